//! Notifications with real parts: emails through a real Postfix (reached like
//! any backend, with a PROXY header of the notification connection's own)
//! into a real Dovecot mailbox, read back over IMAP; a webhook served by a
//! small HTTP server in the test; and the failures, which must only log.
//!
//! The daemons are [`common::mail`]'s; each test starts its own.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::mail::{imap_messages, loopback, proxy_config, tools, MailStack};
use common::{free_port, init_logging, log_line, log_lines, Proxy};
use portcullis::config::{Backend, Notify, ProxyProtocol};
use portcullis::ops::notify::{Event, Notifier};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const IMAPS: &str = "protocol: imap, tls: implicit";
const ALICE: &str = "alice@example.test";
/// The config file the emails' commands name.
const CONFIG: &str = "/etc/portcullis/config.yaml";
const DAY: Duration = Duration::from_secs(24 * 3600);

fn notify(smtp: Option<Backend>, webhook: Option<String>) -> Arc<Notifier> {
    let config = Notify {
        email: if smtp.is_some() {
            vec![ALICE.to_string()]
        } else {
            vec![]
        },
        from: "portcullis@example.test".into(),
        smtp,
        webhook,
    };
    let notifier = Notifier::new(&config, None).expect("notifier");
    Arc::new(notifier.with_config_path(Path::new(CONFIG)))
}

fn smtp(port: u16, proxy_protocol: ProxyProtocol) -> Option<Backend> {
    Some(Backend {
        address: SocketAddr::from(([127, 0, 0, 1], port)),
        proxy_protocol,
        connect_timeout: Duration::from_secs(5),
    })
}

