//! A real authoritative DNS server for the DNS-01 tests: ISC BIND 9
//! (Debian's `bind9` package, 9.18: `named`), serving test zones on a free
//! loopback port and taking RFC 2136 dynamic updates signed with TSIG
//! (RFC 8945, hmac-sha256).
//!
//! [`Bind::start`] runs `named -g -4 -c DIR/named.conf` as a plain child
//! process, as whoever runs the tests (root in CI: no `-u`, named keeps
//! running as root), with everything in one scratch directory: config, zone
//! files, their journals (`ZONE.zone.jnl`), pid file, session key and log
//! (`-g`: foreground, every log line to stderr, which goes to `named.log`;
//! the config's `logging` would be ignored, so there is none). It listens on
//! 127.0.0.1 only, one port number for UDP and TCP, with IPv6, recursion,
//! NOTIFY, DNSSEC validation and the control channel (`controls { };`: no
//! rndc) all off, and logs every query (`querylog yes`), so a test's failure
//! shows what the client under test (or Pebble's validator) asked.
//!
//! Every zone given to [`Bind::start`] has an SOA, an NS (`ns.ZONE`, with
//! an A record) and an A record `127.0.0.1` for each listed name under it; a
//! listed `*.ZONE` is a wildcard A record. TTLs and the negative-caching TTL
//! are 1 s. The key [`Bind::key_name`] may add and delete TXT and TLSA
//! records anywhere in those zones (`update-policy { grant KEY zonesub TXT
//! TLSA; };`; TLSA for tests/dane.rs) and nothing else: an A record, or any update in [`LOCKED_ZONE`] (served,
//! but static), or any update signed with [`Bind::other_key`] (in the
//! config, granted nothing) is answered REFUSED. A wrong secret is answered
//! NOTAUTH (TSIG error BADSIG), an unknown key name NOTAUTH (BADKEY).
//!
//! The harness itself asks the server only directly, over UDP (TCP when an
//! answer is truncated), with a small DNS client of its own
//! ([`Bind::query`]): no system resolver, no `dig`. Only `named` is needed;
//! tests that send updates with `nsupdate` (package `bind9-dnsutils`) check
//! for it themselves.
//!
//! [`Bind::stop`] kills named (SIGKILL); [`Bind::restart`] starts it again
//! with the same command line, port and directory, and its log continues in
//! the same file. Updates are written to the zone's journal before they are
//! answered, so a restarted named still serves every update it accepted.
//! [`Bind::freeze`] / [`Bind::thaw`] (SIGSTOP / SIGCONT) make a server that
//! is there but silent: queries time out rather than being refused, and
//! whatever was sent meanwhile waits in its socket buffer and is handled at
//! [`Bind::thaw`], even an update its client has long given up on.
//! Dropping a [`Bind`] kills named.
//!
//! What named 9.18 does, for the tests' expectations (measured on
//! loopback): it answers for every zone 30 to 40 ms after its start, 80 to
//! 90 ms after a restart (the kill included); an update is answered in
//! about 40 ms (an `nsupdate` run) and is visible to the next query; a
//! query to a stopped server fails at once (ICMP port unreachable:
//! `ConnectionRefused`). Until its zones are loaded it answers SERVFAIL,
//! which is why the start waits for an authoritative SOA, not a port.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;

use super::tool;

/// Bound on named answering for every zone after a start or restart.
const START: Duration = Duration::from_secs(10);
/// Bound on one query of [`Bind::query`].
pub const QUERY: Duration = Duration::from_secs(2);
/// Pause between two looks in a wait loop.
const POLL: Duration = Duration::from_millis(20);

/// A zone every [`Bind`] serves in which no key may update anything.
pub const LOCKED_ZONE: &str = "locked.test";
/// The key allowed to add and delete TXT records.
const KEY_NAME: &str = "portcullis-acme";
/// The key in the config that is allowed nothing.
const OTHER_KEY_NAME: &str = "intruder";

/// Record types.
pub const A: u16 = 1;
pub const SOA: u16 = 6;
pub const TXT: u16 = 16;
/// Response codes.
pub const NOERROR: u8 = 0;
pub const NXDOMAIN: u8 = 3;
pub const REFUSED: u8 = 5;

/// The programs every BIND test runs; a missing one skips loudly.
pub fn tools(test: &str) -> bool {
    tool("named", test)
}

/// A TSIG key: name and base64 secret.
struct Key {
    name: String,
    secret: String,
}

