//! The ALPACA countermeasure (RFC 7301, RFC 9325 §3.8) with real clients:
//! a mail listener refuses a ClientHello whose ALPN offers only protocols it
//! does not speak, with a `no_application_protocol` alert, on implicit TLS
//! and after STARTTLS alike; a client that offers its own protocol gets it
//! (iOS Mail offers `imap` on 993), one that offers none is served as ever.
//! A browser sent to a mail port (curl) gets no TLS session. A `tcp`
//! listener keeps its configured list. The tls-alpn-01 path is covered by
//! tests/acme.rs.

mod common;

use std::time::Duration;

use common::{log_line, read_until, sample, scrape, tls_connect_with, Backend, Proxy};
use tokio::io::AsyncWriteExt;

/// Mail listeners of each kind, a `tcp` one with its own ALPN list and one
/// without, all in front of one echo backend; the admin endpoint.
struct World {
    proxy: Proxy,
    backend: Backend,
    admin: String,
}

async fn world() -> World {
    let backend = Backend::start("* OK echo\r\n", true).await;
    let admin = format!("127.0.0.1:{}", common::free_port());
    let yaml = format!(
        r#"
state_dir: state
admin: {{ bind: "{admin}" }}
listeners:
  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
  smtps: {{ bind: "127.0.0.1:0", protocol: smtp, tls: implicit }}
  imap:  {{ bind: "127.0.0.1:0", protocol: imap, tls: starttls }}
  https: {{ bind: "127.0.0.1:0", protocol: tcp, tls: implicit, alpn: [http/1.1] }}
  tcp:   {{ bind: "127.0.0.1:0", protocol: tcp, tls: implicit }}
backends: {{ imaps: "{b}", smtps: "{b}", imap: "{b}", https: "{b}", tcp: "{b}" }}
hosts: [ {{ names: [mail.example.test], certificate: self-signed }} ]
"#,
        b = backend.addr
    );
    World {
        proxy: Proxy::start(&yaml).await,
        backend,
        admin,
    }
}

/// `openssl s_client` to a listener with `extra` options; stdout and stderr.
async fn s_client(w: &World, listener: &str, extra: &[&str]) -> String {
    let connect = w.proxy.addr(listener).to_string();
    let mut args = vec![
        "s_client",
        "-connect",
        &connect,
        "-servername",
        "mail.example.test",
    ];
    args.extend(extra);
    let (_, out, err) = common::run_cmd("openssl", &args, b"", Duration::from_secs(20)).await;
    format!("{out}\n{err}")
}

/// What openssl prints for a handshake ended by alert 120.
fn refused_with_alert(view: &str) -> bool {
    view.contains("alert number 120") || view.contains("no application protocol")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_listeners_refuse_alpn_offers_they_do_not_speak() {
    if !common::tool(
        "openssl",
        "mail_listeners_refuse_alpn_offers_they_do_not_speak",
    ) {
        return;
    }
    let w = world().await;
    for (listener, extra, speaks) in [
        ("imaps", &["-alpn", "http/1.1"][..], "imap"),
        ("smtps", &["-alpn", "http/1.1"][..], "smtp, submission"),
        ("smtps", &["-alpn", "imap"][..], "smtp, submission"),
        (
            "imap",
            &["-starttls", "imap", "-alpn", "http/1.1"][..],
            "imap",
        ),
    ] {
        let view = s_client(&w, listener, extra).await;
        assert!(
            refused_with_alert(&view) && !view.contains("ALPN protocol:"),
            "{listener} {extra:?}: not refused with alert 120:\n{view}"
        );
        let offered = extra[extra.len() - 1];
        log_line(&[
            "session closed",
            &format!("listener={listener}"),
            "outcome=alpn_refused",
            &format!("reason=\"client offered {offered}; this listener speaks {speaks}\""),
        ])
        .await;
    }
    // The protocol the listener speaks is selected and echoed; no ALPN is fine.
    for (listener, extra, want) in [
        ("imaps", &["-alpn", "imap"][..], "ALPN protocol: imap"),
        ("imaps", &["-alpn", "h2,imap"][..], "ALPN protocol: imap"),
        ("imaps", &[][..], "No ALPN negotiated"),
        ("smtps", &["-alpn", "smtp"][..], "ALPN protocol: smtp"),
        (
            "smtps",
            &["-alpn", "submission"][..],
            "ALPN protocol: submission",
        ),
        (
            "imap",
            &["-starttls", "imap", "-alpn", "imap"][..],
            "ALPN protocol: imap",
        ),
    ] {
        let view = s_client(&w, listener, extra).await;
        assert!(
            view.contains(want) && view.contains("TLSv1.3"),
            "{listener} {extra:?}: want {want:?} in\n{view}"
        );
    }
    // iOS Mail: offers imap on 993, gets it and its mail.
    let mut tls = tls_connect_with(
        w.proxy.addr("imaps"),
        Some("mail.example.test"),
        common::client_config(&["imap"]),
    )
    .await
    .expect("handshake offering imap");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"imap"[..]));
    assert_eq!(read_until(&mut tls, b"\r\n").await, b"* OK echo\r\n");
    tls.write_all(b"a1 NOOP\r\n").await.unwrap();
    assert_eq!(read_until(&mut tls, b"a1 NOOP\r\n").await, b"a1 NOOP\r\n");

    let text = scrape(&w.admin).await;
    for (listener, n) in [("imaps", "1"), ("smtps", "2"), ("imap", "1")] {
        let series = format!(
            "portcullis_handshakes_total{{listener=\"{listener}\",outcome=\"alpn_refused\"}}"
        );
        assert_eq!(sample(&text, &series), Some(n), "{series} in\n{text}");
    }
}

