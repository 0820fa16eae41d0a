//! The `portcullis` binary as an operator uses it: `check` like `nginx -t`, and
//! `run` on the bundled `config.example.yaml` (so the example cannot rot).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.yaml");

fn check(config: &Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_example_with_a_one_line_summary() {
    let (code, out, err) = check(Path::new(EXAMPLE));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains("ok: 9 listeners on 10 addresses, 3 hosts with 5 names"),
        "{out}"
    );
    assert!(err.is_empty(), "no warnings for the example: {err}");
}

#[test]
fn check_lists_every_problem_with_its_key_path() {
    let dir = common::scratch();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        r#"
listeners:
  imaps: { bind: "0.0.0.0:993", protocol: imap, tls: implict }
  pop3s: { bind: "0.0.0.0:995", protocol: pop3, tls: implicit }
backends:
  pop3s: 127.0.0.1:10110
hosts:
  - names: [mail.example.com]
    certificate: self-signed
  - names: [other.example.com]
    certificate: self-signed
    backends:
      pop3s: "10.0.0.5:99999"
    colour: blue
"#,
    )
    .unwrap();
    let (code, out, err) = check(&path);
    assert_eq!(code, 1, "{out}{err}");
    for want in [
        "listeners.imaps.tls: unknown variant `implict`",
        "hosts[1].backends.pop3s: invalid address \"10.0.0.5:99999\"",
        "hosts[1].colour: unknown key",
        "3 problem(s), config not valid",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert!(out.is_empty());
}

#[test]
fn check_refuses_a_key_that_does_not_match_its_certificate() {
    let dir = common::scratch();
    let (crt, _) = common::cert_files(dir.path(), "a", &["mail.example.test"]);
    let (_, other_key) = common::cert_files(dir.path(), "b", &["mail.example.test"]);
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        format!(
            r#"
listeners: {{ imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }} }}
backends: {{ imaps: 127.0.0.1:10143 }}
hosts:
  - names: [mail.example.test]
    certificate: {{ cert: {}, key: {} }}
  - names: [gone.example.test]
    certificate: {{ cert: missing.crt, key: missing.key }}
"#,
            crt.display(),
            other_key.display()
        ),
    )
    .unwrap();
    let (code, _, err) = check(&path);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("hosts[0] (mail.example.test): "), "{err}");
    assert!(
        err.contains("b.key does not match the certificate in"),
        "{err}"
    );
    assert!(err.contains("hosts[1] (gone.example.test): "), "{err}");
    assert!(err.contains("missing.crt: cannot read"), "{err}");
}

/// The README's run command on the example (ports swapped for free ones):
/// a TLS 1.3 handshake shows the host's certificate, the certificate is kept
/// across a restart, and SIGTERM exits 0.
#[test]
fn the_example_config_runs_and_serves_its_certificates() {
    if !common::tool(
        "openssl",
        "the_example_config_runs_and_serves_its_certificates",
    ) {
        return;
    }
    let dir = common::scratch();
    let mut text = std::fs::read_to_string(EXAMPLE).unwrap();
    for port in [
        "10993", "10465", "10995", "10443", "10587", "10025", "10143", "10110", "14190",
    ] {
        text = text.replace(&format!(":{port}\""), ":0\"");
    }
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, text).unwrap();

    let first = serve_once(&config);
    assert!(first.contains("CN = mail.example.test"), "{first}");
    assert!(first.contains("TLSv1.3"), "{first}");
    let key = dir
        .path()
        .join("state/self-signed/mail.example.test/key.pem");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let second = serve_once(&config);
    assert_eq!(
        certificate_pem(&first),
        certificate_pem(&second),
        "same certificate after a restart"
    );
}

/// Starts `portcullis run`, asks for the IMAPS certificate with openssl, sends
/// SIGTERM; returns what openssl printed.
fn serve_once(config: &Path) -> String {
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut addrs = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while addrs.len() < 9 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            // "… listening listener=imaps addr=127.0.0.1:40211"
            let field = |name: &str| {
                line.split(&format!("{name}="))
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .map(str::to_string)
            };
            if let (true, Some(l), Some(a)) =
                (line.contains("listening"), field("listener"), field("addr"))
            {
                if a.starts_with("127.") {
                    addrs.insert(l, a);
                }
            }
        }
    }
    if addrs.len() < 9 {
        let _ = child.kill();
        panic!("portcullis did not report all its addresses: {addrs:?}");
    }
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let shown = openssl(&[
        "s_client",
        "-connect",
        &addrs["imaps"],
        "-servername",
        "mail.example.test",
    ]);
    // the README's STARTTLS check, on the submission port, for the other host
    let starttls = openssl(&[
        "s_client",
        "-connect",
        &addrs["submission"],
        "-starttls",
        "smtp",
        "-servername",
        "mail.other.test",
    ]);
    assert!(starttls.contains("CN = mail.other.test"), "{starttls}");
    // SIGHUP (systemctl reload, logrotate) must not kill it
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "still running after SIGHUP"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(code) = child.try_wait().unwrap() {
            assert!(code.success(), "exit status after SIGTERM: {code}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.contains("reload is not supported yet")),
        "{rest:?}"
    );
    shown
}

fn certificate_pem(openssl_output: &str) -> &str {
    let start = openssl_output.find("-----BEGIN CERTIFICATE-----").unwrap();
    let end = openssl_output.find("-----END CERTIFICATE-----").unwrap();
    &openssl_output[start..end]
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = common::scratch();
    let config = dir.path().join("json.yaml");
    std::fs::write(
        &config,
        r#"
listeners: { imaps: { bind: "127.0.0.1:0", protocol: imap, tls: implicit } }
backends: { imaps: 127.0.0.1:9 }
hosts: [ { names: [mail.example.test], certificate: self-signed } ]
log: { format: json, level: info }
"#,
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().expect("a log line").unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(child.wait().unwrap().success());
    let event: serde_json::Value = serde_json::from_str(&first).expect("JSON");
    assert_eq!(event["message"], "listening", "{first}");
    assert_eq!(event["listener"], "imaps");
    assert_eq!(event["level"], "INFO");
    for line in rest {
        serde_json::from_str::<serde_json::Value>(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
}

#[test]
fn check_warns_when_plaintext_mx_shares_the_submission_backend() {
    let dir = common::scratch();
    let path = dir.path().join("mx.yaml");
    std::fs::write(
        &path,
        r#"
listeners:
  submission: { bind: "127.0.0.1:0", protocol: smtp, tls: starttls }
  smtp: { bind: "127.0.0.1:0", protocol: smtp, tls: starttls, require_tls: false }
backends: { submission: 127.0.0.1:20587, smtp: 127.0.0.1:20587 }
hosts: [ { names: [mail.example.test], certificate: self-signed } ]
"#,
    )
    .unwrap();
    let (code, out, err) = check(&path);
    assert_eq!(code, 0, "a warning, not an error: {err}");
    assert!(out.contains("ok:"), "{out}");
    assert!(
        err.contains("warning: listener smtp passes plaintext SMTP to 127.0.0.1:20587, which TLS-only listener submission also uses"),
        "{err}"
    );
}
