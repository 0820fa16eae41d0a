//! Challenge responses while an order is open: http-01 tokens for the port-80
//! listener and tls-alpn-01 certificates for implicit-TLS listeners. Each entry
//! lives as long as the [`Posted`] guard the ACME task holds, so a failed or
//! abandoned order leaves nothing behind.
//!
//! In a cluster, the node that orders posts its answers to the store too
//! (`order::post`), and every node answers from there what it did not post
//! itself: Let's Encrypt may ask any of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tracing::warn;

use crate::cluster::Cluster;

/// The ALPN protocol of tls-alpn-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Every challenge response currently offered.
#[derive(Debug, Default)]
pub struct Challenges {
    /// Token → key authorization.
    http: Mutex<HashMap<String, String>>,
    /// DNS name → self-signed certificate carrying the acmeIdentifier.
    tls_alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// Answers other nodes posted, when this node is one of a cluster.
    shared: Option<Shared>,
}

/// The cluster's answers, and the tls-alpn-01 certificates made for them.
#[derive(Debug)]
struct Shared {
    cluster: Arc<Cluster>,
    provider: Arc<CryptoProvider>,
    /// DNS name → (hex digest, certificate carrying it).
    made: Mutex<HashMap<String, (String, Arc<CertifiedKey>)>>,
}

/// Removes its challenge response when dropped.
#[derive(Debug)]
pub struct Posted {
    challenges: Arc<Challenges>,
    entry: Entry,
}

#[derive(Debug)]
enum Entry {
    Http(String),
    TlsAlpn(String),
    /// A dns-01 record: its own guard removes it.
    Dns(#[allow(dead_code)] Box<super::dns01::Published>),
}

impl Drop for Posted {
    fn drop(&mut self) {
        // A poisoned lock only means another thread panicked mid-insert; the
        // map itself is still a map.
        match &self.entry {
            Entry::Http(token) => {
                let mut map = self
                    .challenges
                    .http
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                map.remove(token);
            }
            Entry::TlsAlpn(name) => {
                let mut map = self
                    .challenges
                    .tls_alpn
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                map.remove(name);
            }
            Entry::Dns(_) => {}
        }
    }
}

impl Challenges {
    /// Answers posted here and, for what is not, those in the cluster store.
    pub fn clustered(cluster: Arc<Cluster>, provider: Arc<CryptoProvider>) -> Challenges {
        Challenges {
            shared: Some(Shared {
                cluster,
                provider,
                made: Mutex::default(),
            }),
            ..Challenges::default()
        }
    }

    /// The key authorization for an http-01 token, posted by this node or,
    /// in a cluster, by the one that orders.
    pub async fn http_answer(&self, token: &str) -> Option<String> {
        if let Some(local) = self.http(token) {
            return Some(local);
        }
        self.shared.as_ref()?.cluster.http01(token).await
    }

    /// The tls-alpn-01 certificate for `name`, posted by this node or, in a
    /// cluster, made here from the digest the ordering node posted.
    pub async fn tls_alpn_answer(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(local) = self.tls_alpn(name) {
            return Some(local);
        }
        let shared = self.shared.as_ref()?;
        let name = name.to_ascii_lowercase();
        let digest = shared.cluster.tls_alpn01(&name).await?;
        let mut made = shared.made.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((d, cert)) = made.get(&name) {
            if *d == digest {
                return Some(cert.clone());
            }
        }
        let Some(bytes) = unhex(&digest) else {
            warn!(name = %name, "the cluster store holds a tls-alpn-01 digest that is not hex; not answering");
            return None;
        };
        match tls_alpn_cert(&name, &bytes, &shared.provider) {
            Ok(cert) => {
                // One per name: an order's digest replaces the last one's.
                made.insert(name, (digest, cert.clone()));
                Some(cert)
            }
            Err(e) => {
                warn!(name = %name, error = %e, "cannot answer the tls-alpn-01 challenge another node posted");
                None
            }
        }
    }

    /// Offers `key_authorization` at `/.well-known/acme-challenge/<token>`.
    pub fn post_http(self: &Arc<Self>, token: &str, key_authorization: &str) -> Posted {
        let mut map = self.http.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert(token.to_string(), key_authorization.to_string());
        Posted {
            challenges: self.clone(),
            entry: Entry::Http(token.to_string()),
        }
    }

