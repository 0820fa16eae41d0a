//! A real etcd cluster for the tests: N members of Debian's etcd 3.4
//! (packages `etcd-server` and `etcd-client`: `etcd`, and `etcdctl` spoken
//! to with `ETCDCTL_API=3`), each a plain child process on free loopback
//! ports, with its own data directory and log file in one scratch directory.
//!
//! [`EtcdCluster::start`] serves clients plain `http://`.
//! [`EtcdCluster::start_tls`] serves them `https://` only, as
//! deploy/etcd/README.md sets etcd up: a test CA made with rcgen, one
//! server certificate (IP SAN 127.0.0.1, server and client use) for every
//! member, `--client-cert-auth` (a client needs a certificate from that
//! CA, whose CN etcd takes as the user when no password is given). Peer
//! traffic stays plain `http://`. The harness's own `etcdctl` then presents
//! a client certificate with CN `root`: it may do anything before `auth
//! enable`, and is `root` after. [`EtcdCluster::ca`] and
//! [`EtcdCluster::client_cert`] give a test the CA and client certificates
//! for other users.
//!
//! Everything names 127.0.0.1, never a host name: the peer and client URLs
//! each member listens on and advertises, and `--initial-cluster`. Every
//! cluster has its own `--initial-cluster-token`, so two clusters of one
//! test run can never join each other. Members run with
//! `--heartbeat-interval 50 --election-timeout 500` (ms): a lost leader is
//! replaced within about a second.
//!
//! A member is stopped with SIGKILL ([`EtcdCluster::kill`],
//! [`EtcdCluster::stop_all`]) and brought back with the very same command
//! line ([`EtcdCluster::restart`], [`EtcdCluster::start_all`]): same name,
//! ports and data directory. A member whose data directory holds a WAL
//! ignores `--initial-cluster-state new` and the other `--initial-cluster*`
//! flags; it restarts as the member it was ("restarting local member" in its
//! log) and catches up from the leader. Its log continues in the same file.
//! Dropping the cluster kills every member.
//!
//! What etcd 3.4 does, for the tests' expectations (measured on loopback): a
//! new three-member cluster is healthy after 0.2 to 2.5 s (a new member
//! first asks the others whether the cluster exists already, and a peer port
//! that is bound but not yet served makes it wait out a 1 s timeout, per
//! peer); a killed leader is replaced within 0.5 to 1.5 s; a restarted
//! member, or a whole cluster started again, is healthy within 0.5 s.
//!
//! `etcdctl` runs only against the members that run now, with bounded
//! `--dial-timeout` and `--command-timeout`, and is killed if it still runs
//! after [`ETCDCTL`]. etcd and etcdctl get a clean environment: no `ETCD*`
//! variable of the developer's shell (each would conflict with a flag), no
//! proxy setting (`process::INHERITED`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::{free_port, tool};

/// Bound on a cluster (or a restarted member) becoming healthy.
const START: Duration = Duration::from_secs(20);
/// Bound on the running members agreeing on a leader.
const LEADER: Duration = Duration::from_secs(10);
/// Hard bound on one `etcdctl` run (its own timeouts are shorter).
const ETCDCTL: Duration = Duration::from_secs(15);
/// Pause between two looks in a wait loop.
const POLL: Duration = Duration::from_millis(50);
/// Lines of each member's log that [`EtcdCluster::log`] shows.
const TAIL: usize = 60;

/// The programs every etcd test runs; a missing one skips loudly.
pub fn tools(test: &str) -> bool {
    ["etcd", "etcdctl"].iter().all(|t| tool(t, test))
}

/// One member: what its command line is made of, and its process if it runs
/// (in a mutex only so that `&self` methods can see whether it exited).
struct Member {
    name: String,
    peer: u16,
    client: u16,
    child: Mutex<Option<Child>>,
}

