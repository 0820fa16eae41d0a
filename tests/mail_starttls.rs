//! portcullis' STARTTLS listeners in front of a real Postfix and Dovecot
//! ([`common::mail`]), with real clients: Python's smtplib, imaplib and poplib
//! calling their own `starttls`/`stls`, swaks, and a small ManageSieve client.
//! The dialogue details are tested against scripted backends in
//! tests/starttls.rs; this is the proof that the real daemons accept what
//! comes out of the upgrade: a client's second EHLO/CAPABILITY/CAPA reaches
//! them, Dovecot counts the session as secured from the PROXY v2 SSL TLV
//! (`disable_plaintext_auth = yes` would refuse every login otherwise), and an
//! MX takes plaintext mail through portcullis, also behind postscreen.

mod common;

use common::mail::{
    client, loopback, managesieve, proxy_config, tools, unique_subject, ClientRun, MailStack,
    CLIENT_IP, CLIENT_LIMIT, PASSWORD, SNI,
};
use common::{run_cmd, tool, Proxy};
use tokio::io::AsyncWriteExt;

const SUBMISSION: &str = "protocol: smtp, tls: starttls";
const MX: &str = "protocol: smtp, tls: starttls, require_tls: false, hostname: mx.example.test";
const IMAP: &str = "protocol: imap, tls: starttls";
const POP3: &str = "protocol: pop3, tls: starttls";
const SIEVE: &str = "protocol: sieve, tls: starttls";

const ALICE: &str = "alice@example.test";
/// A sender on the outside, for mail that arrives at the MX.
const STRANGER: &str = "carol@sender.test";

/// Sends one message to alice through a portcullis SMTP listener with smtplib;
/// `tls` is `starttls` or `none`. Logs in when the sender is alice.
async fn send(proxy: &Proxy, listener: &str, tls: &str, from: &str, subject: &str) -> ClientRun {
    let mut extra = vec!["--tls", tls, "--to", ALICE, "--subject", subject];
    if from != ALICE {
        extra.push("--no-login");
    }
    let run = client("submit", proxy.addr(listener), from, &extra).await;
    run.assert_ok();
    run.assert_line("SENT OK");
    assert_eq!(
        run.lines("STARTTLS OK").len(),
        usize::from(tls == "starttls"),
        "{}",
        run.output
    );
    run
}

/// The message subjects in `run`'s lines that start with `prefix`, sorted.
fn subjects(run: &ClientRun, prefix: &str) -> Vec<String> {
    let mut found: Vec<String> = run
        .lines(prefix)
        .iter()
        .map(|l| l[prefix.len()..].trim().to_string())
        .collect();
    found.sort();
    found
}

/// The acceptance test for the STARTTLS ports: mail in on 587 and on 25 (with
/// and without TLS), read back on 143 and 110.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submission_and_mx_then_read_back_over_imap_and_pop3() {
    if !tools("submission_and_mx_then_read_back_over_imap_and_pop3") {
        return;
    }
    let mail = MailStack::start().await;
    let proxy = Proxy::start(&proxy_config(&[
        ("submission", SUBMISSION, loopback(mail.submission_port)),
        ("mx", MX, loopback(mail.mx_port)),
        ("imap", IMAP, loopback(mail.imap_port)),
        ("pop3", POP3, loopback(mail.pop3_port)),
    ]))
    .await;
    let tag = unique_subject();
    let mut expected = vec![
        format!("{tag} submission"),
        format!("{tag} mx-plaintext"),
        format!("{tag} mx-starttls"),
    ];

    let submitted = send(&proxy, "submission", "starttls", ALICE, &expected[0]).await;
    // Postfix's own EHLO reply, after TLS, with its SASL mechanisms and
    // without a second STARTTLS offer.
    let ehlo = submitted.line("EHLO 250");
    assert!(ehlo.contains("PLAIN"), "{}", submitted.output);
    assert!(ehlo.ends_with("no-starttls"), "{}", submitted.output);
    submitted.assert_line("LOGIN OK");
    send(&proxy, "mx", "none", STRANGER, &expected[1]).await;
    send(&proxy, "mx", "starttls", STRANGER, &expected[2]).await;
    expected.sort();

    let imap = client(
        "imap-find",
        proxy.addr("imap"),
        ALICE,
        &["--tls", "starttls", "--subject", &tag, "--count", "3"],
    )
    .await;
    imap.assert_ok();
    assert!(
        imap.line("PRE-TLS CAPABILITY").contains("LOGINDISABLED"),
        "{}",
        imap.output
    );
    // Dovecot's own capabilities: secured, so LOGIN is allowed.
    assert!(
        !imap.line("CAPABILITY").contains("LOGINDISABLED"),
        "{}",
        imap.output
    );
    imap.assert_line("LOGIN OK");
    assert_eq!(subjects(&imap, "FOUND"), expected, "{}", imap.output);

    let pop3 = client("pop3", proxy.addr("pop3"), ALICE, &["--tls", "starttls"]).await;
    pop3.assert_ok();
    pop3.assert_line("STLS OK");
    pop3.assert_line("LOGIN OK");
    pop3.assert_line("STAT OK (3,");
    assert_eq!(subjects(&pop3, "SUBJECT"), expected, "{}", pop3.output);

    // Every backend saw the real client, from the PROXY header.
    let client_info = format!("client=unknown[{CLIENT_IP}]");
    mail.postfix
        .log_line(&[
            "postfix/submission/smtpd",
            &client_info,
            "sasl_username=alice@example.test",
        ])
        .await;
    mail.postfix
        .log_line(&["postfix/mx/smtpd", &client_info])
        .await;
    for login in ["imap-login", "pop3-login"] {
        mail.dovecot
            .secured_login(login, "alice@example.test")
            .await;
    }
    proxy.shutdown().await;
}

