//! Implicit TLS end to end: certificate choice by SNI, routing by host, the
//! PROXY header a backend receives, and what happens on bad input, a dead
//! backend and shutdown. Real sockets on loopback, rustls and openssl clients.

mod common;

use std::time::{Duration, Instant};

use common::{log_line, read_until, served_names, tls_connect, Backend, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Two file-certificate hosts, a wildcard host and a self-signed host, each
/// routed to its own echo backend on the `imaps` listener.
struct World {
    proxy: Proxy,
    a: Backend,
    b: Backend,
    org: Backend,
}

async fn world(extra: &str) -> World {
    let dir = common::scratch();
    let (a_crt, a_key) =
        common::cert_files(dir.path(), "a", &["a.example.test", "imap.example.test"]);
    let (org_crt, org_key) = common::cert_files(dir.path(), "org", &["*.example.org"]);
    let a = Backend::start("* OK backend-a\r\n", true).await;
    let b = Backend::start("* OK backend-b\r\n", true).await;
    let org = Backend::start("* OK backend-org\r\n", true).await;
    let yaml = format!(
        r#"
state_dir: state
listeners:
  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
backends:
  imaps: "{a}"
hosts:
  - names: [a.example.test, imap.example.test]
    certificate: {{ cert: {a_crt}, key: {a_key} }}
  - names: [b.example.test]
    certificate: self-signed
    backends:
      imaps: "{b}"
  - names: ["*.example.org"]
    certificate: {{ cert: {org_crt}, key: {org_key} }}
    backends:
      imaps: {{ address: "{org}", proxy_protocol: v2 }}
default_host: a.example.test
{extra}
"#,
        a = a.addr,
        b = b.addr,
        org = org.addr,
        a_crt = a_crt.display(),
        a_key = a_key.display(),
        org_crt = org_crt.display(),
        org_key = org_key.display(),
    );
    World {
        proxy: Proxy::start_in(dir, &yaml).await,
        a,
        b,
        org,
    }
}

async fn greeting(sni: Option<&str>, w: &World) -> (Vec<String>, String) {
    let mut tls = tls_connect(w.proxy.addr("imaps"), sni)
        .await
        .expect("handshake");
    let names = served_names(&tls);
    let greeting = read_until(&mut tls, b"\r\n").await;
    (names, String::from_utf8_lossy(&greeting).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_certificate_and_backend_of_each_host() {
    let w = world("").await;
    let cases: [(Option<&str>, &[&str], &str); 6] = [
        (
            Some("a.example.test"),
            &["a.example.test", "imap.example.test"],
            "backend-a",
        ),
        (
            Some("IMAP.Example.Test"),
            &["a.example.test", "imap.example.test"],
            "backend-a",
        ),
        (Some("b.example.test"), &["b.example.test"], "backend-b"),
        (Some("mx.example.org"), &["*.example.org"], "backend-org"),
        // no SNI: default_host
        (None, &["a.example.test", "imap.example.test"], "backend-a"),
        // unknown SNI under the default policy: default_host too
        (
            Some("nobody.example.net"),
            &["a.example.test", "imap.example.test"],
            "backend-a",
        ),
    ];
    for (sni, names, backend) in cases {
        let (served, greet) = greeting(sni, &w).await;
        assert_eq!(served, names, "certificate for SNI {sni:?}");
        assert!(
            greet.contains(backend),
            "SNI {sni:?} reached {greet:?}, not {backend}"
        );
    }
    // a wildcard covers exactly one label
    let (served, _) = greeting(Some("a.b.example.org"), &w).await;
    assert_eq!(served, ["a.example.test", "imap.example.test"]);
    assert_eq!(
        (w.a.connections(), w.b.connections(), w.org.connections()),
        (5, 1, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sni_can_be_rejected_with_an_alert() {
    let w = world("unknown_sni: reject").await;
    let err = tls_connect(w.proxy.addr("imaps"), Some("nobody.example.net"))
        .await
        .expect_err("handshake must fail");
    assert!(
        format!("{err:?}").contains("UnrecognisedName"),
        "expected an unrecognized_name alert, got {err:?}"
    );
    log_line(&["outcome=unknown_sni", "nobody.example.net"]).await;
    // known names and clients without SNI are still served
    assert_eq!(
        greeting(Some("b.example.test"), &w).await.0,
        ["b.example.test"]
    );
    assert_eq!(
        greeting(None, &w).await.0,
        ["a.example.test", "imap.example.test"]
    );
    assert_eq!(
        w.a.connections() + w.b.connections() + w.org.connections(),
        2
    );
}

/// The subject and SANs openssl saw, and the protocol it negotiated.
async fn openssl_view(addr: std::net::SocketAddr, sni: Option<&str>) -> String {
    let connect = addr.to_string();
    let mut args = vec!["s_client", "-connect", &connect, "-showcerts"];
    match sni {
        Some(name) => args.extend(["-servername", name]),
        None => args.push("-noservername"),
    }
    let (_, out, err) = common::run_cmd("openssl", &args, b"", Duration::from_secs(20)).await;
    format!("{out}\n{err}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_sees_the_right_certificate() {
    if !common::tool("openssl", "openssl_s_client_sees_the_right_certificate") {
        return;
    }
    let w = world("").await;
    let addr = w.proxy.addr("imaps");
    let cases = [
        (Some("b.example.test"), "CN = b.example.test"),
        (Some("mx.example.org"), "CN = *.example.org"),
        (Some("imap.example.test"), "CN = a.example.test"),
        (None, "CN = a.example.test"),
    ];
    for (sni, subject) in cases {
        let view = openssl_view(addr, sni).await;
        assert!(
            view.contains(subject),
            "SNI {sni:?}: want {subject:?} in\n{view}"
        );
        assert!(
            view.contains("TLSv1.3"),
            "SNI {sni:?}: not TLS 1.3:\n{view}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_gets_proxy_v2_with_client_address_and_tls_facts() {
    let mut w = world("").await;
    let mut tls = tls_connect(w.proxy.addr("imaps"), Some("mx.example.org"))
        .await
        .unwrap();
    let client_addr = tls.get_ref().0.local_addr().unwrap();
    read_until(&mut tls, b"\r\n").await;
    let h = w.org.next_header().await;
    assert_eq!(h.version, 2);
    assert_eq!(h.source, Some(client_addr), "the real client address");
    assert_eq!(h.destination, Some(w.proxy.addr("imaps")));
    assert_eq!(
        h.tlv(0x02),
        Some(&b"mx.example.org"[..]),
        "authority TLV = SNI"
    );
    assert_eq!(
        h.tlv(0x01),
        None,
        "no ALPN TLV (Dovecot 2.4 drops sessions on it)"
    );
    let common::SslTlv {
        client,
        verify,
        subs,
    } = h.ssl().expect("SSL TLV");
    assert_eq!(client & 0x01, 0x01, "PP2_CLIENT_SSL");
    assert_eq!(verify, 0);
    assert_eq!(subs[0], (0x21, "TLSv1.3".to_string()));
    assert_eq!(subs[1].0, 0x23);
    assert!(
        subs[1].1.starts_with("TLS_AES_"),
        "IANA cipher name: {:?}",
        subs[1].1
    );

    // an unknown name served by default_host is not passed on as the authority
    let mut tls = tls_connect(w.proxy.addr("imaps"), Some("nobody.example.net"))
        .await
        .unwrap();
    read_until(&mut tls, b"\r\n").await;
    let h = w.a.next_header().await;
    assert_eq!(h.tlv(0x02), None, "only configured names reach the backend");
    assert!(h.ssl().is_some());

    // and the same over TLS 1.2
    let tls12 = common::client_config_versions(&[&rustls::version::TLS12], &[]);
    let mut tls = common::tls_connect_with(w.proxy.addr("imaps"), Some("b.example.test"), tls12)
        .await
        .unwrap();
    read_until(&mut tls, b"\r\n").await;
    let subs = w.b.next_header().await.ssl().unwrap().subs;
    assert_eq!(subs[0].1, "TLSv1.2");
    assert!(
        subs[1].1.starts_with("TLS_ECDHE_ECDSA_WITH_"),
        "{:?}",
        subs[1].1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v1_and_no_header_are_available_per_backend() {
    let mut v1 = Backend::start("+OK v1\r\n", true).await;
    let mut none = Backend::start("+OK none\r\n", false).await;
    let yaml = format!(
        r#"
listeners:
  pop3s: {{ bind: "127.0.0.1:0", protocol: pop3, tls: implicit }}
hosts:
  - names: [v1.example.test]
    certificate: self-signed
    backends: {{ pop3s: {{ address: "{}", proxy_protocol: v1 }} }}
  - names: [none.example.test]
    certificate: self-signed
    backends: {{ pop3s: {{ address: "{}", proxy_protocol: none }} }}
"#,
        v1.addr, none.addr
    );
    let proxy = Proxy::start(&yaml).await;
    let mut tls = tls_connect(proxy.addr("pop3s"), Some("v1.example.test"))
        .await
        .unwrap();
    let client_addr = tls.get_ref().0.local_addr().unwrap();
    assert_eq!(read_until(&mut tls, b"\r\n").await, b"+OK v1\r\n");
    let h = v1.next_header().await;
    assert_eq!((h.version, h.source), (1, Some(client_addr)));

    let mut tls = tls_connect(proxy.addr("pop3s"), Some("none.example.test"))
        .await
        .unwrap();
    assert_eq!(read_until(&mut tls, b"\r\n").await, b"+OK none\r\n");
    tls.write_all(b"CAPA\r\n").await.unwrap();
    assert_eq!(
        read_until(&mut tls, b"CAPA\r\n").await,
        b"CAPA\r\n",
        "bytes pass untouched"
    );
    none.next_header().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_is_byte_exact_and_keeps_half_close() {
    let w = world("").await;
    let mut tls = tls_connect(w.proxy.addr("imaps"), Some("b.example.test"))
        .await
        .unwrap();
    assert_eq!(read_until(&mut tls, b"\r\n").await, b"* OK backend-b\r\n");
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (mut r, mut wr) = tokio::io::split(tls);
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&sent).await.unwrap();
        wr.shutdown().await.unwrap(); // half-close: nothing more from the client
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut echoed))
        .await
        .expect("echo within 30 s")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(
        echoed.len(),
        payload.len(),
        "every byte came back after the half-close"
    );
    assert!(echoed == payload, "and in order");
    log_line(&["session closed", "bytes.up=2000000", "bytes.down=2000016"]).await;
}

/// A listener selects the first of its ALPN IDs the client offers; a mail
/// listener refuses a browser's offer (tests/alpaca.rs has the rest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_is_selected_from_the_listeners_own_list() {
    let backend = Backend::start("HTTP/1.1 200 OK\r\n", true).await;
    let yaml = format!(
        r#"
listeners:
  https: {{ bind: "127.0.0.1:0", protocol: tcp, tls: implicit, alpn: [http/1.1] }}
  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
backends: {{ https: "{0}", imaps: "{0}" }}
hosts: [ {{ names: [www.example.test], certificate: self-signed }} ]
"#,
        backend.addr
    );
    let proxy = Proxy::start(&yaml).await;
    let offer = common::client_config(&["h2", "http/1.1"]);
    let tls =
        common::tls_connect_with(proxy.addr("https"), Some("www.example.test"), offer.clone())
            .await
            .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let err = common::tls_connect_with(proxy.addr("imaps"), Some("www.example.test"), offer)
        .await
        .expect_err("a mail listener refuses h2 and http/1.1");
    assert!(
        format!("{err:?}").contains("NoApplicationProtocol"),
        "{err:?}"
    );
    for (offer, selected) in [(&[][..], None), (&["h2", "imap"][..], Some(&b"imap"[..]))] {
        let config = common::client_config(offer);
        let tls = common::tls_connect_with(proxy.addr("imaps"), Some("www.example.test"), config)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), selected, "{offer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_with_tickets() {
    let w = world("").await;
    let config = common::client_config(&[]);
    // One ticket per handshake: each connection leaves the ticket for the
    // next, so a client that reconnects again and again resumes every time.
    let (full, resumed) = (rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed);
    for expect in [full, resumed, resumed, resumed, resumed] {
        let mut tls = common::tls_connect_with(
            w.proxy.addr("imaps"),
            Some("b.example.test"),
            config.clone(),
        )
        .await
        .unwrap();
        // TLS 1.3 tickets arrive after the handshake: read the greeting to take them in.
        read_until(&mut tls, b"\r\n").await;
        assert_eq!(tls.get_ref().1.handshake_kind(), Some(expect));
    }
}

// ----------------------------------------------------------------- bad input

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_truncated_hellos_are_refused_without_harm() {
    let w = world("timeouts: { handshake: 1s }").await;
    let addr = w.proxy.addr("imaps");
    // a session that must survive everything below
    let mut live = tls_connect(addr, Some("b.example.test")).await.unwrap();
    assert_eq!(read_until(&mut live, b"\r\n").await, b"* OK backend-b\r\n");

    // a plaintext IMAP command instead of a ClientHello
    let mut plain = TcpStream::connect(addr).await.unwrap();
    let port = plain.local_addr().unwrap().port().to_string();
    plain.write_all(b"a1 LOGIN alice secret\r\n").await.unwrap();
    let answer = read_until(&mut plain, b"never").await;
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "only a TLS alert, got {answer:?}"
    );
    log_line(&["outcome=handshake_failed", &port]).await;

    // a ClientHello cut short, then silence: the handshake deadline ends it
    let hello = client_hello_bytes().await;
    let mut cut = TcpStream::connect(addr).await.unwrap();
    let port = cut.local_addr().unwrap().port().to_string();
    cut.write_all(&hello[..hello.len() / 2]).await.unwrap();
    let started = Instant::now();
    let answer = read_until(&mut cut, b"never").await;
    assert!(answer.is_empty(), "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed by the 1 s deadline"
    );
    log_line(&["outcome=handshake_timeout", &port]).await;

    // a client that connects and says nothing
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let port = silent.local_addr().unwrap().port().to_string();
    let started = Instant::now();
    assert!(read_until(&mut silent, b"never").await.is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));
    log_line(&["outcome=handshake_timeout", &port]).await;

    // none of that reached a backend, and the live session still relays
    assert_eq!(
        (w.a.connections(), w.b.connections(), w.org.connections()),
        (0, 1, 0)
    );
    live.write_all(b"a2 NOOP\r\n").await.unwrap();
    assert_eq!(read_until(&mut live, b"NOOP\r\n").await, b"a2 NOOP\r\n");
}

/// A real ClientHello, as a rustls client writes it.
async fn client_hello_bytes() -> Vec<u8> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = tokio::spawn(async move { tls_connect(addr, Some("b.example.test")).await });
    let (mut s, _) = listener.accept().await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    buf.truncate(n);
    drop(s);
    let _ = client.await;
    assert_eq!(buf[0], 0x16, "a handshake record");
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_gets_each_protocol_its_goodbye() {
    // a port nothing listens on: bind, note, release
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let yaml = format!(
        r#"
listeners:
  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
  smtps: {{ bind: "127.0.0.1:0", protocol: smtp, tls: implicit }}
  pop3s: {{ bind: "127.0.0.1:0", protocol: pop3, tls: implicit }}
  https: {{ bind: "127.0.0.1:0", protocol: tcp, tls: implicit }}
backends: {{ imaps: "{dead}", smtps: "{dead}", pop3s: "{dead}", https: "{dead}" }}
hosts: [ {{ names: [mail.example.test], certificate: self-signed }} ]
"#
    );
    let proxy = Proxy::start(&yaml).await;
    let cases = [
        ("imaps", "* BYE [UNAVAILABLE] "),
        ("smtps", "421 4.3.0 mail.example.test "),
        ("pop3s", "-ERR [SYS/TEMP] "),
        ("https", ""),
    ];
    for (listener, words) in cases {
        let mut tls = tls_connect(proxy.addr(listener), Some("mail.example.test"))
            .await
            .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut got))
            .await
            .expect("closed promptly")
            .expect("closed cleanly with close_notify");
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with(words), "{listener}: got {got:?}");
        assert!(got.is_empty() || got.ends_with("\r\n"));
    }
    log_line(&[
        "outcome=backend_unavailable",
        &dead.to_string(),
        "Connection refused",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_closes_at_once_closes_the_client() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            drop(s);
        }
    });
    let yaml = format!(
        r#"
listeners: {{ imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }} }}
backends: {{ imaps: "{addr}" }}
hosts: [ {{ names: [mail.example.test], certificate: self-signed }} ]
"#
    );
    let proxy = Proxy::start(&yaml).await;
    let mut tls = tls_connect(proxy.addr("imaps"), Some("mail.example.test"))
        .await
        .unwrap();
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut got))
        .await
        .expect("the client is not left hanging");
    assert!(got.is_empty(), "{got:?} / {r:?}");
    let port = tls.get_ref().0.local_addr().unwrap().port().to_string();
    drop(tls);
    log_line(&["session closed", "bytes.down=0", &port]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_back_the_next_client() {
    let w = world("max_connections: 1").await;
    let addr = w.proxy.addr("imaps");
    let mut first = tls_connect(addr, Some("b.example.test")).await.unwrap();
    read_until(&mut first, b"\r\n").await;
    let second = tokio::spawn(async move { tls_connect(addr, Some("b.example.test")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "the second client must wait for a free slot"
    );
    drop(first);
    let mut second = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("served once the first left")
        .unwrap()
        .unwrap();
    assert_eq!(
        read_until(&mut second, b"\r\n").await,
        b"* OK backend-b\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_drains_within_grace() {
    let w = world("timeouts: { shutdown_grace: 2s }").await;
    let addr = w.proxy.addr("imaps");
    let mut live = tls_connect(addr, Some("b.example.test")).await.unwrap();
    read_until(&mut live, b"\r\n").await;
    let World { proxy, .. } = w;
    let started = Instant::now();
    let stopping = tokio::spawn(proxy.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // the open session keeps relaying during the grace period
    live.write_all(b"a1 NOOP\r\n").await.unwrap();
    assert_eq!(read_until(&mut live, b"NOOP\r\n").await, b"a1 NOOP\r\n");
    // new clients are not accepted any more
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "{took:?}"
    );
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), live.read_to_end(&mut rest)).await;
    log_line(&["grace period over"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_and_dual_stack_listeners_report_the_client_family() {
    let mut backend = Backend::start("* OK v6\r\n", true).await;
    let yaml = format!(
        r#"
listeners:
  imaps: {{ bind: ["127.0.0.1:0", "[::1]:0"], protocol: imap, tls: implicit }}
  dual:  {{ bind: "[::]:0", protocol: imap, tls: implicit }}
backends: {{ imaps: "{0}", dual: "{0}" }}
hosts: [ {{ names: [mail.example.test], certificate: self-signed }} ]
"#,
        backend.addr
    );
    let proxy = Proxy::start(&yaml).await;
    let v6 = proxy.addrs["imaps"][1];
    assert!(v6.is_ipv6());
    let mut tls = tls_connect(v6, Some("mail.example.test")).await.unwrap();
    let me = tls.get_ref().0.local_addr().unwrap();
    read_until(&mut tls, b"\r\n").await;
    let h = backend.next_header().await;
    assert_eq!((h.source, h.destination), (Some(me), Some(v6)));

    // "[::]" alone is dual-stack: an IPv4 client is served and reported as IPv4
    let port = proxy.addr("dual").port();
    let v4: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut tls = tls_connect(v4, Some("mail.example.test")).await.unwrap();
    let me = tls.get_ref().0.local_addr().unwrap();
    read_until(&mut tls, b"\r\n").await;
    let h = backend.next_header().await;
    assert_eq!((h.source, h.destination), (Some(me), Some(v4)));
}

/// A backend that greets, records what it reads and, with `reset_after`,
/// answers LOGOUT and resets the connection (close with linger 0).
async fn recording_backend(
    reset_after: bool,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = s.write_all(b"* OK hi\r\n").await;
                let mut got = Vec::new();
                let mut b = [0u8; 1024];
                loop {
                    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
                        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                        Ok(Ok(n)) => {
                            got.extend_from_slice(&b[..n]);
                            if reset_after && got.ends_with(b"LOGOUT\r\n") {
                                let _ = s.write_all(b"* BYE bye\r\na OK LOGOUT done\r\n").await;
                                // linger 0: close sends a reset
                                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                                break;
                            }
                        }
                    }
                }
                let _ = tx.send(got);
            });
        }
    });
    (addr, rx)
}

