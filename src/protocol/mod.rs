//! What each mail protocol says to a client, in that protocol's own words.
//! Pure: no sockets here. The STARTTLS dialogues will live beside these.

pub mod imap;
pub mod pop3;
pub mod smtp;

use crate::config::Protocol;

/// The line a client gets when its session cannot reach a backend, or `None`
/// where the protocol has no words for it (`tcp`: the connection just closes).
pub fn unavailable(protocol: Protocol, hostname: &str) -> Option<Vec<u8>> {
    match protocol {
        Protocol::Imap => Some(imap::BYE_UNAVAILABLE.to_vec()),
        Protocol::Pop3 => Some(pop3::ERR_UNAVAILABLE.to_vec()),
        Protocol::Smtp => Some(smtp::unavailable(hostname)),
        Protocol::Sieve | Protocol::Tcp | Protocol::Http => None,
    }
}
