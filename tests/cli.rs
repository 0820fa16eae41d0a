//! The `portcullis` binary as an operator uses it: `check` like `nginx -t`,
//! `run` on the bundled `config.example.yaml` (so the example cannot rot),
//! `certs` and `renew` with and without a running instance, and ACME orders
//! through an `HTTPS_PROXY` (against a real Pebble).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{path_str, portcullis, Running, BIN, INHERITED, QUICK};
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
        out.contains("ok: 10 listeners on 11 addresses, 4 hosts with 8 names"),
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

/// The etcd files are read by `check` as by `run`: a missing password file
/// or CA is a problem with its path, without etcd having to answer.
#[test]
fn check_reads_the_etcd_tls_and_password_files() {
    let dir = common::scratch();
    let path = dir.path().join("c.yaml");
    let config = |store: &str| {
        format!(
            r#"
state_dir: state
store:
{store}
listeners: {{ imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }} }}
backends: {{ imaps: 127.0.0.1:10143 }}
hosts: [ {{ names: [mail.example.test], certificate: self-signed }} ]
"#
        )
    };
    std::fs::write(
        &path,
        config("  etcd: { endpoints: [\"http://127.0.0.1:9\"], node: a, user: portcullis, password_file: pw }"),
    )
    .unwrap();
    let (code, out, err) = check(&path);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("store.etcd: password_file "), "{err}");
    assert!(err.contains("pw: No such file or directory"), "{err}");
    assert!(!err.contains("store.etcd: store.etcd"), "said once: {err}");

    std::fs::write(
        &path,
        config("  etcd: { endpoints: [\"https://127.0.0.1:9\"], node: a, tls: { ca: nope.pem } }"),
    )
    .unwrap();
    let (code, _, err) = check(&path);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("store.etcd: tls: ") && err.contains("nope.pem"),
        "{err}"
    );

    // With the password file there, and etcd down (port 9): valid.
    std::fs::write(dir.path().join("pw"), "secret\n").unwrap();
    std::fs::write(
        &path,
        config("  etcd: { endpoints: [\"http://127.0.0.1:9\"], node: a, user: portcullis, password_file: pw }"),
    )
    .unwrap();
    let (code, out, err) = check(&path);
    assert_eq!(code, 0, "{out}{err}");
}

/// `check` reads the TSIG secret file as an order does: one others can
/// read, or one that is missing, is a warning (the proxy serves without
/// it; only dns-01 orders would fail), not a reason to refuse the config.
#[test]
fn check_warns_of_an_unusable_tsig_secret_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = common::scratch();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        r#"
state_dir: state
acme:
  directory: letsencrypt-staging
  terms_of_service_agreed: true
  dns: { server: "127.0.0.1:53", zone: example.test, tsig: { name: k, secret_file: tsig.key } }
listeners: { imaps: { bind: "127.0.0.1:0", protocol: imap, tls: implicit } }
backends: { imaps: 127.0.0.1:10143 }
hosts: [ { names: [example.test, "*.example.test"], certificate: acme, acme: { challenges: [dns-01] } } ]
"#,
    )
    .unwrap();
    let key = dir.path().join("tsig.key");
    let (code, _, err) = check(&path);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: dns-01 orders will fail: TSIG secret file ")
            && err.contains("No such file"),
        "{err}"
    );
    std::fs::write(
        &key,
        "key \"k\" { algorithm hmac-sha256; secret \"c2VjcmV0\"; };\n",
    )
    .unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, _, err) = check(&path);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("open to group or others (mode 640): chmod 600 it"),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, out, err) = check(&path);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("dns-01"), "{err}");
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
    // Every port the example binds, so that the example itself may run
    // beside the tests (the README's quick tour keeps it running).
    for port in [
        "10993", "10465", "10995", "10443", "10587", "10025", "10143", "10110", "14190", "10080",
    ] {
        text = text.replace(&format!(":{port}\""), ":0\"");
    }
    assert!(
        text.contains("bind: 127.0.0.1:19099"),
        "the example's admin address"
    );
    text = text.replace("bind: 127.0.0.1:19099", "bind: 127.0.0.1:0");
    assert!(
        !text.contains(":100") && !text.contains(":1909"),
        "a port of the example is left:\n{text}"
    );
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
    let mut said = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while addrs.len() < 9 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            said.push(line.clone());
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
        let _ = child.wait();
        said.extend(rx.try_iter());
        panic!(
            "portcullis did not report all its addresses: {addrs:?}; it said:\n{}",
            said.join("\n")
        );
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
        rest.iter().any(|l| l.contains("configuration reloaded")
            && l.contains("trigger=\"SIGHUP\"")
            && l.contains("changes=nothing changed")),
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

