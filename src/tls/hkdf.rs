//! TLS 1.3's key schedule with every HMAC key set up once.
//!
//! rustls's aws-lc-rs suites derive each secret with aws-lc-rs's HKDF, which
//! keeps an extracted PRK as its salt and input and runs HKDF-Extract again
//! inside every HKDF-Expand, setting the HMAC key up each time: eight SHA-384
//! blocks for one derived secret where two do. A handshake derives about
//! twenty, and SHA-384 was a fifth of the CPU of a resumed handshake.
//!
//! Here rustls's own [`HkdfUsingHmac`] runs over an HMAC whose key (its
//! inner and outer padded blocks) is hashed once, when the key is made, and
//! copied for each use: an expansion costs two blocks. The derivations are
//! RFC 5869's, byte for byte; the tests hold them to aws-lc's.

use std::sync::{Arc, LazyLock};

use aws_lc_rs::hmac as lc;
use rustls::crypto::hmac::{Hmac, Key, Tag};
use rustls::crypto::tls13::HkdfUsingHmac;
use rustls::crypto::CryptoProvider;
use rustls::{CipherSuiteCommon, SupportedCipherSuite, Tls13CipherSuite};

/// An HMAC algorithm whose keys are set up once.
struct KeyedOnce(lc::Algorithm);

static HMAC_SHA256: KeyedOnce = KeyedOnce(lc::HMAC_SHA256);
static HMAC_SHA384: KeyedOnce = KeyedOnce(lc::HMAC_SHA384);
static HKDF_SHA256: HkdfUsingHmac<'static> = HkdfUsingHmac(&HMAC_SHA256);
static HKDF_SHA384: HkdfUsingHmac<'static> = HkdfUsingHmac(&HMAC_SHA384);

impl Hmac for KeyedOnce {
    fn with_key(&self, key: &[u8]) -> Box<dyn Key> {
        Box::new(Keyed(lc::Key::new(self.0, key)))
    }

    fn hash_output_len(&self) -> usize {
        self.0.digest_algorithm().output_len()
    }
}

/// aws-lc-rs hashes the padded key into its context when the key is made;
/// [`lc::Context::with_key`] copies that context.
struct Keyed(lc::Key);

impl Key for Keyed {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> Tag {
        let mut ctx = lc::Context::with_key(&self.0);
        ctx.update(first);
        for part in middle {
            ctx.update(part);
        }
        ctx.update(last);
        Tag::new(ctx.sign().as_ref())
    }

    fn tag_len(&self) -> usize {
        self.0.algorithm().digest_algorithm().output_len()
    }
}

/// aws-lc-rs's TLS 1.3 suites with the HKDF for their hash, made once per
/// process however many configs are built.
static KEYED: LazyLock<Vec<Tls13CipherSuite>> = LazyLock::new(|| {
    rustls::crypto::aws_lc_rs::default_provider()
        .cipher_suites
        .iter()
        .filter_map(|suite| suite.tls13().and_then(keyed))
        .collect()
});

/// `provider` (aws-lc-rs's) with its TLS 1.3 suites deriving keys through
/// [`KeyedOnce`]: the same suites, in the same order, with the same record
/// protection.
fn with_keyed_hkdf(mut provider: CryptoProvider) -> CryptoProvider {
    for suite in &mut provider.cipher_suites {
        let ours = KEYED
            .iter()
            .find(|k| Some(k.common.suite) == suite.tls13().map(|t| t.common.suite));
        if let Some(ours) = ours {
            *suite = SupportedCipherSuite::Tls13(ours);
        }
    }
    provider
}

/// The suite with the HKDF for its hash; `None` for a hash not covered.
fn keyed(suite: &Tls13CipherSuite) -> Option<Tls13CipherSuite> {
    let hkdf = match suite.common.hash_provider.algorithm() {
        rustls::crypto::hash::HashAlgorithm::SHA256 => &HKDF_SHA256,
        rustls::crypto::hash::HashAlgorithm::SHA384 => &HKDF_SHA384,
        _ => return None,
    };
    Some(Tls13CipherSuite {
        common: CipherSuiteCommon {
            suite: suite.common.suite,
            hash_provider: suite.common.hash_provider,
            confidentiality_limit: suite.common.confidentiality_limit,
        },
        hkdf_provider: hkdf,
        aead_alg: suite.aead_alg,
        quic: suite.quic,
    })
}

