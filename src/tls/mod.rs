//! TLS: certificates (`certs`: loaded, generated; `store`: written
//! atomically), the host table with the one lookup rule (`hosts`), the
//! resolver rustls asks (`resolver`), and the server side built here.
//!
//! TLS 1.2 and 1.3 only, aws-lc-rs, session tickets on; one ticketer and one
//! session cache shared by every listener, so resumption survives across them.
//! Reads the typed config; knows nothing of sessions, ACME or the operator.

pub mod certs;
pub mod hkdf;
pub mod hosts;
pub mod resolver;
pub mod store;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::ServerConfig;

use crate::config::Listener;
use resolver::CertResolver;

/// Built once per process; cheap to clone.
#[derive(Clone, Debug)]
pub struct TlsContext {
    pub provider: Arc<CryptoProvider>,
    ticketer: Arc<dyn ProducesTickets>,
    sessions: Arc<dyn StoresServerSessions>,
}

/// Session IDs remembered for TLS 1.2 clients that do not take tickets.
const SESSION_CACHE_SIZE: usize = 4096;

impl TlsContext {
    pub fn new() -> Result<TlsContext, rustls::Error> {
        Ok(TlsContext {
            provider: hkdf::provider(),
            ticketer: rustls::crypto::aws_lc_rs::Ticketer::new()?,
            sessions: ServerSessionMemoryCache::new(SESSION_CACHE_SIZE),
        })
    }

    /// The server config for one listener: its ALPN list, the shared resolver.
    pub fn server_config(
        &self,
        listener: &Listener,
        resolver: Arc<CertResolver>,
    ) -> Result<Arc<ServerConfig>, rustls::Error> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        config.alpn_protocols = listener.alpn.clone();
        config.ticketer = self.ticketer.clone();
        // One TLS 1.3 ticket per handshake (rustls sends two), as OpenSSL
        // does after a resumption and Go always: each connection leaves its
        // client the ticket for the next. A client that asks for more
        // (RFC 9149 ticket_request) gets up to four.
        config.send_tls13_tickets = 1;
        config.max_tls13_tickets = 4;
        config.session_storage = self.sessions.clone();
        Ok(Arc::new(config))
    }
}

/// `TLSv1.3`, as OpenSSL, HAProxy and Dovecot logs spell it.
pub fn version_name(v: rustls::ProtocolVersion) -> &'static str {
    match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
        _ => "unknown",
    }
}

/// IANA name of a suite: rustls says `TLS13_AES_128_GCM_SHA256`, the registry
/// (and every backend log) `TLS_AES_128_GCM_SHA256`.
pub fn cipher_name(suite: rustls::SupportedCipherSuite) -> String {
    let name = suite.suite().as_str().unwrap_or("unknown");
    match name.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => name.to_string(),
    }
}