// --- `certs`, `renew`, the control socket, and ACME through an egress proxy ---

/// A certificate's notAfter as `portcullis certs` prints it.
fn not_after(pem_path: &Path) -> String {
    let pem = std::fs::read(pem_path).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    let secs = cert.validity().not_after.timestamp();
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The table row of `portcullis certs` whose NAMES column is `names`, and
/// its `last error` line, if it has one among its indented lines.
fn row<'a>(table: &'a str, names: &str) -> (Vec<&'a str>, Option<&'a str>) {
    let lines: Vec<&str> = table.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.split_whitespace().next() == Some(names))
        .unwrap_or_else(|| panic!("no row for {names} in:\n{table}"));
    let error = lines[at + 1..]
        .iter()
        .take_while(|l| l.starts_with("    "))
        .find(|l| l.starts_with("    last error"))
        .copied();
    (lines[at].split_whitespace().collect(), error)
}

/// A row's indented detail line starting with `what`.
fn detail<'a>(table: &'a str, names: &str, what: &str) -> Option<&'a str> {
    let lines: Vec<&str> = table.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.split_whitespace().next() == Some(names))?;
    lines[at + 1..]
        .iter()
        .take_while(|l| l.starts_with("    "))
        .find_map(|l| l.strip_prefix(&format!("    {what}: ")))
}

