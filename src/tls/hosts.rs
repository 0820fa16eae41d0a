//! The host table: every configured name → its host (certificate and backends).
//! The one lookup rule, used by the certificate resolver and by routing alike:
//! exact name, then one-label wildcard, then `default_host` (no SNI, or unknown
//! SNI under `unknown_sni: default`), else refuse.
//!
//! A table is immutable once built; a reload builds a new one and swaps it.
//! Only a host's certificate changes in place: it sits in a [`CertSlot`] that
//! its one writer (the host's ACME task) swaps on renewal.
//!
//! A host may serve two certificates, one ECDSA and one RSA
//! (`key_types: [ecdsa-p256, rsa-2048]`, or two file pairs): each handshake
//! gets the ECDSA one when the client offers its signature scheme, else the
//! RSA one ([`prefers_first`]), an issued one before a placeholder.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use rustls::{SignatureAlgorithm, SignatureScheme};

use crate::config::names::{HostPattern, Hostname};
use crate::config::{Backend, UnknownSni};
use crate::tls::certs::CertInfo;

/// One `hosts[]` entry, ready to serve.
#[derive(Debug)]
pub struct Host {
    pub names: Vec<HostPattern>,
    pub cert: Arc<CertSlot>,
    /// A second certificate of another key type (the host's second
    /// `key_types` entry, or its second file pair).
    pub alt: Option<Arc<CertSlot>>,
    /// Listener name → backend.
    pub backends: BTreeMap<String, Backend>,
}

/// Where the certificate a host serves came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Files,
    SelfSigned,
    /// Issued over ACME.
    Acme,
    /// `certificate: acme` but nothing issued yet: a self-signed stand-in.
    Placeholder,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Files => "files",
            Source::SelfSigned => "self-signed",
            Source::Acme => "acme",
            Source::Placeholder => "placeholder",
        }
    }
}

/// A certificate as served: the key rustls signs with, and what it says.
#[derive(Debug)]
pub struct Served {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
    pub source: Source,
    /// Worked out once here, so a handshake only compares.
    pub kind: KeyKind,
}

impl Served {
    pub fn new(key: Arc<CertifiedKey>, info: CertInfo, source: Source) -> Served {
        let kind = KeyKind::of(&key);
        Served {
            key,
            info,
            source,
            kind,
        }
    }
}

/// What a certificate's key signs with, as far as choosing between two
/// certificates goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA, with the one scheme of its curve (TLS 1.3 ties the hash to
    /// the curve: a P-384 key is no use to a client offering only P-256).
    Ecdsa(SignatureScheme),
    Rsa,
    Other,
}

/// The ECDSA schemes, one per curve.
const ECDSA_SCHEMES: [SignatureScheme; 3] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ECDSA_NISTP521_SHA512,
];

impl KeyKind {
    pub fn of(key: &CertifiedKey) -> KeyKind {
        match key.key.algorithm() {
            SignatureAlgorithm::ECDSA => ECDSA_SCHEMES
                .into_iter()
                .find(|s| key.key.choose_scheme(&[*s]).is_some())
                .map_or(KeyKind::Other, KeyKind::Ecdsa),
            SignatureAlgorithm::RSA => KeyKind::Rsa,
            _ => KeyKind::Other,
        }
    }

    /// Whether a client offering `offered` can take this key.
    fn fits(self, offered: &[SignatureScheme]) -> bool {
        match self {
            KeyKind::Ecdsa(scheme) => offered.contains(&scheme),
            // A client that names no scheme is an old one: RSA.
            KeyKind::Rsa => {
                offered.is_empty()
                    || offered.iter().any(|s| {
                        matches!(
                            s,
                            SignatureScheme::RSA_PSS_SHA256
                                | SignatureScheme::RSA_PSS_SHA384
                                | SignatureScheme::RSA_PSS_SHA512
                                | SignatureScheme::RSA_PKCS1_SHA256
                                | SignatureScheme::RSA_PKCS1_SHA384
                                | SignatureScheme::RSA_PKCS1_SHA512
                                | SignatureScheme::RSA_PKCS1_SHA1
                        )
                    })
            }
            KeyKind::Other => true,
        }
    }
}

