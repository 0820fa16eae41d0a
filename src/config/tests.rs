//! The config's unit tests: good configs parse into the values meant, and
//! every mistake is reported with its key path.
#![cfg(test)]

use std::time::Duration;

use ipnet::IpNet;

use super::*;

fn parse(text: &str) -> Result<Config, Vec<String>> {
    Config::parse(text, Path::new("/etc/portcullis"))
        .map_err(|ps| ps.iter().map(|p| p.to_string()).collect())
}

/// `errs` are exactly the problems `expect` starts, in any order.
fn assert_problems(errs: &[String], expect: &[&str]) {
    for e in expect {
        assert!(
            errs.iter().any(|got| got.starts_with(e)),
            "missing {e:?} in {errs:#?}"
        );
    }
    assert_eq!(errs.len(), expect.len(), "{errs:#?}");
}

const GOOD: &str = r#"
state_dir: state
listeners:
  imaps: { bind: ["127.0.0.1:10993", "[::1]:10993"], protocol: imap, tls: implicit }
  https: { bind: "127.0.0.1:10443", protocol: tcp, tls: implicit, alpn: [h2, http/1.1] }
backends:
  imaps: 127.0.0.1:10143
hosts:
  - names: [mail.example.test, IMAP.example.test]
    certificate: self-signed
    backends:
      https: { address: "127.0.0.1:8080", proxy_protocol: none, connect_timeout: 2s }
  - names: ["*.example.org"]
    certificate: { cert: /etc/ssl/org.pem, key: org.key }
default_host: mail.example.test
timeouts: { idle: 45m }
"#;

#[test]
fn admin_and_notify_blocks_parse_and_their_mistakes_are_named() {
    let c = parse(&format!(
            "{GOOD}admin: {{ bind: 127.0.0.1:9099 }}\nnotify: {{ email: [ops@example.test], smtp: 127.0.0.1:20025, webhook: \"https://hooks.example.test/x?k=1\" }}\n"
        ))
        .unwrap();
    assert_eq!(c.admin.unwrap().bind, "127.0.0.1:9099".parse().unwrap());
    let n = c.notify.unwrap();
    assert_eq!(n.email, ["ops@example.test"]);
    assert_eq!(n.from, "portcullis@mail.example.test");
    let smtp = n.smtp.unwrap();
    assert_eq!(smtp.address, "127.0.0.1:20025".parse().unwrap());
    assert_eq!(smtp.proxy_protocol, ProxyProtocol::V2);
    assert_eq!(
        n.webhook.as_deref(),
        Some("https://hooks.example.test/x?k=1")
    );

    for (block, want) in [
        (
            "notify: { email: [ops@example.test] }",
            "notify.smtp: missing",
        ),
        (
            "notify: { webhook: \"https://hooks.example.test/a b\" }",
            "notify.webhook: \"https://hooks.example.test/a b\": expected an http",
        ),
        (
            "notify: { webhook: ftp://x }",
            "notify.webhook: \"ftp://x\": expected an http",
        ),
        (
            "notify: { from: nobody }",
            "notify.from: \"nobody\": expected an address",
        ),
        (
            "notify: { email: [\"a b@c\"], smtp: 127.0.0.1:25 }",
            "notify.email[0]: \"a b@c\": expected an address",
        ),
        ("notify: {}", "notify: nobody to notify"),
        (
            "admin: { bind: localhost:9099 }",
            "admin.bind: invalid address",
        ),
    ] {
        let errs = parse(&format!("{GOOD}{block}\n")).unwrap_err();
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "{block}: {errs:?}"
        );
    }
}

#[test]
fn notify_email_defaults_to_the_acme_contacts() {
    let text = GOOD.replace(
            "hosts:",
            "acme: { directory: letsencrypt-staging, contact: [\"mailto:ops@example.test\"], terms_of_service_agreed: true }\nhosts:",
        ) + "notify: { smtp: 127.0.0.1:20025 }\n";
    let c = parse(&text).unwrap();
    assert_eq!(c.notify.unwrap().email, ["ops@example.test"]);
}

