//! What the bench reads from `/proc`: a process's CPU time and resident
//! memory, its children (nginx workers), per-core busy time (to spot other
//! load on the proxy's cores), the online CPUs, and the machine's
//! description.

use std::fs;
use std::process::Command;

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`).
pub fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// The fields of `/proc/<pid>/stat` after the command name, starting at
/// field 3 (state).
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// (utime, stime) of a process (all its threads, live and exited), in ticks.
pub fn cpu_split(pid: u32) -> Option<(u64, u64)> {
    let f = stat_fields(&pid.to_string())?;
    // field 14 utime, 15 stime; index 0 here is field 3
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// utime + stime of a process, in ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    cpu_split(pid).map(|(u, s)| u + s)
}

/// CPU ticks of this process.
pub fn self_cpu_ticks() -> u64 {
    cpu_ticks(std::process::id()).unwrap_or(0)
}

fn status_value(pid: u32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resident set size in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_value(pid, "VmRSS:")
}

/// Number of threads.
pub fn threads(pid: u32) -> Option<u64> {
    status_value(pid, "Threads:")
}

/// Effective uid of this process.
pub fn euid() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(u64::MAX)
}

/// Processes whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Some(f) = stat_fields(name) {
            if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
                if let Ok(child) = name.parse() {
                    out.push(child);
                }
            }
        }
    }
    out.sort_unstable();
    out
}

/// Soft limit on open files of this process.
pub fn nofile_limit() -> u64 {
    fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1024)
}

/// Busy, total and stolen ticks of a set of cores from `/proc/stat`,
/// summed (busy includes steal: time the hypervisor gave these virtual
/// CPUs to others).
pub fn cores_ticks(cores: &[usize]) -> Option<(u64, u64, u64)> {
    let text = fs::read_to_string("/proc/stat").ok()?;
    let mut sum = (0, 0, 0);
    for &core in cores {
        let name = format!("cpu{core}");
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        sum.0 += total.saturating_sub(idle);
        sum.1 += total;
        sum.2 += v.get(7).copied().unwrap_or(0);
    }
    Some(sum)
}

/// The online CPUs of the machine (the `cpuN` lines of `/proc/stat`),
/// ascending. Not `available_parallelism()`: that honours this process's
/// affinity, and the harness has pinned itself to one CPU.
pub fn online_cpus() -> Vec<usize> {
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut cpus: Vec<usize> = text
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .next()?
                .strip_prefix("cpu")?
                .parse()
                .ok()
        })
        .collect();
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// CPU model, core count, kernel and Debian version, memory.
pub fn machine() -> serde_json::Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default().trim().to_string();
    let mem_kib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| {
                    v.split_whitespace()
                        .next()
                        .and_then(|v| v.parse::<u64>().ok())
                })
        })
        .unwrap_or(0);
    serde_json::json!({
        "cpu": model,
        "cores": cpuinfo.lines().filter(|l| l.starts_with("processor")).count(),
        "kernel": read("/proc/sys/kernel/osrelease"),
        "debian": read("/etc/debian_version"),
        "mem_gib": (mem_kib as f64 / 1048576.0 * 10.0).round() / 10.0,
    })
}

/// The CPUs a process may run on (`Cpus_allowed_list`), e.g. `0`.
pub fn cpus_allowed(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}
