//! The standard `process_*` metrics (the names every Prometheus client
//! library exports, so stock dashboards and alerts find them), read from
//! `/proc/self` and `getrlimit` at scrape time: nothing is kept between
//! scrapes. Linux only; elsewhere, or when `/proc` cannot be read, the
//! metrics that cannot be known are left out, never faked.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Emits the process metrics on each scrape; register it on a registry
/// without a prefix.
#[derive(Debug)]
pub(super) struct ProcessCollector;

/// What one reading of `/proc/self` found.
#[derive(Debug, Default, PartialEq)]
struct Reading {
    cpu_seconds: Option<f64>,
    start_time: Option<f64>,
    resident_bytes: Option<i64>,
    virtual_bytes: Option<i64>,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = read();
        if let Some(v) = r.cpu_seconds {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?)?;
        }
        let gauges = [
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                r.start_time,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                r.resident_bytes.map(|b| b as f64),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                r.virtual_bytes.map(|b| b as f64),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                r.open_fds.map(|n| n as f64),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (the soft limit)",
                r.max_fds.map(|n| n as f64),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        Ok(())
    }
}

fn read() -> Reading {
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| boot_time(&s));
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let page = rustix::param::page_size() as i64;
    let mut r = stat
        .as_deref()
        .map(|s| parse_stat(s, ticks, page, boot))
        .unwrap_or_default();
    // Less the descriptor read_dir itself holds open while listing.
    r.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| (d.count() as i64 - 1).max(0));
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    r.max_fds = limit.current.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
    r
}

/// `btime` of `/proc/stat`: when the system booted, Unix time.
fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The fields of `/proc/self/stat` (proc(5)): utime (14), stime (15),
/// starttime (22) in clock ticks, vsize (23) in bytes, rss (24) in pages.
/// The command name (2) may hold spaces and parentheses: fields are
/// counted from the last `)`.
fn parse_stat(stat: &str, ticks: f64, page: i64, boot: Option<u64>) -> Reading {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Reading::default();
    };
    // `rest` starts at field 3 (state).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let cpu = match (field(14), field(15)) {
        (Some(u), Some(s)) if ticks > 0.0 => Some((u + s) as f64 / ticks),
        _ => None,
    };
    let start = match (field(22), boot) {
        (Some(t), Some(b)) if ticks > 0.0 => Some(b as f64 + t as f64 / ticks),
        _ => None,
    };
    Reading {
        cpu_seconds: cpu,
        start_time: start,
        virtual_bytes: field(23).and_then(|v| i64::try_from(v).ok()),
        resident_bytes: field(24)
            .and_then(|p| i64::try_from(p).ok())
            .map(|p| p.saturating_mul(page)),
        ..Reading::default()
    }
}

/// Now, Unix time in seconds (for tests comparing with the start time).
#[cfg(test)]
fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_past_a_command_name_with_spaces() {
        let stat = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    250 150 0 0 20 0 9 0 1000 104857600 2560 18446744073709551615";
        let r = parse_stat(stat, 100.0, 4096, Some(1_700_000_000));
        assert_eq!(r.cpu_seconds, Some(4.0));
        assert_eq!(r.start_time, Some(1_700_000_010.0));
        assert_eq!(r.virtual_bytes, Some(104_857_600));
        assert_eq!(r.resident_bytes, Some(2560 * 4096));
        assert_eq!(parse_stat("garbage", 100.0, 4096, None), Reading::default());
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_read() {
        let r = read();
        let start = r.start_time.expect("start time");
        assert!(start > 1_600_000_000.0 && start <= now() + 1.0, "{r:?}");
        assert!(r.resident_bytes.is_some_and(|b| b > 1 << 20), "{r:?}");
        assert!(r.open_fds.is_some_and(|n| n >= 3), "{r:?}");
        assert!(
            r.max_fds.is_some_and(|n| n >= r.open_fds.unwrap_or(0)),
            "{r:?}"
        );
        assert!(r.cpu_seconds.is_some(), "{r:?}");
    }
}
