//! Several instances sharing one etcd cluster (`store: { etcd: … }`): one
//! orders, every one answers the CA's challenges, every one serves the new
//! certificate within seconds, and an etcd outage costs no session.
//!
//! Each test starts a real 3-member etcd ([`common::etcd`]), a Pebble and
//! three portcullis instances in this process, each on its own loopback
//! address (127.0.0.11, .12, .13) with the same ports: the CA's validator
//! connects to whichever address Pebble's DNS server gives it
//! ([`Pebble::set_default_ipv4`]), so the tests choose which instance
//! answers a challenge another one posted.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis::ops::control::{self, Request, Response};

use common::acme::{chains_to, free_port, Pebble};
use common::etcd::EtcdCluster;
use common::node::Node;
use common::site::{eventually, is_placeholder, serial, served_chain, CONTROL, ISSUE};
use common::{admin_get, log_line, tls_connect, Backend, Proxy};

/// How soon every instance must serve a certificate another one wrote.
const SPREAD: Duration = Duration::from_secs(2);

fn tools(test: &str) -> bool {
    common::acme::tools(test) && common::etcd::tools(test)
}

/// What this file asks of a node beyond [`common::node`].
impl Node {
    /// The serial this node serves for `sni`, `None` for the placeholder.
    async fn serving(&self, sni: &str) -> Option<String> {
        let chain = served_chain(self.imaps(), sni).await.ok()?;
        (!is_placeholder(&chain)).then(|| serial(&chain[0]))
    }
}

/// etcd, Pebble and three instances with one ACME host.
struct Fleet {
    names: Vec<String>,
    etcd: EtcdCluster,
    pebble: Pebble,
    nodes: Vec<Node>,
    _backend: Backend,
}

impl Fleet {
    /// Starts everything; Pebble validates at `validator` (an index into the
    /// nodes). Returns once all three serve the first certificate.
    async fn start(tag: &str, challenge: &str, validator: usize) -> Fleet {
        let etcd = EtcdCluster::start(3).await;
        let (http, imaps) = (free_port(), free_port());
        let pebble = Pebble::start(http, imaps).await;
        let backend = Backend::start("* OK echo\r\n", true).await;
        let names = vec![format!("imap.{tag}.test"), format!("smtp.{tag}.test")];
        let endpoints = etcd
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for i in 0..3 {
            let ip = format!("127.0.0.{}", 11 + i);
            let name = format!("n{}", i + 1);
            let admin = format!("127.0.0.1:{}", free_port());
            let yaml = format!(
                r#"
state_dir: state
store:
  etcd:
    endpoints: [{endpoints}]
    node: {name}
acme:
  directory: {directory}
  contact: ["mailto:postmaster@{n0}"]
  terms_of_service_agreed: true
  challenges: [{challenge}]
  ca_roots: {ca_roots}
admin: {{ bind: "{admin}" }}
listeners:
  imaps: {{ bind: "{ip}:{imaps}", protocol: imap, tls: implicit }}
  http: {{ bind: "{ip}:{http}", protocol: http }}
backends:
  imaps: "{backend}"
hosts:
  - names: [{n0}, {n1}]
    certificate: acme
"#,
                directory = pebble.directory,
                ca_roots = pebble.ca_roots.display(),
                n0 = names[0],
                n1 = names[1],
                backend = backend.addr,
            );
            let proxy = Proxy::start_in(common::scratch(), &yaml).await;
            nodes.push(Node {
                name,
                ip,
                admin,
                dir: proxy.dir.path().to_path_buf(),
                proxy,
            });
        }
        let fleet = Fleet {
            names,
            etcd,
            pebble,
            nodes,
            _backend: backend,
        };
        fleet
            .pebble
            .set_default_ipv4(&fleet.nodes[validator].ip)
            .await;
        let first = fleet.all_serving(None, ISSUE).await;
        assert!(
            first.is_some(),
            "the three do not serve one issued certificate within {ISSUE:?}\n{}",
            fleet.logs()
        );
        fleet
    }

