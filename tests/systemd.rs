//! `Type=notify` (deploy/portcullis.service): portcullis tells systemd,
//! through `$NOTIFY_SOCKET`, when it serves (`READY=1`, only after every
//! listener is bound), when a reload runs (`RELOADING=1` with the
//! monotonic time, then `READY=1` saying how it went) and when it drains
//! (`STOPPING=1`). The test plays systemd: a datagram socket of its own.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::process::Running;

const CONFIG: &str = r#"
state_dir: state
listeners:
  imaps: { bind: "127.0.0.1:0", protocol: imap, tls: implicit }
backends:
  imaps: 127.0.0.1:9
hosts:
  - names: [mail.notify.test]
    certificate: self-signed
"#;

/// The next notification, within 20 s.
fn next(socket: &UnixDatagram, run: &Running) -> String {
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!("no notification: {e}\n{}", run.log()),
    }
}

fn hup(run: &Running) {
    let sent = Command::new("kill")
        .args(["-HUP", &run.pid().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// portcullis on [`CONFIG`] with `$NOTIFY_SOCKET` at a socket of the
/// test's (20 s read timeout): the scratch dir, the socket, the process.
fn under_systemd() -> (tempfile::TempDir, UnixDatagram, Running) {
    let dir = common::scratch();
    let config = dir.path().join("portcullis.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let path = dir.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let run = Running::start(&config, &[("NOTIFY_SOCKET", path.display().to_string())]);
    (dir, systemd, run)
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let (dir, systemd, mut run) = under_systemd();
    let config = dir.path().join("portcullis.yaml");

    let ready = next(&systemd, &run);
    assert_eq!(ready, "READY=1\nSTATUS=serving");
    assert!(
        run.log().contains("listening"),
        "ready before bound:\n{}",
        run.log()
    );

    // systemctl reload: RELOADING=1 with CLOCK_MONOTONIC in µs, then READY=1.
    hup(&run);
    let reloading = next(&systemd, &run);
    let usec = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("{reloading:?}"));
    let usec: u64 = usec.parse().unwrap();
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (usec as f64 / 1e6 - uptime).abs() < 5.0,
        "MONOTONIC_USEC={usec} is not this boot's monotonic clock ({uptime} s)"
    );
    assert_eq!(
        next(&systemd, &run),
        "READY=1\nSTATUS=serving; configuration reloaded"
    );

    // A refused config: still serving the old one, and systemd is told so.
    std::fs::write(&config, "listeners: [").unwrap();
    hup(&run);
    assert!(next(&systemd, &run).starts_with("RELOADING=1\n"));
    assert_eq!(
        next(&systemd, &run),
        "READY=1\nSTATUS=serving the previous configuration: the reload failed"
    );

    assert!(run.stop().success());
    assert_eq!(next(&systemd, &run), "STOPPING=1\nSTATUS=draining");
}

/// systemd's own socket is an abstract one (`@/org/freedesktop/…`).
#[test]
fn an_abstract_notify_socket_is_reached_too() {
    use std::os::linux::net::SocketAddrExt;
    let dir = common::scratch();
    let config = dir.path().join("portcullis.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let name = format!("portcullis-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let systemd = UnixDatagram::bind_addr(&addr).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut run = Running::start(&config, &[("NOTIFY_SOCKET", format!("@{name}"))]);
    assert_eq!(next(&systemd, &run), "READY=1\nSTATUS=serving");
    assert!(run.stop().success());
}

/// `portcullis upgrade` under `Type=notify` with `NotifyAccess=all`: the new
/// process names itself the main process (`MAINPID=`) once the old one told
/// it to go, says it serves, and the old one exits without `STOPPING=1`
/// (systemd would take that for the service stopping).
#[test]
fn an_upgrade_hands_systemd_the_new_main_process() {
    let (dir, systemd, mut run) = under_systemd();
    let config = dir.path().join("portcullis.yaml");
    assert_eq!(next(&systemd, &run), "READY=1\nSTATUS=serving");

    let (code, out, err) = common::process::portcullis(
        &["upgrade", "--config", common::process::path_str(&config)],
        Duration::from_secs(120),
    );
    assert_eq!(code, 0, "{out}{err}\n{}", run.log());
    let pid: u32 = out
        .strip_prefix("process ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    // The new process names itself once told to go, before it says it
    // took over (so before the old one can exit), then it is ready.
    assert_eq!(
        next(&systemd, &run),
        format!("MAINPID={pid}\nSTATUS=upgraded: process {pid} serves")
    );
    assert_eq!(next(&systemd, &run), "READY=1\nSTATUS=serving");

    // The old process had no session: it exits at once, and quietly.
    let status = run.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{}", run.log());
    // Not a word from it on its way out (a STOPPING=1 would stop the unit).
    systemd
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 4096];
    if let Ok(n) = systemd.recv(&mut buf) {
        panic!(
            "after the handover: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    systemd
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();

    // The new one is the service now: its stop is the service's.
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    assert_eq!(next(&systemd, &run), "STOPPING=1\nSTATUS=draining");
}
