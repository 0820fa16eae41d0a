//! What a reload changed, for its log line and `portcullis reload`, and
//! which files a reload reads. Certificates aside: only the server knows
//! what each host served.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use super::names::{self, HostPattern};
use super::{Backend, CertSource, Config, Listener};

/// What a reload changed, for its log line and for `portcullis reload`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub hosts_added: Vec<String>,
    pub hosts_removed: Vec<String>,
    /// `host/listener`.
    pub backends_moved: Vec<String>,
    pub certificates_replaced: Vec<String>,
    pub listeners_added: Vec<String>,
    pub listeners_removed: Vec<String>,
    pub listeners_changed: Vec<String>,
    /// `default_host`, `unknown_sni`, `acme`, `timeouts`, `domains`: in effect at once.
    pub settings_changed: Vec<String>,
    /// Settings read only at start.
    pub need_restart: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

impl fmt::Display for Changes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("nothing changed");
        }
        let parts = [
            ("hosts added", &self.hosts_added),
            ("hosts removed", &self.hosts_removed),
            ("backends moved", &self.backends_moved),
            ("certificates replaced", &self.certificates_replaced),
            ("listeners added", &self.listeners_added),
            ("listeners removed", &self.listeners_removed),
            ("listeners changed", &self.listeners_changed),
            ("settings changed", &self.settings_changed),
            (
                "needs portcullis upgrade (or a restart) to apply",
                &self.need_restart,
            ),
        ];
        let mut first = true;
        for (label, items) in parts.iter().filter(|(_, items)| !items.is_empty()) {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{label}: {}", items.join(", "))?;
        }
        Ok(())
    }
}

/// The difference between two configs, certificates aside (the server adds
/// those: only it knows what each host served).
pub fn diff(old: &Config, new: &Config) -> Changes {
    let hosts = |c: &Config| -> BTreeMap<String, BTreeMap<String, Backend>> {
        c.hosts
            .iter()
            .map(|h| (host_key(&h.names), h.backends.clone()))
            .collect()
    };
    let (old_hosts, new_hosts) = (hosts(old), hosts(new));
    let mut changes = Changes {
        hosts_added: added(&old_hosts, &new_hosts),
        hosts_removed: added(&new_hosts, &old_hosts),
        ..Changes::default()
    };
    for (host, backends) in &new_hosts {
        let Some(before) = old_hosts.get(host) else {
            continue;
        };
        let listeners: BTreeSet<&String> = backends.keys().chain(before.keys()).collect();
        for l in listeners {
            if backends.get(l) != before.get(l) {
                let to = backends
                    .get(l)
                    .map_or("none".to_string(), |b| b.address.to_string());
                changes.backends_moved.push(format!("{host}/{l} → {to}"));
            }
        }
    }
    let listeners = |c: &Config| -> BTreeMap<String, Listener> { c.listeners.clone() };
    let (old_l, new_l) = (listeners(old), listeners(new));
    changes.listeners_added = added(&old_l, &new_l);
    changes.listeners_removed = added(&new_l, &old_l);
    changes.listeners_changed = new_l
        .iter()
        .filter(|(name, l)| old_l.get(*name).is_some_and(|o| o != *l))
        .map(|(name, _)| name.clone())
        .collect();
    for (what, differs) in [
        ("timeouts", old.timeouts != new.timeouts),
        ("default_host", old.default_host != new.default_host),
        ("unknown_sni", old.unknown_sni != new.unknown_sni),
        ("acme", old.acme != new.acme),
        ("notify", old.notify != new.notify),
        ("domains", old.domains != new.domains),
    ] {
        if differs {
            changes.settings_changed.push(what.to_string());
        }
    }
    for (what, differs) in [
        ("state_dir", old.state_dir != new.state_dir),
        (
            "max_connections",
            old.max_connections != new.max_connections,
        ),
        ("log", old.log != new.log),
        ("admin", old.admin != new.admin),
        ("store", old.store != new.store),
    ] {
        if differs {
            changes.need_restart.push(what.to_string());
        }
    }
    changes
}

/// A host as the log names it: its names, comma-joined.
pub fn host_key(names: &[HostPattern]) -> String {
    names::to_strings(names).join(",")
}

fn added<V>(old: &BTreeMap<String, V>, new: &BTreeMap<String, V>) -> Vec<String> {
    new.keys()
        .filter(|k| !old.contains_key(*k))
        .cloned()
        .collect()
}

/// The files a reload reads: the config and every `{ cert, key }` file.
pub fn watched_files(config_file: &Path, config: &Config) -> Vec<PathBuf> {
    let mut files = vec![config_file.to_path_buf()];
    for h in &config.hosts {
        if let CertSource::Files { cert, key, second } = &h.certificate {
            files.push(cert.clone());
            files.push(key.clone());
            if let Some((cert, key)) = second {
                files.push(cert.clone());
                files.push(key.clone());
            }
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("/etc/portcullis")).unwrap()
    }

    const BASE: &str = r#"
listeners:
  imaps: { bind: "127.0.0.1:10993", protocol: imap, tls: implicit }
  pop3s: { bind: "127.0.0.1:10995", protocol: pop3, tls: implicit }
backends: { imaps: 127.0.0.1:20143, pop3s: 127.0.0.1:20110 }
hosts:
  - names: [mail.example.test]
    certificate: self-signed
  - names: [old.example.test]
    certificate: self-signed
"#;

    #[test]
    fn changes_name_what_moved() {
        let old = parse(BASE);
        assert!(diff(&old, &old).is_empty());
        assert_eq!(diff(&old, &old).to_string(), "nothing changed");
        let new = parse(
            &BASE
                .replace("old.example.test", "new.example.test")
                .replace("pop3s: { bind", "pop3: { bind")
                .replace("10995\", protocol: pop3, tls: implicit", "10110\", protocol: pop3, tls: starttls")
                .replace("pop3s: 127.0.0.1:20110", "pop3: 127.0.0.1:20110")
                .replace(
                    "  - names: [mail.example.test]\n    certificate: self-signed\n",
                    "  - names: [mail.example.test]\n    certificate: self-signed\n    backends: { imaps: 127.0.0.1:20144 }\n",
                )
                .replace("hosts:", "max_connections: 10\nunknown_sni: reject\nhosts:"),
        );
        let c = diff(&old, &new);
        assert_eq!(c.hosts_added, ["new.example.test"]);
        assert_eq!(c.hosts_removed, ["old.example.test"]);
        assert!(
            c.backends_moved
                .contains(&"mail.example.test/imaps → 127.0.0.1:20144".to_string()),
            "{c:?}"
        );
        assert!(
            c.backends_moved
                .contains(&"mail.example.test/pop3 → 127.0.0.1:20110".to_string()),
            "{c:?}"
        );
        assert_eq!(c.listeners_added, ["pop3"]);
        assert_eq!(c.listeners_removed, ["pop3s"]);
        assert_eq!(c.need_restart, ["max_connections"]);
        assert_eq!(c.settings_changed, ["unknown_sni"]);
        let text = c.to_string();
        assert!(
            text.starts_with(
                "hosts added: new.example.test; hosts removed: old.example.test; backends moved: "
            ),
            "{text}"
        );
        assert!(
            text.ends_with("needs portcullis upgrade (or a restart) to apply: max_connections"),
            "{text}"
        );
    }
}