impl Key {
    fn new(name: &str) -> Key {
        let bytes: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
        Key {
            name: name.to_string(),
            secret: base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    }

    /// The key as `tsig-keygen` prints it (and `named.conf` or
    /// `nsupdate -k` read it).
    fn conf(&self) -> String {
        format!(
            "key \"{}\" {{\n\talgorithm hmac-sha256;\n\tsecret \"{}\";\n}};\n",
            self.name, self.secret
        )
    }
}

/// A running named. Dropping it kills it.
pub struct Bind {
    port: u16,
    /// Every zone served, [`LOCKED_ZONE`] last.
    zones: Vec<String>,
    key: Key,
    other: Key,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

/// One answer of [`Bind::query`].
#[derive(Clone, Debug)]
pub struct Reply {
    /// [`NOERROR`], [`NXDOMAIN`], [`REFUSED`], …
    pub rcode: u8,
    /// The AA bit: the server is authoritative for the name.
    pub authoritative: bool,
    /// The answer section.
    pub answers: Vec<Record>,
}

/// One resource record of an answer section.
#[derive(Clone, Debug)]
pub struct Record {
    /// Lower case, no trailing dot.
    pub name: String,
    pub rtype: u16,
    pub ttl: u32,
    /// The RDATA as received (names in it may be compressed).
    pub data: Vec<u8>,
}

/// Hard bound on one `nsupdate` run (its own timeouts are shorter).
pub const NSUPDATE: Duration = Duration::from_secs(15);

/// `hmac-sha256:NAME:SECRET`, as `nsupdate -y` takes a key.
pub fn key_arg(name: &str, secret: &str) -> String {
    format!("hmac-sha256:{name}:{secret}")
}

impl Bind {
    /// Runs `nsupdate ARGS` with `commands` (after `server 127.0.0.1 PORT`
    /// and `zone ZONE`, before `send`) on stdin: (exit status 0, stdout +
    /// stderr). Every message goes to this server, none to a resolver.
    pub async fn nsupdate(&self, args: &[&str], zone: &str, commands: &[&str]) -> (bool, String) {
        let mut script = format!("server 127.0.0.1 {}\nzone {zone}\n", self.port());
        for c in commands {
            script.push_str(c);
            script.push('\n');
        }
        script.push_str("send\n");
        let (ok, out, err) = super::run_cmd("nsupdate", args, script.as_bytes(), NSUPDATE).await;
        (ok, format!("{out}{err}"))
    }

    /// [`Bind::nsupdate`] signed with this server's key.
    pub async fn update(&self, zone: &str, commands: &[&str]) -> (bool, String) {
        let key = key_arg(self.key_name(), self.secret_b64());
        self.nsupdate(&["-y", &key], zone, commands).await
    }

    /// Starts named on a free port serving `zones` (and [`LOCKED_ZONE`]),
    /// with an A record 127.0.0.1 for each of `names` (each must lie in one
    /// of the zones; `*.ZONE` is a wildcard; the zone's own name gives the
    /// apex an A record). Waits until it answers an SOA query for every
    /// zone; panics with its log after [`START`].
    pub async fn start(zones: &[&str], names: &[&str]) -> Bind {
        let mut all: Vec<String> = zones.iter().map(|z| normalize(z)).collect();
        assert!(
            !all.iter().any(|z| z == LOCKED_ZONE),
            "{LOCKED_ZONE} is the harness's own zone"
        );
        all.push(LOCKED_ZONE.to_string());
        let mut by_zone: Vec<Vec<String>> = vec![Vec::new(); all.len()];
        for name in names {
            let name = normalize(name);
            let zone = all
                .iter()
                .enumerate()
                .filter(|(_, z)| name == **z || name.ends_with(&format!(".{z}")))
                .max_by_key(|(_, z)| z.len())
                .map(|(i, _)| i)
                .unwrap_or_else(|| panic!("{name} is in none of the zones {all:?}"));
            by_zone[zone].push(name);
        }

        let dir = super::scratch();
        let port = free_udp_tcp_port();
        let (key, other) = (Key::new(KEY_NAME), Key::new(OTHER_KEY_NAME));
        let d = dir.path();
        let mut conf = format!(
            r#"options {{
	directory "{d}";
	pid-file "{d}/named.pid";
	session-keyfile "{d}/session.key";
	managed-keys-directory "{d}";
	listen-on port {port} {{ 127.0.0.1; }};
	listen-on-v6 {{ none; }};
	recursion no;
	dnssec-validation no;
	notify no;
	querylog yes;
}};
controls {{ }};
"#,
            d = d.display()
        );
        conf.push_str(&key.conf());
        conf.push_str(&other.conf());
        for (zone, names) in all.iter().zip(&by_zone) {
            let file = format!("{zone}.zone");
            std::fs::write(d.join(&file), zone_file(zone, names)).expect("write a zone file");
            let policy = if zone == LOCKED_ZONE {
                String::new()
            } else {
                format!(" update-policy {{ grant {} zonesub TXT TLSA; }};", key.name)
            };
            conf.push_str(&format!(
                "zone \"{zone}\" {{ type primary; file \"{file}\";{policy} }};\n"
            ));
        }
        std::fs::write(d.join("named.conf"), conf).expect("write named.conf");