/// The ALPACA vector itself: a browser made to talk HTTPS to a mail port
/// must not get a TLS session with the mail server's certificate (nor
/// reach the mail backend with its request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_sent_to_a_mail_port_gets_no_tls_session() {
    if !common::tool("curl", "a_browser_sent_to_a_mail_port_gets_no_tls_session") {
        return;
    }
    let w = world().await;
    for listener in ["imaps", "smtps"] {
        let port = w.proxy.addr(listener).port();
        let url = format!("https://mail.example.test:{port}/");
        let resolve = format!("mail.example.test:{port}:127.0.0.1");
        let (ok, out, err) = common::run_cmd(
            "curl",
            &[
                "-sS",
                "-k",
                "--noproxy",
                "*",
                "--max-time",
                "10",
                "--resolve",
                &resolve,
                &url,
            ],
            b"",
            Duration::from_secs(20),
        )
        .await;
        assert!(!ok, "{listener}: curl got an answer: {out}\n{err}");
        // curl's exit 35: the TLS handshake failed (not a garbled HTTP answer)
        assert!(
            err.contains("(35)") && err.contains("no application protocol"),
            "{listener}: {err}"
        );
        log_line(&[
            "session closed",
            &format!("listener={listener}"),
            "outcome=alpn_refused",
            "client offered h2, http/1.1;",
        ])
        .await;
    }
    assert_eq!(
        w.backend.connections(),
        0,
        "nothing reached the mail backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_keeps_its_configured_alpn_list() {
    if !common::tool("openssl", "a_tcp_listener_keeps_its_configured_alpn_list") {
        return;
    }
    let w = world().await;
    let view = s_client(&w, "https", &["-alpn", "h2"]).await;
    assert!(refused_with_alert(&view), "h2 only: {view}");
    log_line(&[
        "session closed",
        "listener=https",
        "outcome=alpn_refused",
        "reason=\"client offered h2; this listener speaks http/1.1\"",
    ])
    .await;
    for alpn in ["http/1.1", "h2,http/1.1"] {
        let view = s_client(&w, "https", &["-alpn", alpn]).await;
        assert!(view.contains("ALPN protocol: http/1.1"), "{alpn}: {view}");
    }
    // a tcp listener without a list takes any offer, as before
    let view = s_client(&w, "tcp", &["-alpn", "h2"]).await;
    assert!(
        view.contains("No ALPN negotiated") && view.contains("TLSv1.3"),
        "{view}"
    );
    let text = scrape(&w.admin).await;
    let refused = |l: &str| {
        sample(
            &text,
            &format!("portcullis_handshakes_total{{listener=\"{l}\",outcome=\"alpn_refused\"}}"),
        )
        .map(str::to_string)
    };
    assert_eq!(refused("https").as_deref(), Some("1"), "{text}");
    assert_eq!(refused("tcp").as_deref(), Some("0"), "{text}");
}
