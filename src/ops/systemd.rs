//! systemd's readiness protocol (`sd_notify(3)`, `Type=notify`): a
//! datagram to `$NOTIFY_SOCKET` when the listeners are bound (`READY=1`),
//! around each reload (`RELOADING=1`, then `READY=1`), at shutdown
//! (`STOPPING=1`), and when a new process takes over (`MAINPID=`). Written by hand: it is one `sendto` of a few bytes, and
//! libsystemd would be a C dependency for it. Without `$NOTIFY_SOCKET`
//! (not under systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;

use tracing::debug;

/// The listeners are bound and serving.
pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}"));
}

/// A reload begins: systemd shows `reloading` until the next `ready`.
pub fn reloading() {
    // systemd ≥ 253 wants the time the reload began, on CLOCK_MONOTONIC.
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// Process `pid` is the service's main process (`portcullis upgrade`): the
/// new process says so of itself when it takes over, and an old one of
/// itself when the new one did not.
pub fn main_pid(pid: u32) {
    notify(&format!(
        "MAINPID={pid}\nSTATUS=upgraded: process {pid} serves"
    ));
}

/// Shutdown begins: no longer accepting, draining.
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=draining");
}

/// Sends `state` to `$NOTIFY_SOCKET`, a path or (`@…`) an abstract name.
/// Failures are logged at debug: readiness is systemd's business, serving
/// goes on either way.
fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            None => socket.send_to(state.as_bytes(), &path),
        }
    });
    if let Err(e) = sent {
        debug!(error = %e, socket = ?path, "systemd notification not sent");
    }
}
