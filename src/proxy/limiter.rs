//! Per-client-address limits of one listener: how many connections an
//! address may hold open, and how fast it may open new ones (a token
//! bucket; on implicit-TLS ports each new connection is a handshake). One
//! slowloris address must not starve everyone else of `max_connections`.
//!
//! ```text
//! accept ─▶ admit(ip) ─ exempt ──────────────▶ no slot: unlimited
//!                     ├ open < cap, a token ─▶ Slot (dropped with the connection)
//!                     └ otherwise ───────────▶ Refusal (per_ip_connections | per_ip_rate)
//! ```
//!
//! IPv6 clients count per /64 (one customer's prefix), and their /48 (one
//! site, as tunnel brokers and many hosters hand out) may hold at most
//! [`SITE_FACTOR`] times the cap of one: a /48 holds 65,536 /64s, each of
//! which alone could otherwise take a full share. IPv4-mapped IPv6 clients
//! count as the IPv4 address they are. One [`ClientLimiter`] per listener
//! lives across reloads: a connection's [`Slot`] returns to the limiter it
//! came from, whatever the configuration is by then. An address with
//! nothing open and a full bucket has no entry; the map is swept every
//! [`SWEEP_EVERY`] or when it has doubled, so it holds little more than the
//! addresses with connections open.
//!
//! This module decides and logs; it never touches a socket.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::config::Limits;

/// How often idle entries are dropped, at the latest.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Below this many entries, only time triggers a sweep.
const SWEEP_MIN_LEN: usize = 1024;
/// At most one warning per address and listener this often.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// One token in the bucket's units (millionths): refills add up exactly,
/// with no floating point.
const TOKEN: u64 = 1_000_000;

/// A /48 may hold this many times `connections_per_ip`, across its /64s.
pub const SITE_FACTOR: u32 = 4;

/// Whom a limit counts: an IPv4 address, an IPv6 /64, or (for the
/// connection cap only) an IPv6 /48.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(Ipv4Addr),
    /// The upper 64 bits of the address.
    V6(u64),
    /// The upper 48 bits of the address, shifted right by 16.
    V6Site(u64),
}

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match unmapped(ip) {
            IpAddr::V4(v4) => ClientKey::V4(v4),
            IpAddr::V6(v6) => ClientKey::V6((u128::from(v6) >> 64) as u64),
        }
    }

    /// The /48 an IPv6 client's /64 is in; `None` for IPv4.
    fn site(self) -> Option<ClientKey> {
        match self {
            ClientKey::V6(prefix) => Some(ClientKey::V6Site(prefix >> 16)),
            _ => None,
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientKey::V4(a) => write!(f, "{a}"),
            ClientKey::V6(prefix) => write!(f, "{}/64", Ipv6Addr::from(u128::from(*prefix) << 64)),
            ClientKey::V6Site(prefix) => {
                write!(f, "{}/48", Ipv6Addr::from(u128::from(*prefix) << 80))
            }
        }
    }
}

/// `::ffff:192.0.2.1` (a dual-stack socket's IPv4 client) as `192.0.2.1`.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Which limit turned a client away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `connections_per_ip` connections already open.
    Connections,
    /// No token left: more than `handshake_burst` at once, or faster than
    /// `handshakes_per_ip` per second.
    Rate,
}

impl Reason {
    /// The `reason` label of `portcullis_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Connections => "per_ip_connections",
            Reason::Rate => "per_ip_rate",
        }
    }

    /// What the client is told, in its protocol's framing.
    pub fn phrase(self) -> &'static str {
        match self {
            Reason::Connections => "Too many connections from your address, try again later",
            Reason::Rate => "Too many connections per second from your address, try again later",
        }
    }

    /// Seconds an HTTP client should wait (`Retry-After`): a token comes
    /// back within a second; an open connection may last much longer.
    pub fn retry_after(self) -> u64 {
        match self {
            Reason::Connections => 60,
            Reason::Rate => 1,
        }
    }

    /// The limit as configured, for the log (`key` says whether a /48's).
    fn limit(self, limits: &Limits, key: ClientKey) -> String {
        match self {
            Reason::Connections if matches!(key, ClientKey::V6Site(_)) => format!(
                "connections_per_ip={} (x{SITE_FACTOR} for a /48)",
                limits.connections_per_ip
            ),
            Reason::Connections => format!("connections_per_ip={}", limits.connections_per_ip),
            Reason::Rate => format!(
                "handshakes_per_ip={} handshake_burst={}",
                limits.handshakes_per_ip, limits.handshake_burst
            ),
        }
    }
}

