//! The two text formats `/metrics` speaks, and which one a scraper asked
//! for. prometheus-client writes OpenMetrics only; the Prometheus text
//! format 0.0.4 (what `promtool check metrics`, older Prometheus servers and
//! most other scrapers read) is derived from it line by line. Pure: text in,
//! text out.
//!
//! The two differ where a reader of one chokes on the other: a counter's
//! family is named without `_total` in OpenMetrics and with it in 0.0.4
//! (else its HELP and TYPE describe no sample, and the samples are untyped
//! with no help), `# UNIT` and `# EOF` exist only in OpenMetrics, and its
//! `info` and `unknown` types are `gauge` and `untyped` in 0.0.4.

/// An exposition format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4: the default.
    Prometheus,
    /// OpenMetrics 1.0.0 text, for a scraper that asks for it.
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` that names the format (Prometheus picks its parser
    /// by it).
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// The format for a request's `Accept` header: OpenMetrics when it asks
    /// for `application/openmetrics-text` and does not prefer `text/plain`
    /// (by `q`), else the Prometheus text format. Prometheus itself sends
    /// `application/openmetrics-text;version=1.0.0,…,text/plain;version=0.0.4;q=0.5,…`.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let (mut open_metrics, mut text) = (0.0f32, 0.0f32);
        for range in accept.unwrap_or_default().split(',') {
            let mut params = range.split(';').map(str::trim);
            let media = params.next().unwrap_or_default().to_ascii_lowercase();
            let q = params
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
            match media.as_str() {
                "application/openmetrics-text" => open_metrics = open_metrics.max(q),
                "text/plain" => text = text.max(q),
                _ => {}
            }
        }
        if open_metrics > 0.0 && open_metrics > text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }
}

/// The Prometheus text format 0.0.4 of an OpenMetrics exposition as
/// prometheus-client writes it (no exemplars, no `_created` samples).
pub fn to_prometheus(open_metrics: &str) -> String {
    let mut out = String::with_capacity(open_metrics.len());
    // A family's HELP comes before its TYPE, which says whether its name
    // takes `_total`: held back until the TYPE line.
    let mut help: Option<&str> = None;
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.rsplit_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "unknown" => ("", "untyped"),
                other => ("", other),
            };
            if let Some(text) = help.take().and_then(|h| h.split_once(' ').map(|(_, t)| t)) {
                out.push_str(&format!("# HELP {name}{suffix} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_asks_for_open_metrics_curl_gets_text() {
        let om = Format::OpenMetrics;
        let text = Format::Prometheus;
        for (accept, want) in [
            (None, text),
            (Some("*/*"), text),
            (Some("text/plain"), text),
            (Some("application/openmetrics-text"), om),
            (Some("Application/OpenMetrics-Text; version=1.0.0"), om),
            // Prometheus 2.42's scrape
            (Some("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"), om),
            // scrape_protocols: [PrometheusText0.0.4, OpenMetricsText1.0.0]
            (Some("text/plain;version=0.0.4;q=0.9,application/openmetrics-text;version=1.0.0;q=0.5"), text),
            (Some("application/openmetrics-text;q=0"), text),
            (Some("application/openmetrics-text;q=bad"), text),
            (Some("text/plain;q=0.5, application/openmetrics-text;q=0.5"), text),
        ] {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn counters_take_total_in_their_family_name_and_open_metrics_lines_go() {
        let om = "# HELP p_conns Connections.\n# TYPE p_conns counter\np_conns_total{l=\"a\"} 1\n\
                  # HELP p_open Open now.\n# TYPE p_open gauge\np_open 2\n\
                  # HELP p_wait_seconds Waits.\n# TYPE p_wait_seconds histogram\n# UNIT p_wait_seconds seconds\n\
                  p_wait_seconds_sum 0.5\np_wait_seconds_count 1\np_wait_seconds_bucket{le=\"+Inf\"} 1\n\
                  # HELP p_build Build.\n# TYPE p_build info\np_build_info{v=\"1\"} 1\n# EOF\n";
        let want = "# HELP p_conns_total Connections.\n# TYPE p_conns_total counter\np_conns_total{l=\"a\"} 1\n\
                    # HELP p_open Open now.\n# TYPE p_open gauge\np_open 2\n\
                    # HELP p_wait_seconds Waits.\n# TYPE p_wait_seconds histogram\n\
                    p_wait_seconds_sum 0.5\np_wait_seconds_count 1\np_wait_seconds_bucket{le=\"+Inf\"} 1\n\
                    # HELP p_build_info Build.\n# TYPE p_build_info gauge\np_build_info{v=\"1\"} 1\n";
        assert_eq!(to_prometheus(om), want);
    }
}
