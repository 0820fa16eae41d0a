//! DANE-safe keys (RFC 7672): with `acme: { key: reuse }` a renewal keeps
//! the certificate's key, so a `TLSA 3 1 1` record stays valid; `portcullis
//! tlsa` prints that record from the certificate on disk, and it matches
//! what openssl computes from the certificate served.

mod common;

use std::time::Duration;

use common::acme::{tools, Pebble};
use common::process::{path_str, portcullis};
use common::site::*;
use common::Proxy;

/// SHA-256 of the served certificate's SubjectPublicKeyInfo, by openssl:
/// `openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | sha256`.
async fn openssl_spki_sha256(der: &[u8]) -> String {
    let pem = common::cert_pem(der);
    let limit = Duration::from_secs(10);
    let (ok, pubkey, err) = common::run_cmd(
        "openssl",
        &["x509", "-pubkey", "-noout"],
        pem.as_bytes(),
        limit,
    )
    .await;
    assert!(ok, "openssl x509: {err}");
    let dir = common::scratch();
    let der_path = dir.path().join("spki.der");
    let (ok, _, err) = common::run_cmd(
        "openssl",
        &[
            "pkey",
            "-pubin",
            "-outform",
            "der",
            "-out",
            path_str(&der_path),
        ],
        pubkey.as_bytes(),
        limit,
    )
    .await;
    assert!(ok, "openssl pkey: {err}");
    let (ok, out, err) = common::run_cmd(
        "openssl",
        &["dgst", "-sha256", "-r", path_str(&der_path)],
        b"",
        limit,
    )
    .await;
    assert!(ok, "openssl dgst: {err}");
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Starts portcullis on the site's config with `acme` lines added to its
/// `acme:` block (and written for the CLI); waits for the first certificate.
async fn start_with(
    site: &Site,
    pebble: &Pebble,
    acme: &str,
) -> (Proxy, std::net::SocketAddr, Vec<Vec<u8>>) {
    let yaml = site
        .config(&pebble.directory, &pebble.ca_roots, "http-01")
        .replace("  challenges: [", &format!("{acme}  challenges: ["));
    std::fs::write(site.config_path(), &yaml).unwrap();
    let proxy = Proxy::start(&yaml).await;
    let imaps = proxy.addr(&site.imaps());
    let first = wait_issued(imaps, &site.names[0], None)
        .await
        .unwrap_or_else(|| panic!("no certificate\n{}", pebble.log()));
    (proxy, imaps, first)
}

/// `portcullis tlsa` for the site's first name: exit code, stdout, stderr.
fn tlsa(site: &Site) -> (i32, String, String) {
    let config = site.config_path();
    let args = ["tlsa", "--config", path_str(&config), &site.names[0]];
    portcullis(&args, Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_reuse_keeps_the_tlsa_record_valid_across_renewals() {
    let test = "key_reuse_keeps_the_tlsa_record_valid_across_renewals";
    if !tools(test) || !common::tool("openssl", test) {
        return;
    }
    let site = Site::new("dane1").await;
    let pebble = Pebble::start(site.http, site.imaps).await;
    let (_proxy, imaps, first) = start_with(&site, &pebble, "  key: reuse\n").await;
    let digest = openssl_spki_sha256(&first[0]).await;

    // What `portcullis tlsa` prints for the host: the same key.
    let (code, out, err) = tlsa(&site);
    assert_eq!(code, 0, "{out}{err}");
    let want = format!(
        "_{}._tcp.{}. IN TLSA 3 1 1 {digest}",
        site.imaps, site.names[0]
    );
    assert!(out.lines().any(|l| l == want), "{want:?} not in:\n{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("_{}._tcp.{}. ", site.imaps, site.names[1]))),
        "every name of the host: {out}"
    );

    // Three renewals: three new certificates, one key.
    let mut serial_seen = serial(&first[0]);
    for round in 1..=3 {
        let row = renew(&site, true).await;
        assert_eq!(row.outcome, "renewed", "round {round}: {row:?}");
        let chain = wait_issued(imaps, &site.names[0], Some(&serial_seen))
            .await
            .unwrap_or_else(|| panic!("round {round}: no new certificate"));
        serial_seen = serial(&chain[0]);
        assert_eq!(
            openssl_spki_sha256(&chain[0]).await,
            digest,
            "round {round}: the key changed"
        );
    }
    assert_eq!(pebble.issued(), 4);
    let (_, again, _) = tlsa(&site);
    assert_eq!(
        again, out,
        "the record printed is the same after the renewals"
    );
}

/// Without `key: reuse`, each renewal has a new key (the default), and
/// `portcullis tlsa` follows the certificate on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_renewal_brings_a_new_key_and_tlsa_follows_it() {
    let test = "by_default_a_renewal_brings_a_new_key_and_tlsa_follows_it";
    if !tools(test) || !common::tool("openssl", test) {
        return;
    }
    let (site, pebble, proxy, _yaml, first) = issued_site("dane2", "http-01").await;
    let imaps = proxy.addr(&site.imaps());
    let before = openssl_spki_sha256(&first[0]).await;
    let row = renew(&site, true).await;
    assert_eq!(row.outcome, "renewed", "{row:?}\n{}", pebble.log());
    let chain = wait_issued(imaps, &site.names[0], Some(&serial(&first[0])))
        .await
        .unwrap();
    let after = openssl_spki_sha256(&chain[0]).await;
    assert_ne!(before, after, "a new key");
    let (code, out, err) = tlsa(&site);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&after), "{out}");
    assert!(!out.contains(&before), "{out}");
}