fn json_rows(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

const CERTS_HEADER: [&str; 8] = [
    "NAMES", "SOURCE", "KEY", "NOT", "AFTER", "DAYS", "NEXT", "RENEWAL",
];

/// A files host, a self-signed host and an ACME host (its CA never asked).
fn three_sources(dir: &Path) -> std::path::PathBuf {
    common::cert_files(dir, "files", &["files.example.test", "imap.example.test"]);
    let config = dir.join("certs.yaml");
    std::fs::write(
        &config,
        r#"
state_dir: state
acme:
  directory: "https://127.0.0.1:9/dir"
  terms_of_service_agreed: true
  challenges: [http-01]
listeners:
  imaps: { bind: "127.0.0.1:0", protocol: imap, tls: implicit }
  http: { bind: "127.0.0.1:0", protocol: http }
backends: { imaps: 127.0.0.1:9 }
hosts:
  - names: [files.example.test, imap.example.test]
    certificate: { cert: files.crt, key: files.key }
  - names: [self.example.test]
    certificate: self-signed
  - names: [acme.example.test]
    certificate: acme
"#,
    )
    .unwrap();
    config
}

#[test]
fn certs_without_an_instance_reads_the_disk() {
    let dir = common::scratch();
    let config = three_sources(dir.path());
    let files_not_after = not_after(&dir.path().join("files.crt"));

    let (code, out, err) = portcullis(&["certs", "--config", path_str(&config)], QUICK);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "(no running instance: certificates on disk, no renewal times)"
    );
    let header: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(header[..8], CERTS_HEADER, "{out}");
    assert_eq!(header[8], "ISSUER", "{out}");

    let (files, next) = row(&out, "files.example.test,imap.example.test");
    assert_eq!(
        [files[1], files[2], files[3], files[5]],
        ["files", "ecdsa-p256", &files_not_after, "-"],
        "{out}"
    );
    // Days left, as certbot's `certificates` shows them.
    let days: u64 = files[4].parse().unwrap_or_else(|_| panic!("DAYS: {out}"));
    assert!(days > 14, "{out}");
    assert!(files.len() > 6, "an issuer: {out}");
    // The serial and the files, as certbot shows them.
    let files_line = detail(&out, "files.example.test,imap.example.test", "files").unwrap();
    assert!(
        files_line.ends_with("files.crt ") || files_line.contains("files.crt "),
        "{out}"
    );
    assert!(files_line.ends_with("files.key"), "{out}");
    assert!(
        detail(&out, "files.example.test,imap.example.test", "serial").is_some(),
        "{out}"
    );
    assert!(!next.unwrap_or("").starts_with("    last error"), "{out}");
    // Never run: the self-signed certificate is not generated by `certs`.
    let (own, next) = row(&out, "self.example.test");
    assert_eq!(own[1..6], ["self-signed", "-", "-", "-", "-"], "{out}");
    assert!(next.unwrap().starts_with("    last error: "), "{out}");
    let (acme, next) = row(&out, "acme.example.test");
    assert_eq!(acme[1..], ["acme", "ecdsa-p256", "-", "-", "-"], "{out}");
    assert_eq!(next, Some("    last error: nothing issued yet"), "{out}");
    assert!(
        !dir.path().join("state").exists(),
        "certs without an instance writes nothing"
    );

    let (code, out, err) = portcullis(&["certs", "--config", path_str(&config), "--json"], QUICK);
    assert_eq!(code, 0, "{out}{err}");
    let rows = json_rows(&out);
    assert_eq!(rows.len(), 3, "one object per host: {out}");
    // The files, where there are some (not for what was never made).
    assert_eq!(
        rows[0]["cert_path"]
            .as_str()
            .map(|p| p.ends_with("files.crt")),
        Some(true),
        "{out}"
    );
    assert!(rows[1].get("cert_path").is_none(), "{out}");
    for r in &rows {
        let mut keys: Vec<&str> = r
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .filter(|k| !k.ends_with("_path"))
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "issuer",
                "key_type",
                "last_error",
                "names",
                "next_renewal",
                "not_after",
                "serial",
                "source"
            ],
            "{r}"
        );
        assert!(r["next_renewal"].is_null(), "{r}");
    }
    assert_eq!(
        rows[0]["names"],
        serde_json::json!(["files.example.test", "imap.example.test"])
    );
    assert_eq!(rows[0]["source"], "files");
    assert_eq!(rows[0]["not_after"], files_not_after.as_str());
    assert_ne!(rows[0]["serial"], "");
    assert_ne!(rows[0]["issuer"], "");
    assert!(rows[0]["last_error"].is_null());
    assert_eq!(rows[1]["source"], "self-signed");
    assert!(rows[1]["last_error"].is_string());
    assert_eq!(rows[2]["names"], serde_json::json!(["acme.example.test"]));
    assert_eq!(rows[2]["source"], "acme");
    assert_eq!(rows[2]["not_after"], "");
    assert_eq!(rows[2]["last_error"], "nothing issued yet");
}

#[test]
fn renew_without_an_instance_says_how_to_start_one() {
    let dir = common::scratch();
    let config = three_sources(dir.path());
    let state = dir.path().join("state");
    let want = format!(
        "no running portcullis answers on {}: start it with `portcullis run --config {}`",
        state.join("control.sock").display(),
        config.display()
    );
    let (code, out, err) = portcullis(&["renew", "--config", path_str(&config)], QUICK);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains(&want), "{err}");
    assert!(out.is_empty(), "{out}");
    // Nothing to upgrade either: said the same way, and nothing started.
    let (code, out, err) = portcullis(&["upgrade", "--config", path_str(&config)], QUICK);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains(&want), "{err}");

    // A socket file left by a killed instance answers nobody: the same.
    std::fs::create_dir(&state).unwrap();
    drop(std::os::unix::net::UnixListener::bind(state.join("control.sock")).unwrap());
    let (code, _, err) = portcullis(
        &[
            "renew",
            "--force",
            "--config",
            path_str(&config),
            "acme.example.test",
        ],
        QUICK,
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&want), "{err}");
    let (code, out, err) = portcullis(&["certs", "--config", path_str(&config)], QUICK);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("(no running instance"), "{out}");
}

