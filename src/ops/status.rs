//! The runtime view over the control socket: `portcullis status` (listeners,
//! backends, a certificates line), `sessions` (the live ones) and `drain` /
//! `enable`. Builds the answers from the proxy's [`Runtime`] and the host
//! [`View`]s, and renders them as aligned tables or JSON lines for the
//! command line. Changes nothing but the drain switches. The control
//! socket ([`super::control`]) serves it; it does not import that back.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::info;

use super::View;
use crate::proxy::runtime::{Runtime, SessionInfo, Target};

/// Most sessions one `portcullis sessions` answer lists.
pub const SESSION_ROWS: usize = 1000;

/// `portcullis status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub listeners: Vec<ListenerRow>,
    pub backends: Vec<BackendRow>,
    pub certificates: CertSummary,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerRow {
    pub name: String,
    pub addresses: Vec<String>,
    /// `accepting` or `drained`.
    pub state: String,
    pub sessions: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRow {
    pub address: String,
    /// `up` or `drained` (`up`: new sessions are sent to it; whether it
    /// answers is what `failures` says).
    pub state: String,
    pub listeners: Vec<String>,
    /// Connects (or greetings) that failed since start.
    pub failures: u64,
    pub last_error: Option<String>,
    /// RFC 3339.
    pub last_error_at: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertSummary {
    pub count: usize,
    /// RFC 3339 and the first name of the certificate that expires first.
    pub soonest_expiry: Option<String>,
    pub soonest_host: Option<String>,
}

/// `portcullis sessions`: at most [`SESSION_ROWS`] rows, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionsReport {
    pub sessions: Vec<SessionRow>,
    /// Live sessions not listed.
    pub more: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRow {
    /// As in the session's log lines (`session=`).
    pub id: String,
    pub listener: String,
    pub client: String,
    pub sni: Option<String>,
    pub backend: Option<String>,
    pub age_seconds: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

pub fn status(runtime: &Runtime, views: &[View]) -> StatusReport {
    let topology = runtime.topology();
    let open = runtime.open_by_listener();
    let listeners = topology
        .listeners
        .iter()
        .map(|(name, addrs)| ListenerRow {
            name: name.clone(),
            addresses: addrs.iter().map(ToString::to_string).collect(),
            state: if runtime.listener_drained(name) {
                "drained"
            } else {
                "accepting"
            }
            .into(),
            sessions: open.get(name).copied().unwrap_or(0),
        })
        .collect();
    let backends = topology
        .backends
        .iter()
        .map(|(address, users)| {
            let gate = runtime.backend(*address);
            let last = gate.as_ref().and_then(|g| g.last_error());
            BackendRow {
                address: address.to_string(),
                state: if gate.as_ref().is_some_and(|g| g.is_drained()) {
                    "drained"
                } else {
                    "up"
                }
                .into(),
                listeners: users.clone(),
                failures: gate.as_ref().map_or(0, |g| g.failures()),
                last_error_at: last.as_ref().map(|(at, _)| time(*at)),
                last_error: last.map(|(_, e)| e),
            }
        })
        .collect();
    StatusReport {
        listeners,
        backends,
        certificates: cert_summary(views),
    }
}

fn cert_summary(views: &[View]) -> CertSummary {
    let soonest = views
        .iter()
        .map(|v| (v.slot.load().info.not_after, v.names.first()))
        .min_by_key(|(not_after, _)| *not_after);
    CertSummary {
        count: views.len(),
        soonest_expiry: soonest
            .map(|(t, _)| time(UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0)))),
        soonest_host: soonest.and_then(|(_, n)| n.cloned()),
    }
}

pub fn sessions(runtime: &Runtime, listener: Option<&str>) -> Result<SessionsReport, String> {
    if let Some(name) = listener {
        if !runtime.topology().listeners.contains_key(name) {
            return Err(format!("no listener is named {name:?}"));
        }
    }
    let (rows, total) = runtime.sessions(listener, SESSION_ROWS);
    Ok(SessionsReport {
        more: total.saturating_sub(rows.len()),
        sessions: rows.into_iter().map(session_row).collect(),
    })
}

fn session_row(s: SessionInfo) -> SessionRow {
    SessionRow {
        id: s.id.to_string(),
        listener: s.listener,
        client: s.client.to_string(),
        sni: s.sni,
        backend: s.backend.map(|b| b.to_string()),
        age_seconds: s.age.as_secs(),
        bytes_up: s.up,
        bytes_down: s.down,
    }
}

/// Drains (`true`) or enables a listener or a backend by name; what
/// happened, in words, or why nothing could.
pub fn switch(runtime: &Runtime, name: &str, drain: bool) -> Result<String, String> {
    let target = runtime.target(name).map_err(|e| e.to_string())?;
    let changed = runtime.set_drained(&target, drain);
    let open = match &target {
        Target::Listener(l) => runtime.open_by_listener().get(l).copied().unwrap_or(0),
        Target::Backend(a) => runtime.open_on_backend(*a),
    };
    let what = match (drain, &target) {
        (true, Target::Listener(_)) => "drained: new connections are turned away",
        (true, Target::Backend(_)) => "drained: no new sessions are sent to it",
        (false, Target::Listener(_)) => "enabled: accepting",
        (false, Target::Backend(_)) => "enabled: new sessions are sent to it",
    };
    if changed {
        info!(target = %target, drained = drain, "runtime switch");
    }
    let already = if changed { "" } else { " (already)" };
    Ok(format!(
        "{target} {what}{already}; {open} open session(s) continue"
    ))
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `12s`, `3m05s`, `2h07m`, `4d03h`: short and without spaces, for columns.
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Rows as columns, each as wide as its widest cell, two spaces apart; the
/// last column is not padded.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The value, or `-` when there is none.
pub fn or_dash(s: Option<&str>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or("-").to_string()
}

/// `portcullis status` as text: a listeners table, a backends table, the
/// certificates line.
pub fn status_text(r: &StatusReport) -> String {
    let mut rows = vec![vec![
        "LISTENER".to_string(),
        "STATE".into(),
        "SESSIONS".into(),
        "ADDRESSES".into(),
    ]];
    for l in &r.listeners {
        rows.push(vec![
            l.name.clone(),
            l.state.clone(),
            l.sessions.to_string(),
            or_dash(Some(&l.addresses.join(","))),
        ]);
    }
    let mut out = table(&rows);
    out.push('\n');
    let mut rows = vec![vec![
        "BACKEND".to_string(),
        "STATE".into(),
        "FAILURES".into(),
        "LISTENERS".into(),
        "LAST ERROR".into(),
    ]];
    for b in &r.backends {
        let last = match (&b.last_error_at, &b.last_error) {
            (Some(at), Some(e)) => format!("{at} {e}"),
            _ => "-".into(),
        };
        rows.push(vec![
            b.address.clone(),
            b.state.clone(),
            b.failures.to_string(),
            or_dash(Some(&b.listeners.join(","))),
            last,
        ]);
    }
    out.push_str(&table(&rows));
    out.push('\n');
    let c = &r.certificates;
    match (&c.soonest_expiry, &c.soonest_host) {
        (Some(at), Some(host)) => {
            let _ = writeln!(
                out,
                "certificates: {}, soonest expiry {at} ({host})",
                c.count
            );
        }
        _ => {
            let _ = writeln!(out, "certificates: {}", c.count);
        }
    }
    out
}

/// `portcullis status --json`: one object per line, `{"listener": …}`,
/// `{"backend": …}`, then `{"certificates": …}`.
pub fn status_json(r: &StatusReport) -> Vec<String> {
    let mut lines = Vec::new();
    for l in &r.listeners {
        lines.push(serde_json::json!({ "listener": l }).to_string());
    }
    for b in &r.backends {
        lines.push(serde_json::json!({ "backend": b }).to_string());
    }
    lines.push(serde_json::json!({ "certificates": r.certificates }).to_string());
    lines
}

/// `portcullis sessions` as a table, with a last line for those not listed.
pub fn sessions_text(r: &SessionsReport) -> String {
    let mut rows = vec![vec![
        "ID".to_string(),
        "LISTENER".into(),
        "CLIENT".into(),
        "SNI".into(),
        "BACKEND".into(),
        "AGE".into(),
        "UP".into(),
        "DOWN".into(),
    ]];
    for s in &r.sessions {
        rows.push(vec![
            s.id.clone(),
            s.listener.clone(),
            s.client.clone(),
            or_dash(s.sni.as_deref()),
            or_dash(s.backend.as_deref()),
            age(Duration::from_secs(s.age_seconds)),
            s.bytes_up.to_string(),
            s.bytes_down.to_string(),
        ]);
    }
    let mut out = table(&rows);
    if r.more > 0 {
        let _ = writeln!(out, "… and {} more", r.more);
    }
    out
}

/// `portcullis sessions --json`: one object per session, then
/// `{"more": N}` when some are not listed.
pub fn sessions_json(r: &SessionsReport) -> Vec<String> {
    let mut lines: Vec<String> = r
        .sessions
        .iter()
        .filter_map(|s| serde_json::to_string(s).ok())
        .collect();
    if r.more > 0 {
        lines.push(serde_json::json!({ "more": r.more }).to_string());
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_ages_are_short() {
        let t = table(&[
            vec!["A".into(), "BB".into(), "C".into()],
            vec!["aaaa".into(), "b".into(), "c c".into()],
        ]);
        assert_eq!(t, "A     BB  C\naaaa  b   c c\n");
        assert_eq!(age(Duration::from_secs(5)), "5s");
        assert_eq!(age(Duration::from_secs(185)), "3m05s");
        assert_eq!(age(Duration::from_secs(7620)), "2h07m");
        assert_eq!(age(Duration::from_secs(3 * 86400 + 3600)), "3d01h");
    }

    #[test]
    fn more_sessions_than_shown_say_so() {
        let r = SessionsReport {
            sessions: Vec::new(),
            more: 3,
        };
        assert!(sessions_text(&r).ends_with("… and 3 more\n"));
        assert_eq!(sessions_json(&r), vec!["{\"more\":3}".to_string()]);
    }
}
