//! The discovery module's unit tests: documents, records and routing
//! from configs written out, and bad domains refused with their key path.
#![cfg(test)]

use std::path::Path;

use super::*;

const LISTENERS: &str = r#"
listeners:
  imaps: { bind: "127.0.0.1:993", protocol: imap, tls: implicit }
  imap: { bind: "127.0.0.1:143", protocol: imap, tls: starttls }
  submissions: { bind: "127.0.0.1:465", protocol: smtp, tls: implicit }
  submission: { bind: "127.0.0.1:587", protocol: smtp, tls: starttls }
  mx: { bind: "127.0.0.1:25", protocol: smtp, tls: starttls, require_tls: false }
  sieve: { bind: "127.0.0.1:4190", protocol: sieve, tls: starttls }
  https: { bind: "127.0.0.1:443", protocol: tcp, tls: implicit, alpn: [h2, http/1.1] }
backends:
  imaps: 127.0.0.1:20143
  imap: 127.0.0.1:20143
  submissions: 127.0.0.1:20587
  submission: 127.0.0.1:20587
  mx: 127.0.0.1:20025
  sieve: 127.0.0.1:24190
  https: 127.0.0.1:20080
"#;

fn config(hosts_and_domains: &str) -> Config {
    let text = format!("state_dir: /tmp/x\n{LISTENERS}{hosts_and_domains}");
    Config::parse(&text, Path::new("/")).unwrap_or_else(|p| panic!("{p:#?}\n{text}"))
}

fn problems(hosts_and_domains: &str) -> Vec<String> {
    let text = format!("state_dir: /tmp/x\n{LISTENERS}{hosts_and_domains}");
    match Config::parse(&text, Path::new("/")) {
        Ok(_) => Vec::new(),
        Err(p) => p.iter().map(ToString::to_string).collect(),
    }
}

const TWO: &str = r#"
hosts:
  - names: [mail.one.test]
    certificate: self-signed
  - names: ["*.two.test"]
    certificate: self-signed
    backends:
      imap: 127.0.0.1:20144
domains:
  one.test:
    mta_sts: { mode: enforce, mx: [mail.one.test, "*.mx.one.test"], max_age: 1d }
    autoconfig: { server: mail.one.test, display_name: "One <&> Mail" }
  two.test:
    autoconfig: { server: imap.two.test, username: localpart }
"#;

#[test]
fn the_policy_is_rfc_8461_text_and_its_id_follows_it() {
    let c = config(TWO);
    let d = Discovery::new(&c);
    let r = d.answer("mta-sts.one.test", "GET", "/.well-known/mta-sts.txt", b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type, "text/plain");
    assert_eq!(
        r.body,
        "version: STSv1\r\nmode: enforce\r\nmx: mail.one.test\r\nmx: *.mx.one.test\r\nmax_age: 86400\r\n"
    );
    let p = c.domains[0].mta_sts.clone().unwrap();
    let id = mta_sts::id(&p);
    assert_eq!(id.len(), 20);
    assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()));
    let mut testing = p.clone();
    testing.mode = crate::config::StsMode::Testing;
    assert_ne!(mta_sts::id(&testing), id, "a changed policy has a new id");
    assert_eq!(mta_sts::id(&p), id, "the same policy, the same id");
    // Only at its own name and path, only read.
    assert_eq!(d.answer("mta-sts.one.test", "GET", "/", b"").status, 404);
    assert_eq!(
        d.answer("mta-sts.one.test", "POST", "/.well-known/mta-sts.txt", b"")
            .allow,
        Some("GET, HEAD")
    );
    assert_eq!(
        d.answer(
            "autoconfig.one.test",
            "GET",
            "/.well-known/mta-sts.txt",
            b""
        )
        .status,
        404
    );
    assert_eq!(
        d.answer("www.one.test", "GET", "/.well-known/mta-sts.txt", b"")
            .status,
        421
    );
    // two.test has no policy: no name for it.
    assert!(!d.serves("mta-sts.two.test"));
}

