//! Per-client-address limits with real sockets: one address holding
//! connections open (a slowloris) or opening them in a burst is turned away
//! at accept, in its protocol's words where the server speaks first, while
//! every other address is served. Clients other than 127.0.0.1 bind their
//! sockets to other loopback addresses (127.0.0.2, …); each test uses its
//! own, so the log lines they look for are their own. The default
//! `exempt` covers 127.0.0.0/8: these configs say `exempt: []`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    client_config, connect_from, log_line, log_lines, read_until, sample, scrape, tls_over,
    Backend, Proxy,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SNI: Option<&str> = Some("mail.example.test");

/// A proxy with `listeners` (YAML lines), all but `http` ones routed to
/// one echo backend (port 80 then redirects), an admin endpoint, handshakes that may take long (held connections stay
/// open for the whole test) and `extra` top-level YAML.
async fn proxy(listeners: &str, extra: &str) -> (Proxy, Backend, String) {
    let backend = Backend::start("* OK echo\r\n", true).await;
    let admin = format!("127.0.0.1:{}", common::free_port());
    let names: Vec<&str> = listeners
        .lines()
        .filter_map(|l| Some(l.trim().split_once(':')?.0))
        .filter(|n| !n.is_empty() && !n.starts_with("http"))
        .collect();
    let backends: Vec<String> = names
        .iter()
        .map(|n| format!("{n}: \"{}\"", backend.addr))
        .collect();
    let yaml = format!(
        r#"
state_dir: state
admin: {{ bind: "{admin}" }}
timeouts: {{ handshake: 120s, dialogue: 120s }}
listeners:
{listeners}
backends: {{ {backends} }}
hosts: [ {{ names: [mail.example.test], certificate: self-signed }} ]
{extra}
"#,
        backends = backends.join(", ")
    );
    (Proxy::start(&yaml).await, backend, admin)
}

/// Whether the proxy closed `s` (EOF or reset) within 10 s.
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Everything the proxy sends until it closes (at most 10 s).
async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A TLS session over `tcp`, the backend's greeting, one line echoed.
async fn echo(tcp: TcpStream) -> std::io::Result<()> {
    let mut tls = tls_over(tcp, SNI, client_config(&[])).await?;
    assert_eq!(read_until(&mut tls, b"\r\n").await, b"* OK echo\r\n");
    tls.write_all(b"a1 NOOP\r\n").await?;
    assert_eq!(read_until(&mut tls, b"a1 NOOP\r\n").await, b"a1 NOOP\r\n");
    Ok(())
}

fn refused_series(listener: &str, reason: &str) -> String {
    format!("portcullis_connections_refused_total{{listener=\"{listener}\",reason=\"{reason}\"}}")
}

/// The starvation attack: with `max_connections: 30`, an address that
/// opens 40 connections and never says a word would, without a per-address
/// cap, hold every slot and leave the next client in the accept queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holding_connections_cannot_starve_the_others() {
    let (p, _backend, admin) = proxy(
        r#"  imaps: { bind: "127.0.0.1:0", protocol: imap, tls: implicit }"#,
        "max_connections: 30\nlimits: { connections_per_ip: 20, exempt: [] }",
    )
    .await;
    let addr = p.addr("imaps");
    let mut attacker = Vec::new();
    for _ in 0..40 {
        attacker.push(connect_from("127.0.0.2", addr).await.expect("connect"));
    }
    // the 21st to 40th are closed at once, before any TLS
    for (i, s) in attacker.iter_mut().enumerate().skip(20) {
        assert!(closed(s).await, "connection {} was not refused", i + 1);
    }
    attacker.truncate(20);

    // another address is served as usual: handshake, backend, echo
    let victim = connect_from("127.0.0.3", addr).await.unwrap();
    echo(victim).await.expect("the victim's session");

    // the held connections are untouched: none closed, each still served
    for (i, s) in attacker.iter().enumerate() {
        let mut b = [0u8; 1];
        let still_open =
            matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        assert!(still_open, "held connection {} was closed", i + 1);
    }
    let held = attacker.remove(0);
    echo(held)
        .await
        .expect("a held connection still gets its session");

    let text = scrape(&admin).await;
    let refused = refused_series("imaps", "per_ip_connections");
    assert_eq!(sample(&text, &refused), Some("20"), "{text}");
    assert_eq!(
        sample(&text, &refused_series("imaps", "per_ip_rate")),
        Some("0")
    );
    // one warning for twenty refusals; the rest at debug
    let needles = [
        "connections refused: per-address limit",
        "listener=imaps",
        "client.addr=127.0.0.2",
    ];
    let warn = log_line(&needles).await;
    for want in [
        "WARN",
        "reason=\"per_ip_connections\"",
        "limit=\"connections_per_ip=20\"",
        "refused=1",
    ] {
        assert!(warn.contains(want), "{want} not in {warn}");
    }
    assert_eq!(log_lines(&needles).len(), 1, "{:#?}", log_lines(&needles));
    let quiet = log_lines(&[
        "DEBUG",
        "connection refused: per-address limit",
        "client.addr=127.0.0.2",
    ]);
    assert_eq!(quiet.len(), 19, "{quiet:#?}");
    assert!(log_lines(&["client.addr=127.0.0.3", "refused"]).is_empty());
}