fn plain_backend_yaml(backend: std::net::SocketAddr) -> String {
    format!(
        r#"
state_dir: state
listeners:
  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
backends:
  imaps: {{ address: "{backend}", proxy_protocol: none }}
hosts:
  - names: [last.example.test]
    certificate: self-signed
"#
    )
}

/// A session past the greeting that has just sent `a LOGOUT`.
async fn logout(proxy: &Proxy) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tls = tls_connect(proxy.addr("imaps"), Some("last.example.test"))
        .await
        .unwrap();
    read_until(&mut tls, b"\r\n").await;
    tls.write_all(b"a LOGOUT\r\n").await.unwrap();
    tls.flush().await.unwrap();
    tls
}

/// The last bytes before an unclean end are delivered: a client that sends
/// its last command and closes TCP without close_notify (many do), and a
/// backend that answers and then resets. Each of the 20 sessions must get
/// its last words through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_words_before_an_unclean_close_are_delivered() {
    // client side
    let (addr, mut seen) = recording_backend(false).await;
    let proxy = Proxy::start(&plain_backend_yaml(addr)).await;
    for i in 0..20 {
        let tls = logout(&proxy).await;
        let (mut tcp, _) = tls.into_inner();
        let _ = tcp.shutdown().await; // FIN, no close_notify
        drop(tcp);
        let got = tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            got, b"a LOGOUT\r\n",
            "session {i}: the last command was lost"
        );
    }
    proxy.shutdown().await;

    // backend side
    let (addr, mut seen) = recording_backend(true).await;
    let proxy = Proxy::start(&plain_backend_yaml(addr)).await;
    for i in 0..20 {
        let mut tls = logout(&proxy).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await;
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut reply)).await;
        assert!(
            reply.ends_with(b"a OK LOGOUT done\r\n"),
            "session {i}: the backend's last reply was lost: {:?}",
            String::from_utf8_lossy(&reply)
        );
    }
    proxy.shutdown().await;
}
