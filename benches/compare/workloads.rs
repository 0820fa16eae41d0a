//! The workloads. Each measures over a window bounded in time, reads the
//! proxy's own CPU time (`/proc/<pid>/stat` utime + stime) across the same
//! window, and the generator's, so a rate limited by the generator is
//! visible as such.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;

use crate::client::{self, Names};
use crate::procfs;
use crate::proxies::{Running, GENERATOR_CPU};

/// CPU ticks of the proxy, of this process and of the proxy's cores (core 0
/// but in workload 7), at one instant.
struct Snapshot {
    at: Instant,
    proxy: u64,
    proxy_sys: u64,
    generator: u64,
    cores: (u64, u64, u64),
    /// The proxy's cores include the generator's (workload 7 with every CPU).
    shared: bool,
}

impl Snapshot {
    fn take(proxy: &Running) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            proxy: proxy.cpu_ticks(),
            proxy_sys: proxy.sys_ticks(),
            generator: procfs::self_cpu_ticks(),
            cores: procfs::cores_ticks(&proxy.cpus).unwrap_or((0, 0, 0)),
            shared: proxy.cpus.contains(&GENERATOR_CPU),
        }
    }
}

/// CPU use between two snapshots.
struct Window {
    secs: f64,
    /// Proxy CPU seconds.
    proxy_cpu: f64,
    /// Share of the proxy's CPU time spent in the kernel, percent.
    proxy_sys_pct: f64,
    generator_cpu: f64,
    /// Share of the proxy's cores busy with something other than the proxy
    /// (and the generator, when it shares them), percent of their capacity.
    foreign_pct: f64,
    /// Of which stolen by the hypervisor, percent of the proxy's cores.
    steal_pct: f64,
}

impl Window {
    fn between(a: &Snapshot, b: &Snapshot, clk: f64) -> Window {
        let proxy_ticks = b.proxy.saturating_sub(a.proxy);
        let generator_ticks = b.generator.saturating_sub(a.generator);
        let ours = proxy_ticks + if b.shared { generator_ticks } else { 0 };
        let busy = b.cores.0.saturating_sub(a.cores.0);
        let total = b.cores.1.saturating_sub(a.cores.1).max(1);
        Window {
            secs: b.at.duration_since(a.at).as_secs_f64(),
            proxy_cpu: proxy_ticks as f64 / clk,
            proxy_sys_pct: b.proxy_sys.saturating_sub(a.proxy_sys) as f64 * 100.0
                / proxy_ticks.max(1) as f64,
            generator_cpu: generator_ticks as f64 / clk,
            foreign_pct: busy.saturating_sub(ours) as f64 * 100.0 / total as f64,
            steal_pct: b.cores.2.saturating_sub(a.cores.2) as f64 * 100.0 / total as f64,
        }
    }
}

#[derive(Debug, Default)]
pub struct Handshakes {
    pub rate: f64,
    pub proxy_us_per_hs: f64,
    pub proxy_cpu_pct: f64,
    pub proxy_sys_pct: f64,
    pub generator_cpu_pct: f64,
    pub foreign_pct: f64,
    pub steal_pct: f64,
    pub resumed_pct: f64,
    pub count: u64,
    pub errors: u64,
    /// Where `foreign_pct` was looked for: `core 0`, `cores 0-1`.
    pub cores: String,
}

/// How the load picks each connection's SNI name.
#[derive(Clone, Copy)]
pub enum Pick {
    /// Task `t`'s `k`-th connection uses name `(t + k) % n`.
    RoundRobin,
    Random,
}

