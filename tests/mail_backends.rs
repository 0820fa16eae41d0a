//! portcullis in front of a real Dovecot and Postfix, driven by Python's stock
//! imaplib, poplib and smtplib: the end-to-end proof that a TLS-terminated
//! session reaches the backends with the client's address, that Dovecot counts
//! it as secured only because the PROXY v2 header carries the SSL TLV, and that
//! mail submitted on the submissions listener can be read back over IMAPS.
//!
//! Each test starts its own Dovecot and Postfix ([`MailStack`]) in a scratch
//! directory, in the foreground as child processes, on free loopback ports;
//! dropping the stack stops them, on failure too. Needs root (both masters drop
//! privileges), the `postfix`, `dovecot-imapd`, `dovecot-pop3d` and `python3`
//! packages, and a `vmail` user, which is created when missing.
//!
//! Clients connect from 127.0.0.2 while portcullis reaches the backends from
//! 127.0.0.1, so a backend log that names 127.0.0.2 learned it from the header.

mod common;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{run_cmd, tool, Proxy};

/// The Python client, run with `python3 -c`.
const CLIENT: &str = include_str!("fixtures/mail/client.py");
/// Where clients connect from; see the module comment.
const CLIENT_IP: &str = "127.0.0.2";
const SNI: &str = "mail.example.test";
const PASSWORD: &str = "secret";
/// Bound on a daemon starting to listen, and on a log line appearing.
const WAIT: Duration = Duration::from_secs(10);
/// Bound on one run of the Python client.
const CLIENT_LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaps_login_through_portcullis_with_proxy_v2() {
    if !tools("imaps_login_through_portcullis_with_proxy_v2") {
        return;
    }
    let mail = MailStack::start().await;
    let proxy = Proxy::start(&proxy_config(&[(
        "imaps",
        "imap",
        loopback(mail.imap_port),
    )]))
    .await;

    let run = client("imap", proxy.addr("imaps"), "alice@example.test", &[]).await;
    run.assert_ok();
    run.assert_line("LOGIN OK");
    run.assert_line("LIST OK");
    run.assert_line("SELECT OK");

    // The client's address came in the header, `secured` from the SSL TLV,
    // and local_name from the authority TLV (the SNI).
    mail.dovecot
        .log_line(&[
            "imap-login: Info: Login: user=<alice@example.test>",
            &rip(),
            "secured",
            &local_name(),
        ])
        .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaps_login_with_proxy_v1_is_refused_by_dovecot() {
    if !tools("imaps_login_with_proxy_v1_is_refused_by_dovecot") {
        return;
    }
    let mail = MailStack::start().await;
    let backend = format!(
        "{{ address: \"{}\", proxy_protocol: v1 }}",
        loopback(mail.imap_port)
    );
    let proxy = Proxy::start(&proxy_config(&[("imaps", "imap", backend)])).await;

    let run = client("imap", proxy.addr("imaps"), "alice@example.test", &[]).await;
    // v1 has no room for the SSL TLV: Dovecot knows the client's address but
    // not that it used TLS, so it refuses a plaintext password.
    assert!(
        !run.ok,
        "a v1-proxied login must be refused\n{}",
        run.output
    );
    assert!(
        run.line("CAPABILITY").contains("LOGINDISABLED"),
        "{}",
        run.output
    );
    assert!(
        run.line("LOGIN NO").contains("PRIVACYREQUIRED"),
        "{}",
        run.output
    );

    let line = mail
        .dovecot
        .log_line(&[
            "imap-login: Info: ",
            "Plaintext authentication disabled",
            &rip(),
        ])
        .await;
    assert!(!line.contains("secured"), "{line}");
    proxy.shutdown().await;
}

/// The acceptance test: submit through portcullis, read back through portcullis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_to_postfix_then_read_back_over_imaps() {
    if !tools("submissions_to_postfix_then_read_back_over_imaps") {
        return;
    }
    let mail = MailStack::start().await;
    let proxy = Proxy::start(&proxy_config(&[
        ("submissions", "smtp", loopback(mail.submission_port)),
        ("imaps", "imap", loopback(mail.imap_port)),
    ]))
    .await;
    let subject = unique_subject();

    let sent = client(
        "submit",
        proxy.addr("submissions"),
        "alice@example.test",
        &["--to", "bob@other.test", "--subject", &subject],
    )
    .await;
    sent.assert_ok();
    sent.assert_line("LOGIN OK");
    sent.assert_line("SENT OK");

    let read = client(
        "imap-find",
        proxy.addr("imaps"),
        "bob@other.test",
        &["--subject", &subject, "--wait", "15"],
    )
    .await;
    read.assert_ok();
    read.assert_line(&format!("FOUND {subject}"));

    // Postfix saw the real client (from the PROXY header) and the SASL login.
    let client_info = format!("client=unknown[{CLIENT_IP}]");
    mail.postfix
        .log_line(&[
            &client_info,
            "sasl_method=",
            "sasl_username=alice@example.test",
        ])
        .await;
    mail.postfix
        .log_line(&["to=<bob@other.test>", "relay=virtual", "status=sent"])
        .await;
    mail.dovecot
        .log_line(&[
            "imap-login: Info: Login: user=<bob@other.test>",
            &rip(),
            "secured",
        ])
        .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3s_login_through_portcullis() {
    if !tools("pop3s_login_through_portcullis") {
        return;
    }
    let mail = MailStack::start().await;
    let proxy = Proxy::start(&proxy_config(&[(
        "pop3s",
        "pop3",
        loopback(mail.pop3_port),
    )]))
    .await;

    let run = client("pop3", proxy.addr("pop3s"), "alice@example.test", &[]).await;
    run.assert_ok();
    run.assert_line("LOGIN OK");
    // A fresh mailbox: no messages, no octets.
    run.assert_line("STAT OK (0, 0)");

    mail.dovecot
        .log_line(&[
            "pop3-login: Info: Login: user=<alice@example.test>",
            &rip(),
            "secured",
            &local_name(),
        ])
        .await;
    proxy.shutdown().await;
}

/// Every external program these tests run; a missing one skips loudly.
fn tools(test: &str) -> bool {
    ["postfix", "dovecot", "python3"]
        .iter()
        .all(|t| tool(t, test))
}

/// How Dovecot logs the real client address.
fn rip() -> String {
    format!("rip={CLIENT_IP},")
}

/// How our Dovecot logs the local_name it took from the authority TLV.
fn local_name() -> String {
    format!("local_name=<{SNI}>")
}

fn unique_subject() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("portcullis-e2e-{}-{nanos}", std::process::id())
}

