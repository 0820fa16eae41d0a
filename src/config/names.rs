//! Host names as the config and the TLS layer see them: validated and lowercased
//! once, when they are created, so every lookup afterwards is a plain string
//! comparison. Nothing here resolves a name.

use std::fmt;

/// A DNS host name (`mail.example.com`), lowercase, without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hostname(String);

/// A host name or a one-label wildcard (`*.example.org`) as written under `hosts[].names`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    Exact(Hostname),
    /// `*.example.org`: holds `example.org`; matches exactly one more label.
    Wildcard(Hostname),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("empty host name")]
    Empty,
    #[error("host name longer than 253 characters")]
    TooLong,
    #[error("invalid label {0:?} (letters, digits and inner hyphens, 1 to 63 characters)")]
    Label(String),
    #[error("an IP address is not a host name")]
    IpAddress,
    #[error("a wildcard must be the whole leftmost label of a name with at least two more labels (\"*.example.org\")")]
    Wildcard,
}

impl Hostname {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let s = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > 253 {
            return Err(NameError::TooLong);
        }
        if s.parse::<std::net::IpAddr>().is_ok() {
            return Err(NameError::IpAddress);
        }
        for label in s.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(NameError::Label(label.to_string()));
            }
        }
        Ok(Hostname(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name without its first label (`a.b.c` → `b.c`), for wildcard lookup.
    pub fn parent(&self) -> Option<&str> {
        parent(&self.0)
    }
}

/// A host's names as written (`*.example.org` keeps its star), for logs,
/// the store and the control socket.
pub fn to_strings(names: &[HostPattern]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// `a.b.c` → `b.c`: where a one-label wildcard for `name` would be keyed.
pub fn parent(name: &str) -> Option<&str> {
    name.split_once('.').map(|(_, rest)| rest)
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        match s.strip_prefix("*.") {
            Some(rest) => {
                let base = Hostname::parse(rest)?;
                if !base.as_str().contains('.') {
                    return Err(NameError::Wildcard);
                }
                Ok(HostPattern::Wildcard(base))
            }
            None if s.contains('*') => Err(NameError::Wildcard),
            None => Ok(HostPattern::Exact(Hostname::parse(s)?)),
        }
    }

    pub fn matches(&self, name: &Hostname) -> bool {
        match self {
            HostPattern::Exact(n) => n == name,
            HostPattern::Wildcard(base) => name.parent() == Some(base.as_str()),
        }
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(n) => write!(f, "{n}"),
            HostPattern::Wildcard(base) => write!(f, "*.{base}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lowercased_once() {
        assert_eq!(
            Hostname::parse("Mail.Example.COM.").unwrap().as_str(),
            "mail.example.com"
        );
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in [
            "",
            "a..b",
            "-a.b",
            "a-.b",
            "a b.c",
            "127.0.0.1",
            "::1",
            "a.*.b",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(HostPattern::parse("*.org"), Err(NameError::Wildcard));
        assert_eq!(
            HostPattern::parse("*x.example.org"),
            Err(NameError::Wildcard)
        );
    }

    #[test]
    fn wildcard_matches_exactly_one_label() {
        let w = HostPattern::parse("*.example.org").unwrap();
        assert!(w.matches(&Hostname::parse("a.example.org").unwrap()));
        assert!(!w.matches(&Hostname::parse("example.org").unwrap()));
        assert!(!w.matches(&Hostname::parse("a.b.example.org").unwrap()));
    }
}
