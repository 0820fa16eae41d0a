//! The load generator's TLS client: rustls with aws-lc-rs, TLS 1.3 only,
//! X25519 and TLS_AES_256_GCM_SHA384 only (what OpenSSL 3.0 negotiates with
//! HAProxy and nginx by default, so all three proxies do the same crypto).
//!
//! The server certificate is pinned per SNI name: every handshake checks
//! that the proxy picked the right certificate. The CertificateVerify
//! signature is checked by the readiness probe (`verify_signatures`) and
//! skipped under load, where it would only spend generator CPU (~50 µs per
//! handshake) on a fact the probe already established.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::certs::Cert;

/// Deadline for one connect + handshake + first exchange.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Pinned {
    certs: Arc<HashMap<String, Vec<u8>>>,
    verify_signatures: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ServerName::DnsName(name) = server_name else {
            return Err(rustls::Error::General("SNI must be a DNS name".into()));
        };
        match self.certs.get(name.as_ref()) {
            Some(der) if der.as_slice() == end_entity.as_ref() => {
                Ok(ServerCertVerified::assertion())
            }
            _ => Err(rustls::Error::General(format!(
                "the proxy sent the wrong certificate for {}",
                name.as_ref()
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if self.verify_signatures {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        } else {
            Ok(HandshakeSignatureValid::assertion())
        }
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The names a client may ask for and the certificate each must get.
#[derive(Clone)]
pub struct Names {
    pub names: Arc<Vec<ServerName<'static>>>,
    pins: Arc<HashMap<String, Vec<u8>>>,
}

impl Names {
    pub fn new(certs: &[Cert]) -> Names {
        let names = certs
            .iter()
            .map(|c| ServerName::try_from(c.name.clone()).expect("generated names are valid"))
            .collect();
        let pins = certs
            .iter()
            .map(|c| (c.name.clone(), c.der.clone()))
            .collect();
        Names {
            names: Arc::new(names),
            pins: Arc::new(pins),
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }
}

/// A client config. `resume`: keep session tickets and offer them.
pub fn config(names: &Names, resume: bool, verify_signatures: bool) -> Arc<ClientConfig> {
    use rustls::crypto::aws_lc_rs as provider;
    let mut p = provider::default_provider();
    p.cipher_suites = vec![provider::cipher_suite::TLS13_AES_256_GCM_SHA384];
    p.kx_groups = vec![provider::kx_group::X25519];
    let algs = p.signature_verification_algorithms;
    let mut config = ClientConfig::builder_with_provider(Arc::new(p))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 with aws-lc-rs")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            certs: names.pins.clone(),
            verify_signatures,
            algs,
        }))
        .with_no_client_auth();
    config.resumption = if resume {
        Resumption::in_memory_sessions(4096)
    } else {
        Resumption::disabled()
    };
    Arc::new(config)
}

/// Connects and completes the handshake.
pub async fn handshake(
    connector: &TlsConnector,
    addr: SocketAddr,
    name: &ServerName<'static>,
) -> io::Result<TlsStream<TcpStream>> {
    let work = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        connector.connect(name.clone(), tcp).await
    };
    tokio::time::timeout(CONNECT_DEADLINE, work)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect/handshake timed out"))?
}

/// Connects, completes the handshake, then sends `E` + `ping` and waits
/// for the echo, which proves the proxy finished its side of the handshake
/// and reached the backend. Returns the stream and whether it resumed.
pub async fn open(
    connector: &TlsConnector,
    addr: SocketAddr,
    name: &ServerName<'static>,
) -> io::Result<(TlsStream<TcpStream>, bool)> {
    let work = async {
        let mut tls = handshake(connector, addr, name).await?;
        let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        tls.write_all(b"Eping").await?;
        tls.flush().await?;
        let mut pong = [0u8; 4];
        tls.read_exact(&mut pong).await?;
        if &pong != b"ping" {
            return Err(io::Error::other("backend echo mismatch"));
        }
        Ok((tls, resumed))
    };
    tokio::time::timeout(CONNECT_DEADLINE, work)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect/handshake timed out"))?
}

/// close_notify and FIN, then wait (briefly) for the proxy to close too, so
/// the proxy takes its normal close path rather than a reset.
pub async fn close(mut tls: TlsStream<TcpStream>) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = tls.shutdown().await;
        let mut buf = [0u8; 256];
        while let Ok(n) = tls.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
