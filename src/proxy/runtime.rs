//! What the operator sees and steers of the running proxy without a reload
//! (HAProxy's runtime API): the live sessions, and which listeners and
//! backends are drained. Owns no socket and does no I/O: the accept loop
//! registers each connection ([`Runtime::register`]) and reads its
//! listener's [`Gate`]; a session reads its backend's [`BackendGate`] and
//! records connect failures there; the control socket (`ops`) reads it all.
//!
//! One [`Runtime`] per server, kept across reloads. The server tells it what
//! the config names ([`Runtime::configure`]): a gate (and its drained state)
//! lives as long as its listener or backend does.
//!
//! Cost: a session is one `Arc<Live>` (208 bytes with the Arc's counts, see
//! the test) in one of 16 maps (a slot of about 20 bytes), inserted at
//! accept and removed on drop; its backend and SNI are kept in it (an SNI
//! over 63 bytes in a box of its own). Its byte counts are the relay's own
//! adds, on the session's atomics. Nothing is walked unless someone asks.
//!
//! Its size is measured, not chosen for looks: at 96 bytes the entry
//! shared mimalloc's size class with the handshake's short-lived
//! allocations and pinned their pages, 1.15 KiB of RSS per idle session
//! (`cargo bench --bench compare -- --quick --workloads 4`: 9.25 → 10.4
//! KiB/session; 9.71 with glibc's malloc). At this size it costs about
//! its own size: 9.57 → 9.85 KiB per idle session at 9,000 sessions, and
//! nothing measurable at 2,000.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;

use super::relay::Bytes;

/// Session maps: a power of two, so an insert rarely waits on another.
const SHARDS: usize = 16;

/// A session's id: a counter, unique for the life of the process, shown in
/// hex (`session=1f` in every log line of the session, `portcullis sessions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A listener's switch: drained, its sockets stay bound and every new
/// connection is turned away at accept.
#[derive(Debug)]
pub struct Gate {
    name: Box<str>,
    drained: AtomicBool,
}