/// The process's provider: aws-lc-rs, with [`with_keyed_hkdf`].
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(with_keyed_hkdf(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::tls13::{Hkdf, OkmBlock};

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rfc5869_test_case_1() {
        let ikm = hex("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b");
        let salt = hex("000102030405060708090a0b0c");
        let info = hex("f0f1f2f3f4f5f6f7f8f9");
        let mut okm = [0u8; 42];
        HKDF_SHA256
            .extract_from_secret(Some(&salt), &ikm)
            .expand_slice(&[&info], &mut okm)
            .unwrap();
        assert_eq!(
            okm.to_vec(),
            hex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
        );
    }

    /// Every operation rustls asks of an HKDF gives what rustls's own
    /// aws-lc-rs suites give, for both hashes, over varied inputs.
    #[test]
    fn agrees_with_aws_lc_for_every_operation() {
        let theirs = rustls::crypto::aws_lc_rs::default_provider();
        let ours = provider();
        let mut checked = 0;
        for (a, b) in theirs.cipher_suites.iter().zip(ours.cipher_suites.iter()) {
            assert_eq!(a.suite(), b.suite());
            let (SupportedCipherSuite::Tls13(a), SupportedCipherSuite::Tls13(b)) = (a, b) else {
                continue;
            };
            let (x, y): (&dyn Hkdf, &dyn Hkdf) = (a.hkdf_provider, b.hkdf_provider);
            for len in [0usize, 1, 32, 48, 100] {
                let secret: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                let salt: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
                let info: &[&[u8]] = &[b"tls13 ", b"derived", &secret];
                for salt in [None, Some(salt.as_slice())] {
                    let (p, q) = (
                        x.extract_from_secret(salt, &secret),
                        y.extract_from_secret(salt, &secret),
                    );
                    assert_eq!(p.expand_block(info).as_ref(), q.expand_block(info).as_ref());
                    let (mut o1, mut o2) = ([0u8; 300], [0u8; 300]);
                    p.expand_slice(info, &mut o1).unwrap();
                    q.expand_slice(info, &mut o2).unwrap();
                    assert_eq!(o1, o2);
                    let (p, q) = (x.extract_from_zero_ikm(salt), y.extract_from_zero_ikm(salt));
                    assert_eq!(p.expand_block(info).as_ref(), q.expand_block(info).as_ref());
                }
                let okm = OkmBlock::new(&secret[..len.min(48)]);
                let (p, q) = (x.expander_for_okm(&okm), y.expander_for_okm(&okm));
                assert_eq!(p.expand_block(info).as_ref(), q.expand_block(info).as_ref());
                assert_eq!(
                    x.hmac_sign(&okm, &secret).as_ref(),
                    y.hmac_sign(&okm, &secret).as_ref()
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 3 * 5, "three TLS 1.3 suites");
    }

    /// A client on rustls's stock provider completes full and resumed
    /// handshakes with a server on ours, in each TLS 1.3 suite.
    #[test]
    fn stock_clients_handshake_and_resume_with_every_suite() {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
        use rustls::{
            ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
        };

        let cert = rcgen::generate_simple_self_signed(vec!["mail.example.test".into()]).unwrap();
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().unwrap();
        let server = Arc::new(server);
        let mut roots = RootCertStore::empty();
        roots.add(der).unwrap();
        let stock = rustls::crypto::aws_lc_rs::default_provider();
        for suite in stock.cipher_suites.iter().filter(|s| s.tls13().is_some()) {
            let mut p = rustls::crypto::aws_lc_rs::default_provider();
            p.cipher_suites = vec![*suite];
            let client = Arc::new(
                ClientConfig::builder_with_provider(Arc::new(p))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth(),
            );
            for want in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed] {
                let name = ServerName::try_from("mail.example.test").unwrap();
                let mut c = ClientConnection::new(client.clone(), name).unwrap();
                let mut s = ServerConnection::new(server.clone()).unwrap();
                for _ in 0..10 {
                    let mut wire = Vec::new();
                    c.write_tls(&mut wire).unwrap();
                    s.read_tls(&mut wire.as_slice()).unwrap();
                    s.process_new_packets().unwrap();
                    let mut wire = Vec::new();
                    s.write_tls(&mut wire).unwrap();
                    c.read_tls(&mut wire.as_slice()).unwrap();
                    c.process_new_packets().unwrap();
                }
                assert!(!c.is_handshaking() && !s.is_handshaking());
                assert_eq!(c.handshake_kind(), Some(want), "{:?}", suite.suite());
                assert_eq!(
                    s.negotiated_cipher_suite().map(|s| s.suite()),
                    Some(suite.suite())
                );
                // application data both ways under the derived keys
                use std::io::{Read, Write};
                c.writer().write_all(b"a001 NOOP\r\n").unwrap();
                let mut wire = Vec::new();
                c.write_tls(&mut wire).unwrap();
                s.read_tls(&mut wire.as_slice()).unwrap();
                s.process_new_packets().unwrap();
                let mut got = [0u8; 11];
                s.reader().read_exact(&mut got).unwrap();
                assert_eq!(&got, b"a001 NOOP\r\n");
            }
        }
    }
}
