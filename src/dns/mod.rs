//! What dns-01 needs from DNS, and nothing else: an RFC 2136 dynamic
//! update that adds or removes one TXT record, signed with TSIG (RFC 8945),
//! and a direct, non-recursive query that sees what an authoritative
//! server serves. Over TCP, to IP literals only: nothing here resolves a
//! name. Every exchange is bounded by [`EXCHANGE_TIMEOUT`].
//!
//! Errors say what an operator can act on: a TSIG failure names the key
//! and what the server held against it, REFUSED names the zone and the
//! key, no answer names the server.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{update_message, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::tsig::{TsigAlgorithm, TsigError};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{Name, RData, RecordSet, RecordType, TSigner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{Tsig, TsigAlgo};

/// Bound on one exchange with a DNS server: connect, send, answer.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How far the server's clock may be from ours (RFC 8945 suggests 300 s).
const FUDGE: u16 = 300;
/// The TTL of a challenge record: short, it lives for minutes.
pub const CHALLENGE_TTL: u32 = 60;
/// The largest answer read (a TXT set of challenge records is far smaller).
const ANSWER_LIMIT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("DNS server {server}: no answer within {} s", EXCHANGE_TIMEOUT.as_secs())]
    Timeout { server: SocketAddr },
    #[error("DNS server {server}: {source}")]
    Io {
        server: SocketAddr,
        source: std::io::Error,
    },
    #[error("DNS server {server} did not accept TSIG key {key}: {why}")]
    Tsig {
        server: SocketAddr,
        key: String,
        why: String,
    },
    #[error("DNS server {server} refused the update of zone {zone} signed with key {key} (REFUSED): its update-policy or allow-update does not let this key change TXT records there")]
    Refused {
        server: SocketAddr,
        zone: String,
        key: String,
    },
    #[error("DNS server {server} is not authoritative for zone {zone} ({rcode}): check acme.dns.zone and acme.dns.server")]
    NotAuthoritative {
        server: SocketAddr,
        zone: String,
        rcode: String,
    },
    #[error("DNS server {server} answered {rcode} to {what}")]
    Rcode {
        server: SocketAddr,
        what: String,
        rcode: String,
    },
    #[error("DNS server {server}: unreadable answer to {what}: {why}")]
    Malformed {
        server: SocketAddr,
        what: String,
        why: String,
    },
    #[error("{name} is not in zone {zone}")]
    NotInZone { name: String, zone: String },
    #[error("TSIG key {key}: {why}")]
    Key { key: String, why: String },
}

/// Sends TSIG-signed updates of one zone to its primary server.
pub struct Updater {
    server: SocketAddr,
    zone: Name,
    key: String,
    signer: TSigner,
}

impl std::fmt::Debug for Updater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Updater")
            .field("server", &self.server)
            .field("zone", &self.zone.to_string())
            .field("key", &self.key)
            .finish()
    }
}