/// `certs` and `renew` against a running `portcullis run`; a second `run` on
/// the same state_dir is refused and leaves the first one answering; after
/// SIGTERM `certs` reads the disk again.
#[test]
fn certs_and_renew_ask_the_running_instance() {
    let dir = common::scratch();
    common::cert_files(dir.path(), "files", &["files.example.test"]);
    let config = dir.path().join("live.yaml");
    std::fs::write(
        &config,
        r#"
state_dir: state
listeners:
  imaps: { bind: "127.0.0.1:0", protocol: imap, tls: implicit }
  http: { bind: "127.0.0.1:0", protocol: http }
backends: { imaps: 127.0.0.1:9 }
hosts:
  - names: [files.example.test]
    certificate: { cert: files.crt, key: files.key }
  - names: [self.example.test, "*.self.example.test"]
    certificate: self-signed
"#,
    )
    .unwrap();
    let state = dir.path().join("state");
    // A stale socket from a killed instance is replaced.
    std::fs::create_dir(&state).unwrap();
    drop(std::os::unix::net::UnixListener::bind(state.join("control.sock")).unwrap());
    let cfg = path_str(&config);

    let mut first = Running::start(&config, &[]);
    first.wait_control(&state);

    let (code, out, err) = portcullis(&["certs", "--config", cfg], QUICK);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("no running instance"), "{out}");
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header[..8], CERTS_HEADER, "{out}");
    let (files, _) = row(&out, "files.example.test");
    assert_eq!(files[1], "files", "{out}");
    assert_eq!(files[5], "-", "no renewal for files: {out}");
    let (own, next) = row(&out, "self.example.test,*.self.example.test");
    assert_eq!(own[1], "self-signed", "{out}");
    assert_eq!(own[5], "-", "{out}");
    assert!(next.is_none(), "no error line: {out}");

    let (code, out, err) = portcullis(&["certs", "--config", cfg, "--json"], QUICK);
    assert_eq!(code, 0, "{out}{err}");
    let rows = json_rows(&out);
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(rows[1]["source"], "self-signed");
    assert_eq!(
        rows[1]["names"],
        serde_json::json!(["self.example.test", "*.self.example.test"])
    );
    let live_not_after = rows[1]["not_after"].as_str().unwrap().to_string();
    assert!(!live_not_after.is_empty());
    for r in &rows {
        assert!(r["next_renewal"].is_null(), "{r}");
        assert!(r["last_error"].is_null(), "{r}");
    }

    let (code, out, err) = portcullis(&["renew", "--config", cfg], QUICK);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("no host has certificate: acme"), "{err}");
    let (code, _, err) = portcullis(
        &["renew", "--config", cfg, "--force", "self.example.test"],
        QUICK,
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no host with certificate: acme is named self.example.test"),
        "{err}"
    );

    // A second instance on the same state_dir: refused, quickly.
    let (code, out, err) = portcullis(&["run", "--config", cfg], QUICK);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("another portcullis is running with this state_dir"),
        "{err}"
    );
    let (code, out, _) = portcullis(&["certs", "--config", cfg], QUICK);
    assert_eq!(code, 0);
    assert!(
        !out.contains("no running instance"),
        "the first instance still answers: {out}"
    );

    let status = first.stop();
    assert!(status.success(), "{status}:\n{}", first.log());
    assert!(
        !state.join("control.sock").exists(),
        "the socket is removed at exit"
    );
    // From the disk now: the certificate the instance generated.
    let (code, out, err) = portcullis(&["certs", "--config", cfg], QUICK);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("(no running instance"), "{out}");
    let (own, next) = row(&out, "self.example.test,*.self.example.test");
    assert_eq!(
        [own[1], own[2], own[3], own[5]],
        ["self-signed", "ecdsa-p256", &live_not_after, "-"],
        "{out}"
    );
    assert!(!next.unwrap_or("").starts_with("    last error"), "{out}");
}