impl Gate {
    fn new(name: &str) -> Arc<Gate> {
        Arc::new(Gate {
            name: name.into(),
            drained: AtomicBool::new(false),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }
}

/// A backend's switch and its failures, for `portcullis status`.
#[derive(Debug, Default)]
pub struct BackendGate {
    drained: AtomicBool,
    failures: AtomicU64,
    last_error: Mutex<Option<(SystemTime, String)>>,
}

impl BackendGate {
    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    /// A connect (or greeting) that failed.
    pub fn failed(&self, error: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((SystemTime::now(), error));
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The last failure and when it happened.
    pub fn last_error(&self) -> Option<(SystemTime, String)> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// One live session. Kept small: an idle IMAP session is mostly this, two
/// sockets and rustls's state.
#[derive(Debug)]
pub struct Live {
    listener: Arc<Gate>,
    client: SocketAddr,
    /// Seconds after [`Runtime::epoch`].
    started: u32,
    bytes: Bytes,
    /// Set once the session is routed.
    routed: OnceLock<Routed>,
}

#[derive(Debug)]
struct Routed {
    sni: Sni,
    backend: SocketAddr,
}

/// Longest SNI kept inline; a longer one gets a box.
const SNI_INLINE: usize = 63;

/// A session's SNI, in the entry itself when it is short (nearly always).
#[derive(Debug)]
enum Sni {
    None,
    Inline { len: u8, bytes: [u8; SNI_INLINE] },
    Boxed(Box<str>),
}

impl Sni {
    fn new(name: Option<&str>) -> Sni {
        match name {
            None => Sni::None,
            Some(n) if n.len() <= SNI_INLINE => {
                let mut bytes = [0u8; SNI_INLINE];
                bytes[..n.len()].copy_from_slice(n.as_bytes());
                Sni::Inline {
                    len: n.len() as u8,
                    bytes,
                }
            }
            Some(n) => Sni::Boxed(Box::from(n)),
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Sni::None => None,
            Sni::Inline { len, bytes } => std::str::from_utf8(bytes.get(..usize::from(*len))?).ok(),
            Sni::Boxed(b) => Some(b),
        }
    }
}

impl Live {
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The session's SNI (if any) and backend, once it has them.
    pub fn routed(&self, sni: Option<&str>, backend: SocketAddr) {
        let _ = self.routed.set(Routed {
            sni: Sni::new(sni),
            backend,
        });
    }
}

/// A session's place in the registry; dropping it removes the session.
#[derive(Debug)]
pub struct Registered {
    id: SessionId,
    live: Arc<Live>,
    runtime: Arc<Runtime>,
}

impl Registered {
    pub fn id(&self) -> SessionId {
        self.id
    }

    pub fn live(&self) -> &Live {
        &self.live
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.runtime.shard(self.id).remove(&self.id.0);
    }
}

/// A live session as `portcullis sessions` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: SessionId,
    pub listener: String,
    pub client: SocketAddr,
    pub sni: Option<String>,
    pub backend: Option<SocketAddr>,
    pub age: Duration,
    pub up: u64,
    pub down: u64,
}

/// What the config names, as the server last published it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// Listener name → its bound addresses.
    pub listeners: BTreeMap<String, Vec<SocketAddr>>,
    /// Backend → the listeners that route to it.
    pub backends: BTreeMap<SocketAddr, Vec<String>>,
}

/// What `drain` or `enable` named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Listener(String),
    Backend(SocketAddr),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Listener(n) => write!(f, "listener {n}"),
            Target::Backend(a) => write!(f, "backend {a}"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("no listener is named {0:?} (listeners: {1})")]
    NoListener(String, String),
    #[error("no backend has the address {0} (backends: {1})")]
    NoBackend(SocketAddr, String),
}

/// The live sessions and the drain switches of one server.
#[derive(Debug)]
pub struct Runtime {
    next: AtomicU64,
    epoch: Instant,
    shards: [Mutex<HashMap<u64, Arc<Live>>>; SHARDS],
    listeners: Mutex<BTreeMap<String, Arc<Gate>>>,
    backends: Mutex<BTreeMap<SocketAddr, Arc<BackendGate>>>,
    /// Written by the server only (one writer).
    topology: ArcSwap<Topology>,
}

impl Default for Runtime {
    fn default() -> Runtime {
        Runtime {
            next: AtomicU64::new(1),
            epoch: Instant::now(),
            shards: std::array::from_fn(|_| Mutex::default()),
            listeners: Mutex::default(),
            backends: Mutex::default(),
            topology: ArcSwap::default(),
        }
    }
}

impl Runtime {
    pub fn new() -> Arc<Runtime> {
        Arc::new(Runtime::default())
    }