/// Workloads 1, 2, 6 and 7: `conc` loops of connect, handshake, one echo,
/// close; counted over `secs` after `warmup`.
pub async fn handshakes(
    proxy: &Running,
    names: &Names,
    resume: bool,
    conc: usize,
    (warmup, secs): (Duration, Duration),
    pick: Pick,
    clk: f64,
) -> Handshakes {
    // Without resumption one config serves all; with it each loop has its
    // own ticket cache, so it resumes from its own earlier sessions (a
    // shared cache of 8 tickets per name runs dry under 64 concurrent loops).
    let shared = TlsConnector::from(client::config(names, false, false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for t in 0..conc {
        let connector = if resume {
            TlsConnector::from(client::config(names, true, false))
        } else {
            shared.clone()
        };
        let (names, addr) = (names.clone(), proxy.addr);
        let (stop, done, resumed, errors) =
            (stop.clone(), done.clone(), resumed.clone(), errors.clone());
        set.spawn(async move {
            let n = names.len();
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                let i = match pick {
                    Pick::RoundRobin => (t + k) % n,
                    Pick::Random => fastrand::usize(..n),
                };
                k += 1;
                match client::open(&connector, addr, &names.names[i]).await {
                    Ok((tls, r)) => {
                        client::close(tls).await;
                        done.fetch_add(1, Ordering::Relaxed);
                        if r {
                            resumed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
    tokio::time::sleep(warmup).await;
    let (d0, r0, e0) = (
        done.load(Ordering::Relaxed),
        resumed.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    );
    let a = Snapshot::take(proxy);
    tokio::time::sleep(secs).await;
    let b = Snapshot::take(proxy);
    let (d1, r1, e1) = (
        done.load(Ordering::Relaxed),
        resumed.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    );
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while set.join_next().await.is_some() {}
    })
    .await;
    set.abort_all();
    let w = Window::between(&a, &b, clk);
    let count = d1 - d0;
    Handshakes {
        rate: count as f64 / w.secs,
        proxy_us_per_hs: w.proxy_cpu * 1e6 / count.max(1) as f64,
        proxy_cpu_pct: w.proxy_cpu * 100.0 / w.secs,
        proxy_sys_pct: w.proxy_sys_pct,
        generator_cpu_pct: w.generator_cpu * 100.0 / w.secs,
        foreign_pct: w.foreign_pct,
        steal_pct: w.steal_pct,
        resumed_pct: (r1 - r0) as f64 * 100.0 / count.max(1) as f64,
        count,
        errors: e1 - e0,
        cores: proxy.cores_label(),
    }
}

#[derive(Debug)]
pub struct Transfer {
    pub mb_per_s: f64,
    pub cpu_s_per_gib: f64,
    pub proxy_cpu_pct: f64,
    pub proxy_sys_pct: f64,
    pub generator_cpu_pct: f64,
}

static ZEROS: [u8; 256 * 1024] = [0; 256 * 1024];

/// Workload 3: `bytes` through one session, backend to client (download)
/// or client to backend (upload).
pub async fn transfer(
    proxy: &Running,
    names: &Names,
    upload: bool,
    bytes: u64,
    clk: f64,
) -> io::Result<Transfer> {
    let connector = TlsConnector::from(client::config(names, false, false));
    let mut tls = client::handshake(&connector, proxy.addr, &names.names[0]).await?;
    let mut request = vec![if upload { b'U' } else { b'D' }];
    request.extend_from_slice(&bytes.to_le_bytes());
    tls.write_all(&request).await?;
    tls.flush().await?;
    let a = Snapshot::take(proxy);
    let work = async {
        if upload {
            let mut left = bytes;
            while left > 0 {
                let n = left.min(ZEROS.len() as u64) as usize;
                tls.write_all(&ZEROS[..n]).await?;
                left -= n as u64;
            }
            tls.flush().await?;
            let mut ack = [0u8; 1];
            tls.read_exact(&mut ack).await?;
        } else {
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            while got < bytes {
                let n = tls.read(&mut buf).await?;
                if n == 0 {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                }
                got += n as u64;
            }
        }
        Ok::<_, io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "transfer took over 120 s"))??;
    let b = Snapshot::take(proxy);
    client::close(tls).await;
    let w = Window::between(&a, &b, clk);
    let gib = bytes as f64 / (1u64 << 30) as f64;
    Ok(Transfer {
        mb_per_s: bytes as f64 / w.secs / 1e6,
        cpu_s_per_gib: w.proxy_cpu / gib,
        proxy_cpu_pct: w.proxy_cpu * 100.0 / w.secs,
        proxy_sys_pct: w.proxy_sys_pct,
        generator_cpu_pct: w.generator_cpu * 100.0 / w.secs,
    })
}

#[derive(Debug, Default)]
pub struct Idle {
    pub opened: usize,
    pub base_kib: u64,
    /// (sessions open, proxy RSS KiB)
    pub points: Vec<(usize, u64)>,
    /// (RSS at the most sessions − RSS before any) / sessions.
    pub kib_per_session: f64,
    /// RSS slope between the first and last point.
    pub slope_kib: f64,
    pub errors: u64,
    pub open_secs: f64,
}

/// Workload 4: opens TLS sessions (each with one echo, then silent) up to
/// each count in `steps`, reading the proxy's RSS at each.
pub async fn idle(proxy: &Running, names: &Names, steps: &[usize], conc: usize) -> Idle {
    let connector = TlsConnector::from(client::config(names, false, false));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut out = Idle {
        base_kib: proxy.rss_kib(),
        ..Idle::default()
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let mut held = Vec::new();
    let mut set = JoinSet::new();
    let mut k = 0usize;
    for &step in steps {
        while held.len() < step && Instant::now() < deadline && out.errors < 200 {
            while held.len() + set.len() < step && set.len() < conc {
                let (connector, name) = (connector.clone(), names.names[k % names.len()].clone());
                let addr = proxy.addr;
                k += 1;
                set.spawn(async move { client::open(&connector, addr, &name).await });
            }
            match set.join_next().await {
                Some(Ok(Ok((tls, _)))) => held.push(tls),
                Some(_) => out.errors += 1,
                None => break,
            }
        }
        // drain what is still in flight
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok((tls, _))) => held.push(tls),
                _ => out.errors += 1,
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        out.points.push((held.len(), proxy.rss_kib()));
    }
    out.open_secs = started.elapsed().as_secs_f64();
    out.opened = held.len();
    if let (Some(first), Some(last)) = (out.points.first(), out.points.last()) {
        out.kib_per_session = last.1.saturating_sub(out.base_kib) as f64 / (last.0.max(1)) as f64;
        if last.0 > first.0 {
            out.slope_kib = (last.1 as f64 - first.1 as f64) / (last.0 - first.0) as f64;
        }
    }
    drop(held);
    out
}

#[derive(Debug, Default)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub samples: usize,
    pub errors: u64,
    /// Share of core 0 busy with something other than the proxy, percent.
    pub foreign_pct: f64,
    pub steal_pct: f64,
    /// Proxy CPU µs per request/response.
    pub proxy_us_per_req: f64,
}

/// One session's ping-pong at a fixed interval; round trips in µs.
async fn pinger<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    every: Duration,
    until: Instant,
) -> io::Result<Vec<f64>> {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let msg = [b'x'; 64];
    let mut back = [0u8; 64];
    let mut rtts = Vec::new();
    while Instant::now() < until {
        tick.tick().await;
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.flush().await?;
        s.read_exact(&mut back).await?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    // the first round trips warm caches and the connection
    Ok(rtts.split_off(rtts.len().min(10)))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn summarize(results: Vec<io::Result<Vec<f64>>>) -> Latency {
    let mut all = Vec::new();
    let mut errors = 0;
    for r in results {
        match r {
            Ok(v) => all.extend(v),
            Err(_) => errors += 1,
        }
    }
    all.sort_by(f64::total_cmp);
    Latency {
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
        max_us: all.last().copied().unwrap_or(f64::NAN),
        samples: all.len(),
        errors,
        ..Latency::default()
    }
}

/// Workload 5: `sessions` sessions each sending a 64-byte request every
/// `every` and waiting for the 64-byte echo, for `secs`. `proxy: None`
/// measures the backend directly over plain TCP (the baseline).
pub async fn latency(
    target: Option<(&Running, &Names)>,
    backend: SocketAddr,
    sessions: usize,
    every: Duration,
    secs: Duration,
) -> Latency {
    let until = Instant::now() + secs;
    let before = target.map(|(p, _)| Snapshot::take(p));
    let mut set = JoinSet::new();
    for i in 0..sessions {
        // stagger the sessions across the interval
        let offset = every * i as u32 / sessions as u32;
        match target {
            Some((proxy, names)) => {
                let connector = TlsConnector::from(client::config(names, false, false));
                let (addr, name) = (proxy.addr, names.names[i % names.len()].clone());
                set.spawn(async move {
                    tokio::time::sleep(offset).await;
                    let (tls, _) = client::open(&connector, addr, &name).await?;
                    pinger(tls, every, until).await
                });
            }
            None => {
                set.spawn(async move {
                    tokio::time::sleep(offset).await;
                    let mut tcp = TcpStream::connect(backend).await?;
                    tcp.set_nodelay(true)?;
                    tcp.write_all(b"E").await?;
                    pinger(tcp, every, until).await
                });
            }
        }
    }
    let mut results = Vec::new();
    let _ = tokio::time::timeout(secs + Duration::from_secs(15), async {
        while let Some(r) = set.join_next().await {
            results.push(r.unwrap_or_else(|e| Err(io::Error::other(e))));
        }
    })
    .await;
    set.abort_all();
    let mut l = summarize(results);
    if let (Some(a), Some((p, _))) = (before, target) {
        let w = Window::between(&a, &Snapshot::take(p), procfs::clk_tck());
        l.foreign_pct = w.foreign_pct;
        l.steal_pct = w.steal_pct;
        l.proxy_us_per_req = w.proxy_cpu * 1e6 / l.samples.max(1) as f64;
    }
    l
}

#[derive(Debug, Default)]
pub struct Upgrades {
    /// Upgrades that went through.
    pub upgrades: usize,
    /// Connections that got their handshake and echo.
    pub count: u64,
    /// Connections refused, reset, timed out or failed in the handshake or
    /// the echo.
    pub failed: u64,
    /// Connect to echo, ms, over the whole window.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub first_error: Option<String>,
}

/// Workload 8: `conc` loops of connect, full handshake, one echo, close,
/// for `times + 1` slots of `every`; with `upgrade`, the proxy's binary is
/// upgraded at the start of every slot but the first.
pub async fn upgrades(
    proxy: &mut Running,
    tools: &crate::proxies::Tools,
    names: &Names,
    conc: usize,
    (times, every): (usize, Duration),
    upgrade: bool,
) -> Upgrades {
    let connector = TlsConnector::from(client::config(names, false, false));
    let stop = Arc::new(AtomicBool::new(false));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut set = JoinSet::new();
    for t in 0..conc {
        let (names, addr, connector) = (names.clone(), proxy.addr, connector.clone());
        let (stop, first_error) = (stop.clone(), first_error.clone());
        set.spawn(async move {
            let (mut took, mut failed) = (Vec::new(), 0u64);
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = &names.names[(t + k) % names.len()];
                k += 1;
                let began = Instant::now();
                match client::open(&connector, addr, name).await {
                    Ok((tls, _)) => {
                        took.push(began.elapsed().as_secs_f64() * 1e3);
                        client::close(tls).await;
                    }
                    Err(e) => {
                        failed += 1;
                        if let Ok(mut first) = first_error.lock() {
                            first.get_or_insert_with(|| e.to_string());
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (took, failed)
        });
    }
    let mut out = Upgrades::default();
    tokio::time::sleep(every).await;
    for _ in 0..times {
        let slot = Instant::now() + every;
        if upgrade {
            match proxy.upgrade(tools).await {
                Ok(()) => out.upgrades += 1,
                Err(e) => {
                    if let Ok(mut first) = first_error.lock() {
                        first.get_or_insert(format!("upgrade: {e}"));
                    }
                }
            }
        }
        tokio::time::sleep_until(slot.into()).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(r) = set.join_next().await {
            if let Ok((took, failed)) = r {
                all.extend(took);
                out.failed += failed;
            }
        }
    })
    .await;
    set.abort_all();
    all.sort_by(f64::total_cmp);
    out.count = all.len() as u64;
    out.p50_ms = percentile(&all, 0.50);
    out.p99_ms = percentile(&all, 0.99);
    out.max_ms = all.last().copied().unwrap_or(f64::NAN);
    out.first_error = first_error.lock().ok().and_then(|f| f.clone());
    out
}