/// One address's state on one listener.
#[derive(Debug)]
struct Client {
    open: u32,
    /// The bucket as of `refilled`, in [`TOKEN`] units.
    tokens: u64,
    refilled: Instant,
    /// When the bucket is full again if nothing more is taken.
    full_at: Instant,
    /// The last warning about this address.
    warned: Option<Instant>,
    /// Refusals since that warning.
    unreported: u64,
    /// The last refusal's reason and limit, for a late summary.
    last: Option<(Reason, String)>,
}

impl Client {
    fn new(limits: &Limits, now: Instant) -> Client {
        Client {
            open: 0,
            tokens: u64::from(limits.handshake_burst) * TOKEN,
            refilled: now,
            full_at: now,
            warned: None,
            unreported: 0,
            last: None,
        }
    }

    /// Nothing open, the bucket full, no warning within the minute: as
    /// good as no entry at all.
    fn idle(&self, now: Instant) -> bool {
        self.open == 0
            && now >= self.full_at
            && self
                .warned
                .is_none_or(|t| now.saturating_duration_since(t) >= WARN_EVERY)
    }

    /// Takes a token if there is one.
    fn take(&mut self, limits: &Limits, now: Instant) -> bool {
        // `rate` tokens a second are `rate / 1000` units a nanosecond.
        let rate = u128::from(limits.handshakes_per_ip.max(1));
        let burst = u64::from(limits.handshake_burst) * TOKEN;
        let elapsed = now.saturating_duration_since(self.refilled).as_nanos();
        let refill = elapsed.saturating_mul(rate) / 1000;
        let tokens = u128::from(self.tokens).saturating_add(refill);
        self.tokens = u64::try_from(tokens).unwrap_or(u64::MAX).min(burst);
        self.refilled = now;
        if self.tokens < TOKEN {
            return false;
        }
        self.tokens -= TOKEN;
        let missing = u128::from(burst - self.tokens) * 1000 / rate;
        let refill = Duration::from_nanos(u64::try_from(missing).unwrap_or(u64::MAX));
        self.full_at = now.checked_add(refill).unwrap_or(now);
        true
    }
}

/// A log line owed, written after the lock is released.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// The first refusal of an address within a minute, or a summary.
    Warn {
        key: ClientKey,
        reason: Reason,
        limit: String,
        refused: u64,
    },
    Debug {
        key: ClientKey,
        reason: Reason,
    },
}

#[derive(Debug)]
struct State {
    clients: HashMap<ClientKey, Client>,
    next_sweep: Option<Instant>,
    sweep_at_len: usize,
}

/// The per-address limits of one listener; see the module docs.
#[derive(Debug)]
pub struct ClientLimiter {
    listener: String,
    state: Mutex<State>,
}

/// A connection's place in its address's count (and its /48's); dropping
/// it frees the place.
#[derive(Debug)]
pub struct Slot {
    limiter: Arc<ClientLimiter>,
    key: ClientKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limiter.release_slot(self.key, Instant::now());
    }
}

/// Why and whom a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub client: ClientKey,
}

impl ClientLimiter {
    pub fn new(listener: &str) -> Arc<ClientLimiter> {
        Arc::new(ClientLimiter {
            listener: listener.to_string(),
            state: Mutex::new(State {
                clients: HashMap::new(),
                next_sweep: None,
                sweep_at_len: SWEEP_MIN_LEN,
            }),
        })
    }

