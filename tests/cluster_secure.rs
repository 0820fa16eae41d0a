//! The secure cluster setup of deploy/etcd/README.md against a real etcd
//! 3.4: clients on TLS with client certificates (`--client-cert-auth`),
//! authentication on, and a user `portcullis` that may read and write
//! under `/portcullis/` and nothing else. An instance configured as
//! recommended (`tls: { ca, cert, key }`, `user`, `password_file`) orders
//! the certificate and writes it and the account to etcd, and one with the
//! client certificate alone (etcd takes its CN as the user) takes it from
//! there; instances with a wrong password, with no permission on their
//! prefix, or trusting another CA start and serve all the same, order
//! nothing, and say why in `portcullis certs` (the control socket),
//! `/healthz`, the metrics and the log, trying again at a bounded pace.
//!
//! One etcd member ([`EtcdCluster::start_tls`]), one Pebble, six
//! portcullis instances in this process on 127.0.0.21 to .26 with the same
//! ports; Pebble validates at the first. Addresses only, never a name.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::acme::{chains_to, free_port, Pebble};
use common::etcd::EtcdCluster;
use common::node::Node;
use common::site::{eventually, is_placeholder, serial, served_chain, ISSUE};
use common::{admin_get, log_line, Backend, Proxy};

/// Bound on an instance noticing that etcd refuses it, in the store's
/// health and in its host's attempt to order.
const NOTICE: Duration = Duration::from_secs(20);
/// etcd's `root` password (the harness's etcdctl is `root` by its client
/// certificate and needs none).
const ROOT_PASSWORD: &str = "root-secret-for-tests";

fn tools(test: &str) -> bool {
    common::acme::tools(test) && common::etcd::tools(test)
}

/// What this file asks of a node beyond [`common::node`].
impl Node {
    /// The chain served for `sni`, leaf first.
    async fn chain(&self, sni: &str) -> Vec<Vec<u8>> {
        served_chain(self.imaps(), sni)
            .await
            .unwrap_or_else(|e| panic!("{}: no handshake: {e}", self.name))
    }
}

/// What an instance's `store.etcd` says.
struct Store<'a> {
    node: &'a str,
    ip: &'a str,
    prefix: &'a str,
    ca: &'a Path,
    /// `user: portcullis` with this password; `None`: the client
    /// certificate alone.
    password: Option<&'a str>,
}

/// etcd, Pebble and what every instance shares.
struct Env {
    etcd: EtcdCluster,
    pebble: Pebble,
    names: Vec<String>,
    /// The client certificate (CN `portcullis`) and its key.
    cert: (PathBuf, PathBuf),
    password: String,
    backend: Backend,
    /// Holds another CA, unrelated to etcd's.
    scratch: tempfile::TempDir,
}

impl Env {
    /// A portcullis with `store`, the ACME host, and its listeners on
    /// `store.ip` and Pebble's validation ports; the password file ends
    /// with a newline, as `head … | base64 > etcd-password` writes it.
    async fn node(&self, store: Store<'_>) -> Node {
        let dir = common::scratch();
        let auth = match store.password {
            Some(password) => {
                let file = dir.path().join("etcd-password");
                std::fs::write(file, format!("{password}\n")).unwrap();
                "\n    user: portcullis\n    password_file: etcd-password"
            }
            None => "",
        };
        let admin = format!("127.0.0.1:{}", free_port());
        let yaml = format!(
            r#"
state_dir: state
store:
  etcd:
    endpoints: ["{endpoint}"]
    prefix: {prefix}
    node: {node}
    tls: {{ ca: "{ca}", cert: "{cert}", key: "{key}" }}{auth}
acme:
  directory: {directory}
  contact: ["mailto:postmaster@{n0}"]
  terms_of_service_agreed: true
  challenges: [http-01]
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
            endpoint = self.etcd.endpoints()[0],
            prefix = store.prefix,
            node = store.node,
            ca = store.ca.display(),
            cert = self.cert.0.display(),
            key = self.cert.1.display(),
            directory = self.pebble.directory,
            ca_roots = self.pebble.ca_roots.display(),
            ip = store.ip,
            imaps = self.pebble.tls_port,
            http = self.pebble.http_port,
            backend = self.backend.addr,
            n0 = self.names[0],
            n1 = self.names[1],
        );
        let proxy = Proxy::start_in(dir, &yaml).await;
        Node {
            name: store.node.to_string(),
            ip: store.ip.to_string(),
            admin,
            dir: proxy.dir.path().to_path_buf(),
            proxy,
        }
    }

