//! The `protocol: http` listener (port 80) end to end: the redirect to HTTPS
//! (with curl), http-01 lookups for tokens nobody opened, what is refused
//! with a 400, and forwarding a routed host's requests whole, after a PROXY
//! header, to its backend. Real sockets on loopback; Host headers name the
//! hosts, nothing is resolved.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{log_line, run_cmd, Backend, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on any one exchange with the proxy.
const LIMIT: Duration = Duration::from_secs(10);

/// An http listener (handshake timeout 1 s) and five hosts: `webmail` (the
/// default host) forwarded with PROXY v2, `*.apps` with v1, `raw` with no
/// header, `down` to a closed port, and `mail` with no backend on it.
struct World {
    proxy: Proxy,
    web: Backend,
    apps: Backend,
    raw: Backend,
}

async fn world() -> World {
    let web = Backend::start("", true).await;
    let apps = Backend::start("", true).await;
    let raw = Backend::start("", false).await;
    let down = closed_port();
    let yaml = format!(
        r#"
state_dir: state
timeouts: {{ handshake: 1s }}
listeners:
  http: {{ bind: "127.0.0.1:0", protocol: http }}
hosts:
  - names: [webmail.example.test]
    certificate: self-signed
    backends: {{ http: "{web}" }}
  - names: ["*.apps.example.test"]
    certificate: self-signed
    backends: {{ http: {{ address: "{apps}", proxy_protocol: v1 }} }}
  - names: [raw.example.test]
    certificate: self-signed
    backends: {{ http: {{ address: "{raw}", proxy_protocol: none }} }}
  - names: [down.example.test]
    certificate: self-signed
    backends: {{ http: "{down}" }}
  - names: [mail.example.test]
    certificate: self-signed
default_host: webmail.example.test
"#,
        web = web.addr,
        apps = apps.addr,
        raw = raw.addr,
    );
    World {
        proxy: Proxy::start(&yaml).await,
        web,
        apps,
        raw,
    }
}

/// A loopback address nothing listens on.
fn closed_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], common::free_port()))
}

/// One HTTP response as bytes arrived.
struct Reply {
    raw: Vec<u8>,
    /// The client's own address, as the proxy saw it.
    client: SocketAddr,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
    fn status(&self) -> &str {
        let end = self.raw.iter().position(|&b| b == b'\r').unwrap_or(0);
        std::str::from_utf8(&self.raw[..end]).unwrap_or("")
    }
    fn header(&self, name: &str) -> Option<String> {
        let text = self.text();
        let head = text.split("\r\n\r\n").next().unwrap_or("");
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
    fn body(&self) -> &[u8] {
        let at = self
            .raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of head in {:?}", self.text()));
        &self.raw[at + 4..]
    }
}

/// Sends `pieces` (one write each, 50 ms apart), then reads to EOF.
async fn exchange(addr: SocketAddr, pieces: &[&[u8]]) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let client = s.local_addr().unwrap();
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s.write_all(p).await.unwrap();
    }
    let raw = read_to_end(&mut s).await;
    Reply { raw, client }
}

async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    tokio::time::timeout(LIMIT, s.read_to_end(&mut raw))
        .await
        .unwrap_or_else(|_| panic!("no EOF within {LIMIT:?}; got {raw:?}"))
        .unwrap_or_else(|e| panic!("read: {e}; got {:?}", String::from_utf8_lossy(&raw)));
    raw
}

