//! `domains:` end to end: portcullis orders certificates for
//! `mta-sts.DOMAIN`, `autoconfig.DOMAIN` and `autodiscover.DOMAIN` from a
//! real Pebble and answers them itself on its HTTPS listener: an MTA-STS
//! policy fetched with curl (verifying Pebble's chain) and read by a strict
//! RFC 8461 parser, Thunderbird's GET and Outlook's POST answered with XML
//! that Python's parser reads, offering only the ports that exist.
//! `portcullis dns` prints the records, and a changed policy gets a new id.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::acme::{free_port, tools, Pebble};
use common::process::{path_str, portcullis};
use common::site::wait_issued;
use common::{run_cmd, scratch, tool, Backend, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(20);

/// The config; `ports`: pop3's and submission's, fixed (the documents
/// name the configured ports).
fn yaml(
    state: &Path,
    pebble: &Pebble,
    (http, imaps): (u16, u16),
    ports: (u16, u16),
    backend: SocketAddr,
    mode: &str,
) -> String {
    format!(
        r#"
state_dir: {state}
acme:
  directory: {directory}
  contact: ["mailto:postmaster@one.test"]
  terms_of_service_agreed: true
  challenges: [tls-alpn-01, http-01]
  ca_roots: {ca_roots}
listeners:
  imaps: {{ bind: "127.0.0.1:{imaps}", protocol: imap, tls: implicit }}
  pop3: {{ bind: "127.0.0.1:{pop3}", protocol: pop3, tls: starttls }}
  submission: {{ bind: "127.0.0.1:{submission}", protocol: smtp, tls: starttls }}
  mx: {{ bind: "127.0.0.1:0", protocol: smtp, tls: starttls, require_tls: false }}
  https: {{ bind: "127.0.0.1:0", protocol: tcp, tls: implicit, alpn: [h2, http/1.1] }}
  http: {{ bind: "127.0.0.1:{http}", protocol: http }}
backends:
  imaps: "{backend}"
  submission: "{backend}"
  mx: "{backend}"
  https: "{backend}"
hosts:
  - names: [mail.one.test]
    certificate: acme
  - names: [mail.two.test]
    certificate: acme
    backends:
      pop3: {{ address: "{backend}" }}
domains:
  one.test:
    mta_sts: {{ mode: {mode}, mx: [mail.one.test], max_age: 1d }}
    autoconfig: {{ server: mail.one.test, display_name: "One Mail" }}
  two.test:
    mta_sts: {{ mode: testing, mx: [mail.two.test] }}
    autoconfig: {{ server: mail.two.test, username: localpart }}
"#,
        state = state.display(),
        pop3 = ports.0,
        submission = ports.1,
        directory = pebble.directory,
        ca_roots = pebble.ca_roots.display(),
    )
}

/// RFC 8461 §3.2, strictly: `version: STSv1` first, then `key: value`
/// lines (CRLF or LF), mode one of three, max_age digits up to a year, at
/// least one valid mx unless mode is none, no key other than these twice.
/// Returns (mode, mx, max_age).
fn parse_policy(text: &str) -> Result<(String, Vec<String>, u64), String> {
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    if lines.next() != Some("version: STSv1") {
        return Err("the first line is not `version: STSv1`".into());
    }
    let (mut mode, mut mx, mut max_age) = (None, Vec::new(), None);
    for line in lines.filter(|l| !l.is_empty()) {
        let (key, value) = line
            .split_once(": ")
            .ok_or(format!("not key: value: {line:?}"))?;
        match key {
            "mode" if mode.is_none() => {
                if !["enforce", "testing", "none"].contains(&value) {
                    return Err(format!("mode {value:?}"));
                }
                mode = Some(value.to_string());
            }
            "max_age" if max_age.is_none() => {
                if value.is_empty()
                    || value.len() > 10
                    || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(format!("max_age {value:?}"));
                }
                let n: u64 = value.parse().map_err(|e| format!("{e}"))?;
                if n > 31_557_600 {
                    return Err(format!("max_age {n} over a year"));
                }
                max_age = Some(n);
            }
            "mx" => {
                let name = value.strip_prefix("*.").unwrap_or(value);
                let ok = name.split('.').count() >= 2
                    && name.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    });
                if !ok {
                    return Err(format!("mx {value:?}"));
                }
                mx.push(value.to_string());
            }
            other => return Err(format!("unexpected or repeated key {other:?}")),
        }
    }
    let mode = mode.ok_or("no mode")?;
    if mx.is_empty() && mode != "none" {
        return Err("no mx".into());
    }
    Ok((mode, mx, max_age.ok_or("no max_age")?))
}