    /// `etcdctl ARGS` as root; panics with etcd's log if it fails.
    fn ctl(&self, args: &[&str]) -> String {
        let (ok, out) = self.etcd.etcdctl(args);
        assert!(ok, "etcdctl {args:?}: {out}\n{}", self.etcd.log());
        out
    }

    fn logs(&self) -> String {
        format!("{}\n{}", self.pebble.log(), self.etcd.log())
    }
}

/// A CA of its own, unrelated to etcd's: `DIR/other-ca.pem`.
fn other_ca(dir: &Path) -> PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "some other CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let path = dir.join("other-ca.pem");
    std::fs::write(&path, ca.self_signed(&key).unwrap().pem()).unwrap();
    path
}

/// Authentication on, as deploy/etcd/README.md "The portcullis user" says:
/// `root` first (etcd refuses `auth enable` without it), then a role that
/// may read and write under `/portcullis/` only, and its user.
fn enable_auth(env: &Env) {
    let root = format!("root:{ROOT_PASSWORD}");
    let user = format!("portcullis:{}", env.password);
    env.ctl(&["user", "add", &root]);
    env.ctl(&["user", "grant-role", "root", "root"]);
    env.ctl(&["role", "add", "portcullis"]);
    env.ctl(&[
        "role",
        "grant-permission",
        "portcullis",
        "--prefix=true",
        "readwrite",
        "/portcullis/",
    ]);
    env.ctl(&["user", "add", &user]);
    env.ctl(&["user", "grant-role", "portcullis", "portcullis"]);
    env.ctl(&["auth", "enable"]);
    let role = env.ctl(&["role", "get", "portcullis"]);
    assert!(role.contains("[/portcullis/, /portcullis0)"), "{role}");

    // What etcd itself answers the user, before portcullis is asked to.
    let (ok, out) = env
        .etcd
        .etcdctl(&["--user", &user, "get", "--prefix", "/portcullis/"]);
    assert!(ok, "portcullis may read /portcullis/: {out}");
    let (ok, out) = env.etcd.etcdctl(&["--user", &user, "get", "/other/x"]);
    assert!(!ok && out.contains("permission denied"), "{out}");
    let (ok, out) = env
        .etcd
        .etcdctl(&["--user", "portcullis:wrong", "get", "/portcullis/x"]);
    assert!(!ok && out.contains("authentication failed"), "{out}");
}