#[test]
fn check_lists_acme_mistakes_with_their_key_paths() {
    let dir = common::scratch();
    let path = dir.path().join("acme.yaml");
    std::fs::write(
        &path,
        r#"
acme:
  directory: "http://acme.example.test/dir"
  contact: [postmaster@example.test]
  terms_of_service_agreed: false
  eab: { kid: kid-1, hmac_key: "not base64!" }
  key_type: dsa
  renew_before: 2y
listeners:
  imaps: { bind: "127.0.0.1:0", protocol: imap, tls: implicit }
  http: { bind: "127.0.0.1:0", protocol: http, tls: implicit }
backends: { imaps: 127.0.0.1:10143 }
hosts:
  - names: [mail.example.test, "*.example.org"]
    certificate: acme
"#,
    )
    .unwrap();
    let (code, out, err) = check(&path);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.is_empty(), "{out}");
    let wants = [
        "acme.directory: \"http://acme.example.test/dir\": expected",
        "acme.contact[0]: \"postmaster@example.test\": expected mailto:",
        "acme.terms_of_service_agreed: the CA issues nothing",
        "acme.eab.hmac_key: expected the base64url key",
        "acme.key_type: ",
        "acme.renew_before: 2years is out of range",
        "listeners.http.tls: http listeners are plaintext",
    ];
    for want in wants {
        let want = format!("{}: {want}", path.display());
        assert!(
            err.lines().any(|l| l.starts_with(&want)),
            "missing {want:?} in:\n{err}"
        );
    }
    assert!(
        err.contains(&format!("{} problem(s), config not valid", wants.len())),
        "{err}"
    );

    // `certificate: acme` without an `acme:` block, and an ACME block whose
    // only challenge no listener can answer.
    let path = dir.path().join("acme2.yaml");
    std::fs::write(
        &path,
        r#"
listeners: { imap: { bind: "127.0.0.1:0", protocol: imap, tls: starttls } }
backends: { imap: 127.0.0.1:10143 }
hosts: [ { names: [a.example.test], certificate: acme } ]
"#,
    )
    .unwrap();
    let (code, _, err) = check(&path);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("hosts[0].certificate: acme needs an `acme:` block"),
        "{err}"
    );
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("acme: {{ directory: letsencrypt, terms_of_service_agreed: true, challenges: [http-01] }}\n{text}"),
    )
    .unwrap();
    let (code, _, err) = check(&path);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("acme.challenges: no listener can answer http-01"),
        "{err}"
    );
}

/// A minimal HTTP CONNECT proxy on loopback that records every CONNECT
/// target and counts the bytes it relays. It only connects to IP literals on
/// loopback: it never resolves.
struct ConnectProxy {
    /// `http://127.0.0.1:PORT`.
    url: String,
    targets: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    relayed: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ConnectProxy {
    async fn start() -> ConnectProxy {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let targets = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let relayed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (seen, count) = (targets.clone(), relayed.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (seen, count) = (seen.clone(), count.clone());
                tokio::spawn(async move {
                    let head = common::read_until(&mut client, b"\r\n\r\n").await;
                    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                        return;
                    };
                    let text = String::from_utf8_lossy(&head[..end]).into_owned();
                    let mut words = text.split_whitespace();
                    let (method, target) = (words.next(), words.next().unwrap_or(""));
                    if method != Some("CONNECT") {
                        let _ = client
                            .write_all(
                                b"HTTP/1.1 405 Method Not Allowed\r\nConnection: close\r\n\r\n",
                            )
                            .await;
                        return;
                    }
                    seen.lock().unwrap().push(target.to_string());
                    let addr = target
                        .parse::<std::net::SocketAddr>()
                        .ok()
                        .filter(|a| a.ip().is_loopback());
                    let upstream = match addr {
                        Some(a) => tokio::net::TcpStream::connect(a).await.ok(),
                        None => None,
                    };
                    let Some(mut upstream) = upstream else {
                        let _ = client
                            .write_all(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n")
                            .await;
                        return;
                    };
                    if client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_err()
                        || upstream.write_all(&head[end + 4..]).await.is_err()
                    {
                        return;
                    }
                    // Both ways, counting as the bytes pass (a pooled
                    // tunnel stays open between requests).
                    let (cr, cw) = client.into_split();
                    let (ur, uw) = upstream.into_split();
                    tokio::join!(pump(cr, uw, &count), pump(ur, cw, &count));
                });
            }
        });
        ConnectProxy {
            url,
            targets,
            relayed,
        }
    }

    fn relayed(&self) -> u64 {
        self.relayed.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap().clone()
    }
}

