//! portcullis in front of a real Dovecot and Postfix, driven by Python's stock
//! imaplib, poplib and smtplib: the end-to-end proof that a TLS-terminated
//! session reaches the backends with the client's address, that Dovecot counts
//! it as secured only because the PROXY v2 header carries the SSL TLV, and that
//! mail submitted on the submissions listener can be read back over IMAPS.
//!
//! The daemons and the client are in [`common::mail`], which says what they
//! need. Clients connect from 127.0.0.2 while portcullis reaches the backends
//! from 127.0.0.1, so a backend log that names 127.0.0.2 learned it from the
//! header.

mod common;

use common::mail::{
    client, loopback, proxy_config, rip, tools, unique_subject, MailStack, CLIENT_IP,
};
use common::Proxy;

const IMAPS: &str = "protocol: imap, tls: implicit";
const POP3S: &str = "protocol: pop3, tls: implicit";
const SUBMISSIONS: &str = "protocol: smtp, tls: implicit";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaps_login_through_portcullis_with_proxy_v2() {
    if !tools("imaps_login_through_portcullis_with_proxy_v2") {
        return;
    }
    let mail = MailStack::start().await;
    let proxy = Proxy::start(&proxy_config(&[("imaps", IMAPS, loopback(mail.imap_port))])).await;

    let run = client("imap", proxy.addr("imaps"), "alice@example.test", &[]).await;
    run.assert_ok();
    run.assert_line("LOGIN OK");
    run.assert_line("LIST OK");
    run.assert_line("SELECT OK");

    // The client's address came in the header, `secured` from the SSL TLV,
    // and local_name from the authority TLV (the SNI).
    mail.dovecot
        .secured_login("imap-login", "alice@example.test")
        .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaps_login_with_proxy_v1_is_refused_by_dovecot() {
    if !tools("imaps_login_with_proxy_v1_is_refused_by_dovecot") {
        return;
    }
    let mail = MailStack::start().await;
    let backend = format!(
        "{{ address: \"{}\", proxy_protocol: v1 }}",
        loopback(mail.imap_port)
    );
    let proxy = Proxy::start(&proxy_config(&[("imaps", IMAPS, backend)])).await;

    let run = client("imap", proxy.addr("imaps"), "alice@example.test", &[]).await;
    // v1 has no room for the SSL TLV: Dovecot knows the client's address but
    // not that it used TLS, so it refuses a plaintext password.
    assert!(
        !run.ok,
        "a v1-proxied login must be refused\n{}",
        run.output
    );
    assert!(
        run.line("CAPABILITY").contains("LOGINDISABLED"),
        "{}",
        run.output
    );
    assert!(
        run.line("LOGIN NO").contains("PRIVACYREQUIRED"),
        "{}",
        run.output
    );

    let line = mail
        .dovecot
        .log_line(&[
            "imap-login: Info: ",
            "Plaintext authentication disabled",
            &rip(),
        ])
        .await;
    assert!(!line.contains("secured"), "{line}");
    proxy.shutdown().await;
}

/// The acceptance test: submit through portcullis, read back through portcullis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_to_postfix_then_read_back_over_imaps() {
    if !tools("submissions_to_postfix_then_read_back_over_imaps") {
        return;
    }
    let mail = MailStack::start().await;
    let proxy = Proxy::start(&proxy_config(&[
        ("submissions", SUBMISSIONS, loopback(mail.submission_port)),
        ("imaps", IMAPS, loopback(mail.imap_port)),
    ]))
    .await;
    let subject = unique_subject();

    let sent = client(
        "submit",
        proxy.addr("submissions"),
        "alice@example.test",
        &["--to", "bob@other.test", "--subject", &subject],
    )
    .await;
    sent.assert_ok();
    sent.assert_line("LOGIN OK");
    sent.assert_line("SENT OK");

    let read = client(
        "imap-find",
        proxy.addr("imaps"),
        "bob@other.test",
        &["--subject", &subject, "--wait", "15"],
    )
    .await;
    read.assert_ok();
    read.assert_line(&format!("FOUND {subject}"));

    // Postfix saw the real client (from the PROXY header) and the SASL login.
    let client_info = format!("client=unknown[{CLIENT_IP}]");
    mail.postfix
        .log_line(&[
            &client_info,
            "sasl_method=",
            "sasl_username=alice@example.test",
        ])
        .await;
    mail.postfix
        .log_line(&["to=<bob@other.test>", "relay=virtual", "status=sent"])
        .await;
    mail.dovecot
        .log_line(&[
            "imap-login: Info: Login: user=<bob@other.test>",
            &rip(),
            "secured",
        ])
        .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3s_login_through_portcullis() {
    if !tools("pop3s_login_through_portcullis") {
        return;
    }
    let mail = MailStack::start().await;
    let proxy = Proxy::start(&proxy_config(&[("pop3s", POP3S, loopback(mail.pop3_port))])).await;

    let run = client("pop3", proxy.addr("pop3s"), "alice@example.test", &[]).await;
    run.assert_ok();
    run.assert_line("LOGIN OK");
    // A fresh mailbox: no messages, no octets.
    run.assert_line("STAT OK (0, 0)");

    mail.dovecot
        .secured_login("pop3-login", "alice@example.test")
        .await;
    proxy.shutdown().await;
}