/// A portcullis config with one implicit-TLS listener per `(name, protocol,
/// backend)`, all for the one host [`SNI`] with a self-signed certificate.
fn proxy_config(routes: &[(&str, &str, String)]) -> String {
    let (mut listeners, mut backends) = (String::new(), String::new());
    for (name, protocol, backend) in routes {
        let _ = writeln!(
            listeners,
            "  {name}: {{ bind: \"127.0.0.1:0\", protocol: {protocol}, tls: implicit }}"
        );
        let _ = writeln!(backends, "  {name}: {backend}");
    }
    format!(
        "state_dir: state\nlisteners:\n{listeners}backends:\n{backends}\
         hosts:\n  - names: [{SNI}]\n    certificate: self-signed\n"
    )
}

/// What one run of the Python client printed.
struct ClientRun {
    ok: bool,
    /// stdout, then stderr (a traceback, when there is one).
    output: String,
}

impl ClientRun {
    fn assert_ok(&self) {
        assert!(self.ok, "the mail client failed:\n{}", self.output);
    }

    /// The first output line that starts with `prefix`.
    fn line(&self, prefix: &str) -> &str {
        self.output
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{}", self.output))
    }

    fn assert_line(&self, prefix: &str) {
        self.line(prefix);
    }
}

/// Runs `client.py COMMAND` against a portcullis listener as `user`.
async fn client(command: &str, addr: SocketAddr, user: &str, extra: &[&str]) -> ClientRun {
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
/// sharing the Maildirs of alice@example.test and bob@other.test.
struct MailStack {
    // Fields drop in order (after `drop` below has signalled both daemons):
    // the daemons are reaped before their directory is removed.
    postfix: Daemon,
    dovecot: Daemon,
    imap_port: u16,
    pop3_port: u16,
    submission_port: u16,
    _dir: tempfile::TempDir,
}

impl MailStack {
    async fn start() -> MailStack {
        let dir = common::scratch();
        let root = dir.path();
        let ids = accounts();
        let [imap_port, pop3_port, submission_port] = free_ports();
        let root_str = root.to_str().expect("scratch path is UTF-8");
        let vars = [
            ("root", root_str.to_string()),
            ("imap_port", imap_port.to_string()),
            ("pop3_port", pop3_port.to_string()),
            ("submission_port", submission_port.to_string()),
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
            include_str!("fixtures/mail/dovecot.conf"),
        );
        write("dovecot/users", include_str!("fixtures/mail/users"));
        write("postfix/main.cf", include_str!("fixtures/mail/main.cf"));
        write("postfix/master.cf", include_str!("fixtures/mail/master.cf"));
        write("postfix/vmailbox", include_str!("fixtures/mail/vmailbox"));
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
        let mut postfix = Daemon::spawn(
            "postfix",
            Command::new(postfix_master(&root.join("postfix")))
                .arg("-d")
                .arg("-c")
                .arg(root.join("postfix")),
            root,
        );
        postfix.wait_listening(submission_port).await;

        MailStack {
            postfix,
            dovecot,
            imap_port,
            pop3_port,
            submission_port,
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
fn loopback(port: u16) -> String {
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
struct Daemon {
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
    async fn log_line(&self, needles: &[&str]) -> String {
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

/// `N` distinct free loopback ports: all bound at once so none repeats, then
/// released for the daemons (a race with other binders, small in practice).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("local addr").port())
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
