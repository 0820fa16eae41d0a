//! What every connection of a listener reads ([`ListenerCtx`], swapped whole
//! on reload) and the two stages of shutdown ([`Stop`]).

use std::sync::Arc;

use rustls::ServerConfig;
use tokio_util::sync::CancellationToken;

use super::limiter::ClientLimiter;
use super::runtime::{Gate, Runtime};
use crate::acme::challenge::Challenges;
use crate::config::{Listener, Timeouts};
use crate::discovery::Discovery;
use crate::metrics::ListenerMetrics;
use crate::tls::hosts::HostTable;

/// What every connection of one listener needs.
#[derive(Debug)]
pub struct ListenerCtx {
    pub listener: Listener,
    /// Its certificate resolver looks names up in `table`, the very
    /// snapshot connections route with: certificate and route cannot come
    /// from two different configurations.
    pub tls: Arc<ServerConfig>,
    pub table: Arc<HostTable>,
    /// What `domains:` serves over HTTPS; empty but on a web listener.
    pub discovery: Arc<Discovery>,
    /// `tls` with HTTP/1.1 as the only ALPN, for the names `discovery`
    /// answers itself; `None` where it answers none.
    pub web_tls: Option<Arc<ServerConfig>>,
    pub timeouts: Timeouts,
    /// The name STARTTLS greetings and SMTP goodbyes use before SNI is known.
    pub hostname: String,
    /// Open ACME challenges: http-01 tokens, tls-alpn-01 certificates.
    pub challenges: Arc<Challenges>,
    pub metrics: Arc<ListenerMetrics>,
    /// Open connections and handshake buckets per client address: one per
    /// listener name, handed on by reloads so the counts stay right.
    pub limiter: Arc<ClientLimiter>,
    /// The server's live sessions and drain switches, kept across reloads.
    pub runtime: Arc<Runtime>,
    /// This listener's drain switch (`runtime.gate(name)`).
    pub gate: Arc<Gate>,
}

/// Cancellation for the two stages of shutdown.
#[derive(Clone, Debug, Default)]
pub struct Stop {
    /// Stop accepting; abandon connections still before their relay.
    pub accepting: CancellationToken,
    /// The grace period is over: end relays too.
    pub relays: CancellationToken,
}
