//! The certificate resolver of each listener's base TLS config: it reads the
//! current [`HostTable`] through an `ArcSwap`, so a reload or a renewal is a
//! pointer swap. Handshakes through [`crate::listener`] go one step further
//! and pin the certificate of the host they routed to (same table snapshot
//! for both); this resolver is what any other use of the config gets.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::hosts::HostTable;

#[derive(Debug)]
pub struct CertResolver {
    table: Arc<ArcSwap<HostTable>>,
}

impl CertResolver {
    pub fn new(table: Arc<ArcSwap<HostTable>>) -> CertResolver {
        CertResolver { table }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // None makes rustls abort the handshake with a fatal alert.
        let (host, _) = self.table.load().lookup(hello.server_name());
        host.map(|h| h.cert.key())
    }
}
