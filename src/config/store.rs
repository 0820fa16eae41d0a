//! The `store:` block: where ACME state is shared. Without it, `state_dir`
//! alone holds it; with `store: { etcd: … }`, several instances share the
//! account, certificates and challenge answers through etcd (README
//! "Running several instances").

use std::path::PathBuf;

use serde_yaml::Value;

use super::walk::{field, Walk};
use super::{Etcd, EtcdTls};

const STORE_KEYS: &[&str] = &["etcd"];
const ETCD_KEYS: &[&str] = &[
    "endpoints",
    "prefix",
    "node",
    "tls",
    "user",
    "password_file",
];
const TLS_KEYS: &[&str] = &["ca", "cert", "key"];

/// The key prefix when none is given.
pub const DEFAULT_PREFIX: &str = "/portcullis/";

impl Walk<'_> {
    pub(super) fn store(&mut self, v: &Value) -> Option<Etcd> {
        let m = self.mapping(v, "store", STORE_KEYS)?;
        let etcd = self.required(m, "store", "etcd")?;
        self.etcd(etcd)
    }

    fn etcd(&mut self, v: &Value) -> Option<Etcd> {
        let path = "store.etcd";
        let m = self.mapping(v, path, ETCD_KEYS)?;
        let endpoints = self.required(m, path, "endpoints");
        let endpoints = self.endpoints(endpoints);
        let prefix = match field(m, "prefix").and_then(|v| self.string(v, "store.etcd.prefix")) {
            Some(p) if p.starts_with('/') && !p.contains("//") => {
                Some(format!("{}/", p.trim_end_matches('/')))
            }
            Some(p) => {
                self.err(
                    "store.etcd.prefix",
                    format!("{p:?}: expected a key prefix like /portcullis/"),
                );
                None
            }
            None => Some(DEFAULT_PREFIX.to_string()),
        };
        let node = match field(m, "node") {
            Some(v) => self.string(v, "store.etcd.node"),
            None => this_host().or_else(|| {
                self.err(
                    "store.etcd.node",
                    "missing, and this machine's host name cannot name the node: set one",
                );
                None
            }),
        };
        let node = node.and_then(|n| {
            let fine = !n.is_empty()
                && n.len() <= 64
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !fine {
                self.err(
                    "store.etcd.node",
                    format!(
                        "{n:?}: a node name uses letters, digits, '.', '_' and '-' (at most 64)"
                    ),
                );
            }
            fine.then_some(n)
        });
        let tls = field(m, "tls").map(|v| self.etcd_tls(v));
        let user = field(m, "user").and_then(|v| self.string(v, "store.etcd.user"));
        let password_file = field(m, "password_file")
            .and_then(|v| self.string(v, "store.etcd.password_file"))
            .map(|s| self.path(&s));
        if user.is_some() != password_file.is_some() {
            self.err(
                "store.etcd",
                "user and password_file go together (etcd authentication)",
            );
        }
        let endpoints = endpoints?;
        let https = endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        match (&tls, https) {
            (None, n) if n > 0 => self.err(
                "store.etcd.tls",
                "missing: https:// endpoints need tls: { ca } (and cert and key for client certificates)",
            ),
            (Some(_), n) if n < endpoints.len() => self.err(
                "store.etcd.endpoints",
                "with tls, every endpoint is https://",
            ),
            _ => {}
        }
        Some(Etcd {
            endpoints,
            prefix: prefix?,
            node: node?,
            tls: tls.map_or(Some(None), |t| t.map(Some))?,
            user,
            password_file,
        })
    }

    /// `http://HOST:PORT` or `https://HOST:PORT`, one or a list.
    fn endpoints(&mut self, v: Option<&Value>) -> Option<Vec<String>> {
        let v = v?;
        let mut out = Vec::new();
        for (p, s) in self.strings(v, "store.etcd.endpoints") {
            let rest = s
                .strip_prefix("http://")
                .or_else(|| s.strip_prefix("https://"));
            let ok = rest.is_some_and(|r| {
                r.rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            });
            if ok {
                out.push(s);
            } else {
                self.err(
                    &p,
                    format!("{s:?}: expected an etcd client URL like https://10.0.0.1:2379"),
                );
            }
        }
        if out.is_empty() {
            self.err("store.etcd.endpoints", "at least one endpoint is needed");
            return None;
        }
        Some(out)
    }

    fn etcd_tls(&mut self, v: &Value) -> Option<EtcdTls> {
        let path = "store.etcd.tls";
        let m = self.mapping(v, path, TLS_KEYS)?;
        let file = |w: &mut Self, key: &str| -> Option<PathBuf> {
            field(m, key)
                .and_then(|v| w.string(v, &format!("{path}.{key}")))
                .map(|s| w.path(&s))
        };
        let ca = self
            .required(m, path, "ca")
            .and_then(|v| self.string(v, "store.etcd.tls.ca"))
            .map(|s| self.path(&s));
        let (cert, key) = (file(self, "cert"), file(self, "key"));
        if cert.is_some() != key.is_some() {
            self.err(path, "cert and key go together (a client certificate)");
        }
        Some(EtcdTls { ca: ca?, cert, key })
    }
}

/// This machine's host name (no lookup: the kernel's node name).
fn this_host() -> Option<String> {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_str().ok()?;
    let short = name.split('.').next().unwrap_or(name);
    (!short.is_empty()).then(|| short.to_string())
}
