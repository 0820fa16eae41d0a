//! portcullis: a TLS-terminating front proxy for mail and web servers.
//!
//! The library holds everything; `main.rs` only parses the command line.
//! [`server::Server`] binds the listeners of a [`config::Config`] and runs them
//! until a shutdown future resolves, so tests start it on `127.0.0.1:0`.

pub mod acme;
pub mod config;
pub mod metrics;
pub mod ops;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod tls;
