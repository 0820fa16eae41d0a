//! The certificate resolver of each listener's TLS config. It is bound to
//! one snapshot of the [`HostTable`], the same one the listener routes with,
//! so a connection's certificate and its backend always come from one
//! configuration. A reload builds new listener contexts with new resolvers;
//! a renewal swaps the certificate inside the host's slot.

use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::tls::hosts::HostTable;

#[derive(Debug)]
pub struct CertResolver {
    table: Arc<HostTable>,
}

impl CertResolver {
    pub fn new(table: Arc<HostTable>) -> CertResolver {
        CertResolver { table }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // None makes rustls abort the handshake with a fatal alert.
        let (host, _) = self.table.lookup(hello.server_name());
        host.map(|h| h.key_for(hello.signature_schemes()))
    }
}
