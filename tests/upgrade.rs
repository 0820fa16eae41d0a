//! `portcullis upgrade` and SIGUSR2: a new process takes over every
//! listening socket while the old one drains. Real portcullis processes,
//! real Dovecot behind them, real TLS clients on loopback.
//!
//! The acceptance run: a handshake loop and 50 long-lived sessions (IMAP
//! IDLE to Dovecot, a byte-checked relay to an echo backend) across five
//! upgrades in a row. Not one connection refused, not one handshake failed,
//! every old session goes on in its old process until the client closes it,
//! and each old process exits once its last session is gone.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mail::{MailStack, PASSWORD, SNI};
use common::process::{path_str, portcullis, Running, QUICK};
use common::{read_until, tls_connect, Backend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Long-lived sessions opened before the first upgrade, of each kind.
const FIRST: usize = 21;
const UPGRADES: usize = 5;

fn config(imap_backend: &str, echo: SocketAddr) -> String {
    format!(
        r#"
state_dir: state
timeouts: {{ shutdown_grace: 120s }}
listeners:
  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
  imap: {{ bind: "127.0.0.1:0", protocol: imap, tls: starttls }}
  relay: {{ bind: "127.0.0.1:0", protocol: tcp, tls: implicit }}
backends:
  imaps: {imap_backend}
  imap: {imap_backend}
  relay: {echo}
hosts:
  - names: [{SNI}]
    certificate: self-signed
"#
    )
}

/// Where listener `name` listens, from the first process's "listening" line.
fn addr_of(run: &mut Running, name: &str) -> SocketAddr {
    let line = run
        .wait_log(&["listening", &format!("listener={name} ")], QUICK)
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr= in {line:?}"));
    addr.parse().unwrap()
}

/// `portcullis upgrade` (blocking, so run off the test's runtime).
async fn upgrade(config: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["upgrade", "--config", path_str(config)];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        portcullis(&args, Duration::from_secs(150))
    })
    .await
    .unwrap()
}

/// The pid in "process N serves now".
fn new_pid(out: &str) -> u32 {
    out.strip_prefix("process ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no new pid in {out:?}"))
}

/// Whether process `pid` has ended (gone, or a zombie nobody reaped yet).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn wait_ended(pid: u32, limit: Duration, log: &dyn Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !ended(pid) {
        assert!(
            Instant::now() < deadline,
            "process {pid} still runs after {limit:?}:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (bounded) for a process whose sessions all closed to exit by
/// itself, with success.
async fn exits(mut run: Running) -> Running {
    tokio::task::spawn_blocking(move || {
        let status = run.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "{status}\n{}", run.log());
        run
    })
    .await
    .unwrap()
}