    /// A new connection from `ip` under `limits` (the listener's settings
    /// now): a slot to hold for its life (`None`: exempt, not counted), or
    /// why it is refused. Logs refusals, at most one warning per address a
    /// minute.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Result<Option<Slot>, Refusal> {
        self.admit_at(ip, limits, Instant::now())
    }

    fn admit_at(
        self: &Arc<Self>,
        ip: IpAddr,
        limits: &Limits,
        now: Instant,
    ) -> Result<Option<Slot>, Refusal> {
        let plain = unmapped(ip);
        if limits.exempt.iter().any(|n| n.contains(&plain)) {
            return Ok(None);
        }
        let key = ClientKey::of(ip);
        let site = key.site();
        let (verdict, lines) = {
            let mut state = self.lock();
            let mut lines = state.sweep(now);
            let site_cap = limits.connections_per_ip.saturating_mul(SITE_FACTOR);
            let site_full = site
                .and_then(|s| state.clients.get(&s))
                .is_some_and(|c| c.open >= site_cap);
            let client = state
                .clients
                .entry(key)
                .or_insert_with(|| Client::new(limits, now));
            let verdict = if client.open >= limits.connections_per_ip {
                Err((Reason::Connections, key))
            } else if site_full {
                Err((Reason::Connections, site.unwrap_or(key)))
            } else if !client.take(limits, now) {
                Err((Reason::Rate, key))
            } else {
                client.open += 1;
                Ok(())
            };
            match verdict {
                Err((reason, whom)) => {
                    let counted = state
                        .clients
                        .entry(whom)
                        .or_insert_with(|| Client::new(limits, now));
                    lines.push(refused(counted, whom, reason, limits, now));
                }
                Ok(()) => {
                    if let Some(s) = site {
                        let c = state
                            .clients
                            .entry(s)
                            .or_insert_with(|| Client::new(limits, now));
                        c.open += 1;
                    }
                }
            }
            (verdict, lines)
        };
        self.log(&lines);
        match verdict {
            Ok(()) => Ok(Some(Slot {
                limiter: self.clone(),
                key,
            })),
            Err((reason, client)) => Err(Refusal { reason, client }),
        }
    }

    /// Frees a connection's place: its address's, and its /48's.
    fn release_slot(&self, key: ClientKey, now: Instant) {
        self.release(key, now);
        if let Some(site) = key.site() {
            self.release(site, now);
        }
    }

    fn release(&self, key: ClientKey, now: Instant) {
        let lines = {
            let mut state = self.lock();
            let mut lines = Vec::new();
            if let Some(c) = state.clients.get_mut(&key) {
                c.open = c.open.saturating_sub(1);
                if c.idle(now) {
                    if let Some(line) = summary(key, c) {
                        lines.push(line);
                    }
                    state.clients.remove(&key);
                }
            }
            lines
        };
        self.log(&lines);
    }

    /// Addresses with an entry now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().clients.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere mid-update leaves counts, not a broken map.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log(&self, lines: &[Line]) {
        for line in lines {
            match line {
                Line::Warn {
                    key,
                    reason,
                    limit,
                    refused,
                } => warn!(
                    listener = %self.listener,
                    client.addr = %key,
                    reason = reason.label(),
                    limit = limit.as_str(),
                    refused,
                    "connections refused: per-address limit"
                ),
                Line::Debug { key, reason } => debug!(
                    listener = %self.listener,
                    client.addr = %key,
                    reason = reason.label(),
                    "connection refused: per-address limit"
                ),
            }
        }
    }
}

/// Counts a refusal; a warning when none was given within the minute.
fn refused(c: &mut Client, key: ClientKey, reason: Reason, limits: &Limits, now: Instant) -> Line {
    c.unreported += 1;
    let limit = reason.limit(limits, key);
    let due = c
        .warned
        .is_none_or(|t| now.saturating_duration_since(t) >= WARN_EVERY);
    if !due {
        c.last = Some((reason, limit));
        return Line::Debug { key, reason };
    }
    c.warned = Some(now);
    c.last = None;
    Line::Warn {
        key,
        reason,
        limit,
        refused: std::mem::take(&mut c.unreported),
    }
}