        let mut bind = Bind {
            port,
            zones: all,
            key,
            other,
            child: None,
            dir,
        };
        bind.launch().await;
        bind
    }

    /// Runs named and waits until it answers for every zone.
    async fn launch(&mut self) {
        let d = self.dir.path();
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(d.join("named.log"))
            .expect("log file");
        let err = log.try_clone().expect("log file");
        let started = Instant::now();
        self.child = Some(
            Command::new("named")
                .args(["-g", "-4", "-c"])
                .arg(d.join("named.conf"))
                .current_dir(d)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn named: {e}")),
        );

        let deadline = started + START;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("named exited ({status}) while starting:\n{}", self.log());
            }
            if self.zones.iter().all(|z| self.answers_soa(z)) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "named did not answer SOA queries for {:?} within {START:?}:\n{}",
                    self.zones,
                    self.log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Whether an authoritative SOA for `zone` comes back (within 200 ms).
    fn answers_soa(&self, zone: &str) -> bool {
        matches!(
            query(self.addr(), zone, SOA, Duration::from_millis(200)),
            Ok(r) if r.rcode == NOERROR && r.authoritative && r.answers.iter().any(|a| a.rtype == SOA)
        )
    }

    /// Where named listens, UDP and TCP: `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every zone served, in the order given, then [`LOCKED_ZONE`].
    pub fn zones(&self) -> &[String] {
        &self.zones
    }

    /// The name of the key that may add and delete TXT records in every
    /// zone but [`LOCKED_ZONE`].
    pub fn key_name(&self) -> &str {
        &self.key.name
    }

    /// Its secret, base64 (32 random bytes; algorithm hmac-sha256).
    pub fn secret_b64(&self) -> &str {
        &self.key.secret
    }

    /// The key as `tsig-keygen` prints it: `key "NAME" { algorithm
    /// hmac-sha256; secret "…"; };` (what `nsupdate -k FILE` reads).
    pub fn key_conf(&self) -> String {
        self.key.conf()
    }

    /// Writes the base64 secret and a newline to `path`, mode 0600.
    pub fn write_secret_file(&self, path: &Path) {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mut f = std::fs::File::options()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // A file that existed keeps its mode through open(): set it.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .expect("chmod 0600");
        writeln!(f, "{}", self.key.secret).expect("write the secret");
    }

    /// (name, base64 secret) of a second hmac-sha256 key that named knows
    /// but that may update nothing: its updates are answered REFUSED.
    pub fn other_key(&self) -> (&str, &str) {
        (&self.other.name, &self.other.secret)
    }

    /// One query for `name`/`rtype`, straight to this server (never the
    /// system resolver), within [`QUERY`]. An error: no answer (a stopped
    /// server: `ConnectionRefused` at once; a frozen one: `TimedOut`).
    pub fn query(&self, name: &str, rtype: u16) -> std::io::Result<Reply> {
        query(self.addr(), name, rtype, QUERY)
    }

    /// The TXT records served for `name` now, each one's strings joined,
    /// sorted; none for NXDOMAIN or no TXT. Panics with the log if the
    /// server does not answer or answers another error.
    pub fn txt(&self, name: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .answer(name, TXT)
            .iter()
            .map(|r| txt_strings(&r.data).concat())
            .collect();
        out.sort();
        out
    }

    /// The A records served for `name` now (none for NXDOMAIN). Panics
    /// with the log if the server does not answer or answers another error.
    pub fn a(&self, name: &str) -> Vec<Ipv4Addr> {
        self.answer(name, A)
            .iter()
            .filter(|r| r.data.len() == 4)
            .map(|r| Ipv4Addr::new(r.data[0], r.data[1], r.data[2], r.data[3]))
            .collect()
    }