#[test]
fn a_good_config_parses_into_typed_values() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.state_dir, Path::new("/etc/portcullis/state"));
    assert_eq!(c.listeners["imaps"].bind.len(), 2);
    assert_eq!(
        c.listeners["https"].alpn,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    );
    assert_eq!(c.hosts[0].names[1].to_string(), "imap.example.test");
    let https = &c.hosts[0].backends["https"];
    assert_eq!(https.proxy_protocol, ProxyProtocol::None);
    assert_eq!(https.connect_timeout, Duration::from_secs(2));
    // defaults merge in, and the host without an https override gets none
    assert_eq!(
        c.hosts[1].backends["imaps"].proxy_protocol,
        ProxyProtocol::V2
    );
    assert_eq!(
        c.hosts[1].backends["imaps"].connect_timeout,
        defaults::CONNECT
    );
    assert!(!c.hosts[1].backends.contains_key("https"));
    assert_eq!(
        c.hosts[1].certificate,
        CertSource::Files {
            cert: "/etc/ssl/org.pem".into(),
            key: "/etc/portcullis/org.key".into(),
            second: None,
        }
    );
    assert_eq!(c.timeouts.idle, Duration::from_secs(45 * 60));
    assert_eq!(c.timeouts.handshake, defaults::HANDSHAKE);
    assert_eq!(
        c.unrouted(),
        vec![("https".to_string(), "*.example.org".to_string())]
    );
}

#[test]
fn every_problem_is_reported_with_its_key_path() {
    let text = r#"
listeners:
  imaps: { bind: ["127.0.0.1:10993"], protocol: imap, tls: implict }
  pop3s: { bind: "127.0.0.1:10995", protocol: pop3, tls: implicit, colour: blue }
backends:
  imaps: 127.0.0.1:10143
  imap: 127.0.0.1:10144
hosts:
  - names: [a.example.test]
    certificate: self-signed
  - names: [b.example.test, "bad name"]
    certificate: self-signed
    backends:
      pop3s: "10.0.0.5:99999"
  - names: [a.example.test]
    certificate: { cert: x.pem }
default_host: nowhere.test
timeouts: { idle: forever, connect: 0s }
max_connections: 100000000
log: { level: infoo }
"#;
    let errs = parse(text).unwrap_err();
    let expect = [
        "listeners.imaps.tls: unknown variant `implict`, expected one of",
        "listeners.pop3s.colour: unknown key",
        "backends.imap: no listener named \"imap\"",
        "hosts[1].names[1]: \"bad name\": invalid label",
        "hosts[1].backends.pop3s: invalid address \"10.0.0.5:99999\"",
        "hosts[2].certificate.key: missing",
        "hosts[2].names: a.example.test is already listed under hosts[0]",
        "default_host: nowhere.test is not among the names of any host",
        "timeouts.idle: invalid duration forever",
        "timeouts.connect: 0s is out of range",
        "max_connections: expected a whole number from 1 to",
        "log.level: \"infoo\" is not a level",
    ];
    assert_problems(&errs, &expect);
}

#[test]
fn missing_sections_and_bad_yaml_are_reported() {
    let errs = parse("state_dir: x\n").unwrap_err();
    assert_eq!(errs, vec!["listeners: missing", "hosts: missing"]);
    let errs = parse("listeners: [\n").unwrap_err();
    assert!(errs[0].starts_with("YAML: "), "{errs:?}");
    let errs = parse("- just\n- a list\n").unwrap_err();
    assert_eq!(errs, vec!["expected a mapping, found a list"]);
}

const ACME: &str = r#"
acme:
  directory: letsencrypt-staging
  contact: [mailto:postmaster@example.test]
  terms_of_service_agreed: true
  eab: { kid: kid-1, hmac_key: c2VjcmV0LWtleQ }
  key_type: ecdsa-p384
  renew_before: 30d
listeners:
  imaps: { bind: "127.0.0.1:10993", protocol: imap, tls: implicit }
  http: { bind: "127.0.0.1:10080", protocol: http }
backends:
  imaps: 127.0.0.1:10143
hosts:
  - names: [mail.example.test, imap.example.test]
    certificate: acme
    backends: { http: 127.0.0.1:8080 }
"#;

#[test]
fn the_acme_block_parses_with_its_defaults() {
    let c = parse(ACME).unwrap();
    let a = c.acme.unwrap();
    assert_eq!(a.directory, defaults::LETSENCRYPT_STAGING);
    assert_eq!(a.challenges, [Challenge::TlsAlpn01, Challenge::Http01]);
    assert_eq!(a.key_types, [KeyType::EcdsaP384]);
    assert_eq!(a.eab.unwrap().hmac_key, b"secret-key");
    assert_eq!(a.renew_before, Some(Duration::from_secs(30 * 86400)));
    assert_eq!(c.hosts[0].certificate, CertSource::Acme);
    assert_eq!(
        c.hosts[0].backends["http"].address,
        "127.0.0.1:8080".parse().unwrap()
    );
}