impl Member {
    fn runs(&self) -> bool {
        self.child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Kills and reaps the process, if there is one.
    fn stop(&mut self) -> bool {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        match child.take() {
            Some(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
                true
            }
            None => false,
        }
    }
}

/// The test CA of a [`EtcdCluster::start_tls`] cluster and the files made
/// from it, in `DIR/pki/`: `ca.pem`, `server.pem` + `server.key` (every
/// member's), `root.pem` + `root.key` (the harness's `etcdctl`), and one
/// `CN.pem` + `CN.key` per [`EtcdCluster::client_cert`].
struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(dir: PathBuf) -> Pki {
        std::fs::create_dir_all(&dir).expect("pki dir");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.distinguished_name
            .push(DnType::CommonName, "portcullis test etcd CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = ca.self_signed(&key).expect("CA certificate");
        std::fs::write(dir.join("ca.pem"), cert.pem()).expect("ca.pem");
        let pki = Pki {
            dir,
            issuer: Issuer::new(ca, key),
        };
        // etcd 3.4 also presents its server certificate as a client (its
        // gRPC gateway dials the member itself): both uses.
        let mut server = CertificateParams::new(Vec::<String>::new()).expect("server params");
        server.distinguished_name.push(DnType::CommonName, "etcd");
        server.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        pki.issue("server", server);
        pki.client("root");
        pki
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `NAME.pem` and `NAME.key`: a certificate from the CA with `params`.
    fn issue(&self, name: &str, params: CertificateParams) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        let (c, k) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("certificate file");
        std::fs::write(&k, key.serialize_pem()).expect("key file");
        (c, k)
    }

    /// A client certificate (clientAuth only) whose CN is `cn`.
    fn client(&self, cn: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(cn, params)
    }

    /// etcd's flags for serving clients with these files.
    fn server_flags(&self) -> Vec<String> {
        let p = |f: &str| self.dir.join(f).display().to_string();
        vec![
            "--cert-file".into(),
            p("server.pem"),
            "--key-file".into(),
            p("server.key"),
            "--trusted-ca-file".into(),
            p("ca.pem"),
            "--client-cert-auth".into(),
        ]
    }

    /// etcdctl's flags for talking to such a member as `root`.
    fn etcdctl_flags(&self) -> Vec<String> {
        let p = |f: &str| self.dir.join(f).display().to_string();
        vec![
            "--cacert".into(),
            p("ca.pem"),
            "--cert".into(),
            p("root.pem"),
            "--key".into(),
            p("root.key"),
        ]
    }
}

/// A running etcd cluster on loopback. Dropping it kills every member.
pub struct EtcdCluster {
    members: Vec<Member>,
    /// Set by [`EtcdCluster::start_tls`]: clients speak TLS.
    pki: Option<Pki>,
    /// `m0=http://127.0.0.1:PEER,…`: the same for every member.
    initial_cluster: String,
    token: String,
    // Removed after Drop has killed the members.
    dir: tempfile::TempDir,
}

/// What one `etcdctl` run said.
struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl EtcdCluster {
    /// Starts an `n`-member cluster and waits until every member is healthy;
    /// panics with the members' logs if it is not within [`START`].
    pub async fn start(n: usize) -> EtcdCluster {
        EtcdCluster::launch(n, false).await
    }

    /// [`EtcdCluster::start`], with clients on `https://` and client
    /// certificates required (see the module's doc); the harness's
    /// `etcdctl` is `root`.
    pub async fn start_tls(n: usize) -> EtcdCluster {
        EtcdCluster::launch(n, true).await
    }

    async fn launch(n: usize, tls: bool) -> EtcdCluster {
        assert!(n >= 1, "an etcd cluster has at least one member");
        let mut ports: Vec<u16> = Vec::with_capacity(2 * n);
        for _ in 0..100 * n {
            if ports.len() == 2 * n {
                break;
            }
            let p = free_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        assert_eq!(ports.len(), 2 * n, "no {} distinct free ports", 2 * n);
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                peer: ports[2 * i],
                client: ports[2 * i + 1],
                child: Mutex::new(None),
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "portcullis-test-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = tls.then(|| Pki::new(dir.path().join("pki")));
        let mut cluster = EtcdCluster {
            members,
            pki,
            initial_cluster,
            token,
            dir,
        };
        cluster.start_all();
        cluster.wait_healthy().await;
        cluster
    }

    /// Client URLs `http://127.0.0.1:PORT` (`https://` for
    /// [`EtcdCluster::start_tls`]) of every member, in member order, the
    /// stopped ones included (as a client configured with the whole cluster
    /// has them).
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    fn endpoint(&self, i: usize) -> String {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[i].client)
    }

    /// The CA (PEM) that issued the members' certificates; `None` for a
    /// plain cluster.
    pub fn ca(&self) -> Option<PathBuf> {
        self.pki.as_ref().map(Pki::ca)
    }

    /// A new client certificate from the cluster's CA whose CN is `cn` (etcd's
    /// user when no password is given): the paths of `CN.pem` and `CN.key`.
    /// Panics for a plain cluster.
    pub fn client_cert(&self, cn: &str) -> (PathBuf, PathBuf) {
        let pki = self.pki.as_ref().expect("a cluster started with start_tls");
        pki.client(cn)
    }

    /// The TLS flags of the harness's `etcdctl` (none for a plain cluster).
    fn ctl_flags(&self) -> Vec<String> {
        self.pki
            .as_ref()
            .map(Pki::etcdctl_flags)
            .unwrap_or_default()
    }

    /// Indexes of the members that run now.
    fn running(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].runs())
            .collect()
    }

    /// Index of the current leader. Waits (up to [`LEADER`], blocking the
    /// thread) until every running member answers `endpoint status`, all
    /// name the same leader and that leader is one of them; panics with the
    /// logs otherwise. Right after the leader is killed, the survivors still
    /// name it for up to an election timeout: this waits for the new one.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + LEADER;
        let mut why = String::new();
        for _ in 0..LEADER.as_millis() / POLL.as_millis() {
            match self.try_leader() {
                Ok(i) => return i,
                Err(e) => why = e,
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(POLL);
        }
        panic!(
            "the running members agreed on no leader within {LEADER:?}: {why}\n{}",
            self.log()
        );
    }

    fn try_leader(&self) -> Result<usize, String> {
        let running = self.running();
        if running.is_empty() {
            return Err("no member runs".into());
        }
        let endpoints: Vec<String> = running.iter().map(|&i| self.endpoint(i)).collect();
        // Exits 1 when one endpoint fails, yet prints the others' status.
        let out = run_etcdctl(
            &endpoints,
            &self.ctl_flags(),
            &["endpoint", "status", "-w", "json"],
            "1s",
            "2s",
        );
        let statuses: serde_json::Value = serde_json::from_str(&out.stdout)
            .map_err(|e| format!("status is no JSON ({e}): {}{}", out.stdout, out.stderr))?;
        let statuses = statuses.as_array().ok_or("status is no JSON array")?;
        let mut leaders = Vec::new();
        let mut ids = Vec::new();
        for &i in &running {
            let url = self.endpoint(i);
            let s = statuses
                .iter()
                .find(|s| s["Endpoint"] == url.as_str())
                .ok_or_else(|| format!("no status from m{i}: {}", out.stderr))?;
            let leader = s["Status"]["leader"].as_u64();
            let id = s["Status"]["header"]["member_id"].as_u64();
            let (Some(leader), Some(id)) = (leader, id) else {
                return Err(format!("m{i}'s status lacks leader or member_id: {s}"));
            };
            leaders.push(leader);
            ids.push(id);
        }
        let leader = leaders[0];
        if leader == 0 || leaders.iter().any(|&l| l != leader) {
            return Err(format!("the members name different leaders: {leaders:x?}"));
        }
        match ids.iter().position(|&id| id == leader) {
            Some(k) => Ok(running[k]),
            None => Err(format!("the leader {leader:x} is no running member")),
        }
    }

    /// SIGKILLs member `i` and reaps it; [`EtcdCluster::restart`] brings it
    /// back. Panics if it is not running.
    pub fn kill(&mut self, i: usize) {
        assert!(self.members[i].stop(), "etcd m{i} is not running");
    }

    /// SIGKILLs every running member.
    pub fn stop_all(&mut self) {
        for i in self.running() {
            self.kill(i);
        }
    }

    /// Starts stopped member `i` again: same name, ports and data directory
    /// (so it rejoins as itself). Does not wait: see
    /// [`EtcdCluster::wait_healthy`]. Panics if it runs.
    pub fn restart(&mut self, i: usize) {
        assert!(!self.members[i].runs(), "etcd m{i} is already running");
        let child = self.spawn(i);
        *self.members[i]
            .child
            .get_mut()
            .unwrap_or_else(|e| e.into_inner()) = Some(child);
    }

    /// Starts every stopped member again (all of them, at first). Does not
    /// wait: see [`EtcdCluster::wait_healthy`].
    pub fn start_all(&mut self) {
        for i in 0..self.members.len() {
            if !self.members[i].runs() {
                self.restart(i);
            }
        }
    }

    /// Waits until `etcdctl endpoint health` succeeds on every running member
    /// (which takes a quorum: the health check is a read through raft).
    /// Panics with the logs after [`START`], or at once if a member exited.
    pub async fn wait_healthy(&self) {
        let running = self.running();
        assert!(!running.is_empty(), "no etcd member runs");
        let endpoints: Vec<String> = running.iter().map(|&i| self.endpoint(i)).collect();
        let deadline = Instant::now() + START;
        let mut why = String::new();
        for _ in 0..START.as_millis() / POLL.as_millis() {
            self.check_alive();
            // etcdctl waits out its whole dial timeout on a port no one
            // listens on yet: ask it only once every member accepts.
            let listening = running.iter().all(|&i| {
                let addr = ([127, 0, 0, 1], self.members[i].client).into();
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            });
            if listening {
                let (endpoints, flags) = (endpoints.clone(), self.ctl_flags());
                let out = tokio::task::spawn_blocking(move || {
                    run_etcdctl(&endpoints, &flags, &["endpoint", "health"], "1s", "2s")
                })
                .await
                .expect("etcdctl thread");
                if out.ok {
                    return;
                }
                why = format!("{}{}", out.stdout, out.stderr);
            } else {
                why = "not every member accepts connections".into();
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        panic!(
            "etcd members {running:?} not healthy within {START:?}: {why}\n{}",
            self.log()
        );
    }

    /// Panics with the logs if a member that should run has exited.
    fn check_alive(&self) {
        for (i, m) in self.members.iter().enumerate() {
            let exited = match &mut *m.child.lock().unwrap_or_else(|e| e.into_inner()) {
                Some(child) => child.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                panic!("etcd m{i} exited ({status}):\n{}", self.log());
            }
        }
    }

    /// Runs `etcdctl ARGS` against every running member (its
    /// `--dial-timeout 2s --command-timeout 5s`, killed after [`ETCDCTL`]):
    /// (success, stdout); on failure, stderr follows stdout.
    pub fn etcdctl(&self, args: &[&str]) -> (bool, String) {
        let endpoints: Vec<String> = self.running().iter().map(|&i| self.endpoint(i)).collect();
        if endpoints.is_empty() {
            return (false, "no etcd member runs".into());
        }
        result(run_etcdctl(&endpoints, &self.ctl_flags(), args, "2s", "5s"))
    }

    /// [`EtcdCluster::etcdctl`] against member `i` alone, running or not: a
    /// linearizable `get` through it shows that it has rejoined.
    pub fn etcdctl_on(&self, i: usize, args: &[&str]) -> (bool, String) {
        result(run_etcdctl(
            &[self.endpoint(i)],
            &self.ctl_flags(),
            args,
            "2s",
            "5s",
        ))
    }

    /// The last lines of every member's log, each under a heading.
    pub fn log(&self) -> String {
        let mut out = String::new();
        for (i, m) in self.members.iter().enumerate() {
            let state = if m.runs() { "running" } else { "stopped" };
            let text = read(&self.log_path(i));
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(TAIL)..];
            out.push_str(&format!(
                "--- etcd {} (client {}, peer {}, {state}; last {} lines) ---\n",
                m.name,
                m.client,
                m.peer,
                tail.len()
            ));
            for l in tail {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// How many lines of the members' logs, all of them, contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        (0..self.members.len())
            .map(|i| {
                read(&self.log_path(i))
                    .lines()
                    .filter(|l| l.contains(needle))
                    .count()
            })
            .sum()
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.members[i].name))
    }

    /// Starts member `i`, its stdout and stderr (zap's JSON lines) appended
    /// to its log file.
    fn spawn(&self, i: usize) -> Child {
        let m = &self.members[i];
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let client = self.endpoint(i);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("{}.etcd", m.name)))
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        if let Some(pki) = &self.pki {
            cmd.args(pki.server_flags());
        }
        clean_env(&mut cmd);
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .expect("log file");
        let err = log.try_clone().expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.stop();
        }
    }
}