/// The warning for refusals not yet reported, as an entry goes away.
fn summary(key: ClientKey, c: &mut Client) -> Option<Line> {
    let (reason, limit) = c.last.take()?;
    Some(Line::Warn {
        key,
        reason,
        limit,
        refused: std::mem::take(&mut c.unreported),
    })
}

impl State {
    /// Drops idle entries when it is time, or when the map has doubled
    /// since the last sweep (so a flood of new addresses costs O(1) each).
    fn sweep(&mut self, now: Instant) -> Vec<Line> {
        let due = self.next_sweep.is_none_or(|t| now >= t);
        if !due && self.clients.len() < self.sweep_at_len {
            return Vec::new();
        }
        let mut lines = Vec::new();
        self.clients.retain(|key, c| {
            if !c.idle(now) {
                return true;
            }
            lines.extend(summary(*key, c));
            false
        });
        self.next_sweep = Some(now + SWEEP_EVERY);
        self.sweep_at_len = SWEEP_MIN_LEN.max(2 * self.clients.len());
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limits(connections: u32, rate: u32, burst: u32) -> Limits {
        Limits {
            connections_per_ip: connections,
            handshakes_per_ip: rate,
            handshake_burst: burst,
            exempt: Vec::new(),
        }
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let a = ClientKey::of(ip("2001:db8:1:2:aaaa::1"));
        assert_eq!(a, ClientKey::of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")));
        assert_ne!(a, ClientKey::of(ip("2001:db8:1:3::1")));
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        let v4 = ClientKey::of(ip("192.0.2.7"));
        assert_eq!(v4, ClientKey::of(ip("::ffff:192.0.2.7")));
        assert_eq!(v4.to_string(), "192.0.2.7");
        assert_ne!(v4, ClientKey::of(ip("192.0.2.8")));
        // IPv4-compatible (deprecated) and NAT64 addresses are IPv6 clients
        assert_eq!(
            ClientKey::of(ip("64:ff9b::192.0.2.7")).to_string(),
            "64:ff9b::/64"
        );
        assert_eq!(ClientKey::of(ip("::192.0.2.7")).to_string(), "::/64");
    }

    #[test]
    fn the_connection_cap_counts_open_slots_per_address() {
        let l = ClientLimiter::new("imaps");
        let lim = limits(2, 1000, 1000);
        let now = Instant::now();
        let a = l.admit_at(ip("192.0.2.1"), &lim, now).unwrap();
        let b = l.admit_at(ip("::ffff:192.0.2.1"), &lim, now).unwrap();
        let refused = l.admit_at(ip("192.0.2.1"), &lim, now).unwrap_err();
        assert_eq!(refused.reason, Reason::Connections);
        assert_eq!(refused.client.to_string(), "192.0.2.1");
        // another address is not affected; one /64 is one client
        let c = l.admit_at(ip("2001:db8::1"), &lim, now).unwrap();
        let d = l.admit_at(ip("2001:db8::2"), &lim, now).unwrap();
        assert!(l.admit_at(ip("2001:db8::3"), &lim, now).is_err());
        assert!(l.admit_at(ip("2001:db8:0:1::3"), &lim, now).is_ok());
        drop(a);
        let _a = l.admit_at(ip("192.0.2.1"), &lim, now).unwrap();
        drop((b, c, d));
    }

    #[test]
    fn a_48_holds_at_most_a_few_times_the_cap_of_one_address() {
        let l = ClientLimiter::new("imaps");
        let lim = limits(2, 1000, 1000);
        let now = Instant::now();
        let mut held = Vec::new();
        // 2 each from four /64s of one /48: 8, its share
        for subnet in 0..SITE_FACTOR {
            for host in 1..=2 {
                let addr = format!("2001:db8:7:{subnet:x}::{host}");
                held.push(l.admit_at(ip(&addr), &lim, now).unwrap());
            }
        }
        let refused = l.admit_at(ip("2001:db8:7:ff::1"), &lim, now).unwrap_err();
        assert_eq!(refused.reason, Reason::Connections);
        assert_eq!(refused.client.to_string(), "2001:db8:7::/48");
        // another /48 is not affected
        assert!(l.admit_at(ip("2001:db8:8::1"), &lim, now).is_ok());
        // one closes: a place in the /48 again
        held.pop();
        assert!(l.admit_at(ip("2001:db8:7:ff::1"), &lim, now).is_ok());
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let l = ClientLimiter::new("imaps");
        let lim = limits(1000, 2, 3);
        let t0 = Instant::now();
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(l.admit_at(ip("192.0.2.1"), &lim, t0).unwrap());
        }
        let r = l.admit_at(ip("192.0.2.1"), &lim, t0).unwrap_err();
        assert_eq!(r.reason, Reason::Rate);
        // refused attempts take no token: half a second later, one is back
        assert!(l
            .admit_at(ip("192.0.2.1"), &lim, t0 + Duration::from_millis(400))
            .is_err());
        held.push(
            l.admit_at(ip("192.0.2.1"), &lim, t0 + Duration::from_millis(500))
                .unwrap(),
        );
        assert!(l
            .admit_at(ip("192.0.2.1"), &lim, t0 + Duration::from_millis(500))
            .is_err());
        // another address has its own bucket
        assert!(l.admit_at(ip("192.0.2.2"), &lim, t0).is_ok());
        // never more than the burst, however long the wait
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            held.push(l.admit_at(ip("192.0.2.1"), &lim, later).unwrap());
        }
        assert!(l.admit_at(ip("192.0.2.1"), &lim, later).is_err());
    }

