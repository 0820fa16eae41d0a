//! portcullis side by side with HAProxy and nginx (stream), on one machine,
//! in one run: `cargo bench --bench compare` (see BENCHMARKS.md).
//!
//! Each proxy runs with one worker/thread pinned to CPU 0 (`taskset -c 0`);
//! this process — the load generator (rustls, aws-lc-rs, tokio
//! current-thread) and the plaintext backend behind the proxies — pins
//! itself to CPU 1. The exception is workload 7 (multi-core scaling): a
//! fresh instance per worker count w = 1, 2, 4, … up to the online CPUs,
//! with w workers pinned to w CPUs (CPU 0 first, the generator's CPU 1
//! last, so shared only when w is every CPU). Workload 8 (upgrades under
//! load) starts a fresh instance per run and upgrades it the way each proxy
//! does (HAProxy in master-worker mode). Everything is on loopback;
//! no name is ever resolved.
//! Every loop is bounded by count and time, and every proxy is killed when
//! its guard drops (normal end, error, panic, Ctrl-C, or the overall limit).

mod backend;
mod certs;
mod client;
mod procfs;
mod proxies;
mod report;
mod workloads;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use proxies::{Kind, Running, Spec, Tools, ALL, GENERATOR_CPU};
use report::{Better, Report};
use workloads::Pick;

/// The whole run stops (and kills every proxy) after this long.
const TOTAL_LIMIT: Duration = Duration::from_secs(20 * 60);

const USAGE: &str = "\
usage: cargo bench --bench compare [-- OPTIONS]
  --runs N          runs per measurement, medians reported (default 3)
  --secs S          measuring window of the rate and latency workloads (default 5)
  --conc N          concurrent connections of the handshake workloads (default 64)
  --idle N          idle sessions to open (default 9000, bounded by the fd limit)
  --bytes-mib N     bytes per relay run, MiB (default 1024)
  --names A,B,C     host-name counts of workload 6 (default 10,1000,10000)
  --workloads LIST  which of 1-8 (default 1,2,3,4,5,6,7,8)
  --only LIST       which of portcullis,haproxy,nginx (default: all installed)
  --quick           1 run, 2 s windows, 2,000 idle, 256 MiB, names 10,1000
  --out FILE        JSON output (default target/bench/compare.json)
  --keep            keep the temporary directory (configs, logs)";

struct Opts {
    runs: usize,
    secs: f64,
    conc: usize,
    idle: usize,
    bytes: u64,
    names: Vec<usize>,
    workloads: BTreeSet<u8>,
    only: Vec<Kind>,
    out: Option<PathBuf>,
    keep: bool,
}