/// Copies until EOF or an error, adding what passes to `count`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: &std::sync::atomic::AtomicU64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        count.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// One ACME host on a Pebble, http-01 answered by the http listener on
/// Pebble's http port.
fn pebble_config(dir: &Path, pebble: &common::acme::Pebble, http_port: u16) -> std::path::PathBuf {
    let config = dir.join("acme.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
state_dir: state
acme:
  directory: "{directory}"
  ca_roots: {ca_roots}
  terms_of_service_agreed: true
  challenges: [http-01]
listeners:
  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
  http: {{ bind: "127.0.0.1:{http_port}", protocol: http }}
backends: {{ imaps: 127.0.0.1:9 }}
hosts:
  - names: [www.example.test]
    certificate: acme
"#,
            directory = pebble.directory,
            ca_roots = pebble.ca_roots.display(),
        ),
    )
    .unwrap();
    config
}

/// `HTTPS_PROXY` sends every request to the CA through a CONNECT tunnel
/// (hyper-util's env matcher has no loopback exception, so a loopback CA is
/// proxied too); `NO_PROXY` naming the CA's address goes direct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_goes_through_the_https_proxy_unless_no_proxy_says_not() {
    if !common::acme::tools("acme_goes_through_the_https_proxy_unless_no_proxy_says_not") {
        return;
    }
    let proxy = ConnectProxy::start().await;
    let http_port = common::acme::free_port();
    let pebble = common::acme::Pebble::start(http_port, common::acme::free_port()).await;
    let ca = format!("127.0.0.1:{}", pebble.ports().listen);
    let issue_limit = Duration::from_secs(90);

    let dir = common::scratch();
    let config = pebble_config(dir.path(), &pebble, http_port);
    let cfg = path_str(&config);
    let mut run = Running::start(&config, &[("HTTPS_PROXY", proxy.url.clone())]);
    let or_panic =
        |r: Result<String, String>| r.unwrap_or_else(|e| panic!("{e}\n{}", pebble.log()));
    or_panic(run.wait_log(
        &[
            "ACME requests go through a proxy",
            &format!("proxy={}/", proxy.url),
        ],
        issue_limit,
    ));
    or_panic(run.wait_log(
        &["certificate issued", "names=www.example.test", "Pebble"],
        issue_limit,
    ));
    or_panic(run.wait_log(&["acme http-01 challenge answered"], QUICK));
    let targets = proxy.targets();
    assert!(!targets.is_empty(), "no CONNECT:\n{}", run.log());
    assert!(
        targets.iter().all(|t| *t == ca),
        "every tunnel to the CA {ca}: {targets:?}"
    );

    // The running instance shows it, and renews it on demand, through the proxy.
    let (code, out, err) = portcullis(&["certs", "--config", cfg, "--json"], QUICK);
    assert_eq!(code, 0, "{out}{err}");
    let rows = json_rows(&out);
    assert_eq!(rows[0]["source"], "acme", "{out}");
    assert!(
        rows[0]["issuer"].as_str().unwrap().contains("Pebble"),
        "{out}"
    );
    assert!(rows[0]["next_renewal"].is_string(), "{out}");
    assert!(rows[0]["last_error"].is_null(), "{out}");
    let (code, out, err) = portcullis(&["renew", "--config", cfg], QUICK);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("www.example.test: not_due: renews at "),
        "{out}"
    );
    let before = proxy.relayed();
    let (code, out, err) = portcullis(&["renew", "--config", cfg, "--force"], issue_limit);
    assert_eq!(code, 0, "{out}{err}\n{}", run.log());
    assert!(
        out.starts_with("www.example.test: renewed: serial "),
        "{out}"
    );
    assert!(proxy.relayed() > before, "the renewal was tunnelled too");
    assert!(proxy.targets().iter().all(|t| *t == ca));
    assert_eq!(pebble.issued(), 2);
    let status = run.stop();
    assert!(status.success(), "{status}");

    // NO_PROXY=127.0.0.1: direct, though HTTPS_PROXY names a dead proxy.
    let dir = common::scratch();
    let config = pebble_config(dir.path(), &pebble, http_port);
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let (tunnels, relayed) = (proxy.targets().len(), proxy.relayed());
    let mut run = Running::start(
        &config,
        &[
            ("HTTPS_PROXY", format!("http://{dead}")),
            ("NO_PROXY", "localhost,127.0.0.1".into()),
        ],
    );
    let or_panic =
        |r: Result<String, String>| r.unwrap_or_else(|e| panic!("{e}\n{}", pebble.log()));
    or_panic(run.wait_log(
        &["certificate issued", "names=www.example.test"],
        issue_limit,
    ));
    assert!(!run.log().contains("go through a proxy"), "{}", run.log());
    assert_eq!((proxy.targets().len(), proxy.relayed()), (tunnels, relayed));
    assert_eq!(pebble.issued(), 3);
    assert!(run.stop().success());
}