fn signal(pid: u32, sig: &str) {
    let sent = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// An IMAP session in IDLE, through portcullis to Dovecot.
struct Idle {
    tls: TlsStream<TcpStream>,
}

impl Idle {
    async fn open(addr: SocketAddr) -> Idle {
        let mut tls = tls_connect(addr, Some(SNI)).await.expect("handshake");
        let greeting = read_until(&mut tls, b"\r\n").await;
        assert!(greeting.starts_with(b"* OK"), "{greeting:?}");
        Idle::log_in(tls).await
    }

    /// A STARTTLS listener's client, greeted, before its STARTTLS.
    async fn greeted(addr: SocketAddr) -> TcpStream {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let greeting = read_until(&mut tcp, b"\r\n").await;
        assert!(greeting.starts_with(b"* OK"), "{greeting:?}");
        tcp
    }

    /// STARTTLS, then on as [`Idle::open`].
    async fn starttls(mut tcp: TcpStream) -> Idle {
        tcp.write_all(b"s STARTTLS\r\n").await.unwrap();
        let ok = read_until(&mut tcp, b"\r\n").await;
        assert!(
            ok.starts_with(b"s OK"),
            "{:?}",
            String::from_utf8_lossy(&ok)
        );
        let tls = common::tls_over(tcp, Some(SNI), common::client_config(&[]))
            .await
            .expect("handshake after STARTTLS");
        Idle::log_in(tls).await
    }

    async fn log_in(tls: TlsStream<TcpStream>) -> Idle {
        let mut s = Idle { tls };
        s.command(&format!("a LOGIN alice@example.test {PASSWORD}"), "a OK")
            .await;
        s.command("b SELECT INBOX", "b OK").await;
        s.command("c IDLE", "+ ").await;
        s
    }

    async fn command(&mut self, line: &str, expect: &str) {
        self.tls
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        let got = read_until(&mut self.tls, expect.as_bytes()).await;
        assert!(
            got.windows(expect.len()).any(|w| w == expect.as_bytes()),
            "{line:?}: no {expect:?} in {:?}",
            String::from_utf8_lossy(&got)
        );
    }

    /// Leaves IDLE and enters it again: the session still reaches Dovecot.
    async fn check(&mut self) {
        self.command("DONE", "c OK").await;
        self.command("c IDLE", "+ ").await;
    }

    async fn close(mut self) {
        self.command("DONE", "c OK").await;
        self.command("z LOGOUT", "z OK").await;
    }
}

/// A relayed session to the echo backend; every byte sent comes back.
struct Echo {
    tls: TlsStream<TcpStream>,
    round: u8,
}

impl Echo {
    async fn open(addr: SocketAddr) -> Echo {
        let tls = tls_connect(addr, Some(SNI)).await.expect("handshake");
        let mut s = Echo { tls, round: 0 };
        s.check().await;
        s
    }

    async fn check(&mut self) {
        self.round = self.round.wrapping_add(1);
        let sent: Vec<u8> = (0..8192u32)
            .map(|i| (i as u8).wrapping_mul(self.round))
            .collect();
        self.tls.write_all(&sent).await.unwrap();
        let mut got = vec![0u8; sent.len()];
        tokio::time::timeout(Duration::from_secs(10), self.tls.read_exact(&mut got))
            .await
            .expect("echo within 10 s")
            .expect("echo");
        assert!(got == sent, "the relay changed bytes");
    }

    async fn close(mut self) {
        self.tls.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(10), self.tls.read_to_end(&mut rest));
        assert!(end.await.is_ok(), "the relay did not end after the close");
    }
}