/// Listeners where the server speaks first turn a client away in their
/// protocol's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_listeners_refuse_in_their_protocols_words() {
    let (p, _backend, _admin) = proxy(
        r#"  smtp:  { bind: "127.0.0.1:0", protocol: smtp, tls: starttls }
  imap:  { bind: "127.0.0.1:0", protocol: imap, tls: starttls }
  pop3:  { bind: "127.0.0.1:0", protocol: pop3, tls: starttls }
  sieve: { bind: "127.0.0.1:0", protocol: sieve, tls: starttls }"#,
        "limits: { connections_per_ip: 1, exempt: [] }",
    )
    .await;
    let phrase = "Too many connections from your address, try again later";
    let cases = [
        (
            "smtp",
            "220 mail.example.test ESMTP\r\n".to_string(),
            format!("421 4.7.0 mail.example.test {phrase}\r\n"),
        ),
        (
            "imap",
            "* OK [CAPABILITY".to_string(),
            format!("* BYE [UNAVAILABLE] {phrase}\r\n"),
        ),
        (
            "pop3",
            "+OK".to_string(),
            format!("-ERR [SYS/TEMP] {phrase}\r\n"),
        ),
        (
            "sieve",
            "\"IMPLEMENTATION\" \"portcullis\"".to_string(),
            format!("BYE (TRYLATER) \"{phrase}\"\r\n"),
        ),
    ];
    let mut held = Vec::new();
    for (listener, greeting, refusal) in &cases {
        let addr = p.addr(listener);
        let mut first = connect_from("127.0.0.4", addr).await.unwrap();
        let got = String::from_utf8_lossy(&read_until(&mut first, b"\r\n").await).into_owned();
        assert!(got.starts_with(greeting.as_str()), "{listener}: {got:?}");
        let mut second = connect_from("127.0.0.4", addr).await.unwrap();
        assert_eq!(&read_all(&mut second).await, refusal, "{listener}");
        // someone else still gets the greeting
        let mut other = connect_from("127.0.0.5", addr).await.unwrap();
        let got = String::from_utf8_lossy(&read_until(&mut other, b"\r\n").await).into_owned();
        assert!(got.starts_with(greeting.as_str()), "{listener}: {got:?}");
        held.push(first);
    }
    // a real SMTP client sees the refusal as a failed connect with the reply
    if !common::tool(
        "python3",
        "starttls_listeners_refuse_in_their_protocols_words",
    ) {
        return;
    }
    let script = format!(
        r#"
import smtplib
try:
    smtplib.SMTP("127.0.0.1", {port}, source_address=("127.0.0.4", 0), timeout=10)
    print("connected")
except smtplib.SMTPConnectError as e:
    print(e.smtp_code, e.smtp_error.decode())
"#,
        port = p.addr("smtp").port()
    );
    let (ok, out, err) =
        common::run_cmd("python3", &["-c", &script], b"", Duration::from_secs(20)).await;
    assert!(ok, "{out}\n{err}");
    assert_eq!(out.trim(), format!("421 4.7.0 mail.example.test {phrase}"));
    // the held sessions go on: each still answers
    let mut smtp = held.remove(0);
    smtp.write_all(b"EHLO client.test\r\n").await.unwrap();
    assert!(String::from_utf8_lossy(&read_until(&mut smtp, b"250 ").await).contains("STARTTLS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_one_address_is_refused_by_rate_while_another_is_served() {
    let limits = "limits: { handshakes_per_ip: 1, handshake_burst: 3, exempt: [] }";
    let (p, _backend, admin) = proxy(
        &format!(
            r#"  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit, {limits} }}
  smtp: {{ bind: "127.0.0.1:0", protocol: smtp, tls: starttls, limits: {{ handshakes_per_ip: 1, handshake_burst: 1, exempt: [] }} }}
  pop3s: {{ bind: "127.0.0.1:0", protocol: pop3, tls: implicit, limits: {{ handshakes_per_ip: 1, handshake_burst: 1, exempt: [127.0.0.12/32] }} }}"#
        ),
        "",
    )
    .await;
    let addr = p.addr("imaps");
    // ten connections at once from one address; then a handshake on each
    let mut burst = Vec::new();
    for _ in 0..10 {
        burst.push(connect_from("127.0.0.6", addr).await.unwrap());
    }
    let mut served = Vec::new();
    for s in burst {
        served.push(tls_over(s, SNI, client_config(&[])).await.is_ok());
    }
    assert_eq!(served[..3], [true, true, true], "the burst: {served:?}");
    let ok = served.iter().filter(|s| **s).count();
    let refused = 10 - ok;
    // One token a second refills the bucket: however slowly the ten were
    // accepted on a busy machine, most of them come too fast.
    assert!(refused >= 5, "{served:?}");
    // another address has its own bucket
    let other = connect_from("127.0.0.7", addr).await.unwrap();
    echo(other).await.expect("another address is served");

    let text = scrape(&admin).await;
    assert_eq!(
        sample(&text, &refused_series("imaps", "per_ip_rate")),
        Some(refused.to_string().as_str()),
        "{text}"
    );
    let warn = log_line(&[
        "WARN",
        "connections refused: per-address limit",
        "client.addr=127.0.0.6",
    ])
    .await;
    assert!(
        warn.contains("reason=\"per_ip_rate\"")
            && warn.contains("limit=\"handshakes_per_ip=1 handshake_burst=3\""),
        "{warn}"
    );

    // an exempt address is never limited; its neighbour is
    for i in 0..5 {
        let s = connect_from("127.0.0.12", p.addr("pop3s")).await.unwrap();
        echo(s)
            .await
            .unwrap_or_else(|e| panic!("exempt session {i}: {e}"));
    }
    let mut neighbour = Vec::new();
    for _ in 0..2 {
        neighbour.push(connect_from("127.0.0.13", p.addr("pop3s")).await.unwrap());
    }
    assert!(closed(&mut neighbour[1]).await, "127.0.0.13 is limited");
    assert!(log_lines(&["client.addr=127.0.0.12", "refused"]).is_empty());

    // on a STARTTLS port the client hears it, with "per second"
    let smtp = p.addr("smtp");
    let mut first = connect_from("127.0.0.6", smtp).await.unwrap();
    let mut second = connect_from("127.0.0.6", smtp).await.unwrap();
    assert_eq!(
        read_until(&mut first, b"\r\n").await,
        b"220 mail.example.test ESMTP\r\n"
    );
    assert_eq!(
        read_all(&mut second).await,
        "421 4.7.0 mail.example.test Too many connections per second from your address, try again later\r\n"
    );
}

/// `limits` YAML for the reload test's one listener.
fn reload_yaml(backend: SocketAddr, cap: u32) -> String {
    format!(
        r#"
state_dir: state
timeouts: {{ handshake: 120s }}
listeners:
  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit, limits: {{ connections_per_ip: {cap}, exempt: [] }} }}
backends: {{ imaps: "{backend}" }}
hosts: [ {{ names: [mail.example.test], certificate: self-signed }} ]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_limits_for_new_connections_and_keeps_the_counts() {
    let backend = Backend::start("* OK echo\r\n", true).await;
    let p = Proxy::start_file(common::scratch(), &reload_yaml(backend.addr, 5)).await;
    let addr = p.addr("imaps");
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect_from("127.0.0.8", addr).await.unwrap());
    }
    let mut sixth = connect_from("127.0.0.8", addr).await.unwrap();
    assert!(closed(&mut sixth).await, "the cap of 5 holds");

    // a lower cap: the five still open count against it
    p.write_config(&reload_yaml(backend.addr, 3));
    let changes = p.reload().await.expect("reload");
    assert_eq!(changes.listeners_changed, ["imaps"], "{changes}");
    let mut s = connect_from("127.0.0.8", addr).await.unwrap();
    assert!(closed(&mut s).await, "5 open, cap 3: refused");
    // three leave: two open, room for one more, not two
    held.truncate(2);
    let mut admitted = None;
    for _ in 0..100 {
        let s = connect_from("127.0.0.8", addr).await.unwrap();
        match tls_over(s, SNI, client_config(&[])).await {
            Ok(tls) => {
                admitted = Some(tls);
                break;
            }
            // the proxy has not seen all three closes yet
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let _third = admitted.expect("a place freed by the three that left");
    let mut s = connect_from("127.0.0.8", addr).await.unwrap();
    assert!(closed(&mut s).await, "3 open, cap 3: refused");

    // a higher cap lets more in at once
    p.write_config(&reload_yaml(backend.addr, 10));
    p.reload().await.expect("reload");
    for _ in 0..7 {
        held.push(connect_from("127.0.0.8", addr).await.unwrap());
    }
    let mut s = connect_from("127.0.0.8", addr).await.unwrap();
    assert!(closed(&mut s).await, "10 open, cap 10: refused");
    let last = held.pop().unwrap();
    echo(last).await.expect("the tenth is served");
}

/// Port 80: `429 Too Many Requests` with `Retry-After`, seen by curl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_80_answers_429_with_retry_after() {
    if !common::tool("curl", "port_80_answers_429_with_retry_after") {
        return;
    }
    let (p, _backend, admin) = proxy(
        r#"  http:  { bind: "127.0.0.1:0", protocol: http, limits: { connections_per_ip: 1 } }
  http2: { bind: "127.0.0.1:0", protocol: http, limits: { handshakes_per_ip: 1, handshake_burst: 1 } }"#,
        "limits: { exempt: [] }",
    )
    .await;
    let curl = |from: &'static str, addr: SocketAddr| async move {
        let url = format!("http://{addr}/mail/");
        let (ok, out, err) = common::run_cmd(
            "curl",
            &[
                "-sS",
                "-i",
                "--noproxy",
                "*",
                "--max-time",
                "10",
                "--interface",
                from,
                "-H",
                "Host: mail.example.test",
                &url,
            ],
            b"",
            Duration::from_secs(20),
        )
        .await;
        assert!(ok, "curl from {from}: {err}");
        out
    };
    // one connection held open (no request yet): the next one is refused
    let _held = connect_from("127.0.0.9", p.addr("http")).await.unwrap();
    let out = curl("127.0.0.9", p.addr("http")).await;
    assert!(
        out.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
        "{out}"
    );
    for want in [
        "Retry-After: 60\r\n",
        "Connection: close\r\n",
        "\r\n\r\nToo many connections from your address, try again later\n",
    ] {
        assert!(out.contains(want), "{want:?} not in {out}");
    }
    // others are redirected as ever
    let out = curl("127.0.0.10", p.addr("http")).await;
    assert!(out.starts_with("HTTP/1.1 301 "), "{out}");
    // the rate limit says "per second" and asks for a second's wait
    let first = curl("127.0.0.11", p.addr("http2")).await;
    assert!(first.starts_with("HTTP/1.1 301 "), "{first}");
    let second = curl("127.0.0.11", p.addr("http2")).await;
    assert!(
        second.starts_with("HTTP/1.1 429 ")
            && second.contains("Retry-After: 1\r\n")
            && second.contains("Too many connections per second from your address"),
        "{second}"
    );
    let text = scrape(&admin).await;
    assert_eq!(
        sample(&text, &refused_series("http", "per_ip_connections")),
        Some("1"),
        "{text}"
    );
    assert_eq!(
        sample(&text, &refused_series("http2", "per_ip_rate")),
        Some("1")
    );
}