/// Only http:// CONNECT proxies: an https:// one is refused with a reason,
/// which `certs` shows as the host's last error.
#[test]
fn acme_refuses_a_proxy_that_is_not_http() {
    let dir = common::scratch();
    let (roots, _) = common::cert_files(dir.path(), "roots", &["ca.example.test"]);
    let config = dir.path().join("acme.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
state_dir: state
acme:
  directory: "https://127.0.0.1:9/dir"
  ca_roots: {}
  terms_of_service_agreed: true
  challenges: [http-01]
listeners:
  http: {{ bind: "127.0.0.1:0", protocol: http }}
hosts:
  - names: [www.example.test]
    certificate: acme
"#,
            roots.display()
        ),
    )
    .unwrap();
    let mut run = Running::start(&config, &[("HTTPS_PROXY", "https://127.0.0.1:9".into())]);
    let why = "proxy https://127.0.0.1:9/: only http:// CONNECT proxies are supported";
    run.wait_log(&["certificate order failed", why], QUICK)
        .unwrap_or_else(|e| panic!("{e}"));
    run.wait_control(&dir.path().join("state"));
    let (code, out, err) = portcullis(&["certs", "--config", path_str(&config)], QUICK);
    assert_eq!(code, 0, "{err}");
    let (host, next) = row(&out, "www.example.test");
    assert_eq!(host[1], "placeholder", "{out}");
    assert_eq!(
        next,
        Some(format!("    last error: {why}").as_str()),
        "{out}"
    );
    assert!(run.stop().success());
}