/// A whole second: the texts show not-after to the second.
fn whole_second(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The unfolded value of `name` in a raw message's header.
fn header(message: &str, name: &str) -> String {
    let head = message.split("\r\n\r\n").next().unwrap_or_default();
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    let prefix = format!("{}: ", name.to_ascii_lowercase());
    unfolded
        .split("\r\n")
        .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
        .map(|l| l[prefix.len()..].to_string())
        .unwrap_or_else(|| panic!("no {name} header in:\n{message}"))
}

fn body(message: &str) -> &str {
    message
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

/// Postfix logged no warning on the lines of `service` (the stack's own
/// readiness probe leaves a headerless connection on the submission port).
fn assert_no_complaint(mail: &MailStack, service: &str) {
    let complaints: Vec<_> = mail
        .postfix
        .log_lines(service)
        .into_iter()
        .filter(|l| l.contains("warning") || l.contains("haproxy"))
        .collect();
    assert!(complaints.is_empty(), "{complaints:#?}");
}

/// The one message whose subject is `subject`.
fn by_subject<'m>(messages: &'m [String], subject: &str) -> &'m str {
    let found: Vec<_> = messages
        .iter()
        .filter(|m| header(m, "Subject") == subject)
        .collect();
    assert_eq!(found.len(), 1, "one message {subject:?} in {messages:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_and_failed_reach_the_mailbox_through_postfix_with_proxy_v2_local() {
    if !tools("issued_and_failed_reach_the_mailbox_through_postfix_with_proxy_v2_local") {
        return;
    }
    init_logging();
    let mail = MailStack::start().await;
    let proxy = Proxy::start(&proxy_config(&[("imaps", IMAPS, loopback(mail.imap_port))])).await;
    let notifier = notify(smtp(mail.mx_port, ProxyProtocol::V2), None);

    let now = whole_second(SystemTime::now());
    let names = vec!["v2.example.test".to_string(), "imap.v2.example.test".into()];
    notifier.send(Event::Issued {
        host: "v2.example.test".into(),
        names: names.clone(),
        serial: "0a1b2c3d4e5f".into(),
        issuer: "CN=Pebble Intermediate CA 1a2b3c".into(),
        not_after: now + 90 * DAY,
        renewal: false,
    });
    notifier.send(Event::RenewalFailed {
        host: "v2.example.test".into(),
        names,
        error: "urn:ietf:params:acme:error:connection: 127.0.0.1: Connection refused\n.a line with a dot"
            .into(),
        next_try: now + Duration::from_secs(3600),
        not_after: Some(now + 12 * DAY),
    });

    let messages = imap_messages(proxy.addr("imaps"), ALICE, "[portcullis]", 2).await;
    assert_eq!(messages.len(), 2, "{messages:#?}");
    let issued = by_subject(
        &messages,
        "[portcullis] certificate issued: v2.example.test",
    );
    eprintln!("--- the issued message as Dovecot has it ---\n{issued}--- end ---");
    assert_eq!(
        header(issued, "From"),
        "portcullis <portcullis@example.test>"
    );
    assert_eq!(header(issued, "To"), ALICE);
    assert_eq!(header(issued, "Auto-Submitted"), "auto-generated");
    assert_eq!(header(issued, "Content-Type"), "text/plain; charset=utf-8");
    assert!(header(issued, "Date").ends_with(" +0000"), "{issued}");
    assert!(
        header(issued, "Message-ID").ends_with("@example.test>"),
        "{issued}"
    );
    let b = body(issued);
    for fact in [
        "Names:     v2.example.test, imap.v2.example.test",
        "Serial:    0a1b2c3d4e5f",
        "Issuer:    CN=Pebble Intermediate CA 1a2b3c",
        &format!("Not after: {}", rfc3339(now + 90 * DAY)),
    ] {
        assert!(b.contains(fact), "{fact:?} not in:\n{b}");
    }

    let failed = by_subject(&messages, "[portcullis] RENEWAL FAILED: v2.example.test");
    eprintln!("--- the failure message as Dovecot has it ---\n{failed}--- end ---");
    let b = body(failed);
    for fact in [
        "Error:     urn:ietf:params:acme:error:connection: 127.0.0.1: Connection refused\r\n",
        // Dot-stuffed on the wire, unstuffed by Postfix.
        "\r\n           .a line with a dot\r\n",
        &format!("Next try:  {}", rfc3339(now + Duration::from_secs(3600))),
        &format!("valid until {}", rfc3339(now + 12 * DAY)),
        &format!("portcullis renew --config {CONFIG} v2.example.test\r\n"),
        "ports 80 and 443",
    ] {
        assert!(b.contains(fact), "{fact:?} not in:\n{b}");
    }

    // Postfix took the LOCAL header to mean "use the connection's own
    // addresses": it names 127.0.0.1, and nothing about the header.
    mail.postfix
        .log_line(&["postfix/mx/smtpd", "client=unknown[127.0.0.1]"])
        .await;
    let delivered = mail
        .postfix
        .log_line(&["to=<alice@example.test>", "relay=virtual", "status=sent"])
        .await;
    assert!(delivered.contains("status=sent"), "{delivered}");
    assert_no_complaint(&mail, "postfix/mx/");
    log_line(&[
        "INFO",
        "notification sent",
        "event=\"issued\"",
        "v2.example.test",
        ALICE,
    ])
    .await;
    log_line(&[
        "INFO",
        "notification sent",
        "event=\"renewal_failed\"",
        "v2.example.test",
    ])
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v1_and_postscreen_are_accepted_too() {
    if !tools("proxy_v1_and_postscreen_are_accepted_too") {
        return;
    }
    init_logging();
    let mail = MailStack::start().await;
    let proxy = Proxy::start(&proxy_config(&[("imaps", IMAPS, loopback(mail.imap_port))])).await;
    let not_after = whole_second(SystemTime::now()) + 60 * DAY;
    let issued = |host: &str| Event::Issued {
        host: host.into(),
        names: vec![host.into()],
        serial: "01".into(),
        issuer: "CN=test".into(),
        not_after,
        renewal: true,
    };
    // v1 (our own connection's addresses: Postfix refuses `PROXY UNKNOWN`)
    // to a plain smtpd, v2 LOCAL to postscreen (which parses the header
    // itself before handing the connection on).
    notify(smtp(mail.mx_port, ProxyProtocol::V1), None).send(issued("v1.example.test"));
    notify(smtp(mail.postscreen_port, ProxyProtocol::V2), None).send(issued("ps.example.test"));

    let messages = imap_messages(proxy.addr("imaps"), ALICE, "certificate renewed", 2).await;
    by_subject(
        &messages,
        "[portcullis] certificate renewed: v1.example.test",
    );
    by_subject(
        &messages,
        "[portcullis] certificate renewed: ps.example.test",
    );
    mail.postfix
        .log_line(&["postfix/mx/smtpd", "client=unknown[127.0.0.1]"])
        .await;
    mail.postfix
        .log_line(&["postfix/postscreen", "CONNECT from [127.0.0.1]"])
        .await;
    assert_no_complaint(&mail, "postfix/mx/");
    assert_no_complaint(&mail, "postfix/postscreen");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_warning_is_mailed_once_a_day() {
    if !tools("expiry_warning_is_mailed_once_a_day") {
        return;
    }
    init_logging();
    let mail = MailStack::start().await;
    let proxy = Proxy::start(&proxy_config(&[("imaps", IMAPS, loopback(mail.imap_port))])).await;
    let notifier = notify(smtp(mail.mx_port, ProxyProtocol::V2), None);

    let now = whole_second(SystemTime::now());
    let certs = vec![
        (
            "expiring.example.test".to_string(),
            vec!["expiring.example.test".to_string()],
            now + 10 * DAY,
            "acme".to_string(),
        ),
        (
            "fresh.example.test".into(),
            vec!["fresh.example.test".into()],
            now + 60 * DAY,
            "acme".into(),
        ),
        (
            "self.example.test".into(),
            vec!["self.example.test".into()],
            now + DAY,
            "self-signed".into(),
        ),
        (
            "waiting.example.test".into(),
            vec!["waiting.example.test".into()],
            now,
            "placeholder".into(),
        ),
    ];
    assert_eq!(notifier.check_expiry(&certs, now), 1);
    assert_eq!(
        notifier.check_expiry(&certs, now),
        0,
        "again at once: nothing"
    );
    assert_eq!(
        notifier.check_expiry(&certs, now + DAY - Duration::from_secs(60)),
        0,
        "not a day later"
    );

    let subject = "[portcullis] certificate expires in 10 days: expiring.example.test";
    let messages = imap_messages(proxy.addr("imaps"), ALICE, "expires in", 1).await;
    let m = by_subject(&messages, subject);
    let b = body(m);
    for fact in [
        &format!("expires in 10 days, on {}", rfc3339(now + 10 * DAY)) as &str,
        "Source:    acme",
        &format!("portcullis certs --config {CONFIG}\r\n"),
        &format!("portcullis renew --config {CONFIG} expiring.example.test\r\n"),
        "ports 80 and 443",
    ] {
        assert!(b.contains(fact), "{fact:?} not in:\n{b}");
    }
    log_line(&[
        "notification sent",
        "event=\"expiring\"",
        "expiring.example.test",
    ])
    .await;
    let lines = log_lines(&["notification", "example.test"])
        .into_iter()
        .filter(|l| {
            ["expiring", "fresh", "self", "waiting"]
                .iter()
                .any(|h| l.contains(&format!("host=\"{h}.example.test\"")))
        })
        .collect::<Vec<_>>();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_dead_smtp_server_is_a_warning_and_never_blocks() {
    init_logging();
    // Nobody listens there: the connection is refused at once.
    let port = free_port();
    let notifier = notify(smtp(port, ProxyProtocol::V2), None);
    let start = Instant::now();
    notifier.send(Event::RenewalFailed {
        host: "dead.example.test".into(),
        names: vec!["dead.example.test".into()],
        error: "e".into(),
        next_try: SystemTime::now(),
        not_after: None,
    });
    assert!(
        start.elapsed() < Duration::from_millis(100),
        "send blocked for {:?}",
        start.elapsed()
    );
    let addr = format!("127.0.0.1:{port}");
    let line = log_line(&["WARN", "notification failed", "dead.example.test", &addr]).await;
    assert!(line.contains("event=\"renewal_failed\""), "{line}");
    assert!(line.contains("connect to"), "{line}");
}

#[tokio::test]
async fn a_server_that_hangs_up_is_a_warning() {
    init_logging();
    // Accepts, then closes before any greeting.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        if let Ok(Ok((s, _))) =
            tokio::time::timeout(Duration::from_secs(10), listener.accept()).await
        {
            drop(s);
        }
    });
    let notifier = notify(smtp(port, ProxyProtocol::V2), None);
    notifier.send(Event::Expiring {
        host: "hangup.example.test".into(),
        names: vec!["hangup.example.test".into()],
        not_after: SystemTime::now(),
        source: "files".into(),
    });
    let line = log_line(&["WARN", "notification failed", "hangup.example.test"]).await;
    let expected =
        format!("127.0.0.1:{port} closed the connection (waiting for the reply to greeting)");
    assert!(line.contains(&expected), "{line}");
}

/// One request as the test's webhook server saw it.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    content_type: String,
    body: serde_json::Value,
}

/// A one-shot HTTP server on 127.0.0.1:0 that answers `status` and reports
/// the request it got; HTTPS with `tls`.
async fn webhook_server(
    status: &'static str,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (SocketAddr, mpsc::Receiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let Ok(Ok((s, _))) = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await
        else {
            return;
        };
        let seen = match tls {
            None => serve_one(s, status).await,
            Some(config) => {
                let handshake = tokio_rustls::TlsAcceptor::from(config).accept(s);
                match tokio::time::timeout(Duration::from_secs(10), handshake).await {
                    Ok(Ok(s)) => serve_one(s, status).await,
                    _ => None,
                }
            }
        };
        if let Some(seen) = seen {
            let _ = tx.send(seen).await;
        }
    });
    (addr, rx)
}