#[test]
fn acme_mistakes_are_reported_with_their_key_paths() {
    let text = ACME
        .replace("letsencrypt-staging", "http://acme.example.test/dir")
        .replace("mailto:postmaster@example.test", "postmaster@example.test")
        .replace("agreed: true", "agreed: false")
        .replace("c2VjcmV0LWtleQ", "not base64!")
        .replace("ecdsa-p384", "dsa")
        .replace("30d", "2y");
    let errs = parse(&text).unwrap_err();
    for want in [
        "acme.directory: \"http://acme.example.test/dir\": expected",
        "acme.contact[0]: \"postmaster@example.test\": expected mailto:",
        "acme.terms_of_service_agreed: the CA issues nothing",
        "acme.eab.hmac_key: expected the base64url key",
        "acme.key_type: ",
        "acme.renew_before: 2years is out of range",
    ] {
        assert!(errs.iter().any(|e| e.starts_with(want)), "{want}: {errs:?}");
    }
}

const DNS: &str = r#"
acme:
  directory: letsencrypt-staging
  terms_of_service_agreed: true
  dns:
    server: "127.0.0.1:5353"
    zone: example.org.
    tsig: { name: portcullis-acme, secret_file: tsig.key }
listeners:
  imaps: { bind: "127.0.0.1:10993", protocol: imap, tls: implicit }
backends:
  imaps: 127.0.0.1:10143
hosts:
  - names: ["*.example.org", example.org]
    certificate: acme
    acme: { challenges: [dns-01] }
  - names: [mail.example.org]
    certificate: acme
"#;

#[test]
fn dns_01_settings_parse_globally_and_per_host() {
    let c = parse(DNS).unwrap();
    let a = c.acme.unwrap();
    let dns = a.dns.clone().unwrap();
    assert_eq!(dns.server, "127.0.0.1:5353".parse().unwrap());
    assert_eq!(dns.zone, "example.org", "lower-case, no trailing dot");
    assert_eq!(dns.tsig.algorithm, TsigAlgo::HmacSha256);
    assert!(dns.tsig.secret_file.is_absolute());
    assert_eq!(dns.check, vec![dns.server], "the primary alone by default");
    assert_eq!(dns.propagation_timeout, defaults::DNS_PROPAGATION_TIMEOUT);
    assert_eq!(a.challenges_for("*.example.org"), [Challenge::Dns01]);
    assert_eq!(
        a.challenges_for("mail.example.org"),
        [Challenge::TlsAlpn01],
        "the global list, less what no listener answers"
    );
    assert_eq!(a.dns_for("*.example.org"), Some(&dns));
}

#[test]
fn the_key_policy_is_global_and_per_host() {
    let c = parse(&DNS.replace(
        "  terms_of_service_agreed: true\n",
        "  terms_of_service_agreed: true\n  key: reuse\n",
    ))
    .unwrap();
    let a = c.acme.unwrap();
    assert_eq!(a.key_for("mail.example.org"), KeyPolicy::Reuse);
    let c = parse(&DNS.replace(
        "acme: { challenges: [dns-01] }",
        "acme: { challenges: [dns-01], key: reuse }",
    ))
    .unwrap();
    let a = c.acme.unwrap();
    assert_eq!(a.key, KeyPolicy::New, "a new key by default");
    assert_eq!(a.key_for("*.example.org"), KeyPolicy::Reuse);
    assert_eq!(a.key_for("mail.example.org"), KeyPolicy::New);
    let errs = parse(&DNS.replace(
        "acme: { challenges: [dns-01] }",
        "acme: { challenges: [dns-01], key: keep }",
    ))
    .unwrap_err();
    assert!(
        errs.iter()
            .any(|e| e.starts_with("hosts[0].acme.key: unknown variant `keep`")),
        "{errs:?}"
    );
}

#[test]
fn key_rollover_needs_where_to_look_and_a_tls_port() {
    let rolling = DNS.replace(
        "acme: { challenges: [dns-01] }",
        "acme: { challenges: [dns-01], key: rollover }",
    );
    let errs = parse(&rolling).unwrap_err();
    assert_problems(
        &errs,
        &["hosts[0]: key: rollover needs `acme.tlsa: { check: [IP:PORT] }`, the DNS servers the next key's TLSA record is looked for at"],
    );
    let with_check = rolling.replace(
        "  terms_of_service_agreed: true\n",
        "  terms_of_service_agreed: true\n  tlsa: { check: [\"127.0.0.1:5353\"] }\n",
    );
    let c = parse(&with_check).unwrap();
    let a = c.acme.unwrap();
    assert_eq!(a.tlsa.as_ref().unwrap().wait_ttls, 2, "two TTLs by default");
    assert_eq!(
        a.per_host["*.example.org"].tlsa_owners,
        ["_10993._tcp.example.org"],
        "the exact names on the TLS ports that carry the host"
    );
    // Not with a cluster: each node would keep its own next key.
    let clustered = with_check.replace(
        "listeners:",
        "store: { etcd: { endpoints: [\"http://127.0.0.1:2379\"], node: a } }\nlisteners:",
    );
    let errs = parse(&clustered).unwrap_err();
    assert!(
        errs.iter()
            .any(|e| e.starts_with("store: key: rollover does not work with store.etcd yet")),
        "{errs:?}"
    );
}