/// No `ETCD*` variable (etcd refuses one that a flag also sets; etcdctl's
/// would change what it does) but `ETCD_UNSUPPORTED_ARCH`, and no proxy.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("ETCD") && k != "ETCD_UNSUPPORTED_ARCH" {
            cmd.env_remove(&*k);
        }
    }
    for v in super::process::INHERITED {
        cmd.env_remove(v);
    }
}

/// `etcdctl --endpoints … FLAGS --dial-timeout DIAL --command-timeout
/// COMMAND ARGS`, killed after [`ETCDCTL`].
fn run_etcdctl(
    endpoints: &[String],
    flags: &[String],
    args: &[&str],
    dial: &str,
    command: &str,
) -> Output {
    let mut cmd = Command::new("etcdctl");
    cmd.arg("--endpoints")
        .arg(endpoints.join(","))
        .args(flags)
        .args(["--dial-timeout", dial, "--command-timeout", command])
        .args(args);
    clean_env(&mut cmd);
    cmd.env("ETCDCTL_API", "3")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + ETCDCTL;
    let mut status = None;
    for _ in 0..ETCDCTL.as_millis() / 10 + 1 {
        if let Some(s) = child.try_wait().expect("wait for etcdctl") {
            status = Some(s);
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (stdout, mut stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    if status.is_none() {
        stderr.push_str(&format!(
            "\netcdctl {args:?} ran past {ETCDCTL:?}, killed\n"
        ));
    }
    Output {
        ok: status.is_some_and(|s| s.success()),
        stdout,
        stderr,
    }
}

fn result(out: Output) -> (bool, String) {
    if out.ok {
        (true, out.stdout)
    } else {
        (false, out.stdout + &out.stderr)
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| format!("({}: {e})\n", p.display()))
}
