//! Real Postfix and Dovecot behind portcullis, for the tests that prove mail
//! actually flows: a [`MailStack`] of both daemons in a scratch directory, and
//! [`client`], which runs Python's stock imaplib, poplib and smtplib
//! (`tests/fixtures/mail/client.py`) against a portcullis listener.
//!
//! Each test starts its own stack, in the foreground as child processes, on
//! free loopback ports; dropping the stack stops them, on failure too. Needs
//! root (both masters drop privileges), the `postfix`, `dovecot-imapd`,
//! `dovecot-pop3d` and `python3` packages (`dovecot-managesieved` for
//! ManageSieve), and a `vmail` user, which is created when missing.
//!
//! Clients connect from [`CLIENT_IP`] while portcullis reaches the backends
//! from 127.0.0.1, so a backend log that names the client address learned it
//! from the PROXY header.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{run_cmd, tool};

/// The Python client, run with `python3 -c`.
const CLIENT: &str = include_str!("../fixtures/mail/client.py");
/// Where clients connect from; see the module comment.
pub const CLIENT_IP: &str = "127.0.0.2";
pub const SNI: &str = "mail.example.test";
pub const PASSWORD: &str = "secret";
/// Bound on a daemon starting to listen, and on a log line appearing.
const WAIT: Duration = Duration::from_secs(10);
/// Bound on one run of the Python client.
pub const CLIENT_LIMIT: Duration = Duration::from_secs(30);

/// The programs every mail test runs; a missing one skips loudly.
pub fn tools(test: &str) -> bool {
    ["postfix", "dovecot", "python3"]
        .iter()
        .all(|t| tool(t, test))
}

/// Dovecot's ManageSieve server (package `dovecot-managesieved`), which lives
/// outside `PATH`: reported like [`tool`] reports a missing program. Without
/// it the stack runs without its sieve listener.
pub fn managesieve(test: &str) -> bool {
    let found = managesieve_installed();
    if !found {
        let msg = format!(
            "SKIPPED {test}: {MANAGESIEVE} is not installed \
             (package dovecot-managesieved; bash .ci/run installs it)"
        );
        if std::env::var("PORTCULLIS_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("{msg}, and PORTCULLIS_REQUIRE_TOOLS=1 forbids skipping");
        }
        super::say_skipped(&msg);
    }
    found
}

const MANAGESIEVE: &str = "/usr/lib/dovecot/managesieve";

fn managesieve_installed() -> bool {
    Path::new(MANAGESIEVE).is_file()
}

/// How Dovecot logs the real client address.
pub fn rip() -> String {
    format!("rip={CLIENT_IP},")
}

/// How our Dovecot logs the local_name it took from the authority TLV.
pub fn local_name() -> String {
    format!("local_name=<{SNI}>")
}

pub fn unique_subject() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("portcullis-e2e-{}-{nanos}", std::process::id())
}

/// A portcullis config with one listener per `(name, settings, backend)`,
/// `settings` being the listener's keys after `bind` (`protocol: imap, tls:
/// implicit`), all for the one host [`SNI`] with a self-signed certificate.
pub fn proxy_config(routes: &[(&str, &str, String)]) -> String {
    let (mut listeners, mut backends) = (String::new(), String::new());
    for (name, settings, backend) in routes {
        let _ = writeln!(
            listeners,
            "  {name}: {{ bind: \"127.0.0.1:0\", {settings} }}"
        );
        let _ = writeln!(backends, "  {name}: {backend}");
    }
    format!(
        "state_dir: state\nlisteners:\n{listeners}backends:\n{backends}\
         hosts:\n  - names: [{SNI}]\n    certificate: self-signed\n"
    )
}

/// What one run of the Python client printed.
pub struct ClientRun {
    pub ok: bool,
    /// stdout, then stderr (a traceback, when there is one).
    pub output: String,
}

impl ClientRun {
    pub fn assert_ok(&self) {
        assert!(self.ok, "the mail client failed:\n{}", self.output);
    }

