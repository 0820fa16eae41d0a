//! STARTTLS listeners end to end against scripted backends: the dialogue up to
//! the upgrade, SNI after it, the backend greeting dropped (or kept for
//! ManageSieve), plaintext SMTP on an MX, and the attacks: pipelined commands,
//! credentials before TLS, endless lines, floods, stalls.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{log_line, read_proxy_header, read_until, served_names, Proxy, SeenHeader};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Per backend connection: the PROXY header, then every byte the proxy sent.
type Sessions = Arc<Mutex<Vec<(SeenHeader, Vec<u8>)>>>;

/// A backend that reads a PROXY header, greets, answers SMTP-ish lines with
/// `250 got <line>`, and records everything.
#[derive(Clone)]
struct Scripted {
    addr: SocketAddr,
    log: Sessions,
}

impl Scripted {
    async fn start(greeting: &'static str) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Sessions = Arc::new(Mutex::new(Vec::new()));
        let sessions = log.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let sessions = sessions.clone();
                tokio::spawn(async move {
                    let Some(header) = read_proxy_header(&mut s).await else {
                        return;
                    };
                    let index = {
                        let mut all = sessions.lock().unwrap();
                        all.push((header, Vec::new()));
                        all.len() - 1
                    };
                    if s.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    let mut pending = Vec::new();
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        sessions.lock().unwrap()[index]
                            .1
                            .extend_from_slice(&buf[..n]);
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                            let line: Vec<u8> = pending.drain(..=i).collect();
                            let text = String::from_utf8_lossy(&line).trim_end().to_string();
                            let reply = if text.to_ascii_uppercase().starts_with("EHLO") {
                                "250-backend.test\r\n250 AUTH PLAIN\r\n".to_string()
                            } else {
                                format!("250 got {text}\r\n")
                            };
                            if s.write_all(reply.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Scripted { addr, log }
    }

    fn sessions(&self) -> Vec<(SeenHeader, Vec<u8>)> {
        self.log.lock().unwrap().clone()
    }
}

/// Portcullis with one STARTTLS listener per protocol, two hosts on different
/// certificates, all routed to one scripted backend.
async fn proxy(backend: &Scripted, extra: &str) -> Proxy {
    let yaml = format!(
        r#"
listeners:
  submission: {{ bind: "127.0.0.1:0", protocol: smtp, tls: starttls }}
  mx:         {{ bind: "127.0.0.1:0", protocol: smtp, tls: starttls, require_tls: false, hostname: mx.example.test }}
  imap:       {{ bind: "127.0.0.1:0", protocol: imap, tls: starttls }}
  pop3:       {{ bind: "127.0.0.1:0", protocol: pop3, tls: starttls }}
  sieve:      {{ bind: "127.0.0.1:0", protocol: sieve, tls: starttls }}
backends: {{ submission: "{b}", mx: "{b}", imap: "{b}", pop3: "{b}", sieve: "{b}" }}
hosts:
  - names: [mail.example.test]
    certificate: self-signed
  - names: [mail.other.test]
    certificate: self-signed
default_host: mail.example.test
{extra}
"#,
        b = backend.addr
    );
    Proxy::start(&yaml).await
}

async fn line(s: &mut TcpStream) -> String {
    String::from_utf8_lossy(&read_until(s, b"\r\n").await).into_owned()
}

/// Sends `cmd` and reads until `until` appears.
async fn say(s: &mut TcpStream, cmd: &str, until: &str) -> String {
    s.write_all(cmd.as_bytes()).await.unwrap();
    String::from_utf8_lossy(&read_until(s, until.as_bytes()).await).into_owned()
}

async fn upgrade(s: TcpStream, sni: &str) -> TlsStream<TcpStream> {
    let name = ServerName::try_from(sni.to_string()).unwrap();
    TlsConnector::from(common::client_config(&[]))
        .connect(name, s)
        .await
        .expect("TLS handshake after STARTTLS")
}

async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submission_upgrades_then_hands_the_session_to_the_backend() {
    let backend = Scripted::start("220-backend.test first\r\n220 backend.test ESMTP\r\n").await;
    let p = proxy(&backend, "").await;
    let mut s = TcpStream::connect(p.addr("submission")).await.unwrap();
    assert_eq!(line(&mut s).await, "220 mail.example.test ESMTP\r\n");
    let ehlo = say(&mut s, "EHLO client.test\r\n", "250 ").await;
    assert!(
        ehlo.contains("250 STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    let auth = say(&mut s, "AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", "\r\n").await;
    assert_eq!(auth, "530 5.7.0 Must issue a STARTTLS command first\r\n");
    let mail = say(&mut s, "MAIL FROM:<alice@example.test>\r\n", "\r\n").await;
    assert!(mail.starts_with("530 5.7.0"), "{mail}");
    assert_eq!(
        say(&mut s, "STARTTLS\r\n", "\r\n").await,
        "220 2.0.0 Ready to start TLS\r\n"
    );
    let mut tls = upgrade(s, "mail.other.test").await;
    assert_eq!(served_names(&tls), ["mail.other.test"]);
    // the backend's own (multi-line) greeting never reaches the client
    tls.write_all(b"EHLO client.test\r\n").await.unwrap();
    let reply = String::from_utf8_lossy(&read_until(&mut tls, b"250 ").await).into_owned();
    assert_eq!(reply, "250-backend.test\r\n250 AUTH PLAIN\r\n");
    let sessions = backend.sessions();
    assert_eq!(sessions.len(), 1);
    let (header, seen) = &sessions[0];
    assert_eq!(header.tlv(0x02), Some(&b"mail.other.test"[..]));
    assert_eq!(
        header.ssl().unwrap().client & 1,
        1,
        "the backend learns the client used TLS"
    );
    assert_eq!(
        seen, b"EHLO client.test\r\n",
        "nothing of the plaintext phase reached it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_pop3_and_sieve_upgrade_with_their_own_words() {
    let backend = Scripted::start("* OK backend greeting\r\n").await;
    let p = proxy(&backend, "").await;

    let mut s = TcpStream::connect(p.addr("imap")).await.unwrap();
    let greeting = line(&mut s).await;
    assert!(
        greeting.starts_with("* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED]"),
        "{greeting}"
    );
    let no = say(&mut s, "a1 LOGIN alice secret\r\n", "\r\n").await;
    assert!(no.starts_with("a1 NO [PRIVACYREQUIRED]"), "{no}");
    assert_eq!(
        say(&mut s, "a2 STARTTLS\r\n", "\r\n").await,
        "a2 OK Begin TLS negotiation now\r\n"
    );
    let mut tls = upgrade(s, "mail.example.test").await;
    tls.write_all(b"a3 CAPABILITY\r\n").await.unwrap();
    let reply = String::from_utf8_lossy(&read_until(&mut tls, b"\r\n").await).into_owned();
    assert_eq!(
        reply, "250 got a3 CAPABILITY\r\n",
        "backend greeting dropped, backend answers"
    );

    let mut s = TcpStream::connect(p.addr("pop3")).await.unwrap();
    assert!(line(&mut s).await.starts_with("+OK "));
    assert!(say(&mut s, "CAPA\r\n", ".\r\n")
        .await
        .contains("\r\nSTLS\r\n"));
    assert!(say(&mut s, "USER alice\r\n", "\r\n")
        .await
        .starts_with("-ERR [AUTH] "));
    assert_eq!(
        say(&mut s, "STLS\r\n", "\r\n").await,
        "+OK Begin TLS negotiation\r\n"
    );
    let mut tls = upgrade(s, "mail.other.test").await;
    assert_eq!(served_names(&tls), ["mail.other.test"]);
    tls.write_all(b"STAT\r\n").await.unwrap();
    assert_eq!(read_until(&mut tls, b"\r\n").await, b"250 got STAT\r\n");

    // ManageSieve: the backend's capabilities are re-sent after TLS (RFC 5804)
    let mut s = TcpStream::connect(p.addr("sieve")).await.unwrap();
    let caps = String::from_utf8_lossy(&read_until(&mut s, b"first\"\r\n").await).into_owned();
    assert!(caps.contains("\"STARTTLS\"\r\n"), "{caps}");
    assert!(say(&mut s, "AUTHENTICATE \"PLAIN\" \"eA==\"\r\n", "\r\n")
        .await
        .starts_with("NO (ENCRYPT-NEEDED)"));
    assert!(say(&mut s, "STARTTLS\r\n", "\r\n").await.starts_with("OK "));
    let mut tls = upgrade(s, "mail.example.test").await;
    assert_eq!(
        read_until(&mut tls, b"\r\n").await,
        b"* OK backend greeting\r\n"
    );
    assert_eq!(backend.sessions().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mx_takes_plaintext_mail_and_replays_the_clients_hello() {
    let backend = Scripted::start("220 backend.test ESMTP\r\n").await;
    let p = proxy(&backend, "").await;
    let mut s = TcpStream::connect(p.addr("mx")).await.unwrap();
    assert_eq!(line(&mut s).await, "220 mx.example.test ESMTP\r\n");
    let client_addr = s.local_addr().unwrap();
    say(&mut s, "EHLO sender.test\r\n", "250 ").await;
    let mail = say(&mut s, "MAIL FROM:<a@sender.test>\r\n", "\r\n").await;
    assert_eq!(
        mail, "250 got MAIL FROM:<a@sender.test>\r\n",
        "answered by the backend"
    );
    let rcpt = say(&mut s, "RCPT TO:<alice@example.test>\r\n", "\r\n").await;
    assert_eq!(rcpt, "250 got RCPT TO:<alice@example.test>\r\n");
    let (header, seen) = backend.sessions().remove(0);
    assert_eq!(header.source, Some(client_addr), "the real sender address");
    assert!(
        header.ssl().is_none(),
        "no SSL TLV: the sender did not use TLS"
    );
    assert_eq!(
        String::from_utf8_lossy(&seen),
        "EHLO sender.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<alice@example.test>\r\n"
    );

    // the same MX still offers STARTTLS, with the SNI-chosen certificate
    let mut s = TcpStream::connect(p.addr("mx")).await.unwrap();
    line(&mut s).await;
    say(&mut s, "EHLO sender.test\r\n", "250 ").await;
    say(&mut s, "STARTTLS\r\n", "\r\n").await;
    let tls = upgrade(s, "mail.other.test").await;
    assert_eq!(served_names(&tls), ["mail.other.test"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pipelined_behind_starttls_end_the_session() {
    let backend = Scripted::start("220 backend.test ESMTP\r\n").await;
    let p = proxy(&backend, "").await;
    let cases = [
        (
            "submission",
            "EHLO x\r\nSTARTTLS\r\nMAIL FROM:<evil@x>\r\n",
            "554 5.5.1 ",
        ),
        ("mx", "EHLO x\r\nSTARTTLS\r\nRSET\r\n", "554 5.5.1 "),
        (
            "imap",
            "a1 STARTTLS\r\na2 LOGIN alice secret\r\n",
            "a2 BAD Command pipelined after STARTTLS",
        ),
        (
            "pop3",
            "STLS\r\nUSER alice\r\n",
            "-ERR Command pipelined after STLS",
        ),
        ("sieve", "STARTTLS\r\nLOGOUT\r\n", "BYE \"Command pipelined"),
    ];
    for (listener, attack, answer) in cases {
        let mut s = TcpStream::connect(p.addr(listener)).await.unwrap();
        let port = s.local_addr().unwrap().port().to_string();
        s.write_all(attack.as_bytes()).await.unwrap(); // one packet
        let got = read_all(&mut s).await;
        assert!(got.contains(answer), "{listener}: {got:?}");
        log_line(&["command pipelined after STARTTLS", &port]).await;
    }
    // and commands sent right after the "go ahead", instead of a ClientHello
    let mut s = TcpStream::connect(p.addr("submission")).await.unwrap();
    line(&mut s).await;
    assert_eq!(
        say(&mut s, "STARTTLS\r\n", "\r\n").await,
        "220 2.0.0 Ready to start TLS\r\n"
    );
    s.write_all(b"MAIL FROM:<evil@x>\r\n").await.unwrap();
    assert!(read_all(&mut s).await.starts_with("554 5.5.1 "));
    log_line(&["plaintext instead of a TLS handshake after STARTTLS"]).await;
    assert!(backend.sessions().is_empty(), "the backend saw none of it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_lines_floods_and_stalls_are_cut_off() {
    let backend = Scripted::start("220 backend.test ESMTP\r\n").await;
    let p = proxy(&backend, "timeouts: { dialogue: 1s }").await;

    // a live upgraded session that must outlive the attacks
    let mut live = TcpStream::connect(p.addr("imap")).await.unwrap();
    line(&mut live).await;
    say(&mut live, "a STARTTLS\r\n", "\r\n").await;
    let mut live = upgrade(live, "mail.example.test").await;

    // an endless line
    let mut s = TcpStream::connect(p.addr("submission")).await.unwrap();
    line(&mut s).await;
    let _ = s.write_all(&vec![b'A'; 4096]).await;
    let got = read_all(&mut s).await;
    assert!(
        got.starts_with("500 5.5.6 Line too long\r\n421 "),
        "{got:?}"
    );

    // 1,000 bad commands: the budget ends it after ten
    let mut s = TcpStream::connect(p.addr("pop3")).await.unwrap();
    line(&mut s).await;
    let flood = "BOGUS\r\n".repeat(1000);
    let _ = s.write_all(flood.as_bytes()).await;
    let got = read_all(&mut s).await;
    assert_eq!(got.matches("-ERR").count(), 11, "{got:?}");
    assert!(
        got.ends_with("-ERR Too many invalid commands\r\n"),
        "{got:?}"
    );

    // a client that stops mid-line: the dialogue deadline
    let mut s = TcpStream::connect(p.addr("submission")).await.unwrap();
    line(&mut s).await;
    s.write_all(b"EHLO half-a-li").await.unwrap();
    let started = Instant::now();
    let got = read_all(&mut s).await;
    assert!(got.starts_with("421 4.4.2 mail.example.test"), "{got:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    log_line(&["plaintext dialogue timed out"]).await;

    assert!(
        backend.sessions().len() == 1,
        "only the live session reached it"
    );
    live.write_all(b"a NOOP\r\n").await.unwrap();
    assert_eq!(read_until(&mut live, b"\r\n").await, b"250 got a NOOP\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_says_goodbye_to_sessions_in_the_dialogue() {
    let backend = Scripted::start("220 backend.test ESMTP\r\n").await;
    let p = proxy(&backend, "").await;
    let mut smtp = TcpStream::connect(p.addr("submission")).await.unwrap();
    line(&mut smtp).await;
    let mut imap = TcpStream::connect(p.addr("imap")).await.unwrap();
    line(&mut imap).await;
    let mut pop3 = TcpStream::connect(p.addr("pop3")).await.unwrap();
    line(&mut pop3).await;
    p.shutdown().await;
    assert!(read_all(&mut smtp)
        .await
        .starts_with("421 4.3.2 mail.example.test"));
    assert_eq!(read_all(&mut imap).await, "* BYE Server shutting down\r\n");
    assert!(read_all(&mut pop3)
        .await
        .starts_with("-ERR [SYS/TEMP] Server shutting down"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_starttls_sees_the_sni_chosen_certificate() {
    if !common::tool(
        "openssl",
        "openssl_starttls_sees_the_sni_chosen_certificate",
    ) {
        return;
    }
    let backend = Scripted::start("* OK backend\r\n").await;
    let p = proxy(&backend, "").await;
    for (listener, proto) in [
        ("submission", "smtp"),
        ("imap", "imap"),
        ("pop3", "pop3"),
        ("sieve", "sieve"),
    ] {
        for host in ["mail.example.test", "mail.other.test"] {
            let connect = p.addr(listener).to_string();
            let args = [
                "s_client",
                "-connect",
                &connect,
                "-starttls",
                proto,
                "-servername",
                host,
            ];
            let (_, out, err) =
                common::run_cmd("openssl", &args, b"", Duration::from_secs(20)).await;
            let want = format!("CN = {host}");
            assert!(out.contains(&want), "{proto} {host}: {out}\n{err}");
            assert!(out.contains("TLSv1.3"), "{proto} {host}: {out}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_refusal_reaches_the_client_in_its_own_words() {
    // after STARTTLS: the backend's 421 is not swallowed with its greeting
    let busy = Scripted::start("421 4.7.0 backend.test Too many connections\r\n").await;
    let p = proxy(&busy, "").await;
    let mut s = TcpStream::connect(p.addr("submission")).await.unwrap();
    line(&mut s).await;
    say(&mut s, "STARTTLS\r\n", "\r\n").await;
    let mut tls = upgrade(s, "mail.example.test").await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut got)).await;
    assert_eq!(got, b"421 4.7.0 backend.test Too many connections\r\n");
    log_line(&["outcome=backend_refused", "Too many connections"]).await;

    // plaintext MX: a postscreen-style 554 stays a 554, so the sender bounces
    let blocked = Scripted::start("554 5.7.1 Service unavailable; client blocked\r\n").await;
    let p = proxy(&blocked, "").await;
    let mut s = TcpStream::connect(p.addr("mx")).await.unwrap();
    line(&mut s).await;
    say(&mut s, "EHLO sender.test\r\n", "250 ").await;
    s.write_all(b"MAIL FROM:<a@sender.test>\r\n").await.unwrap();
    assert_eq!(
        read_all(&mut s).await,
        "554 5.7.1 Service unavailable; client blocked\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_cannot_outlive_the_dialogue_deadline() {
    let backend = Scripted::start("220 backend.test ESMTP\r\n").await;
    let p = proxy(&backend, "timeouts: { dialogue: 1s }").await;
    let s = TcpStream::connect(p.addr("submission")).await.unwrap();
    let port = s.local_addr().unwrap().port().to_string();
    let (_reader, mut writer) = s.into_split(); // never read a byte
    let flood = tokio::spawn(async move {
        let noops = "NOOP\r\n".repeat(10_000);
        for _ in 0..100 {
            if writer.write_all(noops.as_bytes()).await.is_err() {
                return; // the proxy closed the session
            }
        }
    });
    let started = Instant::now();
    log_line(&["plaintext dialogue timed out", &port]).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let _ = tokio::time::timeout(Duration::from_secs(10), flood).await;
    assert!(backend.sessions().is_empty());
}