/// Under systemd, stderr is the journal and `JOURNAL_STREAM` (`dev:inode`)
/// names it: the journal stamps each line, so portcullis leaves out its own
/// timestamp. A child whose stderr goes elsewhere (a file, a pipe) inherits
/// the variable without the journal, and keeps its timestamps.
#[test]
fn logs_leave_the_timestamp_to_the_journal_only_when_stderr_is_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let dir = common::scratch();
    let config = dir.path().join("journal.yaml");
    std::fs::write(
        &config,
        r#"
state_dir: state
listeners: { imaps: { bind: "127.0.0.1:0", protocol: imap, tls: implicit } }
backends: { imaps: 127.0.0.1:9 }
hosts: [ { names: [mail.example.test], certificate: self-signed } ]
"#,
    )
    .unwrap();
    let stream_of = |path: &Path| {
        let m = std::fs::metadata(path).unwrap();
        format!("{}:{}", m.dev(), m.ino())
    };
    // Runs `portcullis run` with stderr on `log` until it listens, then
    // SIGTERM; returns the log's lines.
    let run = |log: &Path, journal: Option<String>| -> Vec<String> {
        let file = std::fs::File::create(log).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .env_remove("JOURNAL_STREAM");
        for v in INHERITED {
            cmd.env_remove(v);
        }
        if let Some(stream) = journal {
            cmd.env("JOURNAL_STREAM", stream);
        }
        let mut child = cmd.spawn().unwrap();
        let read = || std::fs::read_to_string(log).unwrap_or_default();
        let deadline = Instant::now() + QUICK;
        while !read().contains("listening") {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("portcullis exited ({status}) while starting:\n{}", read());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("not listening within {QUICK:?}:\n{}", read());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline + QUICK {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no exit within {QUICK:?} of SIGTERM:\n{}", read());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "exit status after SIGTERM: {status}");
        read().lines().map(str::to_string).collect()
    };
    // "2025-11-22T06:22:05.605721Z  INFO listening …"
    let stamp = |line: &str| {
        line.split_whitespace()
            .next()
            .is_some_and(|first| humantime::parse_rfc3339(first).is_ok())
    };

    // stderr is the very file JOURNAL_STREAM names: no timestamps
    let journal = dir.path().join("journal.log");
    std::fs::File::create(&journal).unwrap(); // its inode, kept by run's truncate
    let lines = run(&journal, Some(stream_of(&journal)));
    assert!(lines.len() >= 2, "{lines:#?}");
    // "<6>listening listener=… addr=…": the syslog priority journald takes
    // as the line's (journalctl -p), no level word, no timestamp
    assert!(
        lines[0].starts_with("<6>listening"),
        "the first line starts with its priority: {:?}",
        lines[0]
    );
    for line in &lines {
        let priority = line.get(..3).unwrap_or_default();
        assert!(
            ["<3>", "<4>", "<6>", "<7>"].contains(&priority),
            "no syslog priority: {line:?}"
        );
        assert!(!stamp(&line[3..]), "a timestamp for the journal: {line:?}");
        assert!(!line.contains(" INFO "), "the level twice: {line:?}");
    }

    // JOURNAL_STREAM names another file (inherited from a journald parent),
    // or is unset: every line starts with an RFC 3339 timestamp
    let other = stream_of(&config);
    for (name, journal) in [("inherited.log", Some(other)), ("plain.log", None)] {
        let lines = run(&dir.path().join(name), journal);
        assert!(lines.len() >= 2, "{name}: {lines:#?}");
        for line in &lines {
            assert!(stamp(line), "{name}: no timestamp on {line:?}");
        }
        assert!(
            lines[0].contains(" INFO ") && lines[0].contains("listening"),
            "{name}: {:?}",
            lines[0]
        );
    }
}

/// isync (mbsync) sends the server's IP address as SNI on every connection.
/// That is the client's habit, not a problem of the operator's: the session
/// gets the default host's certificate and relays, and the log says no more
/// than its `session closed` line, at INFO (rustls's own WARN about it is
/// not passed on).
#[test]
fn an_ip_address_as_sni_is_served_without_a_warning() {
    if !common::tool(
        "openssl",
        "an_ip_address_as_sni_is_served_without_a_warning",
    ) {
        return;
    }
    // A backend that takes the PROXY header and whatever follows, then closes.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in backend.incoming().map_while(Result::ok) {
            std::thread::spawn(move || std::io::copy(&mut s, &mut std::io::sink()));
        }
    });
    let dir = common::scratch();
    let port = common::free_port();
    let config = dir.path().join("ip-sni.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
state_dir: state
listeners: {{ imaps: {{ bind: "127.0.0.1:{port}", protocol: imap, tls: implicit }} }}
backends: {{ imaps: "{backend_addr}" }}
hosts: [ {{ names: [mail.example.test], certificate: self-signed }} ]
"#
        ),
    )
    .unwrap();
    let mut proxy = Running::start(&config, &[]);
    proxy
        .wait_log(&["listening", "listener=imaps"], QUICK)
        .unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "192.0.2.7"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("CN = mail.example.test"), "{shown}");
    let closed = proxy
        .wait_log(&["session closed"], QUICK)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(closed.contains(" INFO "), "{closed}");
    assert!(closed.contains("outcome=closed"), "{closed}");
    assert!(proxy.stop().success());
    let warnings: Vec<String> = proxy
        .log()
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(str::to_string)
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
}

/// A failed admin bind names the key it comes from (`admin.bind`), not a
/// listener.
#[test]
fn an_admin_address_in_use_is_named_by_its_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = common::scratch();
    let path = dir.path().join("admin.yaml");
    std::fs::write(
        &path,
        format!(
            "state_dir: state\nlisteners:\n  imaps: {{ bind: \"127.0.0.1:0\", protocol: imap, tls: implicit }}\nhosts: [ {{ names: [mail.example.test], certificate: self-signed }} ]\nadmin: {{ bind: \"127.0.0.1:{port}\" }}\n"
        ),
    )
    .unwrap();
    let (code, _, err) = portcullis(&["run", "--config", path_str(&path)], QUICK);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("admin.bind: cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(!err.contains("listeners.admin"), "{err}");
}