    /// Waits until all three serve the same issued certificate, not `old`;
    /// its serial.
    async fn all_serving(&self, old: Option<&str>, limit: Duration) -> Option<String> {
        let sni = &self.names[0];
        eventually(limit, || async move {
            let mut serials = Vec::new();
            for n in &self.nodes {
                serials.push(n.serving(sni).await?);
            }
            let first = serials[0].clone();
            let same = serials.iter().all(|s| *s == first);
            (same && Some(first.as_str()) != old).then_some(first)
        })
        .await
    }

    /// The host's certificate record in etcd, as JSON.
    fn record(&self) -> serde_json::Value {
        let key = format!("/portcullis/certs/{}", self.names[0]);
        let (ok, out) = self.etcd.etcdctl(&["get", &key, "--print-value-only"]);
        assert!(ok, "etcdctl get {key}: {out}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{key}: {e}: {out}"))
    }

    fn logs(&self) -> String {
        format!("{}\n{}", self.pebble.log(), self.etcd.log())
    }
}

/// Handshakes with each instance in turn until stopped; the failures.
struct HandshakeLoop {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl HandshakeLoop {
    fn start(addrs: Vec<SocketAddr>, sni: String) -> HandshakeLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut done, mut failures) = (0usize, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(600);
            while !flag.load(Ordering::Relaxed) && done < 100_000 && Instant::now() < deadline {
                let addr = addrs[done % addrs.len()];
                let shake =
                    tokio::time::timeout(Duration::from_secs(5), tls_connect(addr, Some(&sni)));
                match shake.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
                    Err(_) => failures.push(format!("{addr}: no handshake within 5 s")),
                }
                done += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (done, failures)
        });
        HandshakeLoop { stop, task }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("handshake loop")
    }
}