/// Reads one request and answers `status`.
async fn serve_one<S>(mut s: S, status: &str) -> Option<Seen>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    // Bounded: 64 KiB or 10 s, whichever first.
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let mut chunk = [0u8; 4096];
        let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await
        else {
            return None;
        };
        if n == 0 || buf.len() > 65536 || Instant::now() > deadline {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = req.parse(&buf) else {
            continue;
        };
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
                .unwrap_or_default()
        };
        let len: usize = header("content-length").parse().unwrap_or(0);
        if buf.len() < head + len {
            continue;
        }
        break Seen {
            method: req.method.unwrap_or_default().to_string(),
            path: req.path.unwrap_or_default().to_string(),
            content_type: header("content-type"),
            body: serde_json::from_slice(&buf[head..head + len]).unwrap_or_default(),
        };
    };
    let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let _ = s.write_all(reply.as_bytes()).await;
    let _ = s.shutdown().await;
    Some(seen)
}

/// A CA (its PEM written to `dir/ca.pem`) and a server config with a
/// certificate it issued for 127.0.0.1.
fn https_pki(dir: &Path) -> Arc<rustls::ServerConfig> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = CertificateParams::new(vec!["127.0.0.1".into()]).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf_cert.der().to_vec())],
            PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        )
        .unwrap();
    Arc::new(config)
}

