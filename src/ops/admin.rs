//! The admin endpoint (`admin: { bind: 127.0.0.1:9099 }`): `GET /metrics`
//! in the Prometheus text format, or OpenMetrics when the request's
//! `Accept` asks for it; `GET /healthz` for load balancers and
//! monitoring. Plain HTTP/1.1, one request per connection; bind it to
//! loopback or a management network, it has no authentication.

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::control::{self, CertRow};
use super::{View, Views};
use crate::cluster::{Cluster, Health};
use crate::metrics::{CertGauge, Format, Metrics};
use crate::proxy::http::{self, Head, Unread};

/// A certificate this close to expiry makes `/healthz` fail: a successful
/// renewal would have replaced it long before.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest request head read.
const HEAD_LIMIT: usize = 4096;
/// Time a client gets to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    views: Views,
    cluster: Option<Arc<Cluster>>,
    stop: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(addr = %addr, "admin endpoint listening (/metrics, /healthz)");
    }
    let tasks = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => break,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (metrics, views, cluster) = (metrics.clone(), views.clone(), cluster.clone());
        tasks.spawn(async move {
            if let Err(e) = answer(stream, &metrics, &views, cluster.as_deref()).await {
                debug!(error = %e, "admin request failed");
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}

async fn answer(
    mut stream: TcpStream,
    metrics: &Metrics,
    views: &ArcSwap<Vec<View>>,
    cluster: Option<&Cluster>,
) -> io::Result<()> {
    let read = tokio::time::timeout(READ_TIMEOUT, http::read_head(&mut stream, HEAD_LIMIT))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request timed out"))?;
    let (head, format) = match read {
        Ok((raw, head)) => (Some(head), Format::negotiate(accept(&raw).as_deref())),
        Err(Unread::Bad(_)) => (None, Format::Prometheus),
        Err(Unread::Io(e)) => return Err(e),
    };
    // The certificate rows only for the two answers that use them.
    let rows = || -> Vec<CertRow> { views.load().iter().map(control::row).collect() };
    let health = cluster.map(Cluster::health);
    if let Some(h) = &health {
        let unix = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        };
        metrics.cluster_state(h.down_since.is_none(), h.last_sync.map(unix));
    }
    let (status, content_type, body) = match page(head.as_ref()) {
        Page::Metrics => (
            "200 OK",
            format.content_type(),
            metrics.encode(&gauges(&rows()), format),
        ),
        Page::Health => {
            let warnings = warnings(health.as_ref());
            match problems(metrics, &rows(), SystemTime::now()) {
                p if p.is_empty() => (
                    "200 OK",
                    "text/plain",
                    ["ok".to_string()]
                        .iter()
                        .chain(&warnings)
                        .map(|l| format!("{l}\n"))
                        .collect(),
                ),
                p => (
                    "503 Service Unavailable",
                    "text/plain",
                    p.iter()
                        .chain(&warnings)
                        .map(|l| format!("{l}\n"))
                        .collect(),
                ),
            }
        }
        Page::MethodNotAllowed => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
        Page::NotFound => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /healthz\n".into(),
        ),
        Page::BadRequest => (
            "400 Bad Request",
            "text/plain",
            "malformed request\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// What an admin request gets; `None`: no request head could be read from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page {
    Metrics,
    Health,
    /// `/metrics` or `/healthz` with a method other than GET.
    MethodNotAllowed,
    NotFound,
    BadRequest,
}

/// Routes a request head (pure, so the fuzz target reaches it).
pub fn page(head: Option<&Head>) -> Page {
    match head.map(route) {
        Some(("GET", "/metrics")) => Page::Metrics,
        Some(("GET", "/healthz")) => Page::Health,
        Some((_, "/metrics" | "/healthz")) => Page::MethodNotAllowed,
        Some(_) => Page::NotFound,
        None => Page::BadRequest,
    }
}

/// The request's `Accept` header, if it has one (several are joined, as
/// RFC 9110 §5.3 allows).
fn accept(raw: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(raw).ok()?;
    let values: Vec<&str> = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("accept"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

/// Method and path (query string dropped).
fn route(head: &Head) -> (&str, &str) {
    let path = head.path.as_str();
    (head.method.as_str(), path.split('?').next().unwrap_or(path))
}

/// The certificate gauges, from the rows `portcullis certs` shows.
fn gauges(rows: &[CertRow]) -> Vec<CertGauge> {
    let unix = |s: &str| {
        humantime::parse_rfc3339(s)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64)
    };
    rows.iter()
        .map(|row| CertGauge {
            names: row.names.clone(),
            source: row.source.clone(),
            key_type: row.key_type.clone(),
            not_after: unix(&row.not_after),
            next_renewal: row.next_renewal.as_deref().map(unix),
        })
        .collect()
}

/// What `/healthz` says without failing: a cluster store that does not
/// answer. This node serves what it has, so a load balancer must keep
/// sending it traffic (an etcd outage failing every node's health check
/// would be an outage of them all); `portcullis_cluster_store_up` alerts.
pub fn warnings(cluster: Option<&Health>) -> Vec<String> {
    let Some(since) = cluster.and_then(|h| h.down_since) else {
        return Vec::new();
    };
    let why = cluster
        .and_then(|h| h.last_error.as_deref())
        .map(|e| format!(" ({e})"))
        .unwrap_or_default();
    // etcd answered, and said no: a mistake to fix, not an outage.
    let refused = cluster
        .and_then(|h| h.last_error.as_deref())
        .is_some_and(|e| e.starts_with("cluster store refused"));
    let state = if refused {
        "refuses this node"
    } else {
        "unreachable"
    };
    vec![format!(
        "warning: cluster store {state} since {}{why}: serving the certificates this node has, ordering none",
        humantime::format_rfc3339_seconds(since)
    )]
}

/// Why `/healthz` fails; empty when healthy.
pub fn problems(metrics: &Metrics, certs: &[CertRow], now: SystemTime) -> Vec<String> {
    let mut out: Vec<String> = metrics
        .failing_addresses()
        .into_iter()
        .map(|a| format!("listener {a}: accept is failing"))
        .collect();
    for row in certs {
        let Ok(not_after) = humantime::parse_rfc3339(&row.not_after) else {
            continue;
        };
        let host = row.names.first().map(String::as_str).unwrap_or_default();
        if not_after <= now {
            out.push(format!(
                "certificate for {host} ({}) expired at {}",
                row.source, row.not_after
            ));
        } else if not_after <= now + EXPIRY_MARGIN {
            let days = not_after
                .duration_since(now)
                .map_or(0, |d| d.as_secs() / 86_400);
            let why = row
                .last_error
                .as_deref()
                .map(|e| format!("; last renewal error: {e}"))
                .unwrap_or_default();
            out.push(format!(
                "certificate for {host} ({}) expires in {days} days, at {}, and has not been renewed{why}",
                row.source, row.not_after
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(names: &[&str], not_after: &str) -> CertRow {
        CertRow {
            names: names.iter().map(|s| s.to_string()).collect(),
            source: "files".into(),
            key_type: "ecdsa-p256".into(),
            issuer: "CN=x".into(),
            serial: "01".into(),
            not_after: not_after.into(),
            ..Default::default()
        }
    }

    #[test]
    fn health_names_every_problem() {
        let m = Metrics::new();
        let now = humantime::parse_rfc3339("2030-01-01T00:00:00Z").unwrap();
        let ok = [row(&["a.test"], "2030-03-01T00:00:00Z")];
        assert!(problems(&m, &ok, now).is_empty());
        let bad = [
            row(&["old.test"], "2029-12-31T00:00:00Z"),
            row(&["soon.test", "www.soon.test"], "2030-01-05T00:00:00Z"),
            row(&["fine.test"], "2030-01-09T00:00:00Z"),
        ];
        let p = problems(&m, &bad, now);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].contains("old.test") && p[0].contains("expired"),
            "{p:?}"
        );
        assert!(
            p[1].contains("soon.test") && p[1].contains("expires in 4 days"),
            "{p:?}"
        );
        m.accepting("imaps", "127.0.0.1:993".parse().unwrap(), false);
        let p = problems(&m, &ok, now);
        assert_eq!(p, vec!["listener imaps 127.0.0.1:993: accept is failing"]);
    }

    #[test]
    fn an_unreachable_cluster_store_is_a_warning_not_a_failure() {
        assert!(warnings(None).is_empty());
        let up = Health::default();
        assert!(warnings(Some(&up)).is_empty());
        let down = Health {
            down_since: humantime::parse_rfc3339("2030-01-01T00:00:00Z").ok(),
            last_error: Some("etcd does not answer".into()),
            last_sync: None,
        };
        let w = warnings(Some(&down));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("warning: cluster store unreachable since 2030-01-01T00:00:00Z (etcd does not answer)"), "{w:?}");
        assert!(w[0].contains("ordering none"), "{w:?}");
        let refused = Health {
            last_error: Some(
                "cluster store refused connecting: etcdserver: authentication failed".into(),
            ),
            ..down
        };
        let w = warnings(Some(&refused));
        assert!(w[0].starts_with("warning: cluster store refuses this node since 2030-01-01T00:00:00Z (cluster store refused connecting: "), "{w:?}");
    }

    #[test]
    fn requests_are_parsed() {
        let parse = |text: &[u8]| http::parse(text).ok().flatten();
        let head = parse(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(head.as_ref().map(route), Some(("GET", "/metrics")));
        assert_eq!(parse(b"garbage\r\n\r\n").as_ref().map(route), None);
        let raw =
            b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\naccept: */*\r\n\r\n";
        assert_eq!(
            accept(raw).as_deref(),
            Some("application/openmetrics-text,*/*")
        );
        assert_eq!(accept(b"GET /metrics HTTP/1.1\r\n\r\n"), None);
    }

    #[test]
    fn requests_are_routed() {
        let page_of = |text: &[u8]| page(http::parse(text).ok().flatten().as_ref());
        for (text, want) in [
            (&b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"[..], Page::Metrics),
            (b"GET /healthz HTTP/1.0\r\n\r\n", Page::Health),
            (b"POST /metrics HTTP/1.1\r\n\r\n", Page::MethodNotAllowed),
            (b"HEAD /healthz HTTP/1.1\r\n\r\n", Page::MethodNotAllowed),
            (b"GET /metrics/ HTTP/1.1\r\n\r\n", Page::NotFound),
            (b"garbage\r\n\r\n", Page::BadRequest),
        ] {
            assert_eq!(page_of(text), want, "{}", String::from_utf8_lossy(text));
        }
    }
}
