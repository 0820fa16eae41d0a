//! rustls asks this resolver for a certificate during every handshake. It reads
//! the current [`HostTable`] through an `ArcSwap`, so a reload or a renewal is a
//! pointer swap: the next handshake sees the new certificate, open sessions keep
//! the one they were given.

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