    #[test]
    fn exempt_networks_are_never_limited_or_counted() {
        let l = ClientLimiter::new("imaps");
        let mut lim = limits(1, 1, 1);
        lim.exempt = vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/48".parse().unwrap(),
        ];
        let now = Instant::now();
        for addr in ["10.1.2.3", "::ffff:10.1.2.3", "2001:db8:0:7::1"] {
            for _ in 0..100 {
                assert!(l.admit_at(ip(addr), &lim, now).unwrap().is_none(), "{addr}");
            }
        }
        assert_eq!(l.len(), 0);
        assert!(l.admit_at(ip("11.0.0.1"), &lim, now).unwrap().is_some());
    }

    #[test]
    fn idle_addresses_leave_no_entry() {
        let l = ClientLimiter::new("imaps");
        let lim = limits(10, 10, 10);
        let t0 = Instant::now();
        // a connection that lasts past the bucket's refill goes at close
        let slot = l.admit_at(ip("192.0.2.1"), &lim, t0).unwrap().unwrap();
        assert_eq!(l.len(), 1);
        std::mem::forget(slot); // released by hand below, at a chosen time
        l.release_slot(ClientKey::of(ip("192.0.2.1")), t0 + Duration::from_secs(1));
        assert_eq!(l.len(), 0);
        // short ones go at the next sweep
        for i in 0..50u8 {
            let s = l
                .admit_at(IpAddr::from([192, 0, 2, i]), &lim, t0)
                .unwrap()
                .unwrap();
            std::mem::forget(s);
            l.release_slot(ClientKey::of(IpAddr::from([192, 0, 2, i])), t0);
        }
        assert_eq!(l.len(), 50);
        let later = t0 + SWEEP_EVERY + Duration::from_secs(1);
        let _s = l.admit_at(ip("198.51.100.1"), &lim, later).unwrap();
        assert_eq!(l.len(), 1, "only the open one is left");
    }

    #[test]
    fn a_flood_of_new_addresses_is_swept_by_size() {
        let l = ClientLimiter::new("imaps");
        let lim = limits(10, 1, 1);
        let t0 = Instant::now();
        // one connection each from many /64s, all closed at once
        for i in 0..(4 * SWEEP_MIN_LEN as u64) {
            let addr = IpAddr::from(Ipv6Addr::from(
                (0x2001_0db8_u128 << 96) | (u128::from(i) << 64),
            ));
            let t = t0 + Duration::from_secs(2) * (i as u32) / 1000;
            let s = l.admit_at(addr, &lim, t).unwrap().unwrap();
            std::mem::forget(s);
            l.release_slot(ClientKey::of(addr), t);
            assert!(l.len() <= 2 * SWEEP_MIN_LEN + 1, "{} entries", l.len());
        }
    }

    #[test]
    fn a_refused_address_is_warned_about_once_a_minute_with_a_count() {
        let l = ClientLimiter::new("imaps");
        let lim = limits(1, 1000, 1000);
        let t0 = Instant::now();
        let key = ClientKey::of(ip("192.0.2.1"));
        let _held = l.admit_at(ip("192.0.2.1"), &lim, t0).unwrap();
        let mut lines = Vec::new();
        let mut attempt = |at: Instant| {
            let mut state = l.lock();
            let c = state.clients.get_mut(&key).unwrap();
            lines.push(refused(c, key, Reason::Connections, &lim, at));
        };
        attempt(t0);
        for i in 1..=5 {
            attempt(t0 + Duration::from_secs(i));
        }
        attempt(t0 + Duration::from_secs(61));
        let warns: Vec<&Line> = lines
            .iter()
            .filter(|l| matches!(l, Line::Warn { .. }))
            .collect();
        assert_eq!(
            warns,
            [
                &Line::Warn {
                    key,
                    reason: Reason::Connections,
                    limit: "connections_per_ip=1".into(),
                    refused: 1
                },
                &Line::Warn {
                    key,
                    reason: Reason::Connections,
                    limit: "connections_per_ip=1".into(),
                    refused: 6
                },
            ]
        );
        assert_eq!(lines.len(), 7);
    }

    #[test]
    fn refusals_not_yet_reported_are_summed_up_when_the_entry_goes() {
        let l = ClientLimiter::new("imaps");
        let lim = limits(1000, 1, 1);
        let t0 = Instant::now();
        let addr = ip("192.0.2.1");
        drop(l.admit_at(addr, &lim, t0).unwrap());
        for _ in 0..3 {
            assert!(l.admit_at(addr, &lim, t0).is_err());
        }
        let mut state = l.lock();
        assert!(
            state.sweep(t0 + Duration::from_secs(30)).is_empty(),
            "warned within the minute: kept"
        );
        let lines = state.sweep(t0 + Duration::from_secs(61));
        assert_eq!(
            lines,
            [Line::Warn {
                key: ClientKey::of(addr),
                reason: Reason::Rate,
                limit: "handshakes_per_ip=1 handshake_burst=1".into(),
                refused: 2
            }]
        );
        assert!(state.clients.is_empty());
    }

    #[test]
    fn changed_limits_apply_to_the_next_connection_and_counts_stay() {
        let l = ClientLimiter::new("imaps");
        let now = Instant::now();
        let held: Vec<_> = (0..5)
            .map(|_| {
                l.admit_at(ip("192.0.2.1"), &limits(5, 100, 100), now)
                    .unwrap()
            })
            .collect();
        let lower = limits(3, 100, 100);
        assert!(l.admit_at(ip("192.0.2.1"), &lower, now).is_err());
        let mut held = held.into_iter();
        for s in held.by_ref().take(3) {
            drop(s);
        }
        let _one = l.admit_at(ip("192.0.2.1"), &lower, now).unwrap();
        assert!(l.admit_at(ip("192.0.2.1"), &lower, now).is_err());
        assert!(l
            .admit_at(ip("192.0.2.1"), &limits(10, 100, 100), now)
            .is_ok());
    }
}