/// postscreen sends the first line of a multi-line banner (`220-…`), waits,
/// and condemns a client that speaks before the last line (`220 …`): a proxy
/// that greeted on the client's behalf too early would never get mail in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_mx_passes_postscreens_pregreet_test() {
    if !tools("plaintext_mx_passes_postscreens_pregreet_test") {
        return;
    }
    let mail = MailStack::start().await;
    let proxy = Proxy::start(&proxy_config(&[("mx", MX, loopback(mail.postscreen_port))])).await;

    send(&proxy, "mx", "none", STRANGER, &unique_subject()).await;
    let screened = format!("PASS NEW [{CLIENT_IP}]");
    mail.postfix
        .log_line(&["postfix/postscreen", &screened])
        .await;
    mail.postfix
        .log_line(&["to=<alice@example.test>", "relay=virtual", "status=sent"])
        .await;

    // The control: a client that does speak first is caught, so the absence
    // of PREGREET below means something.
    let mut early = tokio::net::TcpStream::connect(("127.0.0.1", mail.postscreen_port))
        .await
        .expect("connect to postscreen");
    early
        .write_all(b"PROXY TCP4 127.0.0.3 127.0.0.1 40000 25\r\nEHLO early.test\r\n")
        .await
        .expect("write to postscreen");
    mail.postfix.log_line(&["PREGREET", "[127.0.0.3]"]).await;
    let pregreets = mail.postfix.log_lines("PREGREET");
    assert!(
        pregreets.iter().all(|l| l.contains("[127.0.0.3]")),
        "{pregreets:#?}"
    );
    proxy.shutdown().await;
}

/// swaks, the SMTP test tool admins reach for: STARTTLS with SNI, AUTH PLAIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_submits_over_starttls() {
    let test = "swaks_submits_over_starttls";
    if !tools(test) || !tool("swaks", test) {
        return;
    }
    let mail = MailStack::start().await;
    let proxy = Proxy::start(&proxy_config(&[
        ("submission", SUBMISSION, loopback(mail.submission_port)),
        ("imap", IMAP, loopback(mail.imap_port)),
    ]))
    .await;
    let subject = unique_subject();
    let port = proxy.addr("submission").port().to_string();
    let header = format!("Subject: {subject}");
    #[rustfmt::skip]
    let args = [
        // IP literals and explicit names: swaks resolves nothing.
        "--server", "127.0.0.1", "--port", &port, "--local-interface", CLIENT_IP,
        "--helo", "client.test", "--from", ALICE, "--to", ALICE, "--header", &header,
        "--tls", "--tls-sni", SNI,
        "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", PASSWORD,
        "--timeout", "10",
    ];
    let (ok, stdout, stderr) = run_cmd("swaks", &args, b"", CLIENT_LIMIT).await;
    assert!(ok, "swaks failed:\n{stdout}{stderr}");
    // swaks's transcript: the upgrade, then Postfix's answer to AUTH.
    assert!(
        stdout.contains("<-  220 2.0.0 Ready to start TLS"),
        "{stdout}"
    );
    assert!(
        stdout.contains("<~  235 2.7.0 Authentication successful"),
        "{stdout}"
    );

    let read = client(
        "imap-find",
        proxy.addr("imap"),
        ALICE,
        &["--tls", "starttls", "--subject", &subject],
    )
    .await;
    read.assert_ok();
    assert_eq!(read.line("FOUND"), format!("FOUND {subject}"));
    mail.postfix
        .log_line(&[
            &format!("client=unknown[{CLIENT_IP}]"),
            "sasl_method=PLAIN",
            "sasl_username=alice@example.test",
        ])
        .await;
    proxy.shutdown().await;
}