#[test]
fn hosts_on_dns_01_alone_need_no_port_80_or_443() {
    // Both hosts by dns-01: nothing to forward.
    let both = DNS.replace(
        "  - names: [mail.example.org]\n    certificate: acme\n",
        "  - names: [mail.example.org]\n    certificate: acme\n    acme: { challenges: [dns-01] }\n",
    );
    assert_ne!(both, DNS);
    assert_eq!(
        parse(&both).unwrap().acme_port_warnings(),
        Vec::<String>::new()
    );
    // One host on the global list (tls-alpn-01 here): its port is checked.
    let w = parse(DNS).unwrap().acme_port_warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("tls-alpn-01 on port 443"), "{w:?}");
}

#[test]
fn dns_01_mistakes_are_reported_with_their_key_paths() {
    // A wildcard without dns-01.
    let errs = parse(&DNS.replace("acme: { challenges: [dns-01] }", "")).unwrap_err();
    assert_problems(
        &errs,
        &["hosts[0].names: *.example.org: a wildcard certificate needs dns-01: give the host `acme: { challenges: [dns-01] }` and an `acme.dns` (server, zone, tsig)"],
    );
    // dns-01 with nowhere to add the record.
    let no_dns = DNS.replace("  dns:\n    server: \"127.0.0.1:5353\"\n    zone: example.org.\n    tsig: { name: portcullis-acme, secret_file: tsig.key }\n", "");
    assert_ne!(no_dns, DNS);
    let errs = parse(&no_dns).unwrap_err();
    assert_problems(
        &errs,
        &["hosts[0].acme: dns-01 needs `acme.dns` or the host's own `acme.dns`: server, zone, tsig"],
    );
    // A name outside the zone, a bad server, an unknown algorithm.
    let errs = parse(&DNS.replace(
        "\"*.example.org\", example.org]",
        "\"*.example.org\", example.net]",
    ))
    .unwrap_err();
    assert!(
        errs.iter().any(|e| e.starts_with(
            "hosts[0].names: example.net: _acme-challenge.example.net is not in zone example.org"
        )),
        "{errs:?}"
    );
    let errs = parse(&DNS.replace("127.0.0.1:5353", "ns1.example.org").replace(
        "name: portcullis-acme,",
        "name: portcullis-acme, algorithm: hmac-md5,",
    ))
    .unwrap_err();
    for want in [
        "acme.dns.server: invalid address \"ns1.example.org\"",
        "acme.dns.tsig.algorithm: ",
    ] {
        assert!(errs.iter().any(|e| e.starts_with(want)), "{want}: {errs:?}");
    }
    // A host's own acme: only with certificate: acme.
    let errs = parse(&DNS.replace(
        "  - names: [mail.example.org]\n    certificate: acme\n",
        "  - names: [mail.example.org]\n    certificate: self-signed\n    acme: { challenges: [http-01] }\n",
    ))
    .unwrap_err();
    assert!(
        errs.iter()
            .any(|e| e
                .starts_with("hosts[1].acme: only a `certificate: acme` host has ACME settings")),
        "{errs:?}"
    );
}

#[test]
fn acme_needs_its_block_and_a_listener_that_answers_a_challenge() {
    let no_block = r#"
listeners:
  imap: { bind: "127.0.0.1:10143", protocol: imap, tls: starttls }
hosts:
  - names: [a.example.test]
    certificate: acme
"#;
    let errs = parse(no_block).unwrap_err();
    assert!(errs[0].starts_with("hosts[0].certificate: acme needs an `acme:` block"));

    let no_listener = format!(
            "acme: {{ directory: letsencrypt, terms_of_service_agreed: true, challenges: [http-01] }}\n{no_block}"
        );
    let errs = parse(&no_listener).unwrap_err();
    assert!(
        errs[0].starts_with("acme.challenges: no listener can answer http-01"),
        "{errs:?}"
    );
    // tls-alpn-01 is dropped where no implicit-TLS listener could answer it.
    let with_http = ACME.replace("tls: implicit", "tls: starttls");
    assert_eq!(
        parse(&with_http).unwrap().acme.unwrap().challenges,
        [Challenge::Http01]
    );
}