    /// Holds a dns-01 record up as long as the returned guard lives.
    pub fn hold_dns(self: &Arc<Self>, published: super::dns01::Published) -> Posted {
        Posted {
            challenges: self.clone(),
            entry: Entry::Dns(Box::new(published)),
        }
    }

    /// The key authorization for an http-01 token: exact match only.
    pub fn http(&self, token: &str) -> Option<String> {
        let map = self.http.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(token).cloned()
    }

    /// Offers `cert` to `acme-tls/1` handshakes for `name`.
    pub fn post_tls_alpn(self: &Arc<Self>, name: &str, cert: Arc<CertifiedKey>) -> Posted {
        let name = name.to_ascii_lowercase();
        let mut map = self.tls_alpn.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert(name.clone(), cert);
        Posted {
            challenges: self.clone(),
            entry: Entry::TlsAlpn(name),
        }
    }

    /// The tls-alpn-01 certificate for a ClientHello's SNI.
    pub fn tls_alpn(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let map = self.tls_alpn.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&name.to_ascii_lowercase()).cloned()
    }
}

/// The tls-alpn-01 response certificate for `name`: self-signed, with the
/// SHA-256 digest of the key authorization in the critical acmeIdentifier
/// extension (RFC 8737 §3).
pub fn tls_alpn_cert(
    name: &str,
    digest: &[u8],
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, ChallengeError> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider.key_provider.load_private_key(private)?;
    let der: CertificateDer<'static> = cert.der().clone();
    Ok(Arc::new(CertifiedKey::new(vec![der], signing)))
}

/// Bytes from lower- or upper-case hex; `None` for anything else.
fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ChallengeError {
    #[error("building the tls-alpn-01 certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("loading the tls-alpn-01 key: {0}")]
    Key(#[from] rustls::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_live_as_long_as_their_guard() {
        let c = Arc::new(Challenges::default());
        let posted = c.post_http("tok-1", "tok-1.thumb");
        assert_eq!(c.http("tok-1").as_deref(), Some("tok-1.thumb"));
        assert_eq!(c.http("tok-"), None, "exact token match only");
        assert_eq!(c.http("tok-1/"), None);
        drop(posted);
        assert_eq!(c.http("tok-1"), None);

        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let cert = tls_alpn_cert("mail.example.test", &[7u8; 32], &provider).unwrap();
        let posted = c.post_tls_alpn("Mail.Example.Test", cert);
        assert!(c.tls_alpn("mail.example.test").is_some());
        assert!(c.tls_alpn("MAIL.example.test").is_some());
        assert!(c.tls_alpn("other.example.test").is_none());
        drop(posted);
        assert!(c.tls_alpn("mail.example.test").is_none());
    }

    #[test]
    fn hex_digests_from_the_cluster_decode_or_are_refused() {
        assert_eq!(unhex("00ff7a"), Some(vec![0, 255, 0x7a]));
        assert_eq!(unhex("00FF"), Some(vec![0, 255]));
        assert_eq!(unhex(""), Some(vec![]));
        assert_eq!(unhex("abc"), None, "odd length");
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("+1"), None, "from_str_radix takes a sign; we do not");
        assert_eq!(unhex("é0"), None, "not on a char boundary");
        let digest = [0x5au8, 0x01, 0xff];
        assert_eq!(
            unhex(&crate::tls::certs::hex(&digest)),
            Some(digest.to_vec())
        );
    }

    #[test]
    fn the_tls_alpn_certificate_carries_the_digest_in_a_critical_extension() {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let digest = [0xabu8; 32];
        let cert = tls_alpn_cert("mail.example.test", &digest, &provider).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&cert.cert[0]).unwrap();
        // id-pe-acmeIdentifier, 1.3.6.1.5.5.7.1.31
        let ext = x509
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        // an OCTET STRING of the 32-byte digest
        assert_eq!(&ext.value[..2], &[0x04, 0x20]);
        assert_eq!(&ext.value[2..], &digest);
    }
}
