//! dns-01 end to end: a real BIND ([`common::bind`]) as the zone's primary,
//! taking TSIG-signed RFC 2136 updates; Pebble resolving every name and
//! checking every dns-01 record there; portcullis adding the record,
//! waiting until BIND serves it, and removing it afterwards.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use portcullis::ops::control::{self, CertRow, RenewRow, Request, Response};

use common::acme::{chains_to, Pebble};
use common::bind::Bind;
use common::site::{eventually, is_placeholder, serial, served_chain, CONTROL, ISSUE};
use common::{free_port, log_line, Proxy};

fn tools(test: &str) -> bool {
    common::acme::tools(test) && common::bind::tools(test)
}

/// One test at a time: they stop and start BIND servers, and a port one
/// test's stopped server left may be handed to another test's new one.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// BIND for `wild.test`, Pebble resolving through it, and portcullis with
/// a wildcard host and a plain one, both by dns-01.
struct Setup {
    bind: Bind,
    pebble: Pebble,
    proxy: Proxy,
    secret: PathBuf,
}

const WILD: [&str; 2] = ["*.wild.test", "wild.test"];
const PLAIN: &str = "mail.wild.test";

fn yaml(bind: &Bind, pebble: &Pebble, key: &str, secret: &std::path::Path) -> String {
    format!(
        r#"
state_dir: state
acme:
  directory: {directory}
  ca_roots: {ca_roots}
  terms_of_service_agreed: true
  dns:
    server: "{server}"
    zone: wild.test
    tsig: {{ name: {key}, secret_file: {secret} }}
    propagation_timeout: 10s
listeners:
  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
backends:
  imaps: 127.0.0.1:9
hosts:
  - names: ["{w0}", {w1}]
    certificate: acme
    acme: {{ challenges: [dns-01] }}
  - names: [{PLAIN}]
    certificate: acme
    acme: {{ challenges: [dns-01] }}
"#,
        directory = pebble.directory,
        ca_roots = pebble.ca_roots.display(),
        server = bind.addr(),
        secret = secret.display(),
        w0 = WILD[0],
        w1 = WILD[1],
    )
}

impl Setup {
    async fn start() -> Setup {
        let bind = Bind::start(&["wild.test"], &["*.wild.test", "wild.test", PLAIN]).await;
        let mut ports = Pebble::reserve();
        ports.dns_server = Some(bind.addr());
        let pebble = ports.start(free_port(), free_port()).await;
        let dir = common::scratch();
        let secret = dir.path().join("tsig.key");
        bind.write_secret_file(&secret);
        let yaml = yaml(&bind, &pebble, bind.key_name(), &secret);
        let proxy = Proxy::start_file(dir, &yaml).await;
        Setup {
            bind,
            pebble,
            proxy,
            secret,
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.proxy.dir.path().join("state")
    }

    async fn renew(&self, name: &str) -> RenewRow {
        let request = Request::Renew {
            dry_run: false,
            force: true,
            name: Some(name.to_string()),
        };
        match control::request(&self.state_dir(), &request, CONTROL).await {
            Ok(Response::Renew(mut rows)) if rows.len() == 1 => rows.remove(0),
            other => panic!("renew: {other:?}"),
        }
    }

    async fn row(&self, first: &str) -> CertRow {
        match control::request(&self.state_dir(), &Request::Certs, CONTROL).await {
            Ok(Response::Certs(rows)) => rows
                .into_iter()
                .find(|r| r.names[0] == first)
                .expect("the host is listed"),
            other => panic!("certs: {other:?}"),
        }
    }

    /// The serial served for `sni`, once an issued certificate is.
    async fn issued(&self, sni: &str, old: Option<&str>) -> String {
        let imaps = self.proxy.addr("imaps");
        eventually(ISSUE, || async move {
            let chain = served_chain(imaps, sni).await.ok()?;
            let s = serial(&chain[0]);
            (!is_placeholder(&chain) && Some(s.as_str()) != old).then_some(s)
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "no certificate for {sni}\n{}\n{}",
                self.pebble.log(),
                self.bind.log()
            )
        })
    }