fn list<T>(v: &str, f: impl Fn(&str) -> Option<T>) -> Result<Vec<T>, String> {
    v.split(',')
        .map(|x| f(x.trim()).ok_or_else(|| format!("bad list item {x:?}")))
        .collect()
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut o = Opts {
            runs: 3,
            secs: 5.0,
            conc: 64,
            idle: 9000,
            bytes: 1 << 30,
            names: vec![10, 1000, 10000],
            workloads: (1..=8).collect(),
            only: ALL.to_vec(),
            out: None,
            keep: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
            let num = |v: String| v.parse::<f64>().map_err(|e| format!("{a}: {e}"));
            match a.as_str() {
                "--bench" => {}
                "--runs" => o.runs = num(val()?)?.max(1.0) as usize,
                "--secs" => o.secs = num(val()?)?.clamp(0.5, 60.0),
                "--conc" => o.conc = num(val()?)?.clamp(1.0, 1000.0) as usize,
                "--idle" => o.idle = num(val()?)?.clamp(10.0, 9000.0) as usize,
                "--bytes-mib" => o.bytes = (num(val()?)?.clamp(1.0, 8192.0) as u64) << 20,
                "--names" => {
                    o.names = list(&val()?, |x| {
                        x.parse().ok().filter(|n| (2..=20000).contains(n))
                    })?
                }
                "--workloads" => {
                    o.workloads = list(&val()?, |x| x.parse().ok().filter(|n| (1..=8).contains(n)))?
                        .into_iter()
                        .collect()
                }
                "--only" => o.only = list(&val()?, Kind::parse)?,
                "--quick" => {
                    o.runs = 1;
                    o.secs = 2.0;
                    o.idle = 2000;
                    o.bytes = 256 << 20;
                    o.names = vec![10, 1000];
                }
                "--out" => o.out = Some(PathBuf::from(val()?)),
                "--keep" => o.keep = true,
                "-h" | "--help" => return Err(String::new()),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(o)
    }
}

/// Pins this process (and the threads it will start) to `cpu`.
fn pin_self(taskset: &Path, cpu: usize) -> bool {
    let ok = Command::new(taskset)
        .args([
            "-a",
            "-p",
            "-c",
            &cpu.to_string(),
            &std::process::id().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok && procfs::cpus_allowed(std::process::id()) == cpu.to_string()
}

/// Workload 7's worker counts: 1, 2, 4, 8, … up to the online CPUs.
fn worker_counts() -> Vec<usize> {
    let cpus = procfs::online_cpus().len().max(1);
    std::iter::successors(Some(1usize), |n| n.checked_mul(2))
        .take_while(|n| *n <= cpus)
        .collect()
}

/// `1 worker`, `2 workers`.
fn workers_label(n: usize) -> String {
    format!("{n} worker{}", if n == 1 { "" } else { "s" })
}

/// `core 0 was`, `cores 0-1 were`.
fn was(cores: &str) -> &'static str {
    if cores.starts_with("cores") {
        "were"
    } else {
        "was"
    }
}

/// What a proxy instance runs on, once started.
fn describe(prefix: &str, r: &Running) {
    eprintln!(
        "{prefix}{:<10} pid {} on CPU {} with {} thread(s) in {} process(es), started in {:.0} ms, listening {}",
        r.kind.label(),
        r.pid,
        r.cpus_allowed(),
        r.threads(),
        r.work_pids().len(),
        r.startup.as_secs_f64() * 1e3,
        r.addr
    );
}

fn loud(msg: &str) {
    let bar = "!".repeat(78);
    eprintln!("\n{bar}\n!!! {msg}\n{bar}\n");
}

fn git_rev() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let rev = out(&["rev-parse", "--short", "HEAD"]);
    let dirty = !out(&["status", "--porcelain", "--", "src", "Cargo.toml"]).is_empty();
    format!("{rev}{}", if dirty { "+dirty" } else { "" })
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The target directory (for the JSON), from this executable's path:
/// `<target>/release/deps/compare-<hash>`.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.ancestors().nth(3).map(Path::to_path_buf))
        .filter(|p| p.join("CACHEDIR.TAG").exists() || p.ends_with("target"))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

struct Bench {
    opts: Opts,
    tools: Tools,
    /// The proxies measured (installed and asked for).
    present: Vec<Kind>,
    clk: f64,
    dir: PathBuf,
    report: Report,
    notes: Vec<String>,
    details: Vec<serde_json::Value>,
}

impl Bench {
    fn secs(&self) -> Duration {
        Duration::from_secs_f64(self.opts.secs)
    }

    fn warmup(&self) -> Duration {
        Duration::from_secs_f64((self.opts.secs / 10.0).clamp(0.3, 1.0))
    }

    /// The proxies in a different order each run, so none is always first.
    fn order(&self, run: usize) -> Vec<Kind> {
        let mut v = self.present.clone();
        if !v.is_empty() {
            let n = run % v.len();
            v.rotate_left(n);
        }
        v
    }

    fn note(&mut self, msg: String) {
        eprintln!("  note: {msg}");
        self.notes.push(msg);
    }

    async fn start(
        &mut self,
        kind: Kind,
        tag: &str,
        spec_certs: &[certs::Cert],
        backend: std::net::SocketAddr,
        workers: usize,
    ) -> Option<Running> {
        let spec = Spec {
            dir: self.dir.join(format!("{tag}-{}", kind.label())),
            backend,
            certs: spec_certs,
            workers,
            upgradable: tag.starts_with("upgrade"),
        };
        match proxies::start(&self.tools, kind, &spec).await {
            Ok(r) => Some(r),
            Err(e) => {
                loud(&format!("{} failed to start ({tag}): {e}", kind.label()));
                self.notes
                    .push(format!("{} failed to start ({tag}): {e}", kind.label()));
                None
            }
        }
    }

    /// A handshake measurement, taken again (once) when something else
    /// kept the proxy's cores (core 0 but in workload 7) busy for more than
    /// 15 % of the window.
    async fn measure_hs(
        &mut self,
        p: &Running,
        names: &client::Names,
        resume: bool,
        window: (Duration, Duration),
        pick: Pick,
    ) -> workloads::Handshakes {
        let mut h =
            workloads::handshakes(p, names, resume, self.opts.conc, window, pick, self.clk).await;
        if h.foreign_pct > 15.0 {
            self.note(format!(
                "{} {} {:.0}% busy with something other than {} during a handshake run: measured again",
                h.cores,
                was(&h.cores),
                h.foreign_pct,
                p.kind.label()
            ));
            h = workloads::handshakes(p, names, resume, self.opts.conc, window, pick, self.clk)
                .await;
        }
        h
    }

    fn record_hs(
        &mut self,
        workload: &'static str,
        suffix: &str,
        kind: Kind,
        run: usize,
        h: &workloads::Handshakes,
    ) {
        let r = &mut self.report;
        r.add(
            workload,
            &format!("handshakes/s{suffix}"),
            Better::Higher,
            kind,
            h.rate,
        );
        r.add(
            workload,
            &format!("proxy CPU µs/handshake{suffix}"),
            Better::Lower,
            kind,
            h.proxy_us_per_hs,
        );
        if suffix.is_empty() {
            r.add(
                workload,
                "proxy CPU %",
                Better::Neither,
                kind,
                h.proxy_cpu_pct,
            );
            r.add(
                workload,
                "proxy CPU in kernel %",
                Better::Neither,
                kind,
                h.proxy_sys_pct,
            );
            r.add(
                workload,
                "generator CPU % (core 1)",
                Better::Neither,
                kind,
                h.generator_cpu_pct,
            );
            r.add(
                workload,
                "other load on core 0 %",
                Better::Neither,
                kind,
                h.foreign_pct,
            );
        }
        eprintln!(
            "  [{workload}{suffix} run {}] {:<10} {:>6.0} hs/s  proxy {:>5.0} µs/hs ({:>3.0}% CPU)  generator {:>3.0}%  other on {} {:>2.0}%  resumed {:>3.0}%  errors {}",
            run + 1, kind.label(), h.rate, h.proxy_us_per_hs, h.proxy_cpu_pct, h.generator_cpu_pct, h.cores, h.foreign_pct, h.resumed_pct, h.errors
        );
        self.details.push(json!({
            "workload": workload, "suffix": suffix, "proxy": kind.label(), "run": run + 1,
            "handshakes": h.count, "rate": h.rate, "proxy_us_per_hs": h.proxy_us_per_hs,
            "proxy_cpu_pct": h.proxy_cpu_pct, "proxy_sys_pct": h.proxy_sys_pct, "generator_cpu_pct": h.generator_cpu_pct,
            "other_load_core0_pct": h.foreign_pct, "steal_core0_pct": h.steal_pct, "resumed_pct": h.resumed_pct, "errors": h.errors,
            "proxy_cores": h.cores,
        }));
        if h.errors > 0 {
            self.note(format!(
                "{workload}{suffix} run {}: {} failed connections through {}",
                run + 1,
                h.errors,
                kind.label()
            ));
        }
        if h.foreign_pct > 10.0 {
            self.note(format!(
                "{workload}{suffix} run {}: {} {} {:.0}% busy with something other than {} (noise)",
                run + 1,
                h.cores,
                was(&h.cores),
                h.foreign_pct,
                kind.label()
            ));
        }
    }
}

async fn run(opts: Opts) -> Result<(), String> {
    let began = Instant::now();
    let load_before = procfs::loadavg();
    // PORTCULLIS_BENCH_BIN runs another build or a wrapper (e.g. a script that
    // starts the binary under heaptrack or perf); its figures are then the wrapper's.
    let portcullis = std::env::var_os("PORTCULLIS_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_portcullis")));
    let tools = Tools::find(portcullis);
    if !tools.portcullis.is_file() {
        return Err(format!(
            "{} is missing: `cargo bench` builds it; run `cargo build --release`",
            tools.portcullis.display()
        ));
    }
    let mut notes = Vec::new();
    for (kind, pkg) in [(Kind::Haproxy, "haproxy"), (Kind::Nginx, "nginx")] {
        if !tools.has(kind) && opts.only.contains(&kind) {
            let msg = format!(
                "{} is NOT INSTALLED: its column is skipped (apt-get install {pkg})",
                kind.label()
            );
            loud(&msg);
            notes.push(msg);
        }
    }
    if tools.nginx.is_some()
        && tools.nginx_stream_module.is_none()
        && opts.only.contains(&Kind::Nginx)
    {
        eprintln!("note: no /usr/lib/nginx/modules/ngx_stream_module.so; assuming nginx has stream built in");
    }
    let present: Vec<Kind> = ALL
        .into_iter()
        .filter(|k| opts.only.contains(k) && tools.has(*k))
        .collect();
    let mut versions = serde_json::Map::new();
    for k in ALL {
        let v = tools.version(k);
        eprintln!("{:<10} {}", k.label(), v);
        versions.insert(k.label().into(), v.into());
    }
    let tmp = tempfile::Builder::new()
        .prefix("portcullis-bench-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    let dir = tmp.path().to_path_buf();
    eprintln!("work dir {}", dir.display());

    let cert_dir = dir.join("certs");
    std::fs::create_dir_all(&cert_dir).map_err(|e| e.to_string())?;
    let two = ["mail.example.test", "mail.other.test"]
        .iter()
        .map(|n| certs::generate(&cert_dir, n))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificates: {e}"))?;
    let two_names = client::Names::new(&two);
    let backend = backend::start()
        .await
        .map_err(|e| format!("backend: {e}"))?;

    let mut b = Bench {
        opts,
        tools,
        present,
        clk: procfs::clk_tck(),
        dir,
        report: Report::default(),
        notes,
        details: Vec::new(),
    };
    let runs = b.opts.runs;
    let w = b.opts.workloads.clone();

    // Workloads 1, 2, 3, 5 share one long-lived instance of each proxy.
    if w.iter().any(|x| [1, 2, 3, 5].contains(x)) {
        let mut running = Vec::new();
        for kind in b.present.clone() {
            if let Some(r) = b.start(kind, "main", &two, backend.addr, 1).await {
                describe("", &r);
                running.push(r);
            }
        }
        let find = |k: Kind| running.iter().find(|r| r.kind == k);

        if w.contains(&1) {
            eprintln!(
                "\n== 1: full TLS 1.3 handshakes, alternating SNI, no resumption, {} connections",
                b.opts.conc
            );
            for run in 0..runs {
                for kind in b.order(run) {
                    let Some(p) = find(kind) else { continue };
                    let window = (b.warmup(), b.secs());
                    let h = b
                        .measure_hs(p, &two_names, false, window, Pick::RoundRobin)
                        .await;
                    b.record_hs("1 full handshake", "", kind, run, &h);
                }
            }
        }
        if w.contains(&2) {
            eprintln!("\n== 2: resumed TLS 1.3 handshakes (session tickets), alternating SNI");
            for run in 0..runs {
                for kind in b.order(run) {
                    let Some(p) = find(kind) else { continue };
                    let window = (b.warmup(), b.secs());
                    let h = b
                        .measure_hs(p, &two_names, true, window, Pick::RoundRobin)
                        .await;
                    b.record_hs("2 resumed handshake", "", kind, run, &h);
                    b.report.add(
                        "2 resumed handshake",
                        "resumed %",
                        Better::Neither,
                        kind,
                        h.resumed_pct,
                    );
                    if h.resumed_pct < 90.0 {
                        b.note(format!(
                            "2 run {}: only {:.0}% of {}'s handshakes resumed",
                            run + 1,
                            h.resumed_pct,
                            kind.label()
                        ));
                    }
                }
            }
        }
        if w.contains(&3) {
            let mib = b.opts.bytes >> 20;
            eprintln!("\n== 3: relay throughput, {mib} MiB through one session each way");
            for run in 0..runs {
                for kind in b.order(run) {
                    let Some(p) = find(kind) else { continue };
                    for (upload, label) in [(false, "3 relay download"), (true, "3 relay upload")] {
                        match workloads::transfer(p, &two_names, upload, b.opts.bytes, b.clk).await
                        {
                            Ok(t) => {
                                eprintln!(
                                    "  [{label} run {}] {:<10} {:>6.0} MB/s  proxy {:.2} CPU s/GiB ({:.0}% CPU)  generator {:.0}%",
                                    run + 1, kind.label(), t.mb_per_s, t.cpu_s_per_gib, t.proxy_cpu_pct, t.generator_cpu_pct
                                );
                                b.report
                                    .add(label, "MB/s", Better::Higher, kind, t.mb_per_s);
                                b.report.add(
                                    label,
                                    "proxy CPU s/GiB",
                                    Better::Lower,
                                    kind,
                                    t.cpu_s_per_gib,
                                );
                                b.report.add(
                                    label,
                                    "proxy CPU %",
                                    Better::Neither,
                                    kind,
                                    t.proxy_cpu_pct,
                                );
                                b.report.add(
                                    label,
                                    "proxy CPU in kernel %",
                                    Better::Neither,
                                    kind,
                                    t.proxy_sys_pct,
                                );
                                b.details.push(json!({"workload": label, "proxy": kind.label(), "run": run + 1,
                                    "mb_per_s": t.mb_per_s, "cpu_s_per_gib": t.cpu_s_per_gib,
                                    "proxy_cpu_pct": t.proxy_cpu_pct, "proxy_sys_pct": t.proxy_sys_pct, "generator_cpu_pct": t.generator_cpu_pct}));
                            }
                            Err(e) => b.note(format!(
                                "{label} run {} through {}: {e}",
                                run + 1,
                                kind.label()
                            )),
                        }
                    }
                }
            }
        }
        if w.contains(&5) {
            let (sessions, every) = (4usize, Duration::from_millis(4));
            eprintln!(
                "\n== 5: latency of a 64-byte echo, {sessions} sessions x {} req/s, {:.0} s",
                1000 / every.as_millis(),
                b.opts.secs
            );
            for run in 0..runs {
                let direct =
                    workloads::latency(None, backend.addr, sessions, every, b.secs()).await;
                eprintln!(
                    "  [5 latency run {}] {:<10} p50 {:>5.0} µs  p99 {:>5.0} µs  ({} samples)",
                    run + 1,
                    "direct",
                    direct.p50_us,
                    direct.p99_us,
                    direct.samples
                );
                b.details.push(json!({"workload": "5 latency", "proxy": "direct (no proxy)", "run": run + 1,
                    "p50_us": direct.p50_us, "p99_us": direct.p99_us, "max_us": direct.max_us, "samples": direct.samples}));
                for kind in b.order(run) {
                    let Some(p) = find(kind) else { continue };
                    // taken again (twice at most) when other load disturbed core 0
                    let mut l = workloads::latency(
                        Some((p, &two_names)),
                        backend.addr,
                        sessions,
                        every,
                        b.secs(),
                    )
                    .await;
                    for _ in 0..2 {
                        if l.foreign_pct <= 10.0 {
                            break;
                        }
                        b.note(format!(
                            "5 run {}: core 0 was {:.0}% busy with something other than {}: measured again",
                            run + 1,
                            l.foreign_pct,
                            kind.label()
                        ));
                        l = workloads::latency(
                            Some((p, &two_names)),
                            backend.addr,
                            sessions,
                            every,
                            b.secs(),
                        )
                        .await;
                    }
                    eprintln!(
                        "  [5 latency run {}] {:<10} p50 {:>5.0} µs  p99 {:>5.0} µs  max {:>6.0} µs  ({} samples, {} errors)  proxy {:.0} µs/req  other on core 0 {:.0}%",
                        run + 1, kind.label(), l.p50_us, l.p99_us, l.max_us, l.samples, l.errors, l.proxy_us_per_req, l.foreign_pct
                    );
                    b.report.add(
                        "5 latency",
                        "proxy CPU µs/request",
                        Better::Lower,
                        kind,
                        l.proxy_us_per_req,
                    );
                    b.report.add(
                        "5 latency",
                        "other load on core 0 %",
                        Better::Neither,
                        kind,
                        l.foreign_pct,
                    );
                    b.report
                        .add("5 latency", "p50 µs", Better::Lower, kind, l.p50_us);
                    b.report
                        .add("5 latency", "p99 µs", Better::Lower, kind, l.p99_us);
                    b.report.add(
                        "5 latency",
                        "p50 added µs (vs direct)",
                        Better::Lower,
                        kind,
                        l.p50_us - direct.p50_us,
                    );
                    b.report.add(
                        "5 latency",
                        "p99 added µs (vs direct)",
                        Better::Lower,
                        kind,
                        l.p99_us - direct.p99_us,
                    );
                    b.details.push(json!({"workload": "5 latency", "proxy": kind.label(), "run": run + 1,
                        "p50_us": l.p50_us, "p99_us": l.p99_us, "max_us": l.max_us, "samples": l.samples, "errors": l.errors,
                        "other_load_core0_pct": l.foreign_pct, "steal_core0_pct": l.steal_pct, "proxy_us_per_req": l.proxy_us_per_req}));
                    if l.foreign_pct > 10.0 {
                        b.note(format!(
                            "5 run {}: core 0 was {:.0}% busy with something other than {} (noise)",
                            run + 1,
                            l.foreign_pct,
                            kind.label()
                        ));
                    }
                    if l.errors > 0 {
                        b.note(format!(
                            "5 run {}: {} latency sessions through {} failed",
                            run + 1,
                            l.errors,
                            kind.label()
                        ));
                    }
                }
            }
        }
        drop(running);
    }

    if w.contains(&4) {
        let limit = procfs::nofile_limit() as usize;
        // this process holds two descriptors per session: client and backend side
        let max = b
            .opts
            .idle
            .min(limit.saturating_sub(1000) / 2)
            .min(proxies::MAX_CONNECTIONS - 100);
        let first = (max / 9).max(1);
        eprintln!("\n== 4: idle TLS sessions: {} then {} sessions, fresh proxy each run (fd limit {limit})", thousands(first), thousands(max));
        for run in 0..runs {
            for kind in b.order(run) {
                let Some(p) = b
                    .start(kind, &format!("idle{run}"), &two, backend.addr, 1)
                    .await
                else {
                    continue;
                };
                let i = workloads::idle(&p, &two_names, &[first, max], b.opts.conc).await;
                drop(p);
                eprintln!(
                    "  [4 idle run {}] {:<10} {} sessions in {:.1} s: RSS {:.1} → {:.1} MiB, {:.1} KiB/session (slope {:.1}), errors {}",
                    run + 1, kind.label(), i.opened, i.open_secs, i.base_kib as f64 / 1024.0,
                    i.points.last().map_or(0, |p| p.1) as f64 / 1024.0, i.kib_per_session, i.slope_kib, i.errors
                );
                let w4 = "4 idle sessions";
                b.report
                    .add(w4, "sessions open", Better::Neither, kind, i.opened as f64);
                b.report.add(
                    w4,
                    "RSS KiB/session",
                    Better::Lower,
                    kind,
                    i.kib_per_session,
                );
                b.report.add(
                    w4,
                    &format!(
                        "RSS slope KiB/session ({}→{})",
                        thousands(first),
                        thousands(max)
                    ),
                    Better::Lower,
                    kind,
                    i.slope_kib,
                );
                b.report.add(
                    w4,
                    "RSS MiB, loaded",
                    Better::Lower,
                    kind,
                    i.points.last().map_or(0, |p| p.1) as f64 / 1024.0,
                );
                b.details.push(json!({"workload": w4, "proxy": kind.label(), "run": run + 1, "opened": i.opened,
                    "base_kib": i.base_kib, "points": i.points, "kib_per_session": i.kib_per_session,
                    "slope_kib": i.slope_kib, "errors": i.errors, "open_secs": i.open_secs}));
                if i.opened < max {
                    b.note(format!(
                        "4 run {}: {} held only {} of {max} sessions ({} errors)",
                        run + 1,
                        kind.label(),
                        i.opened,
                        i.errors
                    ));
                }
            }
        }
    }

    if w.contains(&6) && !b.opts.names.is_empty() {
        let sizes = b.opts.names.clone();
        let most = sizes.iter().copied().max().unwrap_or(10);
        let t = Instant::now();
        let scale_dir = b.dir.join("scale-certs");
        let scale =
            certs::generate_many(&scale_dir, most).map_err(|e| format!("certificates: {e}"))?;
        eprintln!(
            "\n== 6: host names: {} (generated {} certificates in {:.1} s)",
            sizes
                .iter()
                .map(|n| thousands(*n))
                .collect::<Vec<_>>()
                .join(", "),
            thousands(most),
            t.elapsed().as_secs_f64()
        );
        let (least, most) = (sizes.iter().copied().min().unwrap_or(10), most);
        let w6 = "6 host names";
        for &n in &sizes {
            let set = &scale[..n];
            let names = client::Names::new(set);
            for run in 0..runs {
                for kind in b.order(run) {
                    let Some(p) = b
                        .start(kind, &format!("names{n}-{run}"), set, backend.addr, 1)
                        .await
                    else {
                        continue;
                    };
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let rss = p.rss_kib() as f64 / 1024.0;
                    let startup = p.startup.as_secs_f64();
                    eprintln!(
                        "  [6 names {} run {}] {:<10} start-up {:.2} s, RSS {:.1} MiB",
                        thousands(n),
                        run + 1,
                        kind.label(),
                        startup,
                        rss
                    );
                    b.report.add(
                        w6,
                        &format!("start-up s, {} names", thousands(n)),
                        Better::Lower,
                        kind,
                        startup,
                    );
                    b.report.add(
                        w6,
                        &format!("RSS MiB, {} names", thousands(n)),
                        Better::Lower,
                        kind,
                        rss,
                    );
                    b.details.push(json!({"workload": w6, "names": n, "proxy": kind.label(), "run": run + 1, "startup_s": startup, "rss_mib": rss}));
                    if n == least || n == most {
                        // shorter: two sizes x three proxies x runs
                        let window = (b.warmup(), b.secs().mul_f64(0.6));
                        let h = b.measure_hs(&p, &names, false, window, Pick::Random).await;
                        b.record_hs(w6, &format!(", {} names", thousands(n)), kind, run, &h);
                    }
                }
            }
        }
        if least != most {
            // per-run ratio of the rate with the most names to the rate with the fewest
            for kind in b.present.clone() {
                let rate = |n: usize| {
                    b.report
                        .rows
                        .iter()
                        .find(|r| {
                            r.workload == w6
                                && r.metric == format!("handshakes/s, {} names", thousands(n))
                        })
                        .and_then(|r| r.runs.get(&kind).cloned())
                        .unwrap_or_default()
                };
                let (lo, hi) = (rate(least), rate(most));
                for (a, z) in lo.iter().zip(hi.iter()) {
                    b.report.add(
                        w6,
                        &format!(
                            "handshake rate {} names / {} names",
                            thousands(most),
                            thousands(least)
                        ),
                        Better::Higher,
                        kind,
                        z / a,
                    );
                }
            }
        }
    }
    if w.contains(&7) {
        let counts = worker_counts();
        let w7 = "7 multi-core";
        eprintln!(
            "\n== 7: multi-core scaling: full TLS 1.3 handshakes (as 1) with {} worker(s) of {} online CPU(s), fresh proxy each, {} connections",
            counts
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            procfs::online_cpus().len(),
            b.opts.conc
        );
        for run in 0..runs {
            // one proxy's worker counts back to back, so that the two
            // measurements of a ratio are seconds apart; the direction
            // alternates between runs
            let mut order = counts.clone();
            if run % 2 == 1 {
                order.reverse();
            }
            for kind in b.order(run) {
                let mut got: Vec<(usize, workloads::Handshakes)> = Vec::new();
                for &n in &order {
                    let tag = format!("workers{n}-{run}");
                    let Some(p) = b.start(kind, &tag, &two, backend.addr, n).await else {
                        continue;
                    };
                    describe("  ", &p);
                    let window = (b.warmup(), b.secs());
                    let h = b
                        .measure_hs(&p, &two_names, false, window, Pick::RoundRobin)
                        .await;
                    drop(p);
                    b.record_hs(w7, &format!(", {}", workers_label(n)), kind, run, &h);
                    got.push((n, h));
                }
                got.sort_by_key(|g| g.0);
                // this run's ratios of each worker count to one worker
                let Some((1, one)) = got.first() else {
                    continue;
                };
                for (n, h) in &got[1..] {
                    b.report.add(
                        w7,
                        &format!("handshake rate {} / 1 worker", workers_label(*n)),
                        Better::Higher,
                        kind,
                        h.rate / one.rate,
                    );
                    b.report.add(
                        w7,
                        &format!("CPU per handshake {} / 1 worker", workers_label(*n)),
                        Better::Lower,
                        kind,
                        h.proxy_us_per_hs / one.proxy_us_per_hs,
                    );
                }
            }
        }
    }
    if w.contains(&8) {
        let w8 = "8 upgrade under load";
        let (times, every) = (5, Duration::from_secs(1));
        eprintln!(
            "\n== 8: binary upgrades under load: {} connections each doing connect, full handshake, echo, close for {} s, once without and once with {times} upgrades {every:?} apart (nginx: reloads, SIGHUP); fresh proxy each",
            b.opts.conc,
            times + 1
        );
        for run in 0..runs {
            for kind in b.order(run) {
                let mut got = Vec::new();
                for upgrade in [false, true] {
                    let tag = format!("upgrade-{run}-{upgrade}");
                    let Some(mut p) = b.start(kind, &tag, &two, backend.addr, 1).await else {
                        continue;
                    };
                    let u = workloads::upgrades(
                        &mut p,
                        &b.tools,
                        &two_names,
                        b.opts.conc,
                        (times, every),
                        upgrade,
                    )
                    .await;
                    drop(p);
                    eprintln!(
                        "  [{w8} run {}] {:<10} {}/{} upgrades  {} connections, {} failed  connect-to-echo p50 {:.1} ms p99 {:.1} ms max {:.0} ms{}",
                        run + 1,
                        kind.label(),
                        u.upgrades,
                        if upgrade { times } else { 0 },
                        u.count,
                        u.failed,
                        u.p50_ms,
                        u.p99_ms,
                        u.max_ms,
                        u.first_error
                            .as_ref()
                            .map(|e| format!("  first error: {e}"))
                            .unwrap_or_default()
                    );
                    if upgrade && u.upgrades < times {
                        b.note(format!(
                            "8 run {}: {} upgraded {} of {times} times: {}",
                            run + 1,
                            kind.label(),
                            u.upgrades,
                            u.first_error.clone().unwrap_or_default()
                        ));
                    }
                    got.push(u);
                }
                let [quiet, upgraded] = &got[..] else {
                    continue;
                };
                b.report.add(
                    w8,
                    "failed connections",
                    Better::Lower,
                    kind,
                    upgraded.failed as f64,
                );
                b.report.add(
                    w8,
                    "connections completed, with / without upgrades",
                    Better::Higher,
                    kind,
                    upgraded.count as f64 / quiet.count.max(1) as f64,
                );
                b.report.add(
                    w8,
                    "connect to echo p99 ms, with upgrades",
                    Better::Lower,
                    kind,
                    upgraded.p99_ms,
                );
                b.report.add(
                    w8,
                    "connect to echo p99, with / without upgrades",
                    Better::Lower,
                    kind,
                    upgraded.p99_ms / quiet.p99_ms,
                );
                b.report.add(
                    w8,
                    "connect to echo max ms, with upgrades",
                    Better::Lower,
                    kind,
                    upgraded.max_ms,
                );
            }
        }
    }
    drop(backend);

    // Output
    let table = b.report.markdown(&b.present);
    let load_after = procfs::loadavg();
    let elapsed = began.elapsed().as_secs_f64();
    println!("\n{table}");
    for n in &b.notes {
        println!("note: {n}");
    }
    println!(
        "\n{} run(s) per cell, median (min–max). Ratios < 1 mean portcullis is lower (better where 'better' says lower). \
         Load average {load_before:.2} before, {load_after:.2} after; {elapsed:.0} s in all.",
        b.opts.runs
    );
    let out = b
        .opts
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("bench/compare.json"));
    let doc = json!({
        "command": "cargo bench --bench compare",
        "args": std::env::args().skip(1).collect::<Vec<_>>(),
        "portcullis_rev": git_rev(),
        "versions": versions,
        "machine": procfs::machine(),
        "pinning": {
            "proxies": "CPU 0 (taskset -c 0), one worker",
            "generator_and_backend": "CPU 1",
            "workload_7": format!(
                "a fresh instance per worker count w in {:?}, w workers pinned to w CPUs ({}): CPU 0 first, the generator's CPU 1 last (shared only when w is every CPU)",
                worker_counts(),
                worker_counts()
                    .iter()
                    .map(|n| format!("w={n}: taskset -c {}", proxies::cpu_list(&proxies::proxy_cpus(*n))))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        "options": { "runs": b.opts.runs, "secs": b.opts.secs, "conc": b.opts.conc, "idle": b.opts.idle,
                     "bytes": b.opts.bytes, "names": b.opts.names, "workloads": b.opts.workloads },
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "elapsed_s": elapsed,
        "rows": b.report.json(),
        "measurements": b.details,
        "notes": b.notes,
        "table_markdown": table,
    });
    if let Some(parent) = out.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    match std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap_or_default()) {
        Ok(()) => println!("JSON: {}", out.display()),
        Err(e) => eprintln!("cannot write {}: {e}", out.display()),
    }
    if b.opts.keep {
        let kept = tmp.keep();
        eprintln!("kept {}", kept.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; anything else (a test run) does nothing.
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("compare: a benchmark; run it with `cargo bench --bench compare`");
        return ExitCode::SUCCESS;
    }
    let opts = match Opts::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match proxies::find_program("taskset") {
        Some(taskset) if cores >= 2 => {
            if !pin_self(&taskset, GENERATOR_CPU) {
                loud("could not pin the load generator to CPU 1; numbers will be noisier");
            }
        }
        Some(_) => loud("only one CPU: proxies and the load generator share it; ratios only"),
        None => loud("taskset (util-linux) not found: nothing is pinned; numbers will be noisier"),
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        tokio::select! {
            r = tokio::time::timeout(TOTAL_LIMIT, run(opts)) => match r {
                Ok(r) => r,
                Err(_) => Err(format!("stopped after the overall limit of {TOTAL_LIMIT:?}")),
            },
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        }
    });
    // every proxy guard has dropped with the future above
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compare: {e}");
            ExitCode::FAILURE
        }
    }
}