/// Python's XML parser reads the document and prints what a client takes
/// from it, one server per line.
const THUNDERBIRD_PY: &str = r#"
import sys, xml.etree.ElementTree as ET
root = ET.fromstring(sys.stdin.buffer.read())
assert root.tag == "clientConfig" and root.get("version") == "1.1", root.tag
p = root.find("emailProvider")
print("domain", p.findtext("domain"), p.findtext("displayName"))
for s in p:
    if s.tag in ("incomingServer", "outgoingServer"):
        print(s.get("type"), s.findtext("hostname"), s.findtext("port"), s.findtext("socketType"), s.findtext("username"), s.findtext("authentication"))
"#;

const OUTLOOK_PY: &str = r#"
import sys, xml.etree.ElementTree as ET
R = "{http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006}"
A = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
root = ET.fromstring(sys.stdin.buffer.read())
assert root.tag == R + "Autodiscover", root.tag
acct = root.find(A + "Response").find(A + "Account")
print("account", acct.findtext(A + "AccountType"), acct.findtext(A + "Action"))
for p in acct.findall(A + "Protocol"):
    print(*(p.findtext(A + k) for k in ("Type", "Server", "Port", "Encryption", "LoginName", "SSL")))
"#;

const OUTLOOK_REQUEST: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
  <Request>
    <EMailAddress>kim@two.test</EMailAddress>
    <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>
  </Request>
</Autodiscover>"#;

/// `curl` with Pebble's root as the only trust anchor, the name pinned to
/// the listener: (status and headers, body, HTTP version).
async fn curl(
    url_name: &str,
    port: u16,
    path: &str,
    root: &Path,
    extra: &[&str],
) -> (String, String, String) {
    let resolve = format!("{url_name}:{port}:127.0.0.1");
    let url = format!("https://{url_name}:{port}{path}");
    let mut args = vec![
        "-sS",
        "--max-time",
        "10",
        "--cacert",
        path_str(root),
        "--resolve",
        &resolve,
        "-D",
        "-",
        "-w",
        "\n%{http_version}",
    ];
    args.extend_from_slice(extra);
    args.push(&url);
    let (ok, out, err) = run_cmd("curl", &args, b"", LIMIT).await;
    assert!(ok, "curl {url}: {err}");
    let (head, rest) = out
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head: {out}"));
    let (body, version) = rest.rsplit_once('\n').unwrap();
    (head.to_string(), body.to_string(), version.to_string())
}