#[test]
fn thunderbird_gets_the_client_ports_that_exist_best_first() {
    let c = config(TWO);
    let d = Discovery::new(&c);
    let r = d.answer(
        "autoconfig.one.test",
        "GET",
        "/mail/config-v1.1.xml?emailaddress=a%40one.test",
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let x = &r.body;
    assert!(
        x.contains("<displayName>One &lt;&amp;&gt; Mail</displayName>"),
        "{x}"
    );
    // imaps, imap, submissions, submission; not port 25, not sieve.
    let ports: Vec<&str> = x
        .match_indices("<port>")
        .map(|(i, _)| &x[i + 6..i + 9])
        .collect();
    assert_eq!(ports, ["993", "143", "465", "587"], "{x}");
    assert!(x.contains("<socketType>SSL</socketType>"));
    assert!(x.contains("<socketType>STARTTLS</socketType>"));
    assert_eq!(x.matches("<hostname>mail.one.test</hostname>").count(), 4);
    assert!(x.contains("<username>%EMAILADDRESS%</username>"));
    // The well-known path too, at either name.
    let w = d.answer(
        "autodiscover.one.test",
        "GET",
        "/.well-known/autoconfig/mail/config-v1.1.xml",
        b"",
    );
    assert_eq!(w.body, r.body);
    // two.test's server is behind a wildcard host with its own imap backend.
    let t = d.answer("autoconfig.two.test", "GET", "/mail/config-v1.1.xml", b"");
    assert!(t.body.contains("<username>%EMAILLOCALPART%</username>"));
    assert!(t.body.contains("<hostname>imap.two.test</hostname>"));
}

const OUTLOOK_REQUEST: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
  <Request>
    <EMailAddress>jo.doe+x@two.test</EMailAddress>
    <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>
  </Request>
</Autodiscover>"#;

#[test]
fn outlook_gets_its_settings_with_the_login_it_asked_for() {
    let c = config(TWO);
    let d = Discovery::new(&c);
    assert!(Discovery::wants_body(
        "POST",
        "/Autodiscover/Autodiscover.xml"
    ));
    let r = d.answer(
        "autodiscover.two.test",
        "POST",
        "/Autodiscover/Autodiscover.xml",
        OUTLOOK_REQUEST.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("<LoginName>jo.doe+x</LoginName>"),
        "{}",
        r.body
    );
    assert!(r.body.contains("<Type>IMAP</Type>"));
    assert!(r.body.contains("<Encryption>TLS</Encryption>"));
    assert!(!r.body.contains("<Port>25</Port>"));
    let one = d.answer(
        "autodiscover.one.test",
        "POST",
        "/autodiscover/autodiscover.xml",
        OUTLOOK_REQUEST.as_bytes(),
    );
    assert!(one
        .body
        .contains("<LoginName>jo.doe+x@two.test</LoginName>"));
    // Bad requests: a clear 400 each.
    for bad in [
        "",
        "<Autodiscover/>",
        "<EMailAddress>nobody</EMailAddress>",
        "<EMailAddress>a<b@two.test</EMailAddress>",
        "<EMailAddress>a@-x</EMailAddress>",
        "<EMailAddress>a@two.test",
    ] {
        let r = d.answer(
            "autodiscover.two.test",
            "POST",
            "/autodiscover/autodiscover.xml",
            bad.as_bytes(),
        );
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    let r = d.answer(
        "autodiscover.two.test",
        "POST",
        "/autodiscover/autodiscover.xml",
        b"\xff\xfe",
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        d.answer(
            "autodiscover.two.test",
            "GET",
            "/autodiscover/autodiscover.xml",
            b""
        )
        .allow,
        Some("POST")
    );
}

#[test]
fn dns_records_name_the_policy_the_reports_and_every_client_service() {
    let c = config(TWO);
    let lines = records(&c, "One.Test.").unwrap();
    let text = lines.join("\n");
    let id = mta_sts::id(c.domains[0].mta_sts.as_ref().unwrap());
    assert!(
        text.contains(&format!("_mta-sts.one.test. IN TXT \"v=STSv1; id={id}\"")),
        "{text}"
    );
    assert!(
        text.contains("_smtp._tls.one.test. IN TXT \"v=TLSRPTv1; rua=mailto:postmaster@one.test\""),
        "{text}"
    );
    for srv in [
        "_imaps._tcp.one.test. IN SRV 0 1 993 mail.one.test.",
        "_imap._tcp.one.test. IN SRV 0 1 143 mail.one.test.",
        "_submissions._tcp.one.test. IN SRV 0 1 465 mail.one.test.",
        "_submission._tcp.one.test. IN SRV 0 1 587 mail.one.test.",
        "_sieve._tcp.one.test. IN SRV 0 1 4190 mail.one.test.",
        "_pop3s._tcp.one.test. IN SRV 0 0 0 . ; not offered",
        "_pop3._tcp.one.test. IN SRV 0 0 0 . ; not offered",
        "_autodiscover._tcp.one.test. IN SRV 0 1 443 autodiscover.one.test.",
    ] {
        assert!(lines.iter().any(|l| l == srv), "{srv} missing:\n{text}");
    }
    // two.test: autoconfig only.
    let two = records(&c, "two.test").unwrap().join("\n");
    assert!(!two.contains("_mta-sts"), "{two}");
    assert!(two.contains("_imap._tcp.two.test. IN SRV 0 1 143 imap.two.test."));
    let e = records(&c, "three.test").unwrap_err();
    assert!(e.contains("one.test, two.test"), "{e}");
}

#[test]
fn domains_add_a_host_for_names_no_host_covers() {
    let c = config(TWO);
    // one.test's three names are new; two.test's are under *.two.test.
    let added: Vec<String> = c
        .hosts
        .iter()
        .filter(|h| c.is_domains_host(h))
        .flat_map(|h| h.names.iter().map(ToString::to_string))
        .collect();
    assert_eq!(
        added,
        [
            "mta-sts.one.test",
            "autoconfig.one.test",
            "autodiscover.one.test"
        ]
    );
    assert!(c.unrouted().iter().all(|(_, h)| h != "mta-sts.one.test"));
    assert!(
        c.mta_sts_warnings()
            .iter()
            .any(|w| w.contains("*.mx.one.test is not a name of any host")),
        "{:?}",
        c.mta_sts_warnings()
    );
}

#[test]
fn bad_domains_are_refused_with_their_key_path() {
    let hosts = "hosts:\n  - names: [mail.one.test]\n    certificate: self-signed\n";
    let cases = [
        (
            "domains:\n  one.test: {}\n",
            "domains.one.test: nothing to serve",
        ),
        (
            "domains:\n  one.test: { mta_sts: { mode: enforce } }\n",
            "domains.one.test.mta_sts.mx: at least one MX host name is needed",
        ),
        (
            "domains:\n  one.test: { mta_sts: { mode: strict, mx: [a.one.test] } }\n",
            "domains.one.test.mta_sts.mode: unknown variant `strict`",
        ),
        (
            "domains:\n  one.test: { mta_sts: { mode: testing, mx: [a.one.test], max_age: 400d } }\n",
            "domains.one.test.mta_sts.max_age",
        ),
        (
            "domains:\n  one.test: { mta_sts: { mode: none, report_to: [\"mailto:a@b,c\"] } }\n",
            "domains.one.test.mta_sts.report_to[0]",
        ),
        (
            "domains:\n  one.test: { autoconfig: { server: imap.elsewhere.test } }\n",
            "domains.one.test.autoconfig.server: imap.elsewhere.test is not a name of any host",
        ),
        (
            "domains:\n  one.test: { autoconfig: yes please }\n",
            "domains.one.test.autoconfig: expected true or",
        ),
        (
            "domains:\n  \"one..test\": { autoconfig: true }\n",
            "domains.one..test",
        ),
        (
            "domains:\n  one.test: { autoconfig: true, certificate: self-signed, acme: { key: reuse } }\n",
            "domains.one.test.acme: only a `certificate: acme` domain",
        ),
    ];
    for (yaml, want) in cases {
        let p = problems(&format!("{hosts}{yaml}"));
        assert!(p.iter().any(|p| p.contains(want)), "{yaml}: {p:#?}");
    }
    // No web listener: nowhere to serve them.
    let text = format!(
        "state_dir: /tmp/x\nlisteners:\n  imaps: {{ bind: \"127.0.0.1:993\", protocol: imap, tls: implicit }}\n{hosts}domains:\n  one.test: {{ autoconfig: true }}\n"
    );
    let p = Config::parse(&text, Path::new("/")).unwrap_err();
    assert!(
        p.iter()
            .any(|p| p.to_string().contains("served over HTTPS")),
        "{p:#?}"
    );
}

#[test]
fn a_long_report_list_is_split_into_txt_strings_of_255_bytes() {
    let many: Vec<String> = (0..12)
        .map(|i| format!("\"mailto:tls-reports-{i}@reports.one.test\""))
        .collect();
    let c = config(&TWO.replace(
        "max_age: 1d }",
        &format!("max_age: 1d, report_to: [{}] }}", many.join(", ")),
    ));
    let lines = records(&c, "one.test").unwrap();
    let rpt = lines
        .iter()
        .find(|l| l.starts_with("_smtp._tls.one.test. IN TXT "))
        .unwrap();
    let data = rpt.strip_prefix("_smtp._tls.one.test. IN TXT ").unwrap();
    let strings: Vec<&str> = data.split("\" \"").map(|s| s.trim_matches('"')).collect();
    assert!(strings.len() > 1, "{rpt}");
    assert!(strings.iter().all(|s| s.len() <= 255), "{rpt}");
    assert_eq!(
        strings.concat(),
        format!(
            "v=TLSRPTv1; rua={}",
            (0..12)
                .map(|i| format!("mailto:tls-reports-{i}@reports.one.test"))
                .collect::<Vec<_>>()
                .join(",")
        )
    );
    // An empty list is refused: a record without rua is invalid.
    let none = TWO.replace("max_age: 1d }", "max_age: 1d, report_to: [] }");
    assert!(
        problems(&none)
            .iter()
            .any(|p| p.contains("domains.one.test.mta_sts.report_to: at least one address")),
        "{:?}",
        problems(&none)
    );
}

#[test]
fn the_web_listener_is_the_one_on_443_or_speaking_http() {
    let text = format!(
        "state_dir: /tmp/x\n{}  ldaps: {{ bind: \"127.0.0.1:636\", protocol: tcp, tls: implicit }}\n{}",
        LISTENERS.split("backends:").next().unwrap(),
        TWO
    )
    .replace("hosts:", "backends:\n  https: 127.0.0.1:20080\nhosts:");
    let c = Config::parse(&text, Path::new("/")).unwrap_or_else(|p| panic!("{p:#?}\n{text}"));
    let web = web_listener(c.listeners.values()).unwrap();
    assert_eq!(web.name, "https", "not ldaps, which sorts first");
}
