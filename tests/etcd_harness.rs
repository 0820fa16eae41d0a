//! The etcd harness itself ([`common::etcd`]) against a real etcd 3.4
//! cluster: it starts, it finds the leader, a member killed comes back as
//! itself, and a whole cluster stopped and started keeps its data.
//!
//! Each test has its own three-member cluster on its own ports.

mod common;

use std::time::Instant;

use common::etcd::{tools, EtcdCluster};

/// `etcdctl ARGS` against the running members; panics with the logs if it fails.
fn ctl(c: &EtcdCluster, args: &[&str]) -> String {
    let (ok, out) = c.etcdctl(args);
    assert!(ok, "etcdctl {args:?} failed: {out}\n{}", c.log());
    out
}

/// Whether something accepts connections on an endpoint's port.
fn listens(endpoint: &str) -> bool {
    let addr = endpoint.trim_start_matches("http://");
    std::net::TcpStream::connect(addr).is_ok()
}

/// The value of `key`, read through the running members (linearizable).
fn get(c: &EtcdCluster, key: &str) -> String {
    ctl(c, &["get", key, "--print-value-only"])
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_three_members_start_and_a_put_round_trips() {
    if !tools("harness_three_members_start_and_a_put_round_trips") {
        return;
    }
    let started = Instant::now();
    let c = EtcdCluster::start(3).await;
    eprintln!("3 members healthy after {:?}", started.elapsed());

    let endpoints = c.endpoints();
    assert_eq!(endpoints.len(), 3);
    for e in &endpoints {
        assert!(e.starts_with("http://127.0.0.1:"), "{e}");
    }

    assert_eq!(ctl(&c, &["put", "/portcullis/k", "v1"]).trim(), "OK");
    assert_eq!(get(&c, "/portcullis/k"), "v1");
    // Through each member alone: all three serve the one cluster.
    for i in 0..3 {
        let (ok, out) = c.etcdctl_on(i, &["get", "/portcullis/k", "--print-value-only"]);
        assert!(ok && out.trim() == "v1", "m{i}: {out}\n{}", c.log());
    }
    let (ok, out) = c.etcdctl(&["member", "list"]);
    assert!(ok, "{out}");
    assert_eq!(out.lines().count(), 3, "{out}");

    assert!(c.leader() < 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_killing_the_leader_elects_another_and_it_rejoins() {
    if !tools("harness_killing_the_leader_elects_another_and_it_rejoins") {
        return;
    }
    let mut c = EtcdCluster::start(3).await;
    ctl(&c, &["put", "before", "1"]);

    let old = c.leader();
    c.kill(old);
    let killed = Instant::now();
    let new = c.leader();
    eprintln!("m{old} killed: m{new} leads after {:?}", killed.elapsed());
    assert_ne!(new, old);

    // Two of three are a quorum: writes and linearizable reads go on.
    ctl(&c, &["put", "during", "2"]);
    assert_eq!(get(&c, "during"), "2");
    assert_eq!(get(&c, "before"), "1");
    assert!(
        !listens(&c.endpoints()[old]),
        "the killed m{old} still listens"
    );

    // Same data directory, same ports: it rejoins as itself and catches up.
    let restarted = Instant::now();
    c.restart(old);
    c.wait_healthy().await;
    eprintln!("m{old} healthy again after {:?}", restarted.elapsed());
    let (ok, out) = c.etcdctl_on(old, &["get", "during", "--print-value-only"]);
    assert!(ok && out.trim() == "2", "m{old}: {out}\n{}", c.log());
    let (ok, out) = c.etcdctl_on(old, &["member", "list"]);
    assert!(ok && out.lines().count() == 3, "m{old}: {out}");
    assert!(c.leader() < 3);
    ctl(&c, &["put", "after", "3"]);
    assert_eq!(get(&c, "after"), "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_stop_all_then_start_all_keeps_the_data() {
    if !tools("harness_stop_all_then_start_all_keeps_the_data") {
        return;
    }
    let mut c = EtcdCluster::start(3).await;
    for k in 0..10 {
        ctl(&c, &["put", &format!("/keep/{k}"), &format!("v{k}")]);
    }

    c.stop_all();
    let (ok, _) = c.etcdctl(&["get", "/keep/0"]);
    assert!(!ok, "a stopped cluster answered");
    for e in c.endpoints() {
        assert!(!listens(&e), "{e} still listens");
    }

    let restarted = Instant::now();
    c.start_all();
    c.wait_healthy().await;
    eprintln!("all 3 healthy again after {:?}", restarted.elapsed());
    let keys = ctl(&c, &["get", "/keep/", "--prefix", "--keys-only"]);
    assert_eq!(keys.split_whitespace().count(), 10, "{keys}");
    for k in 0..10 {
        assert_eq!(get(&c, &format!("/keep/{k}")), format!("v{k}"));
    }
    ctl(&c, &["put", "/keep/new", "yes"]);
    assert_eq!(get(&c, "/keep/new"), "yes");
    assert!(c.leader() < 3);
}