    /// Every output line that starts with `prefix`.
    pub fn lines(&self, prefix: &str) -> Vec<&str> {
        self.output
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    /// The first output line that starts with `prefix`.
    pub fn line(&self, prefix: &str) -> &str {
        self.lines(prefix)
            .first()
            .copied()
            .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{}", self.output))
    }

    pub fn assert_line(&self, prefix: &str) {
        self.line(prefix);
    }
}

/// Runs `client.py COMMAND` against a portcullis listener as `user`.
pub async fn client(command: &str, addr: SocketAddr, user: &str, extra: &[&str]) -> ClientRun {
    let port = addr.port().to_string();
    let mut args = vec!["-c", CLIENT, command, "--port", &port, "--sni", SNI];
    args.extend([
        "--source",
        CLIENT_IP,
        "--user",
        user,
        "--password",
        PASSWORD,
    ]);
    args.extend(extra);
    let (ok, stdout, stderr) = run_cmd("python3", &args, b"", CLIENT_LIMIT).await;
    ClientRun {
        ok,
        output: format!("{stdout}{stderr}"),
    }
}

/// A Dovecot and a Postfix of their own, listening only with PROXY support,
/// sharing the Maildirs of alice@example.test and bob@other.test. Every port
/// is a plaintext backend port on 127.0.0.1 that expects a PROXY header.
pub struct MailStack {
    // Fields drop in order (after `drop` below has signalled both daemons):
    // the daemons are reaped before their directory is removed.
    pub postfix: Daemon,
    pub dovecot: Daemon,
    /// Dovecot IMAP.
    pub imap_port: u16,
    /// Dovecot POP3.
    pub pop3_port: u16,
    /// Dovecot ManageSieve, when [`managesieve`] is installed.
    pub sieve_port: Option<u16>,
    /// Postfix smtpd with SASL: submission (465 and 587 behind portcullis).
    pub submission_port: u16,
    /// Postfix smtpd without SASL: an MX (25 behind portcullis).
    pub mx_port: u16,
    /// Postfix postscreen in front of an smtpd: an MX as many run one.
    pub postscreen_port: u16,
    _dir: tempfile::TempDir,
}

impl MailStack {
    pub async fn start() -> MailStack {
        let dir = super::scratch();
        let root = dir.path();
        let ids = accounts();
        let [imap_port, pop3_port, sieve_port, submission_port, mx_port, postscreen_port] =
            free_ports();
        let root_str = root.to_str().expect("scratch path is UTF-8");
        let vars = [
            ("root", root_str.to_string()),
            ("imap_port", imap_port.to_string()),
            ("pop3_port", pop3_port.to_string()),
            ("sieve_port", sieve_port.to_string()),
            ("submission_port", submission_port.to_string()),
            ("mx_port", mx_port.to_string()),
            ("postscreen_port", postscreen_port.to_string()),
            ("vmail_uid", ids.vmail_uid.to_string()),
            ("vmail_gid", ids.vmail_gid.to_string()),
        ];
        let write = |path: &str, template: &str| {
            let path = root.join(path);
            std::fs::write(&path, fill(template, &vars))
                .and_then(|()| backdate(&path))
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            chmod(&path, 0o644);
        };

        for d in [
            "dovecot",
            "dovecot/run",
            "dovecot/state",
            "postfix",
            "postfix/data",
            "mail",
        ] {
            mkdir(&root.join(d));
        }
        // The delivery agent and Dovecot's mail processes both run as vmail.
        chown(&root.join("mail"), ids.vmail_uid, ids.vmail_gid);
        chown(&root.join("postfix/data"), ids.postfix_uid, ids.postfix_gid);
        write(
            "dovecot/dovecot.conf",
            include_str!("../fixtures/mail/dovecot.conf"),
        );
        // dovecot.conf includes this when present: `protocols = sieve` would
        // stop Dovecot from starting where ManageSieve is not installed.
        let sieve = managesieve_installed();
        if sieve {
            write(
                "dovecot/sieve.conf",
                include_str!("../fixtures/mail/sieve.conf"),
            );
        }
        write("dovecot/users", include_str!("../fixtures/mail/users"));
        write("postfix/main.cf", include_str!("../fixtures/mail/main.cf"));
        write(
            "postfix/master.cf",
            include_str!("../fixtures/mail/master.cf"),
        );
        write(
            "postfix/vmailbox",
            include_str!("../fixtures/mail/vmailbox"),
        );
        postfix_queue(&root.join("postfix/queue"), ids);

        // Dovecot first: Postfix's smtpd asks its auth socket.
        let mut dovecot = Daemon::spawn(
            "dovecot",
            Command::new("dovecot")
                .arg("-F")
                .arg("-c")
                .arg(root.join("dovecot/dovecot.conf")),
            root,
        );
        dovecot.wait_listening(imap_port).await;
        dovecot.wait_listening(pop3_port).await;
        if sieve {
            dovecot.wait_listening(sieve_port).await;
        }
        let mut postfix = Daemon::spawn(
            "postfix",
            Command::new(postfix_master(&root.join("postfix")))
                .arg("-d")
                .arg("-c")
                .arg(root.join("postfix")),
            root,
        );
        // The master binds its services in master.cf order before it accepts
        // anything, and submission comes last there: once it listens, all do.
        // (A probe of postscreen's port would leave a headerless connection
        // in its log.)
        postfix.wait_listening(submission_port).await;

        MailStack {
            postfix,
            dovecot,
            imap_port,
            pop3_port,
            sieve_port: sieve.then_some(sieve_port),
            submission_port,
            mx_port,
            postscreen_port,
            _dir: dir,
        }
    }
}

impl Drop for MailStack {
    fn drop(&mut self) {
        // Both at once: each takes about a second to wind down.
        self.postfix.terminate();
        self.dovecot.terminate();
    }
}

/// A backend address for portcullis' YAML.
pub fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Sets a file's mtime a minute back. Postfix reads a main.cf modified
/// within the last second only after it "cools down" (a pause of one to two
/// seconds, in every postconf and master start); ours are complete already.
fn backdate(path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::options().write(true).open(path)?;
    file.set_modified(SystemTime::now() - Duration::from_secs(60))
}

/// Replaces every `{{name}}` in `template`; a placeholder left over is a bug.
fn fill(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = template.to_string();
    for (name, value) in vars {
        out = out.replace(&format!("{{{{{name}}}}}"), value);
    }
    assert!(!out.contains("{{"), "unfilled placeholder in:\n{out}");
    out
}

/// The queue directories `postfix check` would create (as listed in Postfix's
/// postfix-files), made directly because `postfix check` takes two seconds.
fn postfix_queue(queue: &Path, ids: &Accounts) {
    mkdir(queue);
    let owned = |name: &str, gid: u32, mode: u32| {
        let d = queue.join(name);
        mkdir(&d);
        chown(&d, ids.postfix_uid, gid);
        chmod(&d, mode);
    };
    for name in [
        "active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming", "private",
        "saved", "trace",
    ] {
        owned(name, ids.postfix_gid, 0o700);
    }
    owned("maildrop", ids.postdrop_gid, 0o730);
    owned("public", ids.postdrop_gid, 0o710);
    mkdir(&queue.join("pid"));
}

/// Postfix's master daemon, run directly: `postfix start-fg` would run it as a
/// grandchild we could not stop by pid, after the same slow checks.
fn postfix_master(config_dir: &Path) -> PathBuf {
    let out = Command::new("postconf")
        .arg("-c")
        .arg(config_dir)
        .args(["-h", "daemon_directory"])
        .output()
        .expect("run postconf");
    assert!(
        out.status.success(),
        "postconf: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("master")
}

/// A mail daemon running in the foreground as our child; dropping it stops it.
pub struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
    /// Its stdout and stderr: configuration errors come before the log file.
    console: PathBuf,
    terminated: bool,
}

impl Daemon {
    /// Starts `command`, which logs to `DIR/NAME.log`.
    fn spawn(name: &'static str, command: &mut Command, dir: &Path) -> Daemon {
        let console = dir.join(format!("{name}.console"));
        let out = std::fs::File::create(&console).expect("console file");
        let err = out.try_clone().expect("console file");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Daemon {
            name,
            child,
            log: dir.join(format!("{name}.log")),
            console,
            terminated: false,
        }
    }