    fn shard(&self, id: SessionId) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Live>>> {
        self.shards[(id.0 as usize) % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The gate of listener `name`: the same one across reloads while the
    /// config names the listener.
    pub fn gate(&self, name: &str) -> Arc<Gate> {
        let mut gates = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        gates
            .entry(name.to_string())
            .or_insert_with(|| Gate::new(name))
            .clone()
    }

    /// The gate of a backend the config names; `None` for one it no longer
    /// does (a session routed by the previous config).
    pub fn backend(&self, address: SocketAddr) -> Option<Arc<BackendGate>> {
        self.backends
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&address)
            .cloned()
    }

    /// What the config names now: gates of listeners and backends it no
    /// longer names are forgotten (with their drained state), the others
    /// kept as they are.
    pub fn configure(&self, topology: Topology) {
        {
            let mut gates = self
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            gates.retain(|name, _| topology.listeners.contains_key(name));
            for name in topology.listeners.keys() {
                gates.entry(name.clone()).or_insert_with(|| Gate::new(name));
            }
        }
        {
            let mut gates = self.backends.lock().unwrap_or_else(PoisonError::into_inner);
            gates.retain(|a, _| topology.backends.contains_key(a));
            for a in topology.backends.keys() {
                gates.entry(*a).or_default();
            }
        }
        self.topology.store(Arc::new(topology));
    }

    pub fn topology(&self) -> Arc<Topology> {
        self.topology.load_full()
    }

    /// A listener name, or a backend's `address:port` (listener names
    /// cannot hold a `:`), that the config names now.
    pub fn target(&self, name: &str) -> Result<Target, TargetError> {
        let topology = self.topology.load();
        match name.parse::<SocketAddr>() {
            Ok(a) if topology.backends.contains_key(&a) => Ok(Target::Backend(a)),
            Ok(a) => Err(TargetError::NoBackend(
                a,
                list(topology.backends.keys().map(ToString::to_string)),
            )),
            Err(_) if topology.listeners.contains_key(name) => {
                Ok(Target::Listener(name.to_string()))
            }
            Err(_) => Err(TargetError::NoListener(
                name.to_string(),
                list(topology.listeners.keys().cloned()),
            )),
        }
    }

    /// Drains (`true`) or enables a listener or backend; whether that
    /// changed anything.
    pub fn set_drained(&self, target: &Target, drained: bool) -> bool {
        let flag = match target {
            Target::Listener(name) => self.gate(name),
            Target::Backend(a) => match self.backend(*a) {
                Some(g) => return g.drained.swap(drained, Ordering::Relaxed) != drained,
                None => return false,
            },
        };
        flag.drained.swap(drained, Ordering::Relaxed) != drained
    }

    /// What is drained now, by the names `drain` takes: listener names and
    /// backend addresses (handed to a new process on upgrade).
    pub fn drained(&self) -> Vec<String> {
        let topology = self.topology();
        let listeners = topology
            .listeners
            .keys()
            .filter(|name| self.listener_drained(name))
            .cloned();
        let backends = topology
            .backends
            .keys()
            .filter(|a| self.backend(**a).is_some_and(|g| g.is_drained()))
            .map(ToString::to_string);
        listeners.chain(backends).collect()
    }

    /// Whether a listener is drained now.
    pub fn listener_drained(&self, name: &str) -> bool {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .is_some_and(|g| g.is_drained())
    }

    /// A new session of `listener` from `client`; it is listed until the
    /// returned guard drops.
    pub fn register(self: &Arc<Self>, listener: Arc<Gate>, client: SocketAddr) -> Registered {
        let id = SessionId(self.next.fetch_add(1, Ordering::Relaxed));
        let started = u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX);
        let live = Arc::new(Live {
            listener,
            client,
            started,
            bytes: Bytes::default(),
            routed: OnceLock::new(),
        });
        self.shard(id).insert(id.0, live.clone());
        Registered {
            id,
            live,
            runtime: self.clone(),
        }
    }

    /// Open sessions per listener name.
    pub fn open_by_listener(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        self.each(|live| *out.entry(live.listener.name().to_string()).or_default() += 1);
        out
    }

    /// Open sessions routed to `backend`.
    pub fn open_on_backend(&self, backend: SocketAddr) -> usize {
        let mut n = 0;
        self.each(|live| {
            if live.routed.get().is_some_and(|r| r.backend == backend) {
                n += 1;
            }
        });
        n
    }

    /// Every live session, one shard locked at a time.
    fn each(&self, mut f: impl FnMut(&Live)) {
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.values().for_each(|l| f(l));
        }
    }

    /// The live sessions (of `listener` only, if given), oldest first, at
    /// most `limit` of them; and how many there are in all.
    pub fn sessions(&self, listener: Option<&str>, limit: usize) -> (Vec<SessionInfo>, usize) {
        let mut found: Vec<(u64, Arc<Live>)> = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            found.extend(
                shard
                    .iter()
                    .filter(|(_, l)| listener.is_none_or(|n| l.listener.name() == n))
                    .map(|(id, l)| (*id, l.clone())),
            );
        }
        let total = found.len();
        found.sort_unstable_by_key(|(id, _)| *id);
        found.truncate(limit);
        let now = self.epoch.elapsed().as_secs();
        let rows = found
            .into_iter()
            .map(|(id, l)| {
                let routed = l.routed.get();
                SessionInfo {
                    id: SessionId(id),
                    listener: l.listener.name().to_string(),
                    client: l.client,
                    sni: routed.and_then(|r| r.sni.as_str().map(str::to_string)),
                    backend: routed.map(|r| r.backend),
                    age: Duration::from_secs(now.saturating_sub(u64::from(l.started))),
                    up: l.bytes.up.load(Ordering::Relaxed),
                    down: l.bytes.down.load(Ordering::Relaxed),
                }
            })
            .collect();
        (rows, total)
    }
}