impl Updater {
    /// For `zone` at `server`, signing with `tsig` whose secret is `secret`
    /// (the decoded bytes of the key file's base64).
    pub fn new(
        server: SocketAddr,
        zone: &str,
        tsig: &Tsig,
        secret: Vec<u8>,
    ) -> Result<Updater, DnsError> {
        let key_err = |why: String| DnsError::Key {
            key: tsig.name.clone(),
            why,
        };
        let zone = fqdn(zone).map_err(|e| key_err(format!("zone {zone}: {e}")))?;
        let key_name = fqdn(&tsig.name).map_err(|e| key_err(format!("not a DNS name: {e}")))?;
        let algorithm = match tsig.algorithm {
            TsigAlgo::HmacSha256 => TsigAlgorithm::HmacSha256,
            TsigAlgo::HmacSha384 => TsigAlgorithm::HmacSha384,
            TsigAlgo::HmacSha512 => TsigAlgorithm::HmacSha512,
        };
        let signer =
            TSigner::new(secret, algorithm, key_name, FUDGE).map_err(|e| key_err(e.to_string()))?;
        Ok(Updater {
            server,
            zone,
            key: tsig.name.clone(),
            signer,
        })
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The zone, without its trailing dot.
    pub fn zone(&self) -> String {
        self.zone.to_string().trim_end_matches('.').to_string()
    }

    /// Whether `name` lies in this updater's zone.
    pub fn covers(&self, name: &str) -> bool {
        fqdn(name).is_ok_and(|n| self.zone.zone_of(&n))
    }

    /// Adds the TXT record `value` at `name` (the set's other records stay).
    pub async fn add_txt(&self, name: &str, value: &str) -> Result<(), DnsError> {
        let rrset = self.txt_set(name, value, CHALLENGE_TTL)?;
        let message = update_message::append(rrset, self.zone.clone(), false, false);
        self.update(message, &format!("the update adding TXT {name}"))
            .await
    }

    /// Removes the TXT record `value` at `name`; one that is not there is
    /// no error.
    pub async fn delete_txt(&self, name: &str, value: &str) -> Result<(), DnsError> {
        let rrset = self.txt_set(name, value, 0)?;
        let message = update_message::delete_by_rdata(rrset, self.zone.clone(), false);
        self.update(message, &format!("the update removing TXT {name}"))
            .await
    }

    fn txt_set(&self, name: &str, value: &str, ttl: u32) -> Result<RecordSet, DnsError> {
        let not_in_zone = || DnsError::NotInZone {
            name: name.to_string(),
            zone: self.zone(),
        };
        let owner = fqdn(name).map_err(|_| not_in_zone())?;
        // update_message asserts this: checked here, so it cannot panic.
        if !self.zone.zone_of(&owner) {
            return Err(not_in_zone());
        }
        let mut rrset = RecordSet::with_ttl(owner, RecordType::TXT, ttl);
        rrset.add_rdata(RData::TXT(TXT::new(vec![value.to_string()])));
        Ok(rrset)
    }

    /// Signs `message`, sends it, and reads the answer as RFC 2136 and
    /// RFC 8945 have it.
    async fn update(&self, mut message: Message, what: &str) -> Result<(), DnsError> {
        let server = self.server;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut verifier = message
            .finalize(&self.signer, now)
            .map_err(|e| DnsError::Key {
                key: self.key.clone(),
                why: e.to_string(),
            })?;
        let request = message.to_vec().map_err(malformed(server, what))?;
        let bytes = exchange(server, &request).await?;
        let answer = Message::from_vec(&bytes).map_err(malformed(server, what))?;
        if answer.id != message.id || answer.message_type != MessageType::Response {
            return Err(DnsError::Malformed {
                server,
                what: what.to_string(),
                why: "not the answer to this request".to_string(),
            });
        }
        // A TSIG error comes back unsigned, with NOTAUTH (RFC 8945 §5.3).
        if let Some(error) = answer.signature().and_then(|s| s.data.error) {
            return Err(self.tsig_error(&error));
        }
        match answer.response_code {
            ResponseCode::NoError => {}
            ResponseCode::Refused => {
                return Err(DnsError::Refused {
                    server,
                    zone: self.zone(),
                    key: self.key.clone(),
                })
            }
            ResponseCode::NotAuth | ResponseCode::NotZone => {
                let rcode = if answer.response_code == ResponseCode::NotAuth {
                    "NOTAUTH"
                } else {
                    "NOTZONE"
                };
                return Err(DnsError::NotAuthoritative {
                    server,
                    zone: self.zone(),
                    rcode: rcode.to_string(),
                });
            }
            rcode => {
                return Err(DnsError::Rcode {
                    server,
                    what: what.to_string(),
                    rcode: rcode.to_string(),
                })
            }
        }
        // A success must be signed with our key: anything else is not the
        // server we share the key with.
        let verified = verifier.as_mut().map(|v| v.verify(&bytes));
        match verified {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(DnsError::Tsig {
                server,
                key: self.key.clone(),
                why: format!("the answer's signature does not verify ({e})"),
            }),
            None => Ok(()),
        }
    }

    fn tsig_error(&self, error: &TsigError) -> DnsError {
        let why = match error {
            TsigError::BadKey => {
                "BADKEY: the server knows no key of this name and algorithm".to_string()
            }
            TsigError::BadSig => {
                "BADSIG: the secret differs from the server's for this key".to_string()
            }
            TsigError::BadTime => format!(
                "BADTIME: this machine's clock and the server's differ by more than {FUDGE} s"
            ),
            other => format!("{other:?}"),
        };
        DnsError::Tsig {
            server: self.server,
            key: self.key.clone(),
            why,
        }
    }
}

/// The TXT strings `server` serves at `name` right now, asked without
/// recursion: an authoritative server's own view. No such name, or no TXT
/// there, is an empty list.
pub async fn txt(server: SocketAddr, name: &str) -> Result<Vec<String>, DnsError> {
    let answer = query(server, name, RecordType::TXT).await?;
    Ok(answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(t) => Some(
                t.txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s))
                    .collect::<String>(),
            ),
            _ => None,
        })
        .collect())
}

/// A TLSA record as served: usage, selector, matching type, the data in
/// lower-case hex, and its TTL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data_hex: String,
    pub ttl: u32,
}

/// The TLSA records `server` serves at `name` (`_25._tcp.mx.example.org`),
/// asked without recursion.
pub async fn tlsa(server: SocketAddr, name: &str) -> Result<Vec<Tlsa>, DnsError> {
    let answer = query(server, name, RecordType::TLSA).await?;
    Ok(answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::TLSA(t) => Some(Tlsa {
                usage: t.cert_usage.into(),
                selector: t.selector.into(),
                matching: t.matching.into(),
                data_hex: crate::tls::certs::hex(&t.cert_data),
                ttl: r.ttl,
            }),
            _ => None,
        })
        .collect())
}

