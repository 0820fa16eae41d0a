//! The server side of a TLS 1.3 handshake in memory, no sockets: what
//! rustls and aws-lc cost portcullis per handshake, and what portcullis's
//! own TLS settings (`tls::hkdf`, one ticket per handshake) save against
//! rustls's stock aws-lc-rs provider with its two tickets.
//!
//! `cargo bench --bench handshake` (about 30 s). The client is rustls with
//! X25519 and TLS_AES_256_GCM_SHA384 only, as in `compare` (the last row:
//! TLS_AES_128_GCM_SHA256, for what that suite would save); only the
//! server's CPU time (this thread's, around each server step) is counted.
//! Variants are interleaved in blocks of 100 handshakes; the median block
//! is reported, so a noisy neighbour moves all of them alike.

use std::sync::Arc;

use rustls::client::Resumption;
use rustls::crypto::aws_lc_rs as stock;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

const BLOCK: usize = 100;
const BLOCKS: usize = 30;

/// This thread's CPU time, µs.
fn cpu_us() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 * 1e6 + t.tv_nsec as f64 / 1e3
}

/// One handshake, then one record each way; the server's CPU µs and
/// whether it resumed.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> (f64, bool) {
    let name = ServerName::try_from("mail.example.test").expect("a valid name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client");
    let mut spent = 0.0;
    let mut s: Option<ServerConnection> = None;
    for _ in 0..4 {
        let mut wire = Vec::new();
        c.write_tls(&mut wire).expect("client writes");
        let at = cpu_us();
        let sc = s.get_or_insert_with(|| ServerConnection::new(server.clone()).expect("server"));
        if !wire.is_empty() {
            sc.read_tls(&mut wire.as_slice()).expect("server reads");
            sc.process_new_packets().expect("server accepts the client");
        }
        let mut back = Vec::new();
        sc.write_tls(&mut back).expect("server writes");
        spent += cpu_us() - at;
        if !back.is_empty() {
            c.read_tls(&mut back.as_slice()).expect("client reads");
            c.process_new_packets().expect("client accepts the server");
        }
    }
    assert!(!c.is_handshaking(), "handshake incomplete");
    (
        spent,
        c.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
    )
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test` builds benches; run only under `cargo bench`
    }
    let cert = rcgen::generate_simple_self_signed(vec!["mail.example.test".into()])
        .expect("a self-signed certificate");
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let ticketer = stock::Ticketer::new().expect("a ticketer");
    let server = |provider: Arc<rustls::crypto::CryptoProvider>, tickets: usize| {
        let mut s = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key.clone_key())
            .expect("the certificate");
        s.ticketer = ticketer.clone();
        s.send_tls13_tickets = tickets;
        Arc::new(s)
    };
    let (aes256, aes128) = (
        stock::cipher_suite::TLS13_AES_256_GCM_SHA384,
        stock::cipher_suite::TLS13_AES_128_GCM_SHA256,
    );
    let variants = [
        (
            "rustls stock aws-lc-rs, 2 tickets",
            server(Arc::new(stock::default_provider()), 2),
            aes256,
        ),
        (
            "+ HMAC keys set up once",
            server(portcullis::tls::hkdf::provider(), 2),
            aes256,
        ),
        (
            "+ one ticket (portcullis)",
            server(portcullis::tls::hkdf::provider(), 1),
            aes256,
        ),
        (
            "portcullis, client offers only TLS_AES_128_GCM_SHA256",
            server(portcullis::tls::hkdf::provider(), 1),
            aes128,
        ),
    ];
    let mut roots = RootCertStore::empty();
    roots.add(der).expect("the root");
    let client = |resume: bool, suite: rustls::SupportedCipherSuite| {
        let mut p = stock::default_provider();
        p.cipher_suites = vec![suite];
        p.kx_groups = vec![stock::kx_group::X25519];
        let mut c = ClientConfig::builder_with_provider(Arc::new(p))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        if !resume {
            c.resumption = Resumption::disabled();
        }
        Arc::new(c)
    };
    println!("| handshake | server | CPU µs, median block (min) | vs stock |");
    println!("|---|---|---|---|");
    for resume in [false, true] {
        let clients: Vec<_> = variants
            .iter()
            .map(|(_, server, suite)| {
                let c = client(resume, *suite);
                let _ = handshake(&c, server); // the first ticket
                c
            })
            .collect();
        let mut blocks = vec![Vec::new(); variants.len()];
        let mut missed = 0;
        for _ in 0..BLOCKS {
            for (i, (_, server, _)) in variants.iter().enumerate() {
                let mut spent = 0.0;
                for _ in 0..BLOCK {
                    let (us, resumed) = handshake(&clients[i], server);
                    spent += us;
                    missed += usize::from(resumed != resume);
                }
                blocks[i].push(spent / BLOCK as f64);
            }
        }
        let kind = if resume { "resumed" } else { "full" };
        let mut base = 0.0;
        for (i, (label, _, _)) in variants.iter().enumerate() {
            let v = &mut blocks[i];
            v.sort_by(f64::total_cmp);
            let median = v[v.len() / 2];
            if i == 0 {
                base = median;
            }
            println!(
                "| {kind} | {label} | {median:.1} ({:.1}) | {:.2} |",
                v[0],
                median / base
            );
        }
        if missed > 0 {
            println!("note: {missed} {kind} handshakes went the other way");
        }
    }
}
