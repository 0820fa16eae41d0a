//! portcullis: a TLS-terminating front proxy for mail and web servers.
//!
//! The library holds everything; `main.rs` only parses the command line.
//! [`server::Server`] binds the listeners of a [`config::Config`] and runs them
//! until a shutdown future resolves, so tests start it on `127.0.0.1:0`.
//!
//! Layers, low to high, each importing only those below it: [`protocol`] and
//! [`metrics`], [`config`], [`tls`], [`discovery`], [`cluster`], [`acme`], [`proxy`], [`ops`], [`server`]
//! (README "Layout"; `tests/layout.rs` keeps it so).

pub mod metrics;
pub mod protocol;

pub mod config;

pub mod tls;

pub mod discovery;

pub mod cluster;
pub mod dns;

pub mod acme;

pub mod proxy;

pub mod ops;

pub mod server;