/// One order for the three; a renewal one node orders is validated at
/// another (http-01 on port 80) and served by all within [`SPREAD`].
async fn one_orders_any_answers(tag: &str, challenge: &str) {
    // Pebble's validator reaches n3 only; n1 orders the renewal.
    let fleet = Fleet::start(tag, challenge, 2).await;
    let first = fleet.nodes[0].serving(&fleet.names[0]).await.unwrap();
    // Time for the two that did not order to have tried (they wait for
    // the lock holder, then take its certificate): still one order.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        fleet.pebble.orders(),
        1,
        "one order for three instances\n{}",
        fleet.logs()
    );
    let record = fleet.record();
    let orderer = record["node"].as_str().unwrap().to_string();
    assert!(["n1", "n2", "n3"].contains(&orderer.as_str()), "{record}");
    assert_eq!(record["serial"], first.as_str());
    let root = fleet.pebble.root_der().await;
    for n in &fleet.nodes {
        let chain = served_chain(n.imaps(), &fleet.names[1]).await.unwrap();
        assert!(
            chains_to(&root, &chain, &fleet.names[1]),
            "{} serves Pebble's certificate",
            n.name
        );
        let row = n.cert_row(&fleet.names).await;
        assert_eq!(row.source, "acme", "{}: {row:?}", n.name);
        assert_eq!(row.serial, first, "{}: {row:?}", n.name);
        // ... and keeps a local copy for when etcd is away.
        let stored = n
            .state_dir()
            .join("certs")
            .join(&fleet.names[0])
            .join("fullchain.pem");
        assert!(stored.exists(), "{}: {}", n.name, stored.display());
    }

    // n1 orders; only n3 is reachable for the CA.
    let row = fleet.nodes[0].renew(&fleet.names).await;
    assert_eq!(row.outcome, "renewed", "{row:?}\n{}", fleet.logs());
    let issued = Instant::now();
    let second = fleet
        .all_serving(Some(&first), SPREAD)
        .await
        .unwrap_or_else(|| {
            panic!(
                "not all serve the renewal within {SPREAD:?}\n{}",
                fleet.logs()
            )
        });
    eprintln!(
        "{tag}: all three serve the renewal {:?} after n1 had it",
        issued.elapsed()
    );
    assert_eq!(fleet.pebble.orders(), 2);
    assert_eq!(fleet.record()["node"], "n1");
    assert_eq!(fleet.record()["serial"], second.as_str());
    // n2 and n3 took it from the store; n1 shows no lock any more.
    log_line(&["certificate taken from the cluster store", &second]).await;
    let row = fleet.nodes[0].cert_row(&fleet.names).await;
    assert_eq!(row.locked_by, None, "{row:?}");
    let cluster = fleet.nodes[1].cluster().await;
    assert_eq!(cluster.node, "n2");
    assert_eq!(cluster.down_since, None, "{cluster:?}");
    let synced: Vec<&str> = cluster.nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(synced, ["n1", "n2", "n3"], "{cluster:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_01_posted_by_one_node_is_answered_by_another() {
    if !tools("http_01_posted_by_one_node_is_answered_by_another") {
        return;
    }
    one_orders_any_answers("cl1", "http-01").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_posted_by_one_node_is_answered_by_another() {
    if !tools("tls_alpn_01_posted_by_one_node_is_answered_by_another") {
        return;
    }
    one_orders_any_answers("cl2", "tls-alpn-01").await;
}

/// A broken record in etcd (not JSON, or a key that is not the
/// certificate's) is logged and left alone: every node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_record_in_the_store_is_not_served() {
    let test = "a_broken_record_in_the_store_is_not_served";
    if !tools(test) {
        return;
    }
    let fleet = Fleet::start("cl3", "http-01", 0).await;
    let good = fleet.nodes[0].serving(&fleet.names[0]).await.unwrap();
    let key = format!("/portcullis/certs/{}", fleet.names[0]);
    let mut record = fleet.record();

    let (ok, out) = fleet.etcd.etcdctl(&["put", &key, "{not json"]);
    assert!(ok, "{out}");
    log_line(&["unreadable certificate record", &fleet.names[0]]).await;

    // A later certificate whose key is another one: a half-written pair.
    let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
    record["key_pem"] = other.into();
    // Later than the one served: a node would take it if it were whole.
    record["not_after"] = (record["not_after"].as_i64().unwrap() + 86_400).into();
    record["serial"] = "00".into();
    let (ok, out) = fleet.etcd.etcdctl(&["put", &key, &record.to_string()]);
    assert!(ok, "{out}");
    log_line(&["unusable: not served"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in &fleet.nodes {
        assert_eq!(
            n.serving(&fleet.names[0]).await.as_deref(),
            Some(good.as_str()),
            "{}",
            n.name
        );
    }
    assert_eq!(fleet.pebble.orders(), 1, "a broken record orders nothing");
}

/// The etcd leader dies during a renewal, then all of etcd stops and comes
/// back; a handshake loop across the three instances sees no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_failures_cost_no_handshake_and_no_extra_order() {
    let test = "etcd_failures_cost_no_handshake_and_no_extra_order";
    if !tools(test) {
        return;
    }
    let mut fleet = Fleet::start("cl4", "http-01", 1).await;
    let addrs = fleet.nodes.iter().map(Node::imaps).collect();
    let shakes = HandshakeLoop::start(addrs, fleet.names[0].clone());
    let first = fleet.nodes[0].serving(&fleet.names[0]).await.unwrap();

    // 1. The leader dies while n1 orders: the renewal completes.
    let orders = fleet.pebble.orders();
    let leader = fleet.etcd.leader();
    let renewing = {
        let state = fleet.nodes[0].state_dir();
        let request = Request::Renew {
            dry_run: false,
            force: true,
            name: Some(fleet.names[0].clone()),
        };
        tokio::spawn(async move { control::request(&state, &request, CONTROL).await })
    };
    let locked = eventually(Duration::from_secs(5), || async {
        let (_, out) =
            fleet
                .etcd
                .etcdctl(&["get", "--prefix", "/portcullis/locks/", "--keys-only"]);
        out.contains("locks/").then_some(())
    })
    .await;
    fleet.etcd.kill(leader);
    eprintln!(
        "killed etcd member {leader} (the leader); lock seen first: {}",
        locked.is_some()
    );
    let row = match renewing.await.unwrap() {
        Ok(Response::Renew(rows)) => rows[0].clone(),
        other => panic!("renew: {other:?}"),
    };
    assert_eq!(row.outcome, "renewed", "{row:?}\n{}", fleet.logs());
    let second = fleet
        .all_serving(Some(&first), Duration::from_secs(10))
        .await
        .unwrap_or_else(|| {
            let mine = common::log_lines(&["cluster"]).join("\n");
            panic!(
                "the renewal did not reach all three\n{mine}\n{}",
                fleet.logs()
            )
        });
    assert_eq!(
        fleet.pebble.orders(),
        orders + 1,
        "one order for the renewal"
    );
    fleet.etcd.restart(leader);
    fleet.etcd.wait_healthy().await;

    // 2. All of etcd stops: every node serves on, says so, orders nothing.
    let before = fleet.nodes[2].cluster().await.last_sync;
    fleet.etcd.stop_all();
    for n in &fleet.nodes {
        let said = eventually(Duration::from_secs(30), || async {
            let (status, body) = admin_get(&n.admin, "/healthz").await;
            (status.contains(" 200 ") && body.contains("warning: cluster store unreachable since"))
                .then_some(body)
        })
        .await;
        assert!(said.is_some(), "{}: /healthz says nothing of etcd", n.name);
        let metrics = common::scrape(&n.admin).await;
        assert_eq!(
            common::sample(&metrics, "portcullis_cluster_store_up"),
            Some("0"),
            "{}",
            n.name
        );
        let cluster = n.cluster().await;
        assert!(cluster.down_since.is_some(), "{}: {cluster:?}", n.name);
    }
    let orders = fleet.pebble.orders();
    let row = fleet.nodes[1].renew(&fleet.names).await;
    assert_eq!(row.outcome, "failed", "{row:?}");
    assert!(row.detail.contains("not ordered"), "{row:?}");
    assert_eq!(fleet.pebble.orders(), orders, "no order while etcd is away");
    for n in &fleet.nodes {
        assert_eq!(
            n.serving(&fleet.names[0]).await.as_deref(),
            Some(second.as_str()),
            "{}",
            n.name
        );
    }

    // 3. etcd returns: every node syncs again, and renewals work.
    fleet.etcd.start_all();
    fleet.etcd.wait_healthy().await;
    for n in &fleet.nodes {
        let back = eventually(Duration::from_secs(30), || async {
            let c = n.cluster().await;
            (c.down_since.is_none() && c.last_sync != before).then_some(c)
        })
        .await;
        assert!(
            back.is_some(),
            "{} did not resync\n{}",
            n.name,
            fleet.logs()
        );
        let (status, body) = admin_get(&n.admin, "/healthz").await;
        assert!(
            status.contains(" 200 ") && body == "ok\n",
            "{}: {status} {body}",
            n.name
        );
    }
    let row = fleet.nodes[2].renew(&fleet.names).await;
    assert_eq!(row.outcome, "renewed", "{row:?}\n{}", fleet.logs());
    fleet
        .all_serving(Some(&second), SPREAD)
        .await
        .unwrap_or_else(|| {
            panic!(
                "not all serve the renewal after etcd returned\n{}",
                fleet.logs()
            )
        });

    let (done, failures) = shakes.finish().await;
    eprintln!("{done} handshakes across the three instances");
    assert!(done > 100, "the loop ran: {done}");
    assert!(
        failures.is_empty(),
        "{} of {done} handshakes failed: {failures:?}",
        failures.len()
    );
}

/// The order lock's lease must be renewed while a node orders; when etcd
/// stops answering, the node gives the lock up (the order stops) before
/// the lease would run out, and a second node cannot take it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_lock_is_kept_alive_and_given_up_when_etcd_is_gone() {
    if !common::etcd::tools("an_order_lock_is_kept_alive_and_given_up_when_etcd_is_gone") {
        return;
    }
    use portcullis::cluster::lock::{Acquired, TTL};
    use portcullis::cluster::Cluster;
    common::init_logging();
    let mut etcd = EtcdCluster::start(3).await;
    let config = |node: &str| portcullis::config::Etcd {
        endpoints: etcd.endpoints(),
        prefix: "/portcullis/".into(),
        node: node.into(),
        tls: None,
        user: None,
        password_file: None,
    };
    let a = Arc::new(Cluster::new(&config("a")).unwrap());
    let b = Arc::new(Cluster::new(&config("b")).unwrap());
    let Ok(Acquired::Held(lock)) = a.lock("mail.example.test").await else {
        panic!("a takes the free lock");
    };
    // Past the lease's own life: kept alive, still a's.
    let held = tokio::time::timeout(TTL + Duration::from_secs(5), lock.lost()).await;
    assert!(
        held.is_err(),
        "the lease was kept alive for longer than its TTL"
    );
    match b.lock("mail.example.test").await {
        Ok(Acquired::Elsewhere(node)) => assert_eq!(node, "a"),
        Ok(_) => panic!("b took a lock a holds"),
        Err(e) => panic!("b: {e}"),
    }
    // etcd gone: given up before the lease could run out.
    let stopped = Instant::now();
    etcd.stop_all();
    tokio::time::timeout(TTL, lock.lost())
        .await
        .expect("the lock is given up within its lease");
    eprintln!("lock given up {:?} after etcd stopped", stopped.elapsed());
    log_line(&["stopping this order before the lock runs out"]).await;
}

