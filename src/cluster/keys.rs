//! The key layout under `store.etcd.prefix` (default `/portcullis/`), and
//! the records kept there. Pure: no I/O, so every rule has a unit test.
//!
//! ```text
//! <prefix>account/<directory>          ACME account credentials (JSON), one per CA directory
//! <prefix>certs/<first name>           a host's certificate: CertRecord (JSON: chain, key, metadata)
//! <prefix>locks/<first name>           the node ordering for the host (leased, 30 s, kept alive)
//! <prefix>challenges/http-01/<token>   key authorization (leased with the lock)
//! <prefix>challenges/tls-alpn-01/<name> hex SHA-256 of the key authorization (leased with the lock)
//! <prefix>nodes/<node>                 NodeRecord: when the node last synced
//! ```
//!
//! A certificate and its key are one value, written in one transaction:
//! a reader sees the old pair or the new one, never half of each.

use serde::{Deserialize, Serialize};

/// What a key under the prefix holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Account(String),
    Cert(String),
    Lock(String),
    Http01(String),
    TlsAlpn01(String),
    Node(String),
}

const ACCOUNT: &str = "account/";
const CERTS: &str = "certs/";
const LOCKS: &str = "locks/";
const HTTP01: &str = "challenges/http-01/";
const TLS_ALPN01: &str = "challenges/tls-alpn-01/";
const NODES: &str = "nodes/";

impl Key {
    /// The full key under `prefix` (which ends with `/`).
    pub fn under(&self, prefix: &str) -> String {
        let (dir, rest) = match self {
            Key::Account(d) => (ACCOUNT, d.as_str()),
            Key::Cert(n) => (CERTS, n.as_str()),
            Key::Lock(n) => (LOCKS, n.as_str()),
            Key::Http01(t) => (HTTP01, t.as_str()),
            Key::TlsAlpn01(n) => (TLS_ALPN01, n.as_str()),
            Key::Node(n) => (NODES, n.as_str()),
        };
        format!("{prefix}{dir}{rest}")
    }

    /// What `key` is, if it is one of ours under `prefix`.
    pub fn parse(prefix: &str, key: &[u8]) -> Option<Key> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
        type Make = fn(String) -> Key;
        let kinds: [(&str, Make); 6] = [
            (ACCOUNT, Key::Account),
            (CERTS, Key::Cert),
            (LOCKS, Key::Lock),
            (HTTP01, Key::Http01),
            (TLS_ALPN01, Key::TlsAlpn01),
            (NODES, Key::Node),
        ];
        kinds.iter().find_map(|(dir, make)| {
            let name = rest.strip_prefix(dir)?;
            (!name.is_empty() && !name.contains('/')).then(|| make(name.to_string()))
        })
    }
}

/// The account key's last part: the directory URL made a key, so staging
/// and production accounts never mix.
pub fn directory_slug(directory: &str) -> String {
    directory
        .trim_start_matches("https://")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A host's certificate as the cluster keeps it. Its `Debug` leaves the
/// private key out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    /// The host's names when it was ordered, first name first.
    pub names: Vec<String>,
    /// The ACME directory that issued it.
    pub directory: String,
    /// RFC 3339, by the clock of the node that ordered it.
    pub issued_at: String,
    pub serial: String,
    /// Unix seconds: which of two certificates is newer, whatever the clocks say.
    pub not_after: i64,
    /// Leaf first, then the chain.
    pub chain_pem: String,
    /// PKCS#8.
    pub key_pem: String,
    /// The node that ordered it.
    pub node: String,
}

impl std::fmt::Debug for CertRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertRecord")
            .field("names", &self.names)
            .field("directory", &self.directory)
            .field("issued_at", &self.issued_at)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// When a node last read the whole store and followed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// RFC 3339, by that node's clock.
    pub synced_at: String,
    /// The store's revision it had seen.
    pub revision: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_shown_for_debugging_holds_no_key() {
        let r = CertRecord {
            names: vec!["mail.example.test".into()],
            directory: "https://ca.test/dir".into(),
            issued_at: "2030-01-01T00:00:00Z".into(),
            serial: "01".into(),
            not_after: 1,
            chain_pem: "-----BEGIN CERTIFICATE-----".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----secret".into(),
            node: "a".into(),
        };
        let shown = format!("{r:?}");
        assert!(
            shown.contains("mail.example.test") && shown.contains("serial"),
            "{shown}"
        );
        assert!(
            !shown.contains("PRIVATE KEY") && !shown.contains("secret"),
            "{shown}"
        );
    }

    #[test]
    fn keys_round_trip_and_strangers_are_not_ours() {
        let p = "/portcullis/";
        let keys = [
            Key::Account("acme-v02.api.letsencrypt.org_directory".into()),
            Key::Cert("mail.example.test".into()),
            Key::Lock("mail.example.test".into()),
            Key::Http01("tok-EN_1".into()),
            Key::TlsAlpn01("mail.example.test".into()),
            Key::Node("mx1".into()),
        ];
        for k in keys {
            let full = k.under(p);
            assert!(full.starts_with(p), "{full}");
            assert_eq!(Key::parse(p, full.as_bytes()), Some(k));
        }
        assert_eq!(
            Key::Cert("mail.example.test".into()).under(p),
            "/portcullis/certs/mail.example.test"
        );
        assert_eq!(
            Key::Http01("t".into()).under("/a/b/"),
            "/a/b/challenges/http-01/t"
        );
        for stranger in [
            "/portcullis/certs/",
            "/portcullis/certs/a/b",
            "/portcullis/other/x",
            "/other/certs/mail.example.test",
            "/portcullis/challenges/dns-01/x",
        ] {
            assert_eq!(Key::parse(p, stranger.as_bytes()), None, "{stranger}");
        }
        assert_eq!(Key::parse(p, b"/portcullis/certs/\xff"), None);
    }

    #[test]
    fn staging_and_production_accounts_have_their_own_key() {
        let prod = directory_slug(crate::config::defaults::LETSENCRYPT);
        let staging = directory_slug(crate::config::defaults::LETSENCRYPT_STAGING);
        assert_ne!(prod, staging);
        assert_eq!(prod, "acme-v02.api.letsencrypt.org_directory");
        assert_eq!(
            directory_slug("https://127.0.0.1:14000/dir"),
            "127.0.0.1_14000_dir"
        );
    }
}
