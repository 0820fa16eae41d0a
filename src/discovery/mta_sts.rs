//! The MTA-STS policy file (RFC 8461 §3.2) and its id.

use crate::config::MtaSts;

/// The policy as served: `key: value` lines ending in CRLF, `version` first.
pub(super) fn policy(p: &MtaSts) -> String {
    let mut out = format!("version: STSv1\r\nmode: {}\r\n", p.mode.as_str());
    for mx in &p.mx {
        out.push_str(&format!("mx: {mx}\r\n"));
    }
    out.push_str(&format!("max_age: {}\r\n", p.max_age.as_secs()));
    out
}

/// The `id=` of the `_mta-sts` TXT record: 20 hex digits of the policy's
/// SHA-256, so it changes exactly when the policy does (a sender fetches
/// the policy again only when the id changes).
pub fn id(p: &MtaSts) -> String {
    let mut digest = crate::tls::certs::sha256_hex(policy(p).as_bytes());
    digest.truncate(20);
    digest
}