/// One non-recursive query and its checked answer (NOERROR or NXDOMAIN).
async fn query(server: SocketAddr, name: &str, kind: RecordType) -> Result<Message, DnsError> {
    let what = format!("the query for {kind} {name}");
    let owner = fqdn(name).map_err(malformed(server, &what))?;
    let mut message = Message::query();
    message.metadata.recursion_desired = false;
    message.add_query(Query::query(owner, kind));
    let request = message.to_vec().map_err(malformed(server, &what))?;
    let bytes = exchange(server, &request).await?;
    let answer = Message::from_vec(&bytes).map_err(malformed(server, &what))?;
    if answer.id != message.id {
        return Err(DnsError::Malformed {
            server,
            what,
            why: "not the answer to this query".to_string(),
        });
    }
    match answer.response_code {
        ResponseCode::NoError | ResponseCode::NXDomain => Ok(answer),
        rcode => Err(DnsError::Rcode {
            server,
            what,
            rcode: rcode.to_string(),
        }),
    }
}

/// Maps any error to [`DnsError::Malformed`] about `what` at `server`.
fn malformed<E: std::fmt::Display>(server: SocketAddr, what: &str) -> impl Fn(E) -> DnsError + '_ {
    move |e| DnsError::Malformed {
        server,
        what: what.to_string(),
        why: e.to_string(),
    }
}

/// One request and its answer over TCP (RFC 1035 §4.2.2: each message
/// after its two-byte length), within [`EXCHANGE_TIMEOUT`].
async fn exchange(server: SocketAddr, request: &[u8]) -> Result<Vec<u8>, DnsError> {
    let io = |source| DnsError::Io { server, source };
    let talk = async {
        let mut stream = TcpStream::connect(server).await.map_err(io)?;
        let len = u16::try_from(request.len())
            .map_err(|_| io(std::io::Error::other("request too long")))?;
        let mut framed = Vec::with_capacity(request.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(request);
        stream.write_all(&framed).await.map_err(io)?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.map_err(io)?;
        let len = usize::from(u16::from_be_bytes(len));
        if len > ANSWER_LIMIT {
            return Err(io(std::io::Error::other("answer too long")));
        }
        let mut answer = vec![0u8; len];
        stream.read_exact(&mut answer).await.map_err(io)?;
        Ok(answer)
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, talk)
        .await
        .map_err(|_| DnsError::Timeout { server })?
}

/// `name` as a fully qualified DNS name.
fn fqdn(name: &str) -> Result<Name, hickory_proto::ProtoError> {
    let mut n = Name::from_ascii(name.trim_end_matches('.'))?;
    n.set_fqdn(true);
    Ok(n)
}

/// The owner of the dns-01 record for an identifier (RFC 8555 §8.4): a
/// wildcard's is its base name's.
pub fn challenge_name(identifier: &str) -> String {
    let base = identifier.strip_prefix("*.").unwrap_or(identifier);
    format!("_acme-challenge.{base}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tsig() -> Tsig {
        Tsig {
            name: "portcullis-key".into(),
            algorithm: TsigAlgo::HmacSha256,
            secret_file: "/nonexistent".into(),
        }
    }

    #[test]
    fn challenge_names_follow_rfc_8555() {
        assert_eq!(
            challenge_name("mail.example.org"),
            "_acme-challenge.mail.example.org"
        );
        assert_eq!(
            challenge_name("*.example.org"),
            "_acme-challenge.example.org"
        );
    }

    #[test]
    fn names_outside_the_zone_are_refused_before_anything_is_sent() {
        let addr = "127.0.0.1:9".parse().unwrap();
        let u = Updater::new(addr, "example.org", &tsig(), vec![1; 32]).unwrap();
        assert_eq!(u.zone(), "example.org");
        assert!(u.covers("_acme-challenge.mail.example.org"));
        assert!(u.covers("example.org."));
        assert!(!u.covers("_acme-challenge.example.com"));
        assert!(!u.covers("badexample.org"));
        let e = u
            .txt_set("_acme-challenge.example.com", "v", 60)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "_acme-challenge.example.com is not in zone example.org"
        );
    }

    #[test]
    fn the_secret_never_shows_in_debug_output() {
        let addr = "127.0.0.1:9".parse().unwrap();
        let u = Updater::new(addr, "example.org", &tsig(), b"very-secret-bytes".to_vec()).unwrap();
        let shown = format!("{u:?}");
        assert!(shown.contains("portcullis-key"), "{shown}");
        assert!(!shown.contains("very-secret"), "{shown}");
    }

    #[tokio::test]
    async fn a_dead_server_is_named() {
        // Nothing listens on a just-closed port: refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let e = txt(addr, "example.org").await.unwrap_err();
        assert!(
            e.to_string().starts_with(&format!("DNS server {addr}: ")),
            "{e}"
        );
    }
}