    /// The records of type `rtype` answered for `name`; panics unless the
    /// answer is NOERROR or NXDOMAIN.
    fn answer(&self, name: &str, rtype: u16) -> Vec<Record> {
        let reply = self
            .query(name, rtype)
            .unwrap_or_else(|e| panic!("query {name} type {rtype}: {e}\n{}", self.log()));
        assert!(
            reply.rcode == NOERROR || reply.rcode == NXDOMAIN,
            "query {name} type {rtype}: rcode {}\n{}",
            reply.rcode,
            self.log()
        );
        reply
            .answers
            .into_iter()
            .filter(|r| r.rtype == rtype)
            .collect()
    }

    /// Kills named (SIGKILL) and waits for it: a dead DNS server. Nothing
    /// listens on [`Bind::addr`] until [`Bind::restart`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops named if it runs and starts it again on the same port, config
    /// and zone files (journals included); waits as [`Bind::start`] does.
    pub async fn restart(&mut self) {
        self.stop();
        let mut log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("named.log"))
            .expect("log file");
        let _ = writeln!(log, "--- restart ---");
        self.launch().await;
    }

    /// Stops named with SIGSTOP, and waits until every one of its threads
    /// has stopped: it stays bound but answers nothing, so queries and
    /// updates time out. Whatever arrives meanwhile is queued and handled
    /// at [`Bind::thaw`].
    pub fn freeze(&mut self) {
        if let Some(c) = &self.child {
            rustix::process::kill_process(
                rustix::process::Pid::from_child(c),
                rustix::process::Signal::STOP,
            )
            .expect("SIGSTOP named");
            // kill() returns before every thread has stopped: one still
            // running could answer one more query.
            let deadline = Instant::now() + Duration::from_secs(2);
            while !all_stopped(c.id()) {
                assert!(
                    Instant::now() < deadline,
                    "named's threads did not all stop within 2 s"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Lets a frozen named go on (SIGCONT).
    pub fn thaw(&mut self) {
        if let Some(c) = &self.child {
            rustix::process::kill_process(
                rustix::process::Pid::from_child(c),
                rustix::process::Signal::CONT,
            )
            .expect("SIGCONT named");
        }
    }

    /// Every log line about an update or a bad signature, in order, as
    /// named 9.18 words them: accepted, `…/key K: updating zone 'Z/IN':
    /// adding an RR at 'N' TXT "V"` (also `deleting an RR at`, `deleting
    /// rrset at`); refused, `…/key K: updating zone 'Z/IN': update failed:
    /// rejected by secure update (REFUSED)`, or in a static zone `…/key K:
    /// update 'Z/IN' denied`; a TSIG failure, `request has invalid
    /// signature: TSIG K: tsig verify failure (BADSIG)` (or `(BADKEY)`).
    pub fn update_log(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| {
                l.contains("updating zone")
                    || l.contains(": update '")
                    || l.contains("invalid signature")
            })
            .map(str::to_string)
            .collect()
    }

    /// The scratch directory: named.conf, zone files and journals, log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// named's log (every start, with `--- restart ---` between two).
    pub fn log(&self) -> String {
        let p = self.dir.path().join("named.log");
        std::fs::read_to_string(&p).unwrap_or_else(|e| format!("({}: {e})\n", p.display()))
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether every thread of process `pid` is stopped (state `T` in
/// `/proc/PID/task/*/stat`).
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|stat| {
                let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
                Some(state == 'T')
            })
            // A thread gone meanwhile is no thread that answers.
            .unwrap_or(true)
    })
}

/// Lower case, no trailing dot.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A port free for both TCP and UDP on 127.0.0.1 a moment ago.
fn free_udp_tcp_port() -> u16 {
    for _ in 0..50 {
        let port = super::free_port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both TCP and UDP");
}

/// SOA, NS, `ns` A and an A record 127.0.0.1 for each name.
fn zone_file(zone: &str, names: &[String]) -> String {
    let mut z = format!(
        "$ORIGIN {zone}.\n$TTL 1\n\
         @ IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 1\n\
         @ IN NS ns.{zone}.\n"
    );
    let ns = format!("ns.{zone}");
    let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
    names.push(&ns);
    names.sort_unstable();
    names.dedup();
    for n in names {
        z.push_str(&format!("{n}. IN A 127.0.0.1\n"));
    }
    z
}

/// One DNS query (with EDNS, 4096 bytes) over UDP, again over TCP if the
/// answer is truncated; `limit` bounds the whole exchange.
pub fn query(
    server: SocketAddr,
    name: &str,
    rtype: u16,
    limit: Duration,
) -> std::io::Result<Reply> {
    use std::io::{Error, ErrorKind};
    let deadline = Instant::now() + limit;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| Error::new(ErrorKind::TimedOut, format!("no answer within {limit:?}")))
    };
    let id = fastrand::u16(..);
    let msg = encode_query(id, name, rtype);

    let udp = UdpSocket::bind(("127.0.0.1", 0))?;
    udp.connect(server)?;
    udp.send(&msg)?;
    let mut buf = vec![0u8; 65535];
    let reply = loop {
        udp.set_read_timeout(Some(left()?))?;
        let n = match udp.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!("no answer within {limit:?}"),
                ))
            }
            Err(e) => return Err(e),
        };
        if n >= 12 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            break buf[..n].to_vec();
        }
    };
    if reply[2] & 0x02 == 0 {
        return parse(&reply);
    }

    // Truncated: the same question over TCP.
    let mut tcp = TcpStream::connect_timeout(&server, left()?)?;
    tcp.set_read_timeout(Some(left()?))?;
    tcp.set_write_timeout(Some(left()?))?;
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&msg);
    tcp.write_all(&framed)?;
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len)?;
    let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
    tcp.read_exact(&mut reply)?;
    parse(&reply)
}