/// Of a host's two certificates, whether a client offering `offered`
/// (its `signature_algorithms`; for TLS 1.2 rustls has already dropped
/// those its cipher suites cannot use) gets `a`: the one it can take, an
/// issued one before a placeholder, ECDSA before RSA; `a` on a tie.
/// Compares only: it runs in every handshake of such a host.
pub fn prefers_first(a: &Served, b: &Served, offered: &[SignatureScheme]) -> bool {
    let rank = |s: &Served| {
        (
            s.kind.fits(offered),
            s.source != Source::Placeholder,
            matches!(s.kind, KeyKind::Ecdsa(_)),
        )
    };
    rank(a) >= rank(b)
}

/// The certificate a host serves now. The next handshake on every listener
/// sees a swap; sessions already open keep the certificate they were given.
#[derive(Debug)]
pub struct CertSlot(ArcSwap<Served>);

impl CertSlot {
    pub fn new(served: Served) -> CertSlot {
        CertSlot(ArcSwap::from_pointee(served))
    }

    pub fn load(&self) -> Arc<Served> {
        self.0.load_full()
    }

    /// For the slot's one writer.
    pub fn store(&self, served: Served) {
        self.0.store(Arc::new(served));
    }

    /// The key rustls needs, without cloning the rest.
    pub fn key(&self) -> Arc<CertifiedKey> {
        self.0.load().key.clone()
    }
}

impl Host {
    /// The key for a client offering `offered`: the one certificate, or
    /// the better of two ([`prefers_first`]).
    pub fn key_for(&self, offered: &[SignatureScheme]) -> Arc<CertifiedKey> {
        let Some(alt) = &self.alt else {
            return self.cert.key();
        };
        let (a, b) = (self.cert.0.load(), alt.0.load());
        if prefers_first(&a, &b, offered) {
            a.key.clone()
        } else {
            b.key.clone()
        }
    }

    /// The name to greet with and log: the first configured name.
    pub fn label(&self) -> String {
        self.names
            .first()
            .map(|n| n.to_string())
            .unwrap_or_default()
    }
}

/// How a client's SNI led to its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matched {
    Exact,
    Wildcard,
    /// The client sent no SNI: `default_host`.
    NoSni,
    /// The SNI matched no host and `unknown_sni: default` served `default_host`.
    UnknownDefault,
    /// The SNI matched no host and `unknown_sni: reject` refuses it.
    Rejected,
}

impl Matched {
    pub fn as_str(self) -> &'static str {
        match self {
            Matched::Exact => "exact",
            Matched::Wildcard => "wildcard",
            Matched::NoSni => "no_sni",
            Matched::UnknownDefault => "unknown_sni",
            Matched::Rejected => "rejected",
        }
    }
}

#[derive(Debug)]
pub struct HostTable {
    exact: Names,
    /// Keyed by the wildcard's base: `*.example.org` → `example.org`.
    wildcard: Names,
    default: Arc<Host>,
    unknown_sni: UnknownSni,
}

#[derive(Debug, thiserror::Error)]
#[error("default_host {0} is not among the names of any host")]
pub struct NoDefaultHost(Hostname);

impl HostTable {
    pub fn new(
        hosts: Vec<Host>,
        default_host: &Hostname,
        unknown_sni: UnknownSni,
    ) -> Result<HostTable, NoDefaultHost> {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for host in hosts {
            let host = Arc::new(host);
            for name in &host.names {
                match name {
                    HostPattern::Exact(n) => exact.insert(n.as_str().to_string(), host.clone()),
                    HostPattern::Wildcard(base) => {
                        wildcard.insert(base.as_str().to_string(), host.clone())
                    }
                };
            }
        }
        let (default, _) = find(&exact, &wildcard, default_host.as_str());
        let default = default.ok_or_else(|| NoDefaultHost(default_host.clone()))?;
        Ok(HostTable {
            exact,
            wildcard,
            default,
            unknown_sni,
        })
    }

