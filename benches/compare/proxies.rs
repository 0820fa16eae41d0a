//! The three proxies under test, each configured the way an operator would
//! for one TLS-terminating TCP port with SNI-selected certificates, in front
//! of the in-process backend, with `Spec::workers` workers pinned to as many
//! CPUs (`proxy_cpus`). Every workload but 7 (multi-core scaling) runs one
//! worker/thread, pinned to CPU 0.
//!
//! - portcullis: one `protocol: tcp, tls: implicit` listener, backend with
//!   `proxy_protocol: none`, one host per name with `{ cert, key }` files,
//!   `log.level: warn` (no per-connection log line, like the others). Its
//!   tokio runtime sizes itself from `available_parallelism()`, which
//!   honours the affinity: pinned to w CPUs it runs w worker threads.
//! - HAProxy: `nbthread w`, `mode tcp`, `bind … ssl crt-list` (certificates
//!   parsed once at start-up, the SNI lookup is a tree search).
//! - nginx stream: `worker_processes w`, `ssl_certificate $var` from a `map
//!   $ssl_server_name`: the only SNI selection nginx 1.22's stream module
//!   has (`server_name` in stream arrived in 1.25.5). nginx then reads and
//!   parses the PEM files on every handshake.
//!
//! All keep their defaults for session tickets (on), so the resumption
//! workload can resume; the full-handshake workload's client offers none.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_rustls::TlsConnector;

use crate::certs::Cert;
use crate::client::{self, Names};
use crate::procfs;

/// Open client connections each proxy allows (two descriptors each; the
/// hard limit here is 20,000 per process).
pub const MAX_CONNECTIONS: usize = 9500;
/// How long a proxy may take to answer its first handshake.
const START_DEADLINE: Duration = Duration::from_secs(120);
/// The CPU the harness (load generator and backend) pins itself to.
pub const GENERATOR_CPU: usize = 1;

/// The CPUs a proxy with `workers` workers is pinned to, ascending: CPU 0
/// first and the generator's CPU last, so the proxy shares the generator's
/// CPU only when it asks for every CPU of the machine. One worker: `[0]`.
pub fn proxy_cpus(workers: usize) -> Vec<usize> {
    let online = procfs::online_cpus();
    let mut cpus: Vec<usize> = online
        .iter()
        .copied()
        .filter(|c| *c != GENERATOR_CPU)
        .collect();
    if online.contains(&GENERATOR_CPU) {
        cpus.push(GENERATOR_CPU);
    }
    cpus.truncate(workers.max(1));
    if cpus.is_empty() {
        cpus.push(0);
    }
    cpus.sort_unstable();
    cpus
}

/// A CPU list as `taskset -c` takes it and the kernel prints it: `0`,
/// `0-1`, `0,2-3`.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if j > i {
            format!("{}-{}", cpus[i], cpus[j])
        } else {
            cpus[i].to_string()
        });
        i = j + 1;
    }
    parts.join(",")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Portcullis,
    Haproxy,
    Nginx,
}

pub const ALL: [Kind; 3] = [Kind::Portcullis, Kind::Haproxy, Kind::Nginx];

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Portcullis => "portcullis",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        ALL.into_iter().find(|k| k.label() == s)
    }
}

/// Programs found on this machine.
#[derive(Debug)]
pub struct Tools {
    pub portcullis: PathBuf,
    pub haproxy: Option<PathBuf>,
    pub nginx: Option<PathBuf>,
    /// Debian builds the stream module as a dynamic module.
    pub nginx_stream_module: Option<PathBuf>,
    pub taskset: Option<PathBuf>,
}