/// A query message: no recursion wanted, one EDNS OPT record.
fn encode_query(id: u16, name: &str, rtype: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 1]);
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        assert!(label.len() < 64, "label too long: {label}");
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&rtype.to_be_bytes());
    // Class IN.
    m.extend_from_slice(&1u16.to_be_bytes());
    // OPT: root name, type 41, payload size 4096, no flags, no options.
    m.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
    m
}

fn parse(m: &[u8]) -> std::io::Result<Reply> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let u16_at = |i: usize| -> std::io::Result<u16> {
        m.get(i..i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| bad("message too short"))
    };
    if m.len() < 12 {
        return Err(bad("message too short"));
    }
    let (qd, an) = (u16_at(4)?, u16_at(6)?);
    let mut at = 12;
    for _ in 0..qd {
        at = read_name(m, at)?.1 + 4;
    }
    let mut answers = Vec::new();
    for _ in 0..an {
        let (name, next) = read_name(m, at)?;
        let rtype = u16_at(next)?;
        let ttl = (u32::from(u16_at(next + 4)?) << 16) | u32::from(u16_at(next + 6)?);
        let len = u16_at(next + 8)? as usize;
        let data = m
            .get(next + 10..next + 10 + len)
            .ok_or_else(|| bad("record past the end"))?
            .to_vec();
        answers.push(Record {
            name,
            rtype,
            ttl,
            data,
        });
        at = next + 10 + len;
    }
    Ok(Reply {
        rcode: m[3] & 0x0f,
        authoritative: m[2] & 0x04 != 0,
        answers,
    })
}

/// A (possibly compressed) name at `at`: (lower case name, where the
/// record goes on after it).
fn read_name(m: &[u8], mut at: usize) -> std::io::Result<(String, usize)> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad name");
    let mut labels: Vec<String> = Vec::new();
    let mut after = None;
    for _ in 0..128 {
        let len = *m.get(at).ok_or_else(bad)? as usize;
        match len {
            0 => {
                let name = labels.join(".").to_ascii_lowercase();
                return Ok((name, after.unwrap_or(at + 1)));
            }
            l if l & 0xc0 == 0xc0 => {
                let low = *m.get(at + 1).ok_or_else(bad)? as usize;
                after.get_or_insert(at + 2);
                at = ((l & 0x3f) << 8) | low;
            }
            l => {
                let label = m.get(at + 1..at + 1 + l).ok_or_else(bad)?;
                labels.push(String::from_utf8_lossy(label).into_owned());
                at += 1 + l;
            }
        }
    }
    Err(bad())
}

/// The character strings of a TXT record's RDATA.
fn txt_strings(data: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let len = data[at] as usize;
        let end = (at + 1 + len).min(data.len());
        out.push(String::from_utf8_lossy(&data[at + 1..end]).into_owned());
        at = end;
    }
    out
}
