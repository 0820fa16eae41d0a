//! Log output: human text or one JSON object per line, filtered by the config's
//! `log.level` unless `RUST_LOG` is set. Under systemd, when stderr is the
//! journal (`JOURNAL_STREAM` names it), lines carry no timestamp (the
//! journal stamps every line itself) and start with their syslog priority
//! (`<4>` for a warning), which journald takes as the line's priority:
//! `journalctl -p warning -u portcullis` shows warnings and errors only.
//!
//! rustls's own messages pass only at `error` unless the filter names rustls
//! (`debug,rustls=debug`): it warns about what a peer got wrong (an IP
//! address sent as SNI, which isync does on every connection), which is the
//! client's habit, not the operator's problem; the session's own line says
//! what happened to it. The etcd client's transport (h2, hyper, tower,
//! tonic) passes only at `warn` unless named: at `debug` it logs every
//! HTTP/2 frame, keepalive pings included; so does hickory_proto (every DNS
//! message dns-01 builds).

use std::io::IsTerminal;

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber; logs go to stderr. A second call is a no-op.
pub fn init(format: LogFormat, level: &str) {
    let wanted = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| level.to_string());
    let filter = EnvFilter::try_new(directives(&wanted))
        .or_else(|_| EnvFilter::try_new(directives(level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_target(false);
    let journal = stderr_is_journal();
    let _ = match (format, journal) {
        (LogFormat::Text, false) => builder.try_init(),
        (LogFormat::Json, false) => builder.json().flatten_event(true).try_init(),
        // The priority prefix says the level: not written twice.
        (LogFormat::Text, true) => builder
            .event_format(Priority(
                tracing_subscriber::fmt::format()
                    .with_target(false)
                    .with_level(false)
                    .without_time(),
            ))
            .try_init(),
        (LogFormat::Json, true) => builder
            .event_format(Priority(
                tracing_subscriber::fmt::format()
                    .json()
                    .flatten_event(true)
                    .without_time(),
            ))
            .try_init(),
    };
}

/// Crates held to a level unless the filter names them.
const QUIET: &[(&str, &str)] = &[
    ("rustls", "error"),
    ("h2", "warn"),
    ("hyper", "warn"),
    ("tower", "warn"),
    ("tonic", "warn"),
    ("hickory_proto", "warn"),
];

/// `filter`, with each of [`QUIET`] held to its level unless the filter
/// names it (or is off).
fn directives(filter: &str) -> String {
    let parts = || filter.split(',').map(str::trim);
    if parts().any(|d| d.eq_ignore_ascii_case("off")) {
        return filter.to_string();
    }
    let mut out = filter.to_string();
    for (target, level) in QUIET {
        let named = parts().any(|d| {
            d.strip_prefix(target)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['=', ':', '[']))
        });
        if !named {
            out.push_str(&format!(",{target}={level}"));
        }
    }
    out
}

/// Prefixes each line with its syslog priority, as journald reads it
/// (`SyslogLevelPrefix=`, on by default): `<3>` error, `<4>` warning,
/// `<6>` info, `<7>` debug and trace.
struct Priority<F>(F);

impl<S, N, F> FormatEvent<S, N> for Priority<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

fn priority(level: &tracing::Level) -> u8 {
    match *level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        _ => 7,
    }
}

/// True when `JOURNAL_STREAM` (`device:inode`, set by systemd) names the
/// file stderr is: a child whose stderr was redirected elsewhere inherits
/// the variable but not the journal.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(parse_journal_stream) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

fn parse_journal_stream(s: &str) -> Option<(u64, u64)> {
    let (dev, ino) = s.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_priorities_follow_syslog() {
        assert_eq!(priority(&tracing::Level::ERROR), 3);
        assert_eq!(priority(&tracing::Level::WARN), 4);
        assert_eq!(priority(&tracing::Level::INFO), 6);
        assert_eq!(priority(&tracing::Level::DEBUG), 7);
    }

    #[test]
    fn rustls_and_the_etcd_transport_are_quiet_unless_named() {
        let rest = ",h2=warn,hyper=warn,tower=warn,tonic=warn,hickory_proto=warn";
        assert_eq!(directives("info"), format!("info,rustls=error{rest}"));
        assert_eq!(
            directives("warn,portcullis=debug"),
            format!("warn,portcullis=debug,rustls=error{rest}")
        );
        assert_eq!(
            directives("debug,rustls=debug"),
            format!("debug,rustls=debug{rest}")
        );
        assert_eq!(
            directives("debug,h2=trace"),
            "debug,h2=trace,rustls=error,hyper=warn,tower=warn,tonic=warn,hickory_proto=warn"
        );
        // `hyper_util` is not `hyper`: hyper is still held.
        assert!(directives("hyper_util=debug").contains(",hyper=warn"));
        assert_eq!(directives("off"), "off");
        // what the filter makes of it
        let f = EnvFilter::try_new(directives("info")).unwrap();
        assert!(f.to_string().contains("rustls=error"), "{f}");
        assert!(f.to_string().contains("h2=warn"), "{f}");
    }

    #[test]
    fn journal_stream_is_device_and_inode() {
        assert_eq!(parse_journal_stream("8:1234"), Some((8, 1234)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("a:1"), None);
    }
}