/// `key: rollover`: the next key is made ahead and printed by `portcullis
/// tlsa`; renewals keep the current key until the next key's TLSA record
/// is served by every `acme.tlsa.check` server for `wait_ttls` TTLs; then
/// the certificate has the next key, and a new next key waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rollover_waits_for_the_tlsa_record_then_switches() {
    let test = "key_rollover_waits_for_the_tlsa_record_then_switches";
    if !tools(test) || !common::tool("openssl", test) || !common::bind::tools(test) {
        return;
    }
    if !common::tool("nsupdate", test) {
        return;
    }
    let site = Site::new("dane3").await;
    let bind = common::bind::Bind::start(&["dane3.test"], &[&site.names[0], &site.names[1]]).await;
    let pebble = Pebble::start(site.http, site.imaps).await;
    let acme = format!(
        "  key: rollover\n  tlsa: {{ check: [\"{}\"], wait_ttls: 2 }}\n",
        bind.addr()
    );
    let (_proxy, imaps, first) = start_with(&site, &pebble, &acme).await;
    let current = openssl_spki_sha256(&first[0]).await;

    // The next key, printed ahead, under every owner name.
    let (code, out, err) = tlsa(&site);
    assert_eq!(code, 0, "{out}{err}");
    let next_lines: Vec<&str> = out.lines().filter(|l| l.contains("the next key")).collect();
    assert_eq!(next_lines.len(), 2, "one per name: {out}");
    let next = next_lines[0].split_whitespace().nth(6).unwrap().to_string();
    assert_ne!(next, current);
    assert!(out.contains(&format!("3 1 1 {current}\n")), "{out}");

    // Not published: a renewal keeps the current key.
    let renewed = |old: String| {
        let site = &site;
        async move {
            let row = renew(site, true).await;
            assert_eq!(row.outcome, "renewed", "{row:?}");
            let chain = wait_issued(imaps, &site.names[0], Some(&old))
                .await
                .unwrap();
            (serial(&chain[0]), openssl_spki_sha256(&chain[0]).await)
        }
    };
    let (s1, k1) = renewed(serial(&first[0])).await;
    assert_eq!(k1, current, "the next key is not served yet");

    // Published (TTL 1 s): seen now, but used only after 2 TTLs.
    let adds: Vec<String> = site
        .names
        .iter()
        .map(|name| format!("update add _{}._tcp.{name} 1 TLSA 3 1 1 {next}", site.imaps))
        .collect();
    let adds: Vec<&str> = adds.iter().map(String::as_str).collect();
    let (ok, out) = bind.update("dane3.test", &adds).await;
    assert!(ok, "nsupdate: {out}");
    let (s2, k2) = renewed(s1).await;
    assert_eq!(k2, current, "served, but not for 2 TTLs yet");
    let row = cert_row(&site).await;
    assert!(
        row.key.as_deref().unwrap_or("").contains("served"),
        "{row:?}"
    );

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, k3) = renewed(s2).await;
    assert_eq!(k3, next, "the certificate has the next key now");
    let (_, out, _) = tlsa(&site);
    assert!(
        out.contains(&format!("3 1 1 {next}\n")),
        "the current record now: {out}"
    );
    let newer: Vec<&str> = out.lines().filter(|l| l.contains("the next key")).collect();
    assert_eq!(newer.len(), 2, "{out}");
    assert!(!newer[0].contains(&next), "a new next key waits: {out}");
    assert_eq!(pebble.issued(), 4);
}