fn list(names: impl Iterator<Item = String>) -> String {
    let names: Vec<String> = names.collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        Topology {
            listeners: [("imaps".to_string(), vec!["127.0.0.1:993".parse().unwrap()])].into(),
            backends: [("127.0.0.1:143".parse().unwrap(), vec!["imaps".to_string()])].into(),
        }
    }

    #[test]
    fn a_session_is_listed_until_its_guard_drops() {
        let rt = Runtime::new();
        rt.configure(topology());
        let gate = rt.gate("imaps");
        let a = rt.register(gate.clone(), "127.0.0.2:5000".parse().unwrap());
        let b = rt.register(gate, "127.0.0.3:5000".parse().unwrap());
        assert_ne!(a.id(), b.id());
        b.live()
            .routed(Some("mail.example.org"), "127.0.0.1:143".parse().unwrap());
        b.live().bytes().up.fetch_add(7, Ordering::Relaxed);
        let (rows, total) = rt.sessions(None, 1000);
        assert_eq!(total, 2);
        assert_eq!(rows[1].sni.as_deref(), Some("mail.example.org"));
        assert_eq!(rows[1].up, 7);
        let (rows, total) = rt.sessions(None, 1);
        assert_eq!((rows.len(), total), (1, 2));
        assert_eq!(rt.sessions(Some("smtps"), 10).1, 0);
        assert_eq!(rt.open_by_listener()["imaps"], 2);
        drop(a);
        assert_eq!(rt.sessions(None, 1000).1, 1);
    }

    #[test]
    fn drained_state_survives_a_reload_that_keeps_the_name() {
        let rt = Runtime::new();
        rt.configure(topology());
        let imaps = rt.target("imaps").unwrap();
        assert!(rt.set_drained(&imaps, true));
        assert!(!rt.set_drained(&imaps, true), "already drained");
        let backend = rt.target("127.0.0.1:143").unwrap();
        assert!(rt.set_drained(&backend, true));
        rt.configure(topology());
        assert!(rt.gate("imaps").is_drained());
        assert!(rt
            .backend("127.0.0.1:143".parse().unwrap())
            .unwrap()
            .is_drained());
        rt.configure(Topology::default());
        rt.configure(topology());
        assert!(!rt.gate("imaps").is_drained(), "gone, then new");
        assert!(matches!(
            rt.target("pop3s"),
            Err(TargetError::NoListener(..))
        ));
        assert!(matches!(
            rt.target("127.0.0.1:1"),
            Err(TargetError::NoBackend(..))
        ));
    }

    /// Issue 18 counts the bytes of an idle session: the entry is one
    /// allocation of the size the module docs say was measured.
    #[test]
    fn a_session_entry_is_one_allocation_of_the_measured_size() {
        let live = std::mem::size_of::<Live>();
        assert!((176..=200).contains(&live), "{live}");
        assert!(std::mem::size_of::<Registered>() <= 24);
        for name in [
            None,
            Some("mail.example.org"),
            Some(&*"a".repeat(63)),
            Some(&*"b".repeat(64)),
            Some(&*"c".repeat(253)),
        ] {
            assert_eq!(Sni::new(name).as_str(), name);
        }
        assert!(matches!(
            Sni::new(Some(&"a".repeat(63))),
            Sni::Inline { .. }
        ));
        assert!(matches!(Sni::new(Some(&"a".repeat(64))), Sni::Boxed(_)));
    }
}