#[test]
fn challenges_on_ports_the_ca_does_not_use_are_warned_about() {
    let c = parse(ACME).unwrap();
    let w = c.acme_port_warnings();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].starts_with("the CA validates tls-alpn-01 on port 443"));
    assert!(w[1].starts_with("the CA validates http-01 on port 80"));
    let standard = ACME
        .replace("127.0.0.1:10993", "0.0.0.0:443")
        .replace("127.0.0.1:10080", "0.0.0.0:80");
    assert!(parse(&standard).unwrap().acme_port_warnings().is_empty());
}

#[test]
fn http_listeners_are_plaintext() {
    let text = ACME.replace("protocol: http }", "protocol: http, tls: implicit }");
    let errs = parse(&text).unwrap_err();
    assert!(errs[0].starts_with("listeners.http.tls: http listeners are plaintext"));
}

#[test]
fn default_host_defaults_to_the_first_exact_name() {
    let text = GOOD.replace("default_host: mail.example.test", "");
    assert_eq!(
        parse(&text).unwrap().default_host.as_str(),
        "mail.example.test"
    );
}

#[test]
fn limits_have_defaults_merge_per_listener_and_name_their_mistakes() {
    let c = parse(GOOD).unwrap();
    let l = &c.listeners["imaps"].limits;
    assert_eq!(*l, Limits::default());
    assert_eq!(
        (l.connections_per_ip, l.handshakes_per_ip, l.handshake_burst),
        (500, 20, 100)
    );
    let net = |s: &str| s.parse::<IpNet>().unwrap();
    assert_eq!(l.exempt, [net("127.0.0.0/8"), net("::1/128")]);

    let text = GOOD.replace(
        "tls: implicit, alpn",
        "tls: implicit, limits: { connections_per_ip: 5, exempt: [] }, alpn",
    ) + "limits: { handshakes_per_ip: 7, exempt: [10.1.2.3/8, \"2001:db8::1\"] }\n";
    let c = parse(&text).unwrap();
    let imaps = &c.listeners["imaps"].limits;
    assert_eq!(
        (
            imaps.connections_per_ip,
            imaps.handshakes_per_ip,
            imaps.handshake_burst
        ),
        (500, 7, 100),
        "the global block over the defaults"
    );
    assert_eq!(imaps.exempt, [net("10.0.0.0/8"), net("2001:db8::1/128")]);
    let https = &c.listeners["https"].limits;
    assert_eq!(
        (https.connections_per_ip, https.handshakes_per_ip),
        (5, 7),
        "the listener's block over the global one"
    );
    assert!(https.exempt.is_empty());

    let text = GOOD.replace(
            "tls: implicit, alpn",
            "tls: implicit, limits: { connections_per_ip: 2000000 }, alpn",
        ) + "limits: { connections_per_ip: 0, handshakes_per_ip: 2.5, handshake_burst: many, exempt: [10.0.0.0/33, example.org], colour: red }\n";
    let errs = parse(&text).unwrap_err();
    let expect = [
            "limits.colour: unknown key",
            "limits.connections_per_ip: expected a whole number from 1 to 1000000, found 0",
            "limits.handshakes_per_ip: expected a whole number from 1 to 1000000, found 2.5",
            "limits.handshake_burst: expected a whole number from 1 to 1000000, found many",
            "limits.exempt[0]: invalid network \"10.0.0.0/33\"",
            "limits.exempt[1]: invalid network \"example.org\"",
            "listeners.https.limits.connections_per_ip: expected a whole number from 1 to 1000000, found 2000000",
        ];
    assert_problems(&errs, &expect);
}