    /// The host for a ClientHello's SNI (`None` = the client sent none).
    pub fn lookup(&self, sni: Option<&str>) -> (Option<Arc<Host>>, Matched) {
        let Some(sni) = sni else {
            return (Some(self.default.clone()), Matched::NoSni);
        };
        // rustls already lowercases SNI; this keeps the rule true for any caller.
        let name: Cow<'_, str> = if sni.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(sni.to_ascii_lowercase())
        } else {
            Cow::Borrowed(sni)
        };
        match find(&self.exact, &self.wildcard, name.trim_end_matches('.')) {
            (Some(h), how) => (Some(h), how),
            (None, _) if self.unknown_sni == UnknownSni::Default => {
                (Some(self.default.clone()), Matched::UnknownDefault)
            }
            (None, _) => (None, Matched::Rejected),
        }
    }
}

type Names = HashMap<String, Arc<Host>>;

/// Exact name first, then the wildcard one label up.
fn find(exact: &Names, wildcard: &Names, name: &str) -> (Option<Arc<Host>>, Matched) {
    if let Some(h) = exact.get(name) {
        return (Some(h.clone()), Matched::Exact);
    }
    match crate::config::names::parent(name).and_then(|p| wildcard.get(p)) {
        Some(h) => (Some(h.clone()), Matched::Wildcard),
        None => (None, Matched::Rejected),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::certs;
    use SignatureScheme as S;

    fn served(alg: &'static rcgen::SignatureAlgorithm, source: Source) -> Served {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let names = [HostPattern::parse("mail.example.test").unwrap()];
        let cert = rcgen::CertificateParams::new(vec!["mail.example.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let loaded = certs::load_pem(
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            std::path::Path::new("c"),
            std::path::Path::new("k"),
            &names,
            &provider,
        )
        .unwrap();
        Served::new(loaded.key, loaded.info, source)
    }

    #[test]
    fn the_ecdsa_certificate_goes_to_clients_offering_its_scheme_else_rsa() {
        let p256 = served(&rcgen::PKCS_ECDSA_P256_SHA256, Source::Acme);
        let p384 = served(&rcgen::PKCS_ECDSA_P384_SHA384, Source::Acme);
        let rsa = served(&rcgen::PKCS_RSA_SHA256, Source::Acme);
        assert_eq!(p256.kind, KeyKind::Ecdsa(S::ECDSA_NISTP256_SHA256));
        assert_eq!(p384.kind, KeyKind::Ecdsa(S::ECDSA_NISTP384_SHA384));
        assert_eq!(rsa.kind, KeyKind::Rsa);
        assert_eq!(p256.info.key_type, "ecdsa-p256");
        assert_eq!(p384.info.key_type, "ecdsa-p384");
        assert_eq!(rsa.info.key_type, "rsa-2048");
        let browser = [
            S::ECDSA_NISTP256_SHA256,
            S::RSA_PSS_SHA256,
            S::RSA_PKCS1_SHA256,
            S::ECDSA_NISTP384_SHA384,
        ];
        let rsa_pss_only = [S::RSA_PSS_SHA256];
        let tls12_rsa = [S::RSA_PKCS1_SHA256];
        let p256_only = [S::ECDSA_NISTP256_SHA256, S::RSA_PSS_SHA256];
        // Either order in the config: the same pick.
        for (a, b, ecdsa_first) in [(&p256, &rsa, true), (&rsa, &p256, false)] {
            assert_eq!(prefers_first(a, b, &browser), ecdsa_first);
            assert_eq!(prefers_first(a, b, &rsa_pss_only), !ecdsa_first);
            assert_eq!(prefers_first(a, b, &tls12_rsa), !ecdsa_first);
            assert_eq!(
                prefers_first(a, b, &[]),
                !ecdsa_first,
                "nothing offered: RSA"
            );
        }
        // A P-384 key needs its own scheme: a P-256-only client gets RSA.
        assert!(!prefers_first(&p384, &rsa, &p256_only));
        assert!(prefers_first(&p384, &rsa, &browser));
    }

    #[test]
    fn an_issued_certificate_wins_over_a_placeholder() {
        let placeholder = served(&rcgen::PKCS_ECDSA_P256_SHA256, Source::Placeholder);
        let rsa = served(&rcgen::PKCS_RSA_SHA256, Source::Acme);
        let offered = [S::ECDSA_NISTP256_SHA256, S::RSA_PSS_SHA256];
        assert!(!prefers_first(&placeholder, &rsa, &offered));
        // … unless the client cannot take the issued one.
        assert!(prefers_first(
            &placeholder,
            &rsa,
            &[S::ECDSA_NISTP256_SHA256]
        ));
    }
}