/// New connections, one after another, until `stop`: each must be
/// accepted, finish its handshake and get Dovecot's greeting.
#[derive(Default)]
struct Loop {
    ok: AtomicUsize,
    refused: AtomicUsize,
    failed: AtomicUsize,
    stop: AtomicBool,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Loop {
    async fn run(self: Arc<Self>, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(240);
        while !self.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let tcp = match TcpStream::connect(addr).await {
                Ok(t) => t,
                Err(e) => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    self.errors.lock().unwrap().push(format!("connect: {e}"));
                    continue;
                }
            };
            let greeted = async {
                let mut tls = common::tls_over(tcp, Some(SNI), common::client_config(&[])).await?;
                let greeting = read_until(&mut tls, b"\r\n").await;
                if greeting.starts_with(b"* OK") {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!(
                        "greeting {:?}",
                        String::from_utf8_lossy(&greeting)
                    )))
                }
            };
            match greeted.await {
                Ok(()) => self.ok.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    self.errors.lock().unwrap().push(format!("handshake: {e}"));
                    self.failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_upgrades_refuse_nothing_and_cut_no_session() {
    if !common::mail::tools("five_upgrades_refuse_nothing_and_cut_no_session") {
        return;
    }
    let mail = MailStack::start().await;
    let echo = Backend::start("", true).await;
    let dir = common::scratch();
    let path = dir.path().join("portcullis.yaml");
    let yaml = config(&common::mail::loopback(mail.imap_port), echo.addr);
    std::fs::write(&path, &yaml).unwrap();
    let mut first = Running::start(&path, &[]);
    let imaps = addr_of(&mut first, "imaps");
    let relay = addr_of(&mut first, "relay");
    let imap = addr_of(&mut first, "imap");
    first.wait_control(&dir.path().join("state"));

    let mut idles = Vec::new();
    let mut echoes = Vec::new();
    for _ in 0..FIRST {
        idles.push(Idle::open(imaps).await);
        echoes.push(Echo::open(relay).await);
    }
    // Four clients at once, so that connections are in every stage (queued,
    // in their handshake, waiting for the greeting) at each handover.
    let handshakes = Arc::new(Loop::default());
    let looping: Vec<_> = (0..4)
        .map(|_| tokio::spawn(handshakes.clone().run(imaps)))
        .collect();

    // One client in its plaintext dialogue across the first upgrade: it
    // goes on to STARTTLS and IDLE in the first process.
    let mut before_starttls = Some(Idle::greeted(imap).await);

    let mut pids = vec![first.pid()];
    for round in 1..=UPGRADES {
        // Some time under load in each process before it is replaced.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = handshakes.ok.load(Ordering::Relaxed);
        let began = Instant::now();
        let pid = if round == 3 {
            // SIGUSR2 to the serving process: the same, answered in the log.
            signal(*pids.last().unwrap(), "-USR2");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let log = first.log();
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("upgrade: the new process serves"))
                    .collect();
                if let Some(line) = lines.get(round - 1) {
                    let pid = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("new_pid="))
                        .and_then(|p| p.parse().ok());
                    break pid.unwrap_or_else(|| panic!("no new_pid in {line:?}"));
                }
                assert!(
                    Instant::now() < deadline,
                    "no upgrade after SIGUSR2:\n{log}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            let (code, out, err) = upgrade(&path, &[]).await;
            assert_eq!(code, 0, "upgrade {round}: {out}{err}\n{}", first.log());
            new_pid(&out)
        };
        eprintln!(
            "upgrade {round}: process {pid} serves after {:?}",
            began.elapsed()
        );
        assert!(!pids.contains(&pid), "upgrade {round} kept pid {pid}");
        pids.push(pid);
        if let Some(tcp) = before_starttls.take() {
            idles.push(Idle::starttls(tcp).await);
        }
        // Every session opened so far still relays, in its own process.
        for s in &mut idles {
            s.check().await;
        }
        for s in &mut echoes {
            s.check().await;
        }
        // Two more in the new process, which the next upgrade drains.
        if round < UPGRADES {
            idles.push(Idle::open(imaps).await);
            echoes.push(Echo::open(relay).await);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while handshakes.ok.load(Ordering::Relaxed) < before + 10 {
            assert!(Instant::now() < deadline, "the handshake loop stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    handshakes.stop.store(true, Ordering::Relaxed);
    for l in looping {
        l.await.unwrap();
    }
    let (ok, refused, failed) = (
        handshakes.ok.load(Ordering::Relaxed),
        handshakes.refused.load(Ordering::Relaxed),
        handshakes.failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "{UPGRADES} upgrades: {ok} handshakes greeted, {refused} refused, {failed} failed; {} long-lived sessions",
        idles.len() + echoes.len()
    );
    assert_eq!(
        (refused, failed),
        (0, 0),
        "{:?}\n{}",
        handshakes.errors.lock().unwrap(),
        first.log()
    );
    assert_eq!(
        idles.len() + echoes.len(),
        2 * FIRST + 2 * (UPGRADES - 1) + 1
    );

    // Every old process still runs: its sessions are open.
    for pid in &pids {
        assert!(!ended(*pid), "process {pid} ended with sessions open");
    }
    for s in idles {
        s.close().await;
    }
    for s in echoes {
        s.close().await;
    }
    // Their last session closed, the old processes exit by themselves, well
    // before the 120 s grace.
    let first = exits(first).await;
    let log = || first.log();
    for pid in &pids[1..UPGRADES] {
        wait_ended(*pid, Duration::from_secs(30), &log);
    }
    let log = first.log();
    assert!(!log.contains("grace period over"), "{log}");
    assert!(!log.contains("upgrade failed"), "{log}");
    assert_eq!(
        log.matches("upgrade: the old process stepped down").count(),
        UPGRADES,
        "{log}"
    );

    // The last process serves, answers on the control socket, and stops.
    let last = pids[UPGRADES];
    let (code, out, err) = portcullis(&["status", "--config", path_str(&path)], QUICK);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("imaps"), "{out}");
    assert!(!ended(last));
    signal(last, "-TERM");
    wait_ended(last, Duration::from_secs(30), &|| first.log());
    drop(mail);
}

/// A new process that cannot take over, for any reason, is ended; the old
/// one serves on with every session, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_fails_leaves_the_old_one_serving() {
    let echo = Backend::start("", true).await;
    let dir = common::scratch();
    let path = dir.path().join("portcullis.yaml");
    // The IMAP backend is never reached here.
    let yaml = config("127.0.0.1:9", echo.addr);
    std::fs::write(&path, &yaml).unwrap();
    let mut run = Running::start(&path, &[]);
    let relay = addr_of(&mut run, "relay");
    run.wait_control(&dir.path().join("state"));
    let mut session = Echo::open(relay).await;

    // A binary that exits at once.
    let (code, out, err) = upgrade(&path, &["--binary", "/bin/false"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("upgrade failed") && err.contains("still serving, nothing closed"),
        "{err}"
    );
    assert!(
        err.contains("exited (exit status: 1) before it was ready"),
        "{err}"
    );

    // A binary that is not there.
    let missing = dir.path().join("no-such-portcullis");
    let (code, _, err) = upgrade(&path, &["--binary", path_str(&missing)]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot start") && err.contains("no-such-portcullis"),
        "{err}"
    );

    // A config the new process refuses. (The command reads a config too,
    // for the state_dir: a good copy beside it.)
    let cli = dir.path().join("cli.yaml");
    std::fs::write(&cli, &yaml).unwrap();
    std::fs::write(&path, "listeners: [").unwrap();
    let (code, _, err) = upgrade(&cli, &[]).await;
    assert_eq!(code, 1);
    assert!(err.contains("config not valid"), "{err}");

    // An address the new process cannot bind: a new listener on a port
    // something else holds.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let blocked = format!(
        r#"
state_dir: state
listeners:
  relay: {{ bind: "127.0.0.1:0", protocol: tcp, tls: implicit }}
  held: {{ bind: "{taken}", protocol: tcp, tls: implicit }}
backends:
  relay: {echo}
  held: {echo}
hosts:
  - names: [{SNI}]
    certificate: self-signed
"#,
        echo = echo.addr
    );
    std::fs::write(&path, &blocked).unwrap();
    let (code, _, err) = upgrade(&path, &[]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot listen on") && err.contains(&taken.to_string()),
        "{err}"
    );
    drop(holder);

    // Nothing was closed: the session relays, new clients are served by
    // this same process, which answers on its control socket.
    session.check().await;
    let mut another = Echo::open(relay).await;
    another.check().await;
    let log = run.log();
    assert_eq!(
        log.matches("upgrade failed: still serving here").count(),
        4,
        "{log}"
    );
    assert!(!log.contains("the new process serves"), "{log}");
    assert!(!log.contains("stopped"), "{log}");

    // Once the config is right again, the upgrade goes through, and the
    // sessions keep relaying in the old process. A listener drained there
    // stays drained in the new one.
    std::fs::write(&path, &yaml).unwrap();
    let (code, out, err) = portcullis(&["drain", "--config", path_str(&path), "imaps"], QUICK);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = upgrade(&path, &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    let pid = new_pid(&out);
    let (code, out, err) = portcullis(&["status", "--config", path_str(&path)], QUICK);
    assert_eq!(code, 0, "{out}{err}");
    let imaps = out
        .lines()
        .find(|l| l.starts_with("imaps "))
        .unwrap_or_default();
    assert!(imaps.contains("drained"), "{out}");
    let relay_line = out
        .lines()
        .find(|l| l.starts_with("relay "))
        .unwrap_or_default();
    assert!(relay_line.contains("accepting"), "{out}");
    session.check().await;
    another.check().await;
    let mut fresh = Echo::open(relay).await;
    fresh.check().await;
    session.close().await;
    another.close().await;
    fresh.close().await;
    let run = exits(run).await;
    signal(pid, "-TERM");
    wait_ended(pid, Duration::from_secs(30), &|| run.log());
}

/// What the old process logged about the new one it started last.
fn started_pid(run: &Running) -> u32 {
    let log = run.log();
    let line = log
        .lines()
        .rfind(|l| l.contains("upgrade: new process started"))
        .unwrap_or_else(|| panic!("no new process started:\n{log}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

fn script(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// While a new process is starting, the old one goes on as before: it
/// answers, reloads, refuses a second upgrade at once; and a SIGTERM stops
/// it at once, the new process with it, not after the upgrade's minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_upgrade_the_old_process_answers_and_a_stop_ends_both() {
    let echo = Backend::start("", true).await;
    let dir = common::scratch();
    let path = dir.path().join("portcullis.yaml");
    std::fs::write(&path, config("127.0.0.1:9", echo.addr)).unwrap();
    let mut run = Running::start(&path, &[]);
    let relay = addr_of(&mut run, "relay");
    run.wait_control(&dir.path().join("state"));
    let mut session = Echo::open(relay).await;

    // A "binary" that never gets ready.
    let slow = script(dir.path(), "slow", "#!/bin/sh\nexec sleep 300\n");
    let first = tokio::spawn({
        let path = path.clone();
        let slow = slow.clone();
        async move { upgrade(&path, &["--binary", path_str(&slow)]).await }
    });
    run.wait_log(&["upgrade: new process started"], QUICK)
        .unwrap_or_else(|e| panic!("{e}"));
    let slow_pid = started_pid(&run);

    let (code, _, err) = upgrade(&path, &[]).await;
    assert_eq!(code, 1);
    assert!(err.contains("an upgrade is already under way"), "{err}");
    let (code, out, err) = portcullis(&["reload", "--config", path_str(&path)], QUICK);
    assert_eq!(code, 0, "{out}{err}");
    session.check().await;
    Echo::open(relay).await.check().await;

    let began = Instant::now();
    signal(run.pid(), "-TERM");
    session.close().await;
    let (code, _, err) = first.await.unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("upgrade failed"), "{err}");
    let run = exits(run).await;
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "the stop waited for the upgrade: {:?}",
        began.elapsed()
    );
    wait_ended(slow_pid, Duration::from_secs(10), &|| run.log());
}

/// A new process that says it is ready and dies before it took over: the
/// old one accepts again on its copies of the sockets and starts its
/// services again (control socket, admin endpoint), and a later upgrade
/// goes through. The new process here is a script that speaks the
/// handover up to `ready` and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_dies_before_it_takes_over_leaves_the_old_one_serving() {
    if !common::tool("python3", "a_new_process_that_dies_before_it_takes_over") {
        return;
    }
    let echo = Backend::start("", true).await;
    let dir = common::scratch();
    let path = dir.path().join("portcullis.yaml");
    let yaml = format!(
        "{}admin: {{ bind: \"127.0.0.1:0\" }}\n",
        config("127.0.0.1:9", echo.addr)
    );
    std::fs::write(&path, &yaml).unwrap();
    let mut run = Running::start(&path, &[]);
    let relay = addr_of(&mut run, "relay");
    let admin = run
        .wait_log(&["admin endpoint listening"], QUICK)
        .unwrap_or_else(|e| panic!("{e}"));
    let admin = admin
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap()
        .to_string();
    run.wait_control(&dir.path().join("state"));
    let mut session = Echo::open(relay).await;

    // One says ready and dies; one says ready, is told to go, and says it
    // was told to stop (as a new process does on SIGTERM at that moment).
    for (name, after_ready) in [
        ("ready-then-gone", "s.close()"),
        (
            "ready-then-refuse",
            "assert s.recv(4096) == b\"go\"\ns.send(b\"failed this process was told to stop\")",
        ),
    ] {
        let fake = script(
            dir.path(),
            name,
            &format!(
                r#"#!/usr/bin/env python3
import os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect("\0" + os.environ["PORTCULLIS_UPGRADE_SOCKET"])
s.send(b"hello " + os.environ["PORTCULLIS_UPGRADE_TOKEN"].encode())
while True:
    msg, fds, _, _ = socket.recv_fds(s, 4096, 4)
    for fd in fds:
        os.close(fd)
    if msg == b"end":
        break
s.send(b"ready 0.0.0-fake")
{after_ready}
"#
            ),
        );
        let (code, _, err) = upgrade(&path, &["--binary", path_str(&fake)]).await;
        assert_eq!(code, 1, "{name}: {err}\n{}", run.log());
        assert!(
            err.contains("did not take over") && err.contains("accepts again"),
            "{name}: {err}"
        );
        session.check().await;
    }

    // Everything serves again: the old session, new ones, the control
    // socket, the admin endpoint.
    session.check().await;
    let mut fresh = Echo::open(relay).await;
    fresh.check().await;
    let (code, out, err) = portcullis(&["status", "--config", path_str(&path)], QUICK);
    assert_eq!(code, 0, "{out}{err}");
    let (status, _) = common::admin_get(&admin, "/healthz").await;
    assert!(status.contains("200"), "{status}");
    let log = run.log();
    assert_eq!(
        log.matches("upgrade failed: the new process did not take over; accepting here again")
            .count(),
        2,
        "{log}"
    );

    // And a real upgrade still goes through.
    let (code, out, err) = upgrade(&path, &[]).await;
    assert_eq!(code, 0, "{out}{err}\n{}", run.log());
    let pid = new_pid(&out);
    Echo::open(relay).await.check().await;
    session.close().await;
    fresh.close().await;
    let run = exits(run).await;
    signal(pid, "-TERM");
    wait_ended(pid, Duration::from_secs(30), &|| run.log());
}