#[test]
fn mail_listeners_speak_their_protocols_alpn_ids_unless_told_otherwise() {
    let text = r#"
listeners:
  imaps: { bind: "127.0.0.1:1", protocol: imap, tls: implicit }
  imap:  { bind: "127.0.0.1:2", protocol: imap, tls: starttls }
  pop3s: { bind: "127.0.0.1:3", protocol: pop3, tls: implicit }
  smtps: { bind: "127.0.0.1:4", protocol: smtp, tls: implicit }
  smtp:  { bind: "127.0.0.1:5", protocol: smtp, tls: starttls, alpn: [smtp] }
  sieve: { bind: "127.0.0.1:6", protocol: sieve, tls: starttls }
  https: { bind: "127.0.0.1:7", protocol: tcp, tls: implicit, alpn: [http/1.1] }
  tcp:   { bind: "127.0.0.1:8", protocol: tcp, tls: implicit }
  open:  { bind: "127.0.0.1:9", protocol: imap, tls: implicit, alpn: [] }
  http:  { bind: "127.0.0.1:10", protocol: http }
hosts: [ { names: [mail.example.test], certificate: self-signed } ]
"#;
    let c = parse(text).unwrap();
    let alpn = |name: &str| -> Vec<String> {
        c.listeners[name]
            .alpn
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    };
    assert_eq!(alpn("imaps"), ["imap"]);
    assert_eq!(alpn("imap"), ["imap"]);
    assert_eq!(alpn("pop3s"), ["pop3"]);
    assert_eq!(alpn("smtps"), ["smtp", "submission"]);
    assert_eq!(alpn("smtp"), ["smtp"], "a written list is kept");
    assert_eq!(alpn("sieve"), ["managesieve"]);
    assert_eq!(alpn("https"), ["http/1.1"]);
    assert!(alpn("tcp").is_empty(), "tcp without alpn accepts anything");
    assert!(alpn("open").is_empty(), "alpn: [] turns the check off");
    assert!(alpn("http").is_empty());

    let errs =
        parse(&text.replace("protocol: http }", "protocol: http, alpn: [h2] }")).unwrap_err();
    assert_eq!(
        errs,
        ["listeners.http.alpn: ALPN only applies to TLS listeners"]
    );
}

#[test]
fn two_listeners_cannot_share_an_address() {
    let text = GOOD.replace("127.0.0.1:10443", "127.0.0.1:10993");
    let errs = parse(&text).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("already bound by listener"), "{errs:?}");
}

#[test]
fn the_store_block_parses_with_its_defaults_and_names_its_mistakes() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.store, None, "state_dir alone unless told");
    let c = parse(&format!(
        "{GOOD}store: {{ etcd: {{ endpoints: [\"http://127.0.0.1:2379\", \"http://127.0.0.2:2379\"], node: mx1 }} }}\n"
    ))
    .unwrap();
    let e = c.store.unwrap();
    assert_eq!(
        e.endpoints,
        ["http://127.0.0.1:2379", "http://127.0.0.2:2379"]
    );
    assert_eq!(
        (e.prefix.as_str(), e.node.as_str()),
        ("/portcullis/", "mx1")
    );
    assert_eq!((e.tls, e.user, e.password_file), (None, None, None));

    let c = parse(&format!(
        "{GOOD}store:\n  etcd:\n    endpoints: https://10.0.0.1:2379\n    prefix: /mail/certs\n    node: mx2\n    tls: {{ ca: etcd-ca.pem, cert: c.pem, key: k.pem }}\n    user: portcullis\n    password_file: etcd.pass\n"
    ))
    .unwrap();
    let e = c.store.unwrap();
    assert_eq!(e.prefix, "/mail/certs/");
    let tls = e.tls.unwrap();
    assert_eq!(tls.ca, Path::new("/etc/portcullis/etcd-ca.pem"));
    assert_eq!(tls.cert.unwrap(), Path::new("/etc/portcullis/c.pem"));
    assert_eq!(
        e.password_file.unwrap(),
        Path::new("/etc/portcullis/etcd.pass")
    );

    // without a node name: the machine's host name
    let c = parse(&format!(
        "{GOOD}store: {{ etcd: {{ endpoints: http://127.0.0.1:2379 }} }}\n"
    ))
    .unwrap();
    assert!(!c.store.unwrap().node.is_empty());

    let errs = parse(&format!(
        "{GOOD}store:\n  etcd:\n    endpoints: [\"127.0.0.1:2379\", \"https://10.0.0.1:2379\"]\n    prefix: portcullis\n    node: \"mx 1\"\n    user: portcullis\n    colour: blue\n"
    ))
    .unwrap_err();
    assert_problems(
        &errs,
        &[
            "store.etcd.endpoints[0]: \"127.0.0.1:2379\": expected an etcd client URL",
            "store.etcd.prefix: \"portcullis\": expected a key prefix",
            "store.etcd.node: \"mx 1\": a node name uses",
            "store.etcd: user and password_file go together",
            "store.etcd.tls: missing: https:// endpoints need tls",
            "store.etcd.colour: unknown key",
        ],
    );
    let errs = parse(&format!("{GOOD}store: {{ etcd: {{ endpoints: [] }} }}\n")).unwrap_err();
    assert_problems(
        &errs,
        &["store.etcd.endpoints: at least one endpoint is needed"],
    );
    let errs = parse(&format!("{GOOD}store: {{ redis: x }}\n")).unwrap_err();
    assert_problems(&errs, &["store.redis: unknown key", "store.etcd: missing"]);
}

