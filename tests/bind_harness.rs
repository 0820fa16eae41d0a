//! The BIND harness itself ([`common::bind`]) against a real named 9.18:
//! it serves the zones and names it was given, a TSIG-signed RFC 2136
//! update (sent with `nsupdate` from `bind9-dnsutils`) adds and deletes TXT
//! records, every update it must not allow is refused, and a stopped,
//! restarted or frozen server behaves as the DNS-01 tests will expect.
//!
//! Each test has its own named on its own port.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::bind::{key_arg, tools, Bind, LOCKED_ZONE, NOERROR, NXDOMAIN, REFUSED, SOA};
use common::tool;

/// Whether `named` and `nsupdate` are both installed; skips loudly if not.
fn with_nsupdate(test: &str) -> bool {
    tools(test) && tool("nsupdate", test)
}

/// An update signed with the harness's key that must succeed.
async fn update(bind: &Bind, zone: &str, commands: &[&str]) {
    let (ok, out) = bind.update(zone, commands).await;
    assert!(ok, "nsupdate {commands:?} failed: {out}\n{}", bind.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_serves_soa_and_a_records_for_the_listed_names() {
    if !tools("harness_serves_soa_and_a_records_for_the_listed_names") {
        return;
    }
    let started = Instant::now();
    let bind = Bind::start(
        &["example.test", "Other.TEST."],
        &[
            "example.test",
            "mail.example.test",
            "imap.example.test",
            "*.other.test",
        ],
    )
    .await;
    eprintln!("named answered after {:?}", started.elapsed());
    assert!(bind.addr().ip().is_loopback());
    assert_eq!(bind.zones(), ["example.test", "other.test", LOCKED_ZONE]);

    for zone in bind.zones() {
        let r = bind.query(zone, SOA).unwrap();
        assert_eq!(r.rcode, NOERROR, "{zone}: {r:?}");
        assert!(r.authoritative, "{zone}: {r:?}");
        assert!(r.answers.iter().any(|a| a.rtype == SOA && a.name == *zone));
    }

    let home = vec![Ipv4Addr::LOCALHOST];
    for name in [
        "example.test",
        "mail.example.test",
        "IMAP.example.test.",
        "ns.example.test",
        "ns.locked.test",
        // The wildcard.
        "anything.other.test",
        "a.b.other.test",
    ] {
        assert_eq!(bind.a(name), home, "{name}");
    }
    // Not listed: no such name.
    let r = bind.query("smtp.example.test", common::bind::A).unwrap();
    assert_eq!(r.rcode, NXDOMAIN, "{r:?}");
    assert!(bind.a("smtp.example.test").is_empty());
    // Not ours at all: no recursion, refused.
    let r = bind.query("example.com", SOA).unwrap();
    assert_eq!(r.rcode, REFUSED, "{r:?}");
    // No TXT anywhere yet.
    assert!(bind.txt("_acme-challenge.mail.example.test").is_empty());
    assert!(bind.txt("mail.example.test").is_empty());
    // Every query is in the log.
    assert!(
        bind.log().contains("query: mail.example.test IN A"),
        "{}",
        bind.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_tsig_key_adds_and_deletes_txt_records() {
    if !with_nsupdate("harness_tsig_key_adds_and_deletes_txt_records") {
        return;
    }
    let bind = Bind::start(&["example.test"], &["mail.example.test"]).await;
    let name = "_acme-challenge.mail.example.test";

    let started = Instant::now();
    update(
        &bind,
        "example.test",
        &[&format!("update add {name}. 60 IN TXT \"token-one\"")],
    )
    .await;
    eprintln!("an update answered after {:?}", started.elapsed());
    // Visible to the very next query.
    assert_eq!(bind.txt(name), ["token-one"]);

    // A second value beside it (a name and its wildcard in one order).
    update(
        &bind,
        "example.test",
        &[&format!("update add {name}. 60 IN TXT \"token-two\"")],
    )
    .await;
    assert_eq!(bind.txt(name), ["token-one", "token-two"]);
    let r = bind.query(name, common::bind::TXT).unwrap();
    assert!(r.answers.iter().all(|a| a.ttl == 60), "{r:?}");

    // The key file named reads, as `nsupdate -k` reads it; one value deleted.
    let key_file = bind.dir().join("key.conf");
    std::fs::write(&key_file, bind.key_conf()).unwrap();
    let (ok, out) = bind
        .nsupdate(
            &["-k", key_file.to_str().unwrap()],
            "example.test",
            &[&format!("update delete {name}. IN TXT \"token-one\"")],
        )
        .await;
    assert!(ok, "{out}\n{}", bind.log());
    assert_eq!(bind.txt(name), ["token-two"]);

    // The whole RRset.
    update(
        &bind,
        "example.test",
        &[&format!("update delete {name}. TXT")],
    )
    .await;
    assert!(bind.txt(name).is_empty());
    let r = bind.query(name, common::bind::TXT).unwrap();
    assert_eq!(r.rcode, NXDOMAIN, "{r:?}");

    let log = bind.update_log();
    assert_eq!(
        log.iter().filter(|l| l.contains("adding an RR")).count(),
        2,
        "{log:#?}"
    );
    assert!(log.iter().all(|l| !l.contains("failed")), "{log:#?}");
    assert_eq!(log.len(), 4, "{log:#?}");

    // The secret file: the secret and a newline, 0600.
    let secret_file = bind.dir().join("tsig.secret");
    bind.write_secret_file(&secret_file);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&secret_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(&secret_file).unwrap(),
        format!("{}\n", bind.secret_b64())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_refuses_what_the_key_may_not_do() {
    if !with_nsupdate("harness_refuses_what_the_key_may_not_do") {
        return;
    }
    let bind = Bind::start(&["example.test"], &["mail.example.test", "www.locked.test"]).await;
    let name = "_acme-challenge.mail.example.test";
    let add = format!("update add {name}. 60 IN TXT \"nope\"");
    let own = key_arg(bind.key_name(), bind.secret_b64());
    let (other_name, other_secret) = bind.other_key();
    assert_ne!(other_name, bind.key_name());
    assert_ne!(other_secret, bind.secret_b64());

    // The other key: known, granted nothing.
    let other = key_arg(other_name, other_secret);
    let (ok, out) = bind
        .nsupdate(&["-y", &other], "example.test", &[&add])
        .await;
    assert!(!ok && out.contains("update failed: REFUSED"), "{out}");

    // The right key, a zone it may not update.
    let (ok, out) = bind
        .nsupdate(
            &["-y", &own],
            LOCKED_ZONE,
            &["update add _acme-challenge.www.locked.test. 60 IN TXT \"nope\""],
        )
        .await;
    assert!(!ok && out.contains("update failed: REFUSED"), "{out}");

    // The right key, a record type it may not touch.
    let (ok, out) = bind
        .nsupdate(
            &["-y", &own],
            "example.test",
            &["update add evil.example.test. 60 IN A 127.0.0.2"],
        )
        .await;
    assert!(!ok && out.contains("update failed: REFUSED"), "{out}");

    // A wrong secret, and a key named never: TSIG errors.
    let wrong = key_arg(
        bind.key_name(),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    );
    let (ok, out) = bind
        .nsupdate(&["-y", &wrong], "example.test", &[&add])
        .await;
    assert!(!ok && out.contains("NOTAUTH(BADSIG)"), "{out}");
    let unknown = key_arg("nobody", bind.secret_b64());
    let (ok, out) = bind
        .nsupdate(&["-y", &unknown], "example.test", &[&add])
        .await;
    assert!(!ok && out.contains("NOTAUTH(BADKEY)"), "{out}");

    // Nothing changed.
    assert!(bind.txt(name).is_empty());
    assert!(bind.txt("_acme-challenge.www.locked.test").is_empty());
    assert!(bind.a("evil.example.test").is_empty());
    let log = bind.update_log();
    assert!(
        log.iter()
            .filter(|l| l.contains("(REFUSED)") || l.contains("denied"))
            .count()
            == 3,
        "{log:#?}"
    );
    assert!(!log.iter().any(|l| l.contains("adding an RR")), "{log:#?}");
    for tsig in ["(BADSIG)", "(BADKEY)"] {
        assert!(log.iter().any(|l| l.contains(tsig)), "{log:#?}");
    }
    assert_eq!(log.len(), 5, "{log:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_stopped_server_is_gone_and_a_restart_keeps_updates() {
    let test = "harness_stopped_server_is_gone_and_a_restart_keeps_updates";
    if !tools(test) {
        return;
    }
    let mut bind = Bind::start(&["example.test"], &["mail.example.test"]).await;
    let name = "_acme-challenge.mail.example.test";
    // Without nsupdate: stop and restart only, said loudly by tool().
    let updates = tool("nsupdate", test);
    if updates {
        update(
            &bind,
            "example.test",
            &[&format!("update add {name}. 60 IN TXT \"kept\"")],
        )
        .await;
        assert_eq!(bind.txt(name), ["kept"]);
    }

    bind.stop();
    let started = Instant::now();
    let e = bind.query("example.test", SOA).unwrap_err();
    eprintln!(
        "a query to the stopped server: {e} after {:?}",
        started.elapsed()
    );
    // Nothing listens: refused at once, or at worst no answer in time.
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut
        ),
        "{e:?}"
    );
    bind.stop(); // Twice is fine.

    let started = Instant::now();
    bind.restart().await;
    eprintln!("restarted named answered after {:?}", started.elapsed());
    assert_eq!(bind.a("mail.example.test"), [Ipv4Addr::LOCALHOST]);
    if updates {
        // Replayed from the journal.
        assert!(bind.dir().join("example.test.zone.jnl").exists());
        assert_eq!(bind.txt(name), ["kept"], "{}", bind.log());
        update(
            &bind,
            "example.test",
            &[&format!("update delete {name}. TXT")],
        )
        .await;
        assert!(bind.txt(name).is_empty());
    }
    assert_eq!(bind.log().matches("--- restart ---").count(), 1);
    assert_eq!(bind.log().matches("all zones loaded").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_frozen_server_times_out_and_thaws_with_queued_updates() {
    if !with_nsupdate("harness_frozen_server_times_out_and_thaws_with_queued_updates") {
        return;
    }
    let mut bind = Bind::start(&["example.test"], &["mail.example.test"]).await;
    let name = "_acme-challenge.mail.example.test";

    bind.freeze();
    let started = Instant::now();
    let e = bind.query("example.test", SOA).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e:?}");
    assert!(started.elapsed() >= common::bind::QUERY);

    // One UDP try, 1 s: nsupdate gives up...
    let key = key_arg(bind.key_name(), bind.secret_b64());
    let started = Instant::now();
    let (ok, out) = bind
        .nsupdate(
            &["-y", &key, "-u", "1", "-r", "0", "-t", "1"],
            "example.test",
            &[&format!("update add {name}. 60 IN TXT \"late\"")],
        )
        .await;
    eprintln!(
        "nsupdate to a frozen server: {out:?} after {:?}",
        started.elapsed()
    );
    assert!(!ok, "{out}");
    assert!(out.contains("timed out"), "{out}");

    // ...but its update waited in the socket buffer and is applied now.
    bind.thaw();
    let deadline = Instant::now() + Duration::from_secs(5);
    while bind.txt(name).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(bind.txt(name), ["late"], "{}", bind.log());
}