async fn get(addr: SocketAddr, request: &str) -> Reply {
    exchange(addr, &[request.as_bytes()]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_https_with_curl() {
    if !common::tool("curl", "redirects_to_https_with_curl") {
        return;
    }
    let w = world().await;
    let port = w.proxy.addr("http").port();
    let curl = |method: &'static str, host: &'static str, path: &'static str| {
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("http://{host}:{port}{path}");
        async move {
            let mut args = vec!["-sS", "-i", "--noproxy", "*", "--max-time", "10"];
            if method == "HEAD" {
                args.push("-I");
            }
            args.extend(["--resolve", &resolve, &url]);
            let (ok, out, err) = run_cmd("curl", &args, b"", LIMIT + LIMIT).await;
            assert!(ok, "curl {args:?}: {err}");
            out
        }
    };

    // An unknown host, a host with no backend here, and a wildcard's parent
    // (which `*.apps.example.test` does not cover): all redirected.
    for (host, path) in [
        ("www.example.net", "/mail/?a=1&b=%20"),
        ("mail.example.test", "/"),
        ("apps.example.test", "/x"),
    ] {
        let out = curl("GET", host, path).await;
        let want = format!("https://{host}{path}");
        assert!(
            out.starts_with("HTTP/1.1 301 Moved Permanently\r\n"),
            "{out}"
        );
        assert!(out.contains(&format!("\r\nLocation: {want}\r\n")), "{out}");
        assert!(out.contains("\r\nConnection: close\r\n"), "{out}");
        assert!(
            out.ends_with(&format!("\r\n\r\nmoved to {want}\n")),
            "{out}"
        );

        let out = curl("HEAD", host, path).await;
        assert!(
            out.starts_with("HTTP/1.1 301 Moved Permanently\r\n"),
            "{out}"
        );
        assert!(out.contains(&format!("\r\nLocation: {want}\r\n")), "{out}");
    }

    // HEAD: the same head, no body (the connection's end says where it stops).
    let addr = w.proxy.addr("http");
    let r = get(addr, "HEAD /a HTTP/1.1\r\nHost: mail.example.test\r\n\r\n").await;
    assert_eq!(r.status(), "HTTP/1.1 301 Moved Permanently", "{}", r.text());
    assert_eq!(
        r.header("location").as_deref(),
        Some("https://mail.example.test/a")
    );
    assert!(r.body().is_empty(), "HEAD has a body: {:?}", r.text());

    // Case and port of Host do not reach the Location; a head in pieces is
    // read whole.
    let r = exchange(
        addr,
        &[
            b"GET /p?q HTTP/1.1\r\nHo",
            b"st: Mail.Example.TEST:8080\r\n",
            b"\r\n",
        ],
    )
    .await;
    assert_eq!(r.status(), "HTTP/1.1 301 Moved Permanently", "{}", r.text());
    assert_eq!(
        r.header("location").as_deref(),
        Some("https://mail.example.test/p?q")
    );
    assert_eq!(
        (w.web.connections(), w.apps.connections()),
        (0, 0),
        "nothing forwarded: the default host's backend is not a fallback"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn challenge_paths_without_an_open_challenge_are_404() {
    let w = world().await;
    let addr = w.proxy.addr("http");
    for request in [
        "GET /.well-known/acme-challenge/no-such-token-get HTTP/1.1\r\nHost: mail.example.test\r\n\r\n",
        // no Host needed for a challenge lookup
        "GET /.well-known/acme-challenge/no-such-token-nohost HTTP/1.0\r\n\r\n",
        // a forwarded host's challenge path is the proxy's, not its backend's
        "GET /.well-known/acme-challenge/no-such-token-fwd HTTP/1.1\r\nHost: webmail.example.test\r\n\r\n",
        "POST /.well-known/acme-challenge/no-such-token-post HTTP/1.1\r\nHost: mail.example.test\r\nContent-Length: 0\r\n\r\n",
    ] {
        let r = get(addr, request).await;
        assert_eq!(r.status(), "HTTP/1.1 404 Not Found", "{request:?}: {}", r.text());
        assert_eq!(r.header("content-type").as_deref(), Some("text/plain"));
        assert_eq!(r.header("connection").as_deref(), Some("close"));
        assert_eq!(r.body(), b"not found\n");
    }
    let r = get(
        addr,
        "HEAD /.well-known/acme-challenge/no-such-token-head HTTP/1.1\r\nHost: a.test\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), "HTTP/1.1 404 Not Found", "{}", r.text());
    assert!(r.body().is_empty(), "{}", r.text());
    for token in ["get", "nohost", "fwd", "post", "head"] {
        log_line(&[
            "INFO",
            "outcome=acme_challenge",
            "reason=\"no open challenge for",
            &format!("/.well-known/acme-challenge/no-such-token-{token}"),
        ])
        .await;
    }
    assert_eq!(w.web.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_400() {
    let w = world().await;
    let addr = w.proxy.addr("http");
    let no_host = "no Host header with a DNS name";
    let cases: [(&str, &str); 5] = [
        ("GET / HTTP/1.0\r\n\r\n", no_host),
        ("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", no_host),
        ("GET / HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n", no_host),
        ("GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", no_host),
        (
            "GET http://mail.example.test/ HTTP/1.1\r\nHost: mail.example.test\r\n\r\n",
            "the request target is not a path",
        ),
    ];
    for (request, why) in cases {
        let r = get(addr, request).await;
        assert_eq!(
            r.status(),
            "HTTP/1.1 400 Bad Request",
            "{request:?}: {}",
            r.text()
        );
        assert_eq!(r.header("connection").as_deref(), Some("close"));
        assert_eq!(r.body(), format!("{why}\n").as_bytes(), "{request:?}");
        log_line(&[
            "outcome=bad_request",
            why,
            &format!("client.addr={}", r.client),
        ])
        .await;
    }

    // A TLS ClientHello on port 80.
    let mut tls = rustls::ClientConnection::new(
        common::client_config(&[]),
        "mail.example.test".try_into().unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    tls.write_tls(&mut hello).unwrap();
    assert!(hello.len() < 1024 && hello[0] == 0x16, "one small record");
    let r = exchange(addr, &[&hello]).await;
    assert_eq!(r.status(), "HTTP/1.1 400 Bad Request", "{}", r.text());
    assert_eq!(r.body(), b"malformed request\n");
    log_line(&[
        "outcome=bad_request",
        "reason=\"malformed request\"",
        &format!("client.addr={}", r.client),
    ])
    .await;

    // A head that does not end within 8 KiB (exactly 8 KiB sent, so the
    // proxy has read all of it and closes without a reset).
    let mut long = b"GET / HTTP/1.1\r\nHost: mail.example.test\r\nX-Long: ".to_vec();
    long.resize(8 * 1024, b'a');
    let r = exchange(addr, &[&long]).await;
    assert_eq!(r.status(), "HTTP/1.1 400 Bad Request", "{}", r.text());
    assert_eq!(r.body(), b"request head longer than 8 KiB\n");
    log_line(&[
        "outcome=bad_request",
        "reason=\"request head longer than 8 KiB\"",
        &format!("client.addr={}", r.client),
    ])
    .await;

    // Two Host headers: portcullis and the backend could disagree on the host.
    let two = b"GET / HTTP/1.1\r\nHost: mail.example.test\r\nHost: webmail.example.test\r\n\r\n";
    let r = exchange(addr, &[two]).await;
    assert_eq!(r.status(), "HTTP/1.1 400 Bad Request", "{}", r.text());
    assert_eq!(r.body(), b"more than one Host header\n");

    // Just under the limit, with its end, is a request like any other.
    let mut fits = b"GET / HTTP/1.1\r\nHost: mail.example.test\r\nX-Long: ".to_vec();
    fits.resize(8 * 1024 - 4, b'a');
    fits.extend_from_slice(b"\r\n\r\n");
    let r = exchange(addr, &[&fits]).await;
    assert_eq!(r.status(), "HTTP/1.1 301 Moved Permanently", "{}", r.text());

    assert_eq!(w.web.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_closed_after_the_handshake_timeout() {
    let w = world().await;
    let mut s = TcpStream::connect(w.proxy.addr("http")).await.unwrap();
    let client = s.local_addr().unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: mail.exa")
        .await
        .unwrap();
    let started = Instant::now();
    let raw = read_to_end(&mut s).await;
    let took = started.elapsed();
    assert!(raw.is_empty(), "{:?}", String::from_utf8_lossy(&raw));
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(5),
        "closed after {took:?}, handshake timeout 1 s"
    );
    log_line(&["outcome=request_timeout", &format!("client.addr={client}")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_host_is_forwarded_whole_after_a_proxy_v2_header() {
    let mut w = world().await;
    let addr = w.proxy.addr("http");

    // The head alone first, the body 50 ms later: both arrive, byte for byte.
    let head = b"POST /submit?x=1 HTTP/1.1\r\nHost: WebMail.example.test:80\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\n";
    let body = b"hello world";
    let mut s = TcpStream::connect(addr).await.unwrap();
    let client = s.local_addr().unwrap();
    s.write_all(head).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(body).await.unwrap();
    let sent = [&head[..], &body[..]].concat();
    let mut echoed = vec![0u8; sent.len()];
    tokio::time::timeout(LIMIT, s.read_exact(&mut echoed))
        .await
        .expect("echo within 10 s")
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&echoed),
        String::from_utf8_lossy(&sent),
        "the backend got the request as sent"
    );
    let seen = w.web.next_header().await;
    assert_eq!(seen.version, 2);
    assert_eq!(seen.source, Some(client), "the real client address");
    assert_eq!(seen.destination, Some(addr));

    // The client ends its side; the backend ends too; the session is logged.
    s.shutdown().await.unwrap();
    assert!(read_to_end(&mut s).await.is_empty());
    log_line(&[
        "session closed",
        &format!("client.addr={client}"),
        "sni=\"webmail.example.test\"",
        &format!("backend={}", w.web.addr),
        &format!("bytes.down={}", sent.len()),
    ])
    .await;

    // Head and body in one write; a request target that is not a path is the
    // backend's business once the host is forwarded.
    let request = b"PUT http://webmail.example.test/a HTTP/1.1\r\nHost: webmail.example.test\r\nContent-Length: 3\r\n\r\nabc";
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    s.shutdown().await.unwrap();
    let echoed = read_to_end(&mut s).await;
    assert_eq!(
        String::from_utf8_lossy(&echoed),
        String::from_utf8_lossy(request)
    );
    assert_eq!(w.web.next_header().await.version, 2);
    assert_eq!(w.web.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_host_is_forwarded_with_its_own_proxy_version() {
    let mut w = world().await;
    let addr = w.proxy.addr("http");
    let request = "GET /shop HTTP/1.1\r\nHost: shop.apps.example.test\r\n\r\n";
    let mut s = TcpStream::connect(addr).await.unwrap();
    let client = s.local_addr().unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    let echoed = read_to_end(&mut s).await;
    assert_eq!(String::from_utf8_lossy(&echoed), request);
    let seen = w.apps.next_header().await;
    assert_eq!(seen.version, 1, "proxy_protocol: v1 for this backend");
    assert_eq!(seen.source, Some(client));
    assert_eq!(seen.destination, Some(addr));
    log_line(&[
        "session closed",
        &format!("client.addr={client}"),
        "sni=\"shop.apps.example.test\"",
    ])
    .await;

    // Two labels below the wildcard's base are not covered: redirected.
    let r = get(
        addr,
        "GET / HTTP/1.1\r\nHost: a.b.apps.example.test\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), "HTTP/1.1 301 Moved Permanently", "{}", r.text());
    assert_eq!(w.apps.connections(), 1);
    assert_eq!(w.web.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_none_sends_the_request_alone() {
    let mut w = world().await;
    let request = "GET / HTTP/1.1\r\nHost: raw.example.test\r\nUser-Agent: t\r\n\r\n";
    let mut s = TcpStream::connect(w.proxy.addr("http")).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    // The backend echoes all it got: any PROXY header would come back too.
    let echoed = read_to_end(&mut s).await;
    assert_eq!(String::from_utf8_lossy(&echoed), request);
    assert_eq!(w.raw.next_header().await.version, 0, "no header read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_is_a_502() {
    let w = world().await;
    let r = get(
        w.proxy.addr("http"),
        "GET / HTTP/1.1\r\nHost: down.example.test\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), "HTTP/1.1 502 Bad Gateway", "{}", r.text());
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert_eq!(r.body(), b"backend unavailable\n");
    log_line(&[
        "WARN",
        "outcome=backend_unavailable",
        &format!("client.addr={}", r.client),
        "sni=\"down.example.test\"",
    ])
    .await;
}