/// Looks for `name` in `PATH` and the sbin directories (not always in a
/// non-root user's `PATH`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Tools {
    pub fn find(portcullis: PathBuf) -> Tools {
        let module = PathBuf::from("/usr/lib/nginx/modules/ngx_stream_module.so");
        Tools {
            portcullis,
            haproxy: find_program("haproxy"),
            nginx: find_program("nginx"),
            nginx_stream_module: module.is_file().then_some(module),
            taskset: find_program("taskset"),
        }
    }

    pub fn has(&self, kind: Kind) -> bool {
        match kind {
            Kind::Portcullis => self.portcullis.is_file(),
            Kind::Haproxy => self.haproxy.is_some(),
            Kind::Nginx => self.nginx.is_some(),
        }
    }

    /// One line naming the version of each proxy.
    pub fn version(&self, kind: Kind) -> String {
        let (prog, arg) = match kind {
            Kind::Portcullis => (Some(&self.portcullis), "version"),
            Kind::Haproxy => (self.haproxy.as_ref(), "-v"),
            Kind::Nginx => (self.nginx.as_ref(), "-v"),
        };
        let Some(prog) = prog else {
            return "not installed".into();
        };
        Command::new(prog)
            .arg(arg)
            .output()
            .map(|o| {
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_else(|e| format!("cannot run: {e}"))
    }
}

/// What one proxy instance serves.
pub struct Spec<'a> {
    /// A fresh directory for its config, state and log.
    pub dir: PathBuf,
    pub backend: SocketAddr,
    /// The first is the default (no SNI, unknown SNI).
    pub certs: &'a [Cert],
    /// Worker threads (HAProxy `nbthread`, portcullis's tokio workers) or
    /// processes (nginx `worker_processes`); the proxy is pinned to as many
    /// CPUs (`proxy_cpus`). 1 everywhere but workload 7.
    pub workers: usize,
    /// Workload 8 (upgrades): HAProxy runs in master-worker mode (`-W`),
    /// whose master re-executes itself on SIGUSR2.
    pub upgradable: bool,
}

/// A running proxy; killed (with its workers) when dropped, also on panic.
pub struct Running {
    pub kind: Kind,
    pub addr: SocketAddr,
    pub pid: u32,
    /// The CPUs it is pinned to (`proxy_cpus`), ascending.
    pub cpus: Vec<usize>,
    /// From exec to the first proxied echo through a verified handshake.
    pub startup: Duration,
    child: Child,
    log: PathBuf,
    dir: PathBuf,
    /// Processes that took over from `pid` (workload 8), killed with it.
    adopted: Vec<u32>,
}

impl Running {
    /// The processes that do the work: nginx's worker(s), else the proxy.
    pub fn work_pids(&self) -> Vec<u32> {
        if self.kind == Kind::Nginx {
            let kids = procfs::children(self.pid);
            if !kids.is_empty() {
                return kids;
            }
        }
        vec![self.pid]
    }

    /// CPU time (user + system) of the working processes, in ticks.
    pub fn cpu_ticks(&self) -> u64 {
        self.work_pids()
            .iter()
            .filter_map(|p| procfs::cpu_ticks(*p))
            .sum()
    }

    /// CPU time in the kernel (system time) of the working processes, in ticks.
    pub fn sys_ticks(&self) -> u64 {
        self.work_pids()
            .iter()
            .filter_map(|p| procfs::cpu_split(*p).map(|c| c.1))
            .sum()
    }

    /// Resident memory of the working processes, KiB.
    pub fn rss_kib(&self) -> u64 {
        self.work_pids()
            .iter()
            .filter_map(|p| procfs::rss_kib(*p))
            .sum()
    }

    pub fn threads(&self) -> u64 {
        self.work_pids()
            .iter()
            .filter_map(|p| procfs::threads(*p))
            .sum()
    }