    /// The log file and console output, for failure messages.
    fn diagnostics(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|e| format!("({e})"));
        format!(
            "--- {} log {} ---\n{}--- console ---\n{}",
            self.name,
            self.log.display(),
            read(&self.log),
            read(&self.console)
        )
    }

    /// Asks the daemon to stop, once. SIGTERM lets a master stop its own
    /// children first (std's `Child::kill` only sends SIGKILL).
    fn terminate(&mut self) {
        if !std::mem::replace(&mut self.terminated, true) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        }
    }

    /// Waits until 127.0.0.1:`port` accepts connections.
    async fn wait_listening(&mut self, port: u16) {
        let start = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before listening on {port}\n{}",
                    self.name,
                    self.diagnostics()
                );
            }
            if start.elapsed() > WAIT {
                panic!(
                    "{} not listening on {port} after {WAIT:?}\n{}",
                    self.name,
                    self.diagnostics()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for a log line containing every one of `needles`, and returns it.
    /// Log lines lag the client's view by a little: the daemons write them
    /// through a log process of their own.
    pub async fn log_line(&self, needles: &[&str]) -> String {
        let start = Instant::now();
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_string();
            }
            if start.elapsed() > WAIT {
                panic!(
                    "no {} log line with all of {needles:?}\n{}",
                    self.name,
                    self.diagnostics()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Dovecot's login line for `user` on `service` (`imap-login`, …): the
    /// client's address from the header, `secured` from the SSL TLV, and
    /// local_name from the authority TLV (the SNI).
    pub async fn secured_login(&self, service: &str, user: &str) -> String {
        let login = format!("{service}: Info: Login: user=<{user}>");
        self.log_line(&[&login, &rip(), "secured", &local_name()])
            .await
    }

    /// Every log line so far that contains `needle`, for asserting absences
    /// (after a [`Daemon::log_line`] has shown the log caught up).
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
        // SIGKILL after a bounded wait so a test never hangs on a stuck daemon.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// System accounts the daemons run as.
struct Accounts {
    vmail_uid: u32,
    vmail_gid: u32,
    postfix_uid: u32,
    postfix_gid: u32,
    postdrop_gid: u32,
}

/// Looks the accounts up once, creating `vmail` when missing (once: tests run
/// in parallel and concurrent `useradd`s would fight over /etc/passwd's lock).
fn accounts() -> &'static Accounts {
    static ACCOUNTS: OnceLock<Accounts> = OnceLock::new();
    ACCOUNTS.get_or_init(|| {
        if user("vmail").is_none() {
            // Dovecot refuses mail uids below first_valid_uid (500).
            let status = Command::new("useradd")
                .args([
                    "-r",
                    "-u",
                    "5000",
                    "-U",
                    "-d",
                    "/nonexistent",
                    "-s",
                    "/usr/sbin/nologin",
                    "vmail",
                ])
                .status()
                .expect("run useradd");
            assert!(
                status.success(),
                "useradd vmail: {status} (the mail tests need root)"
            );
        }
        let (vmail_uid, vmail_gid) = user("vmail").expect("user vmail");
        let (postfix_uid, postfix_gid) = user("postfix").expect("user postfix (package postfix)");
        let postdrop_gid = group("postdrop").expect("group postdrop (package postfix)");
        Accounts {
            vmail_uid,
            vmail_gid,
            postfix_uid,
            postfix_gid,
            postdrop_gid,
        }
    })
}

/// (uid, gid) of a user in /etc/passwd.
fn user(name: &str) -> Option<(u32, u32)> {
    let f = db_entry("/etc/passwd", name)?;
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

/// gid of a group in /etc/group.
fn group(name: &str) -> Option<u32> {
    db_entry("/etc/group", name)?.get(2)?.parse().ok()
}

/// The `:`-separated fields of `name`'s line in a passwd-style file.
fn db_entry(file: &str, name: &str) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .map(|l| l.split(':').map(str::to_string).collect::<Vec<_>>())
        .find(|f| f.first().map(String::as_str) == Some(name))
}

/// `N` distinct free loopback ports for the daemons ([`super::free_port`]).
fn free_ports<const N: usize>() -> [u16; N] {
    let mut ports = [0u16; N];
    for i in 0..N {
        ports[i] = loop {
            let p = super::free_port();
            if !ports[..i].contains(&p) {
                break p;
            }
        };
    }
    ports
}

/// A directory the daemons can enter whatever the umask; callers narrow it.
fn mkdir(path: &Path) {
    std::fs::create_dir(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    chmod(path, 0o755);
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e} (the mail tests need root)", path.display()));
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Fetches whole messages with imaplib: from [`CLIENT_IP`] over implicit TLS
/// (SNI [`SNI`]) to a portcullis listener, waiting up to --wait seconds for
/// --count messages whose subject contains --subject. Prints `COUNT n`, then
/// one `MESSAGE <base64 of the raw message>` line each.
const FETCH: &str = r#"
import argparse, base64, imaplib, socket, ssl, sys, time
ap = argparse.ArgumentParser()
for a in ("--port", "--count"):
    ap.add_argument(a, type=int, required=True)
for a in ("--sni", "--source", "--user", "--password", "--subject"):
    ap.add_argument(a, required=True)
ap.add_argument("--wait", type=float, default=15)
args = ap.parse_args()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE

class Imap(imaplib.IMAP4):
    def _create_socket(self, timeout):
        raw = socket.create_connection(("127.0.0.1", args.port), timeout=10,
                                       source_address=(args.source, 0))
        return ctx.wrap_socket(raw, server_hostname=args.sni)

c = Imap("127.0.0.1", args.port, timeout=10)
c.login(args.user, args.password)
c.select("INBOX", readonly=True)
deadline = time.monotonic() + args.wait
while True:
    c.noop()
    typ, data = c.search(None, "SUBJECT", '"%s"' % args.subject)
    found = data[0].split()
    if len(found) >= args.count or time.monotonic() > deadline:
        break
    time.sleep(0.2)
print("COUNT", len(found))
for num in found:
    typ, msg = c.fetch(num, "(BODY.PEEK[])")
    print("MESSAGE", base64.b64encode(msg[0][1]).decode())
c.logout()
"#;

/// The raw messages (CRLF line endings) in `user`'s INBOX whose subject
/// contains `subject`, read through the portcullis IMAPS listener at `addr`
/// once at least `count` are there (or after 15 s, with what there is).
pub async fn imap_messages(
    addr: SocketAddr,
    user: &str,
    subject: &str,
    count: usize,
) -> Vec<String> {
    use base64::Engine as _;
    let (port, count) = (addr.port().to_string(), count.to_string());
    let args = [
        "-c",
        FETCH,
        "--port",
        &port,
        "--sni",
        SNI,
        "--source",
        CLIENT_IP,
        "--user",
        user,
        "--password",
        PASSWORD,
        "--subject",
        subject,
        "--count",
        &count,
    ];
    let (ok, stdout, stderr) = run_cmd("python3", &args, b"", CLIENT_LIMIT).await;
    assert!(ok, "imap fetch failed:\n{stdout}{stderr}");
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("MESSAGE "))
        .map(|b| {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b)
                .expect("the fetch script prints base64");
            String::from_utf8_lossy(&raw).into_owned()
        })
        .collect()
}