    /// Waits until no `_acme-challenge` TXT is left in the zone, and the
    /// ledger of records up is empty.
    async fn no_records_left(&self) {
        let names = [
            "_acme-challenge.wild.test",
            "_acme-challenge.mail.wild.test",
        ];
        let ledger = self.state_dir().join("acme/dns-01.json");
        let listed = || -> Vec<serde_json::Value> {
            std::fs::read_to_string(&ledger)
                .map(|t| serde_json::from_str(&t).unwrap())
                .unwrap_or_default()
        };
        // A removal that got no answer is made again 5 s later.
        let left = eventually(Duration::from_secs(30), || async {
            let clean = names.iter().all(|n| self.bind.txt(n).is_empty()) && listed().is_empty();
            clean.then_some(())
        })
        .await;
        let now: Vec<Vec<String>> = names.iter().map(|n| self.bind.txt(n)).collect();
        assert!(
            left.is_some(),
            "records left: {now:?}; listed: {:?}\n{}\n{}",
            listed(),
            common::log_lines(&["dns-01"]).join("\n"),
            self.bind.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_and_a_plain_name_are_issued_by_dns_01_through_bind() {
    if !tools("a_wildcard_and_a_plain_name_are_issued_by_dns_01_through_bind") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let s = Setup::start().await;
    let root = s.pebble.root_der().await;
    // Any name under the wildcard gets the wildcard certificate.
    s.issued("a.wild.test", None).await;
    let imaps = s.proxy.addr("imaps");
    let chain = served_chain(imaps, "a.wild.test").await.unwrap();
    assert!(chains_to(&root, &chain, "a.wild.test"), "a.wild.test");
    assert!(chains_to(&root, &chain, "wild.test"), "the base name too");
    let sans = common::san_names(&chain[0]);
    assert!(sans.contains(&"*.wild.test".to_string()), "{sans:?}");
    s.issued(PLAIN, None).await;
    let plain = served_chain(imaps, PLAIN).await.unwrap();
    assert!(chains_to(&root, &plain, PLAIN));
    assert_eq!(common::san_names(&plain[0]), [PLAIN]);
    log_line(&["dns-01 record added", "_acme-challenge.wild.test"]).await;
    log_line(&["dns-01 record removed", "_acme-challenge.mail.wild.test"]).await;
    s.no_records_left().await;
    // BIND saw signed updates from the key, and nothing else.
    let updates = s.bind.update_log();
    assert!(
        updates.iter().any(|l| l.contains(s.bind.key_name())),
        "{updates:?}"
    );
}

/// A wrong TSIG secret, a key the zone refuses, and a dead DNS server:
/// each a clear error naming what to fix, the old certificate served on,
/// and no record left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_failures_name_the_key_the_zone_and_the_server() {
    if !tools("dns_failures_name_the_key_the_zone_and_the_server") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let mut s = Setup::start().await;
    let good = s.issued(PLAIN, None).await;
    // The wildcard's order done too: the reloads below restart the ACME
    // tasks, and would cut it short.
    s.issued("a.wild.test", None).await;
    let key = s.bind.key_name().to_string();

    // 1. The secret is not the server's: BADSIG, naming the key.
    let right = std::fs::read(&s.secret).unwrap();
    std::fs::write(&s.secret, "d3Jvbmcgc2VjcmV0IGJ5dGVzIGhlcmUh\n").unwrap();
    let row = s.renew(PLAIN).await;
    assert_eq!(
        row.outcome,
        "failed",
        "{row:?}\nportcullis:\n{}\npebble:\n{}\nbind:\n{}",
        common::log_lines(&[PLAIN]).join("\n"),
        s.pebble.log(),
        s.bind.log()
    );
    assert!(
        row.detail
            .contains(&format!("did not accept TSIG key {key}: BADSIG")),
        "{row:?}"
    );
    assert!(s.row(PLAIN).await.last_error.unwrap().contains("BADSIG"));
    std::fs::write(&s.secret, &right).unwrap();

    // 2. A secret file others can read is refused before anything is sent.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&s.secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let row = s.renew(PLAIN).await;
    assert!(
        row.detail
            .contains("open to group or others (mode 644): chmod 600 it"),
        "{row:?}"
    );
    std::fs::set_permissions(&s.secret, std::fs::Permissions::from_mode(0o600)).unwrap();

    // 3. A key the zone does not let update TXT: REFUSED, naming the zone.
    let (other, other_secret) = s.bind.other_key();
    let (other, other_secret) = (other.to_string(), other_secret.to_string());
    let other_file = s.proxy.dir.path().join("other.key");
    std::fs::write(&other_file, format!("{other_secret}\n")).unwrap();
    std::fs::set_permissions(&other_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    s.proxy
        .write_config(&yaml(&s.bind, &s.pebble, &other, &other_file));
    s.proxy.reload().await.expect("reload");
    let row = s.renew(PLAIN).await;
    assert!(
        row.detail.contains(&format!(
            "refused the update of zone wild.test signed with key {other} (REFUSED)"
        )),
        "{row:?}"
    );
    s.proxy
        .write_config(&yaml(&s.bind, &s.pebble, &key, &s.secret));
    s.proxy.reload().await.expect("reload");

    // 4. The DNS server is down: named, and nothing else breaks.
    s.bind.stop();
    let row = s.renew(PLAIN).await;
    assert_eq!(row.outcome, "failed", "{row:?}");
    assert!(
        row.detail
            .contains(&format!("DNS server {}", s.bind.addr())),
        "{row:?}"
    );
    s.bind.restart().await;

    // 5. The DNS server takes the update but never answers: a timeout,
    // naming it; the update it applies later is removed all the same.
    s.bind.freeze();
    let row = s.renew(PLAIN).await;
    assert!(
        row.detail.contains(&format!(
            "DNS server {}: no answer within 10 s",
            s.bind.addr()
        )),
        "{row:?}"
    );
    s.bind.thaw();

    // Through all of it the first certificate served, and nothing stayed up.
    assert_eq!(s.issued(PLAIN, None).await, good);
    assert_eq!(
        s.pebble.issued(),
        2,
        "wildcard + plain, no more\n{}",
        s.pebble.log()
    );
    s.no_records_left().await;
    // And with the key put right, a renewal works again.
    let row = s.renew(PLAIN).await;
    assert_eq!(row.outcome, "renewed", "{row:?}");
    s.issued(PLAIN, Some(&good)).await;
    s.no_records_left().await;
}

/// A record an earlier run left up (its ledger says so) is removed at the
/// next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_left_by_a_crash_is_removed_at_the_next_start() {
    if !tools("a_record_left_by_a_crash_is_removed_at_the_next_start") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let s = Setup::start().await;
    s.issued(PLAIN, None).await;
    s.no_records_left().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("acme")).unwrap();
    // What a crash mid-order leaves: the record up, the ledger listing it.
    let stale = "_acme-challenge.mail.wild.test";
    let add = format!("update add {stale} 60 TXT \"left-behind\"");
    let (ok, out) = s.bind.update("wild.test", &[&add]).await;
    assert!(ok, "nsupdate: {out}");
    assert_eq!(s.bind.txt(stale), ["left-behind"]);
    let ledger = serde_json::json!([{
        "server": s.bind.addr().to_string(), "zone": "wild.test", "name": stale, "value": "left-behind"
    }]);
    std::fs::write(state.join("acme/dns-01.json"), ledger.to_string()).unwrap();
    let yaml = yaml(&s.bind, &s.pebble, s.bind.key_name(), &s.secret);
    let second = Proxy::start_in(dir, &yaml).await;
    let gone = eventually(Duration::from_secs(10), || async {
        s.bind.txt(stale).is_empty().then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "the stale record is still there\n{}",
        s.bind.log()
    );
    second.shutdown().await;
}

/// A server in `check` that never serves the record (a secondary that
/// missed the NOTIFY): the order fails after `propagation_timeout`, naming
/// the server it waited for, and the record is removed from the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_that_does_not_serve_the_record_is_named() {
    if !tools("a_secondary_that_does_not_serve_the_record_is_named") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let s = Setup::start().await;
    let good = s.issued(PLAIN, None).await;
    s.issued("a.wild.test", None).await;
    // A second BIND for the zone that takes no updates from the first.
    let lagging = Bind::start(&["wild.test"], &[PLAIN]).await;
    let yaml = yaml(&s.bind, &s.pebble, s.bind.key_name(), &s.secret).replace(
        "    propagation_timeout: 10s\n",
        &format!(
            "    check: [\"{}\", \"{}\"]\n    propagation_timeout: 2s\n",
            s.bind.addr(),
            lagging.addr()
        ),
    );
    s.proxy.write_config(&yaml);
    s.proxy.reload().await.expect("reload");
    let row = s.renew(PLAIN).await;
    assert_eq!(
        row.outcome,
        "failed",
        "{row:?}\n{}",
        common::log_lines(&["portcullis::"]).join("\n")
    );
    let want = format!(
        "_acme-challenge.mail.wild.test TXT was added at {}, but {} did not serve it within 2 s",
        s.bind.addr(),
        lagging.addr()
    );
    assert!(row.detail.contains(&want), "{row:?}");
    assert_eq!(
        s.issued(PLAIN, None).await,
        good,
        "the old certificate serves on"
    );
    s.no_records_left().await;
}