    pub fn cpus_allowed(&self) -> String {
        self.work_pids()
            .iter()
            .map(|p| procfs::cpus_allowed(*p))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `core 0`, `cores 0-1`: where other load is looked for.
    pub fn cores_label(&self) -> String {
        let s = if self.cpus.len() == 1 { "" } else { "s" };
        format!("core{s} {}", cpu_list(&self.cpus))
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn kill(pid: u32) {
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Drop for Running {
    fn drop(&mut self) {
        let workers = procfs::children(self.pid);
        let _ = self.child.kill();
        for w in workers {
            kill(w);
        }
        for pid in &self.adopted {
            let workers = procfs::children(*pid);
            kill(*pid);
            for w in workers {
                kill(w);
            }
        }
        let _ = self.child.wait();
    }
}

impl Running {
    /// Replaces the running binary with a new process of it, the way each
    /// proxy is made to: `portcullis upgrade`; SIGUSR2 to HAProxy's master
    /// (master-worker mode: it re-executes itself, starts new workers and
    /// soft-stops the old ones). nginx's binary upgrade (SIGUSR2 to the
    /// master) is ignored in the foreground (`daemon off`, as here: "the
    /// changing binary signal is ignored"), so it gets its reload, SIGHUP
    /// (new workers from the same binary, old ones finish), the nearest it
    /// has. Returns when the command returned or the signal was sent.
    pub async fn upgrade(&mut self, tools: &Tools) -> Result<(), String> {
        let current = self.adopted.last().copied().unwrap_or(self.pid);
        match self.kind {
            Kind::Portcullis => {
                let out = tokio::process::Command::new(&tools.portcullis)
                    .arg("upgrade")
                    .arg("--config")
                    .arg(self.dir.join("portcullis.yaml"))
                    .output()
                    .await
                    .map_err(|e| e.to_string())?;
                let text = String::from_utf8_lossy(&out.stdout);
                if !out.status.success() {
                    return Err(format!("{}{}", text, String::from_utf8_lossy(&out.stderr)));
                }
                let pid = text
                    .strip_prefix("process ")
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| format!("no pid in {text:?}"))?;
                self.adopted.push(pid);
                Ok(())
            }
            Kind::Haproxy => signal("-USR2", current),
            Kind::Nginx => signal("-HUP", current),
        }
    }
}

fn signal(sig: &str, pid: u32) -> Result<(), String> {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(format!("kill {sig} {pid} failed"))
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn portcullis_config(spec: &Spec<'_>, addr: SocketAddr) -> String {
    let mut y = String::new();
    let _ = writeln!(y, "state_dir: \"{}\"", spec.dir.join("state").display());
    let _ = writeln!(y, "listeners:");
    let _ = writeln!(
        y,
        "  bench: {{ bind: \"{addr}\", protocol: tcp, tls: implicit }}"
    );
    let _ = writeln!(y, "backends:");
    let _ = writeln!(
        y,
        "  bench: {{ address: \"{}\", proxy_protocol: none }}",
        spec.backend
    );
    let _ = writeln!(y, "hosts:");
    for c in spec.certs {
        let _ = writeln!(
            y,
            "  - {{ names: [{}], certificate: {{ cert: \"{}\", key: \"{}\" }} }}",
            c.name,
            c.crt.display(),
            c.key.display()
        );
    }
    let _ = writeln!(y, "default_host: {}", spec.certs[0].name);
    let _ = writeln!(y, "max_connections: {MAX_CONNECTIONS}");
    let _ = writeln!(y, "timeouts: {{ shutdown_grace: 1s }}");
    let _ = writeln!(y, "log: {{ format: text, level: warn }}");
    y
}

fn haproxy_config(spec: &Spec<'_>, addr: SocketAddr) -> io::Result<String> {
    let list = spec.dir.join("crt-list.txt");
    let mut lines = String::new();
    for c in spec.certs {
        let _ = writeln!(lines, "{}", c.pem.display());
    }
    fs::write(&list, lines)?;
    Ok(format!(
        "global
    nbthread {workers}
    maxconn {max}
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode tcp
    timeout connect 5s
    timeout client 15m
    timeout server 15m
    maxconn {max}
frontend fe
    bind {addr} ssl crt-list {list} backlog 4096
    default_backend be
backend be
    server s1 {backend}
",
        workers = spec.workers.max(1),
        max = MAX_CONNECTIONS,
        list = list.display(),
        backend = spec.backend,
    ))
}

fn nginx_config(spec: &Spec<'_>, addr: SocketAddr, tools: &Tools) -> String {
    let mut crt = String::new();
    let mut key = String::new();
    let first = &spec.certs[0];
    let _ = writeln!(crt, "        default {};", first.crt.display());
    let _ = writeln!(key, "        default {};", first.key.display());
    for c in &spec.certs[1..] {
        let _ = writeln!(crt, "        {} {};", c.name, c.crt.display());
        let _ = writeln!(key, "        {} {};", c.name, c.key.display());
    }
    let module = tools
        .nginx_stream_module
        .as_ref()
        .map(|m| format!("load_module {};\n", m.display()))
        .unwrap_or_default();
    // As root the worker would drop to `nobody` and could not read the
    // certificates it loads on every handshake from the private temp dir.
    let user = if procfs::euid() == 0 {
        "user root;\n"
    } else {
        ""
    };
    format!(
        "{module}{user}daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 19800; }}
stream {{
    map_hash_max_size 65536;
    map_hash_bucket_size 128;
    map $ssl_server_name $bench_crt {{
{crt}    }}
    map $ssl_server_name $bench_key {{
{key}    }}
    ssl_protocols TLSv1.2 TLSv1.3;
    proxy_timeout 15m;
    server {{
        listen {addr} ssl backlog=4096;
        ssl_certificate $bench_crt;
        ssl_certificate_key $bench_key;
        proxy_pass {backend};
    }}
}}
",
        workers = spec.workers.max(1),
        dir = spec.dir.display(),
        backend = spec.backend,
    )
}

/// Writes the config, starts the proxy pinned to `proxy_cpus(workers)` (CPU
/// 0 for one worker) and waits until a verified handshake with the last
/// name reaches the backend.
pub async fn start(tools: &Tools, kind: Kind, spec: &Spec<'_>) -> io::Result<Running> {
    fs::create_dir_all(&spec.dir)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let (program, args): (PathBuf, Vec<String>) = match kind {
        Kind::Portcullis => {
            let path = spec.dir.join("portcullis.yaml");
            fs::write(&path, portcullis_config(spec, addr))?;
            (
                tools.portcullis.clone(),
                vec!["run".into(), "--config".into(), path.display().to_string()],
            )
        }
        Kind::Haproxy => {
            let path = spec.dir.join("haproxy.cfg");
            fs::write(&path, haproxy_config(spec, addr)?)?;
            let prog = tools.haproxy.clone().ok_or(io::ErrorKind::NotFound)?;
            let mut args = vec!["-db".into(), "-f".into(), path.display().to_string()];
            if spec.upgradable {
                args.insert(0, "-W".into());
            }
            (prog, args)
        }
        Kind::Nginx => {
            let path = spec.dir.join("nginx.conf");
            fs::write(&path, nginx_config(spec, addr, tools))?;
            let prog = tools.nginx.clone().ok_or(io::ErrorKind::NotFound)?;
            let dir = spec.dir.display().to_string();
            (
                prog,
                vec![
                    "-p".into(),
                    format!("{dir}/"),
                    "-e".into(),
                    format!("{dir}/error.log"),
                    "-c".into(),
                    path.display().to_string(),
                ],
            )
        }
    };
    let log = spec.dir.join(format!("{}.log", kind.label()));
    let out = fs::File::create(&log)?;
    let cpus = proxy_cpus(spec.workers);
    let mut cmd = match &tools.taskset {
        Some(taskset) => {
            let mut c = Command::new(taskset);
            c.arg("-c").arg(cpu_list(&cpus)).arg(&program);
            c
        }
        None => Command::new(&program),
    };
    cmd.args(&args)
        .current_dir(&spec.dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let started = Instant::now();
    let child = cmd.spawn()?;
    let mut running = Running {
        kind,
        addr,
        pid: child.id(),
        cpus,
        startup: Duration::ZERO,
        child,
        log,
        dir: spec.dir.clone(),
        adopted: Vec::new(),
    };
    let names = Names::new(spec.certs);
    let probe = TlsConnector::from(client::config(&names, false, true));
    let last = names.names[names.len() - 1].clone();
    let mut last_err = String::from("never tried");
    let mut failures = 0;
    while started.elapsed() < START_DEADLINE {
        if let Ok(Some(status)) = running.child.try_wait() {
            return Err(io::Error::other(format!(
                "{} exited at start ({status}):\n{}",
                kind.label(),
                running.log_tail()
            )));
        }
        match client::open(&probe, addr, &last).await {
            Ok((tls, _)) => {
                running.startup = started.elapsed();
                client::close(tls).await;
                check_names(&probe, addr, &names).await.map_err(|e| {
                    io::Error::other(format!("{}: {e}\n{}", kind.label(), running.log_tail()))
                })?;
                return Ok(running);
            }
            // not listening yet
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => last_err = e.to_string(),
            // listening, but the handshake or the relay fails
            Err(e) => {
                last_err = e.to_string();
                failures += 1;
                if failures >= 20 {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(io::Error::other(format!(
        "{} did not answer within {START_DEADLINE:?} ({last_err}):\n{}",
        kind.label(),
        running.log_tail()
    )))
}

/// Every name gets its own certificate (a sample of them for large sets),
/// with the handshake signature verified.
async fn check_names(probe: &TlsConnector, addr: SocketAddr, names: &Names) -> io::Result<()> {
    let n = names.len();
    let picks: Vec<usize> = if n <= 10 {
        (0..n).collect()
    } else {
        vec![0, 1, n / 2, n - 1]
    };
    for i in picks {
        let (tls, _) = client::open(probe, addr, &names.names[i]).await?;
        client::close(tls).await;
    }
    Ok(())
}