#[test]
fn key_types_are_one_ecdsa_and_one_rsa_globally_or_per_host() {
    let two = ACME.replace(
        "  key_type: ecdsa-p384\n",
        "  key_types: [ecdsa-p384, rsa-2048]\n",
    );
    let a = parse(&two).unwrap().acme.unwrap();
    assert_eq!(a.key_types, [KeyType::EcdsaP384, KeyType::Rsa2048]);
    assert_eq!(
        a.key_types_for("mail.example.test"),
        [KeyType::EcdsaP384, KeyType::Rsa2048]
    );
    // A host's own, in its own order; the others keep the global one.
    let own = ACME.replace(
        "    backends: { http: 127.0.0.1:8080 }\n",
        "    backends: { http: 127.0.0.1:8080 }\n    acme: { key_types: [rsa-2048, ecdsa-p256] }\n",
    );
    let a = parse(&own).unwrap().acme.unwrap();
    assert_eq!(
        a.key_types_for("mail.example.test"),
        [KeyType::Rsa2048, KeyType::EcdsaP256]
    );
    assert_eq!(a.key_types_for("other.example.test"), [KeyType::EcdsaP384]);

    for (list, want) in [
        (
            "[rsa-2048, rsa-2048]",
            "acme.key_types: rsa-2048 and rsa-2048 are both RSA",
        ),
        (
            "[ecdsa-p256, ecdsa-p384]",
            "acme.key_types: ecdsa-p256 and ecdsa-p384 are both ECDSA",
        ),
        ("[]", "acme.key_types: at least one key type is needed"),
        (
            "[ecdsa-p256, rsa-2048, ecdsa-p384]",
            "acme.key_types: at most two",
        ),
        (
            "[ecdsa-p256, rsa-4096]",
            "acme.key_types: unknown variant `rsa-4096`",
        ),
    ] {
        let text = ACME.replace(
            "  key_type: ecdsa-p384\n",
            &format!("  key_types: {list}\n"),
        );
        assert_problems(&parse(&text).unwrap_err(), &[want]);
    }
    let both = ACME.replace(
        "  key_type: ecdsa-p384\n",
        "  key_type: ecdsa-p384\n  key_types: [ecdsa-p256, rsa-2048]\n",
    );
    assert_problems(
        &parse(&both).unwrap_err(),
        &["acme.key_types: give key_type (one) or key_types (a list), not both"],
    );
    let host_both = own.replace(
        "acme: { key_types: [rsa-2048, ecdsa-p256] }",
        "acme: { key_types: [rsa-2048, rsa-2048] }",
    );
    assert_problems(
        &parse(&host_both).unwrap_err(),
        &["hosts[0].acme.key_types: rsa-2048 and rsa-2048 are both RSA"],
    );
    // Not (yet) with a key rollover or a cluster store.
    let rolling = two.replace(
        "  renew_before: 30d\n",
        "  renew_before: 30d\n  key: rollover\n  tlsa: { check: [\"127.0.0.1:5353\"] }\n",
    );
    assert_problems(
        &parse(&rolling).unwrap_err(),
        &["hosts[0]: key: rollover with two key_types is not supported yet"],
    );
    let clustered = two.replace(
        "listeners:",
        "store: { etcd: { endpoints: [\"http://127.0.0.1:2379\"], node: a } }\nlisteners:",
    );
    assert_problems(
        &parse(&clustered).unwrap_err(),
        &["store: two key_types do not work with store.etcd yet"],
    );
}