/// A store that holds an older certificate than the nodes serve (a write
/// lost while a node was cut off, then a restart) is brought up to date by
/// a node that has the newer one, instead of every node ordering again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_behind_the_nodes_is_brought_up_to_date() {
    if !tools("a_store_behind_the_nodes_is_brought_up_to_date") {
        return;
    }
    let fleet = Fleet::start("cl5", "http-01", 0).await;
    let old = fleet.record();
    let first = fleet.nodes[0].serving(&fleet.names[0]).await.unwrap();
    // A renewal in the same second would expire in the same second: a
    // tie, which the store's record wins (as it should). Newer here.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let row = fleet.nodes[0].renew(&fleet.names).await;
    assert_eq!(row.outcome, "renewed", "{row:?}");
    let newer = fleet.all_serving(Some(&first), SPREAD).await.unwrap();
    let orders = fleet.pebble.orders();

    // The store loses the renewal: it holds the first certificate again.
    let key = format!("/portcullis/certs/{}", fleet.names[0]);
    let (ok, out) = fleet.etcd.etcdctl(&["put", &key, &old.to_string()]);
    assert!(ok, "{out}");
    let caught_up = eventually(Duration::from_secs(10), || async {
        (fleet.record()["serial"] == newer.as_str()).then_some(())
    })
    .await;
    assert!(
        caught_up.is_some(),
        "the store still holds {}\n{}",
        fleet.record()["serial"],
        fleet.logs()
    );
    log_line(&["newer certificate than the cluster store holds"]).await;
    for n in &fleet.nodes {
        assert_eq!(
            n.serving(&fleet.names[0]).await.as_deref(),
            Some(newer.as_str()),
            "{}",
            n.name
        );
    }
    assert_eq!(fleet.pebble.orders(), orders, "no order for it");
}
