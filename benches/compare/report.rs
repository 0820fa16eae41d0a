//! Medians with min–max over runs, ratios portcullis/HAProxy and
//! portcullis/nginx, as a Markdown table and as JSON.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::proxies::{Kind, ALL};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
    /// Context (CPU %, counts): no better direction.
    Neither,
}

impl Better {
    fn word(self) -> &'static str {
        match self {
            Better::Higher => "higher",
            Better::Lower => "lower",
            Better::Neither => "",
        }
    }
}

pub struct Row {
    pub workload: &'static str,
    pub metric: String,
    pub better: Better,
    pub runs: BTreeMap<Kind, Vec<f64>>,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
}

pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn stats(v: &[f64]) -> Option<Stats> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stats {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

/// A number with as many decimals as its size deserves.
pub fn num(x: f64) -> String {
    let a = x.abs();
    if !x.is_finite() {
        "—".into()
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

impl Report {
    pub fn add(
        &mut self,
        workload: &'static str,
        metric: &str,
        better: Better,
        kind: Kind,
        v: f64,
    ) {
        let row = match self
            .rows
            .iter_mut()
            .position(|r| r.workload == workload && r.metric == metric)
        {
            Some(i) => &mut self.rows[i],
            None => {
                self.rows.push(Row {
                    workload,
                    metric: metric.to_string(),
                    better,
                    runs: BTreeMap::new(),
                });
                self.rows.last_mut().expect("just pushed")
            }
        };
        row.runs.entry(kind).or_default().push(v);
    }

    fn ratio(row: &Row, other: Kind) -> Option<f64> {
        if row.better == Better::Neither {
            return None;
        }
        let p = stats(row.runs.get(&Kind::Portcullis)?)?.median;
        let o = stats(row.runs.get(&other)?)?.median;
        (o != 0.0).then(|| p / o)
    }

    /// Rows by workload (stable: metrics keep their order).
    fn sorted(&self) -> Vec<&Row> {
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by_key(|r| r.workload);
        rows
    }

    pub fn markdown(&self, present: &[Kind]) -> String {
        let mut out = String::new();
        out.push_str("| workload | metric | better | ");
        for k in ALL {
            out.push_str(k.label());
            out.push_str(" | ");
        }
        out.push_str("portcullis/haproxy | portcullis/nginx |\n");
        out.push_str("|---|---|---|---|---|---|---|---|\n");
        for row in self.sorted() {
            out.push_str(&format!(
                "| {} | {} | {} | ",
                row.workload,
                row.metric,
                row.better.word()
            ));
            for k in ALL {
                let cell = match row.runs.get(&k).and_then(|v| stats(v)) {
                    Some(s) if row.runs[&k].len() > 1 => {
                        format!("{} ({}–{})", num(s.median), num(s.min), num(s.max))
                    }
                    Some(s) => num(s.median),
                    None if present.contains(&k) => "—".into(),
                    None => "not run".into(), // not installed, or left out with --only
                };
                out.push_str(&cell);
                out.push_str(" | ");
            }
            for other in [Kind::Haproxy, Kind::Nginx] {
                match Self::ratio(row, other) {
                    Some(r) => out.push_str(&format!("{r:.2}")),
                    None => out.push('—'),
                }
                out.push_str(" | ");
            }
            out.pop();
            out.push('\n');
        }
        out
    }

    pub fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .sorted()
            .into_iter()
            .map(|row| {
                let mut proxies = serde_json::Map::new();
                for (k, v) in &row.runs {
                    if let Some(s) = stats(v) {
                        proxies.insert(
                            k.label().into(),
                            json!({"median": s.median, "min": s.min, "max": s.max, "runs": v}),
                        );
                    }
                }
                json!({
                    "workload": row.workload,
                    "metric": row.metric,
                    "better": row.better.word(),
                    "proxies": proxies,
                    "ratio_portcullis_haproxy": Self::ratio(row, Kind::Haproxy),
                    "ratio_portcullis_nginx": Self::ratio(row, Kind::Nginx),
                })
            })
            .collect();
        Value::Array(rows)
    }
}