#[tokio::test]
async fn https_webhook_trusts_the_given_roots_only() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let tls = https_pki(dir.path());
    let event = |host: &str| Event::Expiring {
        host: host.into(),
        names: vec![host.into()],
        not_after: SystemTime::now() + 3 * DAY,
        source: "files".into(),
    };
    let config = |url: String| Notify {
        email: vec![],
        from: "portcullis@example.test".into(),
        smtp: None,
        webhook: Some(url),
    };

    let (addr, mut seen) = webhook_server("200 OK", Some(tls.clone())).await;
    let roots = dir.path().join("ca.pem");
    let notifier = Notifier::new(&config(format!("https://{addr}/tls-hook")), Some(&roots));
    Arc::new(notifier.expect("notifier")).send(event("tls.example.test"));
    let seen = tokio::time::timeout(Duration::from_secs(15), seen.recv())
        .await
        .expect("the webhook was called within 15 s")
        .expect("a request");
    assert_eq!(seen.path, "/tls-hook");
    assert_eq!(seen.body["event"], "expiring");
    assert_eq!(seen.body["days_left"], 3);
    log_line(&["INFO", "notification sent", "tls.example.test", "https://"]).await;

    // Without the CA among the roots, the certificate is not trusted.
    let (addr, _seen) = webhook_server("200 OK", Some(tls)).await;
    let notifier = Notifier::new(&config(format!("https://{addr}/")), None);
    Arc::new(notifier.expect("notifier")).send(event("untrusted.example.test"));
    let line = log_line(&["WARN", "notification failed", "untrusted.example.test"]).await;
    assert!(line.to_lowercase().contains("certificate"), "{line}");
}

