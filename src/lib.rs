//! portcullis: a TLS-terminating front proxy for mail and web servers.
//!
//! The library holds everything; `main.rs` only parses the command line.
//! [`server::Server`] binds the listeners of a [`config::Config`] and runs them
//! until a shutdown future resolves, so tests start it on `127.0.0.1:0`.

pub mod acme;
pub mod config;
pub mod http;
pub mod limiter;
pub mod listener;
pub mod metrics;
pub mod ops;
pub mod protocol;
pub mod proxy_header;
pub mod read_ahead;
pub mod relay;
pub mod server;
pub mod starttls;
pub mod tls;