/// A node etcd refuses: within [`NOTICE`] it says so, with etcd's reason
/// (which contains `why`), in `portcullis certs` (the store and the host),
/// `/healthz`, the metrics and the log; it serves the placeholder; a forced
/// renewal fails without an order. Prints what it said.
async fn refused(env: &Env, node: &Node, why: &str) {
    let started = Instant::now();
    let seen = std::sync::Mutex::new(None);
    let cluster = eventually(NOTICE, || async {
        let c = node.cluster().await;
        let refused =
            c.down_since.is_some() && c.last_error.as_deref().is_some_and(|e| e.contains(why));
        *seen.lock().unwrap() = Some(c.clone());
        refused.then_some(c)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{}: the store is not reported down for {why:?} within {NOTICE:?}: {:?}\n{}",
            node.name,
            seen.lock().unwrap(),
            env.logs()
        )
    });
    let noticed = started.elapsed();
    let error = cluster.last_error.clone().unwrap();
    assert_eq!(cluster.last_sync, None, "{}: {cluster:?}", node.name);

    let (status, body) = admin_get(&node.admin, "/healthz").await;
    assert!(status.contains(" 200 "), "{}: {status}\n{body}", node.name);
    assert!(body.starts_with("ok\n"), "{}: {body}", node.name);
    let warning = body
        .lines()
        .find(|l| l.starts_with("warning: cluster store "))
        .unwrap_or_else(|| panic!("{}: /healthz has no warning: {body}", node.name));
    assert!(warning.contains(&error), "{}: {warning}", node.name);
    // etcd that says no is told apart from etcd that does not answer.
    let state = if error.starts_with("cluster store refused") {
        "warning: cluster store refuses this node since"
    } else {
        "warning: cluster store unreachable since"
    };
    assert!(warning.starts_with(state), "{}: {warning}", node.name);
    let metrics = common::scrape(&node.admin).await;
    assert_eq!(
        common::sample(&metrics, "portcullis_cluster_store_up"),
        Some("0"),
        "{}",
        node.name
    );
    let follow = log_line(&[
        "serving the certificates this node has, ordering none",
        &error,
    ])
    .await;

    // The host's own attempt (at start) and a forced renewal, side by
    // side: each refused as well, no order.
    let asked = Instant::now();
    let last_row = std::sync::Mutex::new(None);
    let host = eventually(NOTICE, || async {
        let row = node.cert_row(&env.names).await;
        let refused = row.last_error.as_deref().is_some_and(|e| e.contains(why));
        *last_row.lock().unwrap() = Some(row.clone());
        refused.then_some(row)
    });
    let renew = async {
        let row = node.renew(&env.names).await;
        (row, asked.elapsed())
    };
    let (row, (renew, answered)) = tokio::join!(host, renew);
    let row = row.unwrap_or_else(|| {
        panic!(
            "{}: the host shows no {why:?} within {NOTICE:?}: {:?}\n{}",
            node.name,
            last_row.lock().unwrap(),
            env.logs()
        )
    });
    assert_eq!(row.source, "placeholder", "{}: {row:?}", node.name);
    let host_error = row.last_error.clone().unwrap();
    assert_eq!(renew.outcome, "failed", "{}: {renew:?}", node.name);
    assert!(
        renew.detail.starts_with("not ordered: ") && renew.detail.contains(why),
        "{}: {renew:?}",
        node.name
    );
    let order = log_line(&["no order", why]).await;
    let chain = node.chain(&env.names[0]).await;
    assert!(
        is_placeholder(&chain),
        "{}: serves the placeholder",
        node.name
    );
    eprintln!(
        "{}: noticed after {noticed:?}\n  certs, store: {error}\n  certs, host:  {host_error}\n  \
         /healthz: {warning}\n  log: {follow}\n  log: {order}\n  renew ({answered:?}): {}",
        node.name, renew.detail
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_auth_work_and_mistakes_are_reported() {
    let test = "tls_and_auth_work_and_mistakes_are_reported";
    if !tools(test) {
        return;
    }
    let started = Instant::now();
    let etcd = EtcdCluster::start_tls(1).await;
    let cert = etcd.client_cert("portcullis");
    let pebble = Pebble::start(free_port(), free_port()).await;
    let env = Env {
        etcd,
        pebble,
        names: vec!["imap.sec.test".into(), "smtp.sec.test".into()],
        cert,
        password: format!("{:016x}", fastrand::u64(..)),
        backend: Backend::start("* OK echo\r\n", true).await,
        scratch: common::scratch(),
    };
    assert!(env.etcd.endpoints()[0].starts_with("https://127.0.0.1:"));
    enable_auth(&env);
    eprintln!("etcd with TLS and auth after {:?}", started.elapsed());
    let ca = env.etcd.ca().expect("a TLS cluster has a CA");

    // a. As recommended: ordered, written to etcd, served.
    env.pebble.set_default_ipv4("127.0.0.21").await;
    let good = env
        .node(Store {
            node: "s1",
            ip: "127.0.0.21",
            prefix: "/portcullis/",
            ca: &ca,
            password: Some(&env.password),
        })
        .await;
    let issued = eventually(ISSUE, || async {
        let chain = served_chain(good.imaps(), &env.names[0]).await.ok()?;
        (!is_placeholder(&chain)).then_some(chain)
    })
    .await
    .unwrap_or_else(|| panic!("s1: no certificate within {ISSUE:?}\n{}", env.logs()));
    eprintln!(
        "s1 serves Pebble's certificate after {:?}",
        started.elapsed()
    );
    let root = env.pebble.root_der().await;
    assert!(chains_to(&root, &issued, &env.names[0]));
    let first = serial(&issued[0]);
    log_line(&["certificate written to the cluster store", &first]).await;
    let key = format!("/portcullis/certs/{}", env.names[0]);
    let out = env.ctl(&["get", &key, "--print-value-only"]);
    let record: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{key}: {e}: {out}"));
    assert_eq!(record["node"], "s1", "{record}");
    assert_eq!(record["serial"], first.as_str(), "{record}");
    let keys = env.ctl(&["get", "--prefix", "/portcullis/", "--keys-only"]);
    let keys: Vec<&str> = keys.split_whitespace().collect();
    assert!(
        keys.iter().any(|k| k.starts_with("/portcullis/account/")),
        "{keys:?}"
    );
    assert!(keys.contains(&"/portcullis/nodes/s1"), "{keys:?}");
    let cluster = eventually(Duration::from_secs(5), || async {
        let c = good.cluster().await;
        c.last_sync.is_some().then_some(c)
    })
    .await
    .expect("s1 synced");
    assert_eq!(cluster.down_since, None, "{cluster:?}");
    assert_eq!(cluster.last_error, None, "{cluster:?}");
    let (status, body) = admin_get(&good.admin, "/healthz").await;
    assert!(
        status.contains(" 200 ") && body == "ok\n",
        "{status}\n{body}"
    );
    assert_eq!(env.pebble.orders(), 1, "{}", env.pebble.log());

    // a'. deploy/etcd/README.md's config: the client certificate alone,
    // whose CN etcd takes as the user. It takes the certificate from etcd.
    let by_cert = env
        .node(Store {
            node: "s5",
            ip: "127.0.0.25",
            prefix: "/portcullis/",
            ca: &ca,
            password: None,
        })
        .await;
    let taken = eventually(NOTICE, || async {
        let chain = served_chain(by_cert.imaps(), &env.names[0]).await.ok()?;
        (!is_placeholder(&chain)).then(|| serial(&chain[0]))
    })
    .await
    .unwrap_or_else(|| panic!("s5 serves nothing from etcd\n{}", env.logs()));
    assert_eq!(taken, first);
    log_line(&["certificate taken from the cluster store", &first]).await;
    let cluster = eventually(Duration::from_secs(5), || async {
        let c = by_cert.cluster().await;
        c.last_sync.is_some().then_some(c)
    })
    .await
    .expect("s5 synced");
    assert_eq!(cluster.last_error, None, "{cluster:?}");
    let nodes: Vec<&str> = cluster.nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(nodes, ["s1", "s5"], "{cluster:?}");
    eprintln!("s5 serves it after {:?}", started.elapsed());

    // b, c, d: each refused for its own mistake, all at once.
    let mistakes = Instant::now();
    let wrong_password = env
        .node(Store {
            node: "s2",
            ip: "127.0.0.22",
            prefix: "/portcullis/",
            ca: &ca,
            password: Some("not-the-password"),
        })
        .await;
    let other_prefix = env
        .node(Store {
            node: "s3",
            ip: "127.0.0.23",
            prefix: "/other/",
            ca: &ca,
            password: Some(&env.password),
        })
        .await;
    let other_ca = other_ca(env.scratch.path());
    let wrong_ca = env
        .node(Store {
            node: "s4",
            ip: "127.0.0.24",
            prefix: "/portcullis/",
            ca: &other_ca,
            password: Some(&env.password),
        })
        .await;

    // The same CA mistake with the client certificate alone (no password,
    // so no login when connecting): the first request finds it.
    let wrong_ca_cert_only = env
        .node(Store {
            node: "s6",
            ip: "127.0.0.26",
            prefix: "/portcullis/",
            ca: &other_ca,
            password: None,
        })
        .await;

    let unknown_ca = "invalid peer certificate: UnknownIssuer";
    tokio::join!(
        refused(&env, &wrong_password, "authentication failed"),
        refused(&env, &other_prefix, "permission denied"),
        refused(&env, &wrong_ca, unknown_ca),
        refused(&env, &wrong_ca_cert_only, unknown_ca),
    );
    eprintln!("the mistakes reported after {:?}", mistakes.elapsed());

    assert_eq!(env.pebble.orders(), 1, "a refused node orders nothing");
    // Each tries again at a bounded pace (the store read backs off from
    // 1 s to 10 s, an order every 30 s; a TLS failure is tried again like a
    // network's): a few attempts a second at most, no storm at etcd.
    let secs = mistakes.elapsed().as_secs() as usize;
    let logins = env.etcd.log_count("invalid authentication was requested");
    let handshakes = env.etcd.log_count("tls: unknown certificate authority");
    eprintln!(
        "etcd saw {logins} wrong passwords, {handshakes} handshakes with the wrong CA in {secs} s"
    );
    let most = 10 + 5 * secs;
    assert!(logins <= most, "{logins} logins\n{}", env.etcd.log());
    assert!(
        handshakes <= most,
        "{handshakes} handshakes\n{}",
        env.etcd.log()
    );
    // Nothing written under the prefix s3 may not touch, nor by s2, s4, s6.
    let keys = env.ctl(&["get", "--prefix", "/", "--keys-only"]);
    assert!(!keys.contains("/other/"), "{keys}");
    for n in ["s2", "s3", "s4", "s6"] {
        assert!(!keys.contains(&format!("/nodes/{n}")), "{keys}");
    }
    // s1 still serves the one certificate, and is still fine.
    assert_eq!(serial(&good.chain(&env.names[0]).await[0]), first);
    assert_eq!(good.cluster().await.down_since, None);
    eprintln!("whole test: {:?}", started.elapsed());
}