#[tokio::test]
async fn webhook_gets_the_event_as_json() {
    init_logging();
    let (addr, mut seen) = webhook_server("204 No Content", None).await;
    let url = format!("http://{addr}/hooks/T000/secret-token?x=1");
    let notifier = notify(None, Some(url));
    let not_after = whole_second(SystemTime::now()) + 90 * DAY;
    notifier.send(Event::Issued {
        host: "hook.example.test".into(),
        names: vec!["hook.example.test".into(), "www.hook.example.test".into()],
        serial: "00ff".into(),
        issuer: "CN=Test CA".into(),
        not_after,
        renewal: true,
    });
    let seen = tokio::time::timeout(Duration::from_secs(15), seen.recv())
        .await
        .expect("the webhook was called within 15 s")
        .expect("a request");
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/hooks/T000/secret-token?x=1");
    assert_eq!(seen.content_type, "application/json");
    let j = &seen.body;
    assert_eq!(j["event"], "renewed", "{j}");
    assert_eq!(j["host"], "hook.example.test", "{j}");
    assert_eq!(
        j["names"],
        serde_json::json!(["hook.example.test", "www.hook.example.test"])
    );
    assert_eq!(j["not_after"], rfc3339(not_after), "{j}");
    assert_eq!(j["serial"], "00ff", "{j}");
    assert_eq!(j["issuer"], "CN=Test CA", "{j}");
    let time = humantime::parse_rfc3339(j["time"].as_str().expect("time")).expect("RFC 3339");
    let age = SystemTime::now().duration_since(time).unwrap_or_default();
    assert!(age < Duration::from_secs(60), "{j}");

    // The log names the webhook without its path, which is often its secret.
    let line = log_line(&["INFO", "notification sent", "hook.example.test"]).await;
    assert!(line.contains(&format!("http://{addr}/…")), "{line}");
    assert!(!line.contains("secret-token"), "{line}");
}

#[tokio::test]
async fn a_webhook_answering_500_is_a_warning() {
    init_logging();
    let (addr, mut seen) = webhook_server("500 Internal Server Error", None).await;
    let notifier = notify(None, Some(format!("http://{addr}/hook")));
    notifier.send(Event::RenewalFailed {
        host: "hook500.example.test".into(),
        names: vec!["hook500.example.test".into()],
        error: "rateLimited".into(),
        next_try: SystemTime::now() + DAY,
        not_after: None,
    });
    let seen = tokio::time::timeout(Duration::from_secs(15), seen.recv())
        .await
        .expect("the webhook was called within 15 s")
        .expect("a request");
    assert_eq!(seen.body["event"], "renewal_failed");
    assert_eq!(seen.body["error"], "rateLimited");
    assert_eq!(seen.body["not_after"], serde_json::Value::Null);
    let line = log_line(&["WARN", "notification failed", "hook500.example.test"]).await;
    assert!(line.contains("500"), "{line}");
    assert!(line.contains(&format!("http://{addr}/…")), "{line}");
}