/// ManageSieve keeps the backend's greeting: after STARTTLS the client must
/// hear the server's capabilities again (RFC 5804 §2.2), now Dovecot's, and
/// with SASL mechanisms that portcullis' own pre-TLS list withholds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managesieve_over_starttls() {
    let test = "managesieve_over_starttls";
    if !tools(test) || !managesieve(test) {
        return;
    }
    let mail = MailStack::start().await;
    let sieve_port = mail.sieve_port.expect("ManageSieve is installed");
    let proxy = Proxy::start(&proxy_config(&[("sieve", SIEVE, loopback(sieve_port))])).await;

    let run = client("sieve", proxy.addr("sieve"), ALICE, &[]).await;
    run.assert_ok();
    let greeting = run.line("GREETING");
    assert!(
        greeting.contains("\"STARTTLS\"") && greeting.contains("\"SASL\" \"\""),
        "{}",
        run.output
    );
    run.assert_line("STARTTLS OK");
    let capability = run.line("CAPABILITY");
    assert!(
        capability.contains("Pigeonhole\"") && capability.contains("\"SASL\" \"PLAIN"),
        "{}",
        run.output
    );
    run.assert_line("LOGIN OK");
    run.assert_line("PUTSCRIPT OK");
    assert!(
        run.line("LISTSCRIPTS").contains("\"portcullis\""),
        "{}",
        run.output
    );
    run.assert_line("LOGOUT OK");

    mail.dovecot
        .secured_login("managesieve-login", "alice@example.test")
        .await;
    proxy.shutdown().await;
}

/// sieve-connect, a real ManageSieve client, refuses a server whose
/// capability list lacks `SIEVE` (RFC 5804 §1.7). Through portcullis it
/// upgrades, logs in to Dovecot, uploads a script and lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sieve_connect_uploads_and_lists_through_portcullis() {
    let test = "sieve_connect_uploads_and_lists_through_portcullis";
    if !tools(test) || !managesieve(test) || !tool("sieve-connect", test) {
        return;
    }
    let mail = MailStack::start().await;
    let sieve_port = mail.sieve_port.expect("ManageSieve is installed");
    let proxy = Proxy::start(&proxy_config(&[("sieve", SIEVE, loopback(sieve_port))])).await;
    let script = proxy.dir.path().join("vacation.sieve");
    std::fs::write(&script, "require \"fileinto\";\nkeep;\n").unwrap();
    let port = proxy.addr("sieve").port().to_string();
    let script = script.to_str().unwrap();
    let upload = [
        "--upload",
        "--localsieve",
        script,
        "--remotesieve",
        "portcullis-test",
    ];
    let (ok, out, err) = sieve_connect(&port, &upload).await;
    assert!(ok, "sieve-connect --upload failed:\n{out}{err}");
    let (ok, out, err) = sieve_connect(&port, &["--list"]).await;
    assert!(ok, "sieve-connect --list failed:\n{out}{err}");
    assert!(out.contains("portcullis-test"), "{out}{err}");
    proxy.shutdown().await;
}

/// Runs sieve-connect as alice against 127.0.0.1:`port` (no SRV lookup, SNI
/// set, the test certificate not verified), password on stdin.
async fn sieve_connect(port: &str, action: &[&str]) -> (bool, String, String) {
    let mut args = vec!["--server", "127.0.0.1", "--port", port, "--nosrv"];
    args.extend(["--user", ALICE, "--passwordfd", "0"]);
    args.extend(["--notlsverify", "--tlshostname", SNI]);
    args.extend(action);
    let password = format!("{PASSWORD}\n");
    run_cmd("sieve-connect", &args, password.as_bytes(), CLIENT_LIMIT).await
}