async fn python(script: &str, input: &str) -> Vec<String> {
    let (ok, out, err) = run_cmd("python3", &["-c", script], input.as_bytes(), LIMIT).await;
    assert!(ok, "python3 could not read the XML: {err}\n{input}");
    out.lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_and_autoconfig_are_served_with_certificates_the_ca_issued() {
    let test = "mta_sts_and_autoconfig_are_served_with_certificates_the_ca_issued";
    if !tools(test) || !tool("curl", test) {
        return;
    }
    let (http, imaps) = (free_port(), free_port());
    let ports = (free_port(), free_port());
    let pebble = Pebble::start(http, imaps).await;
    let mut backend = Backend::start("* OK echo\r\n", true).await;
    let dir = scratch();
    let state = dir.path().join("state");
    let config = yaml(
        &state,
        &pebble,
        (http, imaps),
        ports,
        backend.addr,
        "enforce",
    );
    let proxy = Proxy::start_file(dir, &config).await;
    let https = proxy.addr("https");
    let port = https.port();

    // The names are ordered by themselves, one certificate per domain.
    for name in [
        "mta-sts.one.test",
        "autoconfig.one.test",
        "autodiscover.two.test",
    ] {
        wait_issued(https, name, None)
            .await
            .unwrap_or_else(|| panic!("no certificate for {name}\n{}", pebble.log()));
    }
    let root = proxy.dir.path().join("pebble-root.pem");
    let der = pebble.root_der().await;
    let pem = common::cert_pem(&der);
    std::fs::write(&root, pem).unwrap();

    // MTA-STS: fetched over verified HTTPS, as a sender does; HTTP/1.1
    // although the listener (and curl) prefer h2.
    let (head, body, version) = curl(
        "mta-sts.one.test",
        port,
        "/.well-known/mta-sts.txt",
        &root,
        &[],
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    assert_eq!(version, "1.1");
    let (mode, mx, max_age) = parse_policy(&body).unwrap_or_else(|e| panic!("{e}:\n{body}"));
    assert_eq!(
        (mode.as_str(), mx, max_age),
        ("enforce", vec!["mail.one.test".to_string()], 86_400)
    );
    let (_, two, _) = curl(
        "mta-sts.two.test",
        port,
        "/.well-known/mta-sts.txt",
        &root,
        &[],
    )
    .await;
    let (mode, _, max_age) = parse_policy(&two).unwrap();
    assert_eq!((mode.as_str(), max_age), ("testing", 604_800));

    // Thunderbird: both paths, only the client ports that exist (not the
    // MX's port 25), implicit TLS first.
    let (pop3, submission) = ports;
    for path in [
        "/mail/config-v1.1.xml?emailaddress=ann%40one.test",
        "/.well-known/autoconfig/mail/config-v1.1.xml",
    ] {
        let (head, xml, _) = curl("autoconfig.one.test", port, path, &root, &[]).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let servers = python(THUNDERBIRD_PY, &xml).await;
        assert_eq!(
            servers,
            [
                "domain one.test One Mail".to_string(),
                format!("imap mail.one.test {imaps} SSL %EMAILADDRESS% password-cleartext"),
                format!(
                    "smtp mail.one.test {submission} STARTTLS %EMAILADDRESS% password-cleartext"
                ),
            ],
            "{xml}"
        );
    }
    // mail.two.test has a pop3 backend of its own: its clients get POP3 too.
    let (_, xml, _) = curl(
        "autoconfig.two.test",
        port,
        "/mail/config-v1.1.xml",
        &root,
        &[],
    )
    .await;
    let servers = python(THUNDERBIRD_PY, &xml).await;
    assert!(
        servers.contains(&format!(
            "pop3 mail.two.test {pop3} STARTTLS %EMAILLOCALPART% password-cleartext"
        )),
        "{servers:?}"
    );

    // Outlook: a POST with the address; the login is its local part here.
    let (head, xml, _) = curl(
        "autodiscover.two.test",
        port,
        "/Autodiscover/Autodiscover.xml",
        &root,
        &[
            "-H",
            "Content-Type: text/xml",
            "--data-binary",
            OUTLOOK_REQUEST,
        ],
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{xml}");
    let protocols = python(OUTLOOK_PY, &xml).await;
    assert_eq!(
        protocols,
        [
            "account email settings".to_string(),
            format!("IMAP mail.two.test {imaps} SSL kim None"),
            format!("POP3 mail.two.test {pop3} TLS kim None"),
            format!("SMTP mail.two.test {submission} TLS kim None"),
        ],
        "{xml}"
    );

    // `portcullis dns`: the records, with the id of the policy served.
    let file = proxy.config_path();
    let (code, out, err) = portcullis(&["dns", "-c", path_str(&file), "one.test"], LIMIT);
    assert_eq!(code, 0, "{err}");
    let id = txt_id(&out);
    assert!(
        out.contains("_smtp._tls.one.test. IN TXT \"v=TLSRPTv1; rua=mailto:postmaster@one.test\""),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "_imaps._tcp.one.test. IN SRV 0 1 {imaps} mail.one.test."
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "_submission._tcp.one.test. IN SRV 0 1 {submission} mail.one.test."
        )),
        "{out}"
    );
    assert!(
        out.contains("_pop3._tcp.one.test. IN SRV 0 0 0 . ; not offered"),
        "{out}"
    );

    // A changed policy: served at once after the reload, with a new id.
    proxy.write_config(&yaml(
        &state,
        &pebble,
        (http, imaps),
        ports,
        backend.addr,
        "testing",
    ));
    let changes = proxy.reload().await.expect("reload");
    assert_eq!(changes.settings_changed, ["domains"], "{changes}");
    let (head, body, _) = curl(
        "mta-sts.one.test",
        port,
        "/.well-known/mta-sts.txt",
        &root,
        &["--http1.1"],
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(parse_policy(&body).unwrap().0, "testing");
    let (_, again, _) = portcullis(&["dns", "-c", path_str(&file), "one.test"], LIMIT);
    assert_ne!(txt_id(&again), id, "the id changes with the policy");
    let (_, same, _) = portcullis(&["dns", "-c", path_str(&file), "one.test"], LIMIT);
    assert_eq!(txt_id(&same), txt_id(&again), "and only then");

    // Any other name on the listener still goes to its backend.
    assert_eq!(backend.connections(), 0);
    let mut web = common::tls_connect(https, Some("mail.one.test"))
        .await
        .unwrap();
    let mut greeting = [0u8; 9];
    web.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"* OK echo");
    let header = backend.next_header().await;
    assert_eq!(
        header.tlv(0x02),
        Some(&b"mail.one.test"[..]),
        "authority TLV"
    );
    drop(web);
    proxy.shutdown().await;
}

/// Bad requests to the names portcullis answers: each a clear HTTP error
/// and a `session closed` line, none disturbing another session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_http_errors() {
    let dir = scratch();
    let imaps = free_port();
    let yaml = r#"
state_dir: state
listeners:
  https: { bind: "127.0.0.1:0", protocol: tcp, tls: implicit, alpn: [http/1.1] }
  imaps: { bind: "127.0.0.1:IMAPS", protocol: imap, tls: implicit }
backends:
  imaps: "127.0.0.1:9"
hosts:
  - names: [mail.bad.test]
    certificate: self-signed
domains:
  bad.test:
    mta_sts: { mode: enforce, mx: [mail.bad.test] }
    autoconfig: true
"#;
    let yaml = yaml.replace("IMAPS", &imaps.to_string());
    let proxy = Proxy::start_in(dir, &yaml).await;
    let https = proxy.addr("https");
    // A long-lived session that the bad ones must leave alone.
    let mut calm = common::tls_connect(https, Some("autoconfig.bad.test"))
        .await
        .unwrap();
    calm.write_all(b"GET /mail/config-v1.1.xml HTTP/1.1\r\n")
        .await
        .unwrap();

    // A body the answer does not need is still read, so the client sees
    // the 413 rather than a reset.
    let big = [
        &b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: autodiscover.bad.test\r\nContent-Length: 40000\r\n\r\n"[..],
        &[b'x'; 40_000][..],
    ]
    .concat();
    let cases: [(&str, &[u8], &str); 8] = [
        ("autodiscover.bad.test", &big, "HTTP/1.1 413 "),
        // Another served name than the certificate's: misdirected.
        ("mta-sts.bad.test", b"GET /mail/config-v1.1.xml HTTP/1.1\r\nHost: autoconfig.bad.test\r\n\r\n", "HTTP/1.1 421 "),
        ("mta-sts.bad.test", b"GARBAGE\r\n\r\n", "HTTP/1.1 400 "),
        ("mta-sts.bad.test", b"DELETE /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.bad.test\r\n\r\n", "HTTP/1.1 405 "),
        ("mta-sts.bad.test", b"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: www.bad.test\r\n\r\n", "HTTP/1.1 421 "),
        ("autodiscover.bad.test", b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: autodiscover.bad.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "HTTP/1.1 411 "),
        ("autodiscover.bad.test", b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: autodiscover.bad.test\r\nContent-Length: 100000\r\n\r\n", "HTTP/1.1 413 "),
        ("autodiscover.bad.test", b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: autodiscover.bad.test\r\nContent-Length: 9\r\n\r\n<nothing>", "HTTP/1.1 400 "),
    ];
    for (sni, request, status) in cases {
        let mut tls = common::tls_connect(https, Some(sni)).await.unwrap();
        tls.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(LIMIT, tls.read_to_end(&mut answer))
            .await
            .expect("answered and closed")
            .expect("closed with close_notify");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with(status),
            "{sni} {:?}: {answer}",
            String::from_utf8_lossy(request)
        );
    }
    let line = common::log_line(&["sni=\"mta-sts.bad.test\"", "outcome=bad_request"]).await;
    assert!(line.contains("malformed request"), "{line}");
    common::log_line(&[
        "outcome=answered",
        "DELETE mta-sts.bad.test/.well-known/mta-sts.txt: 405",
    ])
    .await;
    common::log_line(&["outcome=bad_request", "a Content-Length is needed"]).await;

    // The calm session is answered once it finishes its request.
    calm.write_all(b"Host: autoconfig.bad.test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(LIMIT, calm.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(
        answer.contains("<hostname>mail.bad.test</hostname>"),
        "{answer}"
    );
    // A mail port does not answer HTTP for these names.
    let mut imap = common::tls_connect(proxy.addr("imaps"), Some("mta-sts.bad.test"))
        .await
        .unwrap();
    let mut first = vec![0u8; 64];
    let n = tokio::time::timeout(LIMIT, imap.read(&mut first))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(
        String::from_utf8_lossy(&first[..n]).starts_with("* BYE"),
        "{:?}",
        &first[..n]
    );
    proxy.shutdown().await;
}

fn txt_id(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("_mta-sts.one.test. IN TXT \"v=STSv1; id="))
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no _mta-sts record:\n{out}"))
        .to_string()
}