/// The whole path: portcullis orders from a real Pebble, and each issuance,
/// forced renewal and failed renewal reaches the default recipients (the
/// ACME contact) through the real Postfix, read back from Dovecot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_issuance_renewal_and_failure_are_mailed_end_to_end() {
    let test = "acme_issuance_renewal_and_failure_are_mailed_end_to_end";
    if !tools(test) || !common::acme::tools(test) {
        return;
    }
    use portcullis::ops::control::{self, Request, Response};
    const HOST: &str = "mail.notify-e2e.test";
    const CONTROL: Duration = Duration::from_secs(120);

    let mail = MailStack::start().await;
    let reader = Proxy::start(&proxy_config(&[("imaps", IMAPS, loopback(mail.imap_port))])).await;
    let http = free_port();
    let pebble = common::acme::Pebble::start(http, free_port()).await;
    let yaml = format!(
        r#"
state_dir: state
acme:
  directory: {directory}
  contact: ["mailto:{ALICE}"]
  terms_of_service_agreed: true
  challenges: [http-01]
  ca_roots: {ca_roots}
notify:
  from: portcullis@example.test
  smtp: "127.0.0.1:{mx}"
listeners:
  imaps-e2e: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
  http-e2e: {{ bind: "127.0.0.1:{http}", protocol: http }}
backends:
  imaps-e2e: "127.0.0.1:{imap}"
hosts:
  - names: [{HOST}]
    certificate: acme
"#,
        directory = pebble.directory,
        ca_roots = pebble.ca_roots.display(),
        mx = mail.mx_port,
        imap = mail.imap_port,
    );
    let proxy = Proxy::start(&yaml).await;
    let state = proxy.dir.path().join("state");
    let renew = |state: std::path::PathBuf| async move {
        let request = Request::Renew {
            dry_run: false,
            force: true,
            name: Some(HOST.to_string()),
        };
        match control::request(&state, &request, CONTROL).await {
            Ok(Response::Renew(mut rows)) if rows.len() == 1 => rows.remove(0),
            other => panic!("renew: {other:?}"),
        }
    };

    // The first certificate: "issued".
    let subject = format!("[portcullis] certificate issued: {HOST}");
    let messages = imap_messages(reader.addr("imaps"), ALICE, &subject, 1).await;
    let first = by_subject(&messages, &subject);
    let row = match control::request(&state, &Request::Certs, CONTROL).await {
        Ok(Response::Certs(rows)) => rows.into_iter().find(|r| r.names == [HOST]),
        other => panic!("certs: {other:?}"),
    }
    .expect("the host is listed");
    assert_eq!(row.source, "acme", "{row:?}");
    let b = body(first);
    assert!(
        b.contains(&format!("Serial:    {}\r\n", row.serial)),
        "{row:?}\n{b}"
    );
    assert!(
        b.contains(&format!("Not after: {}\r\n", row.not_after)),
        "{row:?}\n{b}"
    );
    assert!(b.contains(&format!("Names:     {HOST}\r\n")), "{b}");

    // A forced renewal: "renewed", with the new serial.
    let renewed = renew(state.clone()).await;
    assert_eq!(renewed.outcome, "renewed", "{renewed:?}\n{}", pebble.log());
    let subject = format!("[portcullis] certificate renewed: {HOST}");
    let messages = imap_messages(reader.addr("imaps"), ALICE, &subject, 1).await;
    let b = body(by_subject(&messages, &subject)).to_string();
    let serial = renewed
        .detail
        .strip_prefix("serial ")
        .and_then(|d| d.split(',').next())
        .unwrap_or_else(|| panic!("detail: {}", renewed.detail));
    assert_ne!(serial, row.serial);
    assert!(
        b.contains(&format!("Serial:    {serial}\r\n")),
        "{renewed:?}\n{b}"
    );

    // The CA gone: "RENEWAL FAILED", with the reason and the certificate
    // that keeps serving.
    let _ports = pebble.stop();
    let failed = renew(state.clone()).await;
    assert_eq!(failed.outcome, "failed", "{failed:?}");
    let subject = format!("[portcullis] RENEWAL FAILED: {HOST}");
    let messages = imap_messages(reader.addr("imaps"), ALICE, &subject, 1).await;
    let m = by_subject(&messages, &subject);
    eprintln!("--- the end-to-end failure message ---\n{m}--- end ---");
    let b = body(m);
    assert!(b.to_lowercase().contains("connection refused"), "{b}");
    assert!(b.contains("Served:    a certificate valid until"), "{b}");
    assert!(b.contains("Next try:  "), "{b}");

    assert_eq!(
        mail.postfix
            .log_lines("status=sent")
            .iter()
            .filter(|l| l.contains("to=<alice@example.test>"))
            .count(),
        3,
        "one message per event"
    );
    assert_no_complaint(&mail, "postfix/mx/");
    proxy.shutdown().await;
    reader.shutdown().await;
}