#[test]
fn a_host_may_have_two_certificate_file_pairs() {
    let two = GOOD.replace(
        "certificate: { cert: /etc/ssl/org.pem, key: org.key }",
        "certificate: [{ cert: /etc/ssl/org.pem, key: org.key }, { cert: org-rsa.pem, key: org-rsa.key }]",
    );
    assert_ne!(two, GOOD, "the GOOD config has this host");
    let c = parse(&two).unwrap();
    assert_eq!(
        c.hosts[1].certificate,
        CertSource::Files {
            cert: "/etc/ssl/org.pem".into(),
            key: "/etc/portcullis/org.key".into(),
            second: Some((
                "/etc/portcullis/org-rsa.pem".into(),
                "/etc/portcullis/org-rsa.key".into()
            )),
        }
    );
    let three = GOOD.replace(
        "certificate: { cert: /etc/ssl/org.pem, key: org.key }",
        "certificate: [{ cert: a.pem, key: a.key }, { cert: b.pem, key: b.key }, { cert: c.pem, key: c.key }]",
    );
    assert_problems(
        &parse(&three).unwrap_err(),
        &["hosts[1].certificate: a list of certificate files has two { cert, key } pairs (one ECDSA, one RSA), found 3"],
    );
    let typo = GOOD.replace(
        "certificate: { cert: /etc/ssl/org.pem, key: org.key }",
        "certificate: [{ cert: a.pem, key: a.key }, { cert: b.pem }]",
    );
    assert_problems(
        &parse(&typo).unwrap_err(),
        &["hosts[1].certificate[1].key: missing"],
    );
}

#[test]
fn a_mistake_is_reported_once_without_follow_on_errors() {
    let bad_address = GOOD.replace(
        "\"127.0.0.1:10993\", \"[::1]:10993\"",
        "\"127.0.0.1:99999\"",
    );
    let errs = parse(&bad_address).unwrap_err();
    assert!(
        errs.iter().all(|e| !e.contains("at least one")),
        "{errs:#?}"
    );
    assert_problems(&errs, &["listeners.imaps.bind[0]: invalid address"]);
    // Every listener bad: their own errors, not "at least one listener".
    let bad_tls = GOOD.replace("tls: implicit", "tls: implict");
    let errs = parse(&bad_tls).unwrap_err();
    assert!(
        errs.iter().all(|e| e.contains("unknown variant `implict`")),
        "{errs:#?}"
    );
    // Written empty: that is the mistake, and it is said.
    let none = GOOD.replace("bind: [\"127.0.0.1:10993\", \"[::1]:10993\"]", "bind: []");
    assert_problems(
        &parse(&none).unwrap_err(),
        &["listeners.imaps.bind: at least one address is needed"],
    );
}

#[test]
fn a_duplicate_key_is_shown_at_its_own_line() {
    let text = "state_dir: s\nlisteners:\n  imaps: { bind: \"127.0.0.1:993\", protocol: imap, tls: implicit }\nhosts:\n  - names: [a.example.test]\n    certificate: self-signed\n  - names: [b.example.test]\n    backends:\n      imaps: 127.0.0.1:1\n      # the same again\n      imaps: 127.0.0.1:2\n    certificate: self-signed\n";
    let errs = parse(text).unwrap_err();
    assert_eq!(
        errs,
        ["YAML: hosts[1].backends: duplicate key \"imaps\" at line 11 column 7 (first at line 9)"]
    );
    let top = "state_dir: a\nlog: { level: info }\nstate_dir: b\n";
    assert_eq!(
        parse(top).unwrap_err(),
        ["YAML: duplicate key \"state_dir\" at line 3 column 1 (first at line 1)"]
    );
    // Inline: the parser's own words stand.
    let inline = "state_dir: s\nlog: { level: info, level: warn }\n";
    let errs = parse(inline).unwrap_err();
    assert!(
        errs[0].contains("duplicate entry with key \"level\""),
        "{errs:?}"
    );
}

#[test]
fn a_dry_run_orders_from_the_staging_directory_known_or_given() {
    // Let's Encrypt's staging directory for Let's Encrypt…
    let le = ACME.replace("directory: letsencrypt-staging", "directory: letsencrypt");
    let a = parse(&le).unwrap().acme.unwrap();
    assert_eq!(a.staging.as_deref(), Some(defaults::LETSENCRYPT_STAGING));
    // … none for another CA (or for the staging directory itself) …
    let other = ACME.replace("letsencrypt-staging", "https://acme.example.test/dir");
    assert_eq!(parse(&other).unwrap().acme.unwrap().staging, None);
    // … unless given.
    let given = other.replace(
        "  renew_before: 30d\n",
        "  renew_before: 30d\n  staging: https://acme-test.example.test/dir\n",
    );
    assert_eq!(
        parse(&given).unwrap().acme.unwrap().staging.as_deref(),
        Some("https://acme-test.example.test/dir")
    );
    let bad = other.replace(
        "  renew_before: 30d\n",
        "  renew_before: 30d\n  staging: http://acme-test.example.test/dir\n",
    );
    assert_problems(&parse(&bad).unwrap_err(), &["acme.staging: \"http://"]);
}
