//! Handing the listening sockets of a running portcullis to the new process
//! that replaces it (`portcullis upgrade`, SIGUSR2): the wire between the
//! two. What each side does around it is [`crate::server`]'s.
//!
//! The old process listens on an abstract Unix socket whose name it gives
//! the new one in `$PORTCULLIS_UPGRADE_SOCKET`, and takes only the process
//! it started (`SO_PEERCRED`): no file is left behind, no `state_dir` is
//! needed, and no other local process can take the sockets. It is a
//! `SOCK_SEQPACKET` socket, so every message arrives whole and alone, with
//! the descriptor sent with it (`SCM_RIGHTS`).
//!
//! - old → new: `socket KEY` with the socket, once for each; then `end`.
//! - new → old: `ready` once it accepts on them; or `failed REASON`.
//! - old → new: `go` once it no longer accepts and its ACME tasks, control
//!   socket and admin endpoint have stopped. The new process starts those
//!   only then, so two processes never order certificates at once.
//!
//! Passing descriptors over a socket rather than leaving them open across
//! `exec` (nginx, systemd's `LISTEN_FDS`): that needs a `pre_exec` hook in
//! the parent and raw descriptor numbers taken on trust in the child, both
//! `unsafe`, where `SCM_RIGHTS` through rustix gives each side an `OwnedFd`
//! in safe code. Cloudflare's `shellflip` does the same with a restart
//! coordinator and serialised state of its own; portcullis hands over
//! sockets only, and its sessions drain in the old process.

use std::collections::BTreeMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::net::{
    self, sockopt, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

/// Where the new process finds the old one.
pub const ENV: &str = "PORTCULLIS_UPGRADE_SOCKET";

/// The longest message either side sends (a `failed` reason is cut there).
const MESSAGE: usize = 4096;
/// How often a wait looks whether the other process is still there.
const TICK: Duration = Duration::from_millis(100);

static HANDED_OVER: AtomicBool = AtomicBool::new(false);

/// Marks this process as having handed its sockets on: the control socket
/// file is the new process's now and stays when this one stops.
pub fn mark_handed_over() {
    HANDED_OVER.store(true, Ordering::SeqCst);
}

/// Whether this process handed its sockets to a new one.
pub fn handed_over() -> bool {
    HANDED_OVER.load(Ordering::SeqCst)
}

/// The old process's end before the new one connects.
pub struct Offer {
    listener: OwnedFd,
    name: String,
}

impl Offer {
    /// Listens on a fresh abstract name.
    pub fn open() -> io::Result<Offer> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let name = format!("portcullis-upgrade-{}-{nanos:08x}", std::process::id());
        let listener = net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        net::bind(
            &listener,
            &SocketAddrUnix::new_abstract_name(name.as_bytes())?,
        )?;
        net::listen(&listener, 4)?;
        // accept(2) honours the receive timeout: each wait is one tick.
        sockopt::set_socket_timeout(&listener, sockopt::Timeout::Recv, Some(TICK))?;
        Ok(Offer { listener, name })
    }

    /// The value of [`ENV`] for the new process.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits until process `pid` connects, or `gone` says it ended, or
    /// `deadline`. Others that connect are turned away.
    pub fn accept(
        &self,
        pid: u32,
        deadline: Instant,
        gone: &mut dyn FnMut() -> Option<String>,
    ) -> Result<Peer, String> {
        loop {
            match net::accept_with(&self.listener, SocketFlags::CLOEXEC) {
                Ok(fd) => match sockopt::socket_peercred(&fd) {
                    Ok(cred) if cred.pid.as_raw_nonzero().get() as u32 == pid => {
                        return Ok(Peer(fd))
                    }
                    Ok(cred) => tracing::warn!(
                        pid = cred.pid.as_raw_nonzero().get(),
                        "upgrade: a process other than the new one connected; turned away"
                    ),
                    Err(e) => tracing::warn!(error = %e, "upgrade: cannot tell who connected"),
                },
                Err(e) if is_timeout(e) => {}
                Err(e) => return Err(format!("upgrade socket: {e}")),
            }
            if let Some(why) = gone() {
                return Err(why);
            }
            if Instant::now() > deadline {
                return Err("the new process did not connect in time".into());
            }
        }
    }
}

/// One end of the connection between the two processes.
pub struct Peer(OwnedFd);

/// What [`Peer::recv`] got.
#[derive(Debug)]
pub enum Received {
    /// A message and the descriptors that came with it.
    Message(String, Vec<OwnedFd>),
    /// Nothing within the wait.
    Nothing,
    /// The other side closed.
    Closed,
}

impl Peer {
    /// Connects to the old process named `name` (the value of [`ENV`]).
    pub fn connect(name: &str) -> io::Result<Peer> {
        let fd = net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        net::connect(&fd, &SocketAddrUnix::new_abstract_name(name.as_bytes())?)?;
        Ok(Peer(fd))
    }

    /// Sends one message, with `fd` if given.
    pub fn send(&self, text: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let text = cut(text, MESSAGE);
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("descriptor does not fit the message"));
        }
        let sent = net::sendmsg(
            &self.0,
            &[IoSlice::new(text.as_bytes())],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        if sent != text.len() {
            return Err(io::Error::other("message sent in part"));
        }
        Ok(())
    }

    /// Waits up to `wait` for one message.
    pub fn recv(&self, wait: Duration) -> io::Result<Received> {
        sockopt::set_socket_timeout(&self.0, sockopt::Timeout::Recv, Some(wait))?;
        let mut buf = vec![0u8; MESSAGE];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = match net::recvmsg(
            &self.0,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(got) => got,
            Err(e) if is_timeout(e) => return Ok(Received::Nothing),
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = message {
                fds.extend(rights);
            }
        }
        if got.bytes == 0 && fds.is_empty() {
            return Ok(Received::Closed);
        }
        buf.truncate(got.bytes);
        let text = String::from_utf8(buf)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "message is not UTF-8"))?;
        Ok(Received::Message(text, fds))
    }

    /// Waits until `deadline` for a message, looking at `gone` every tick.
    pub fn recv_until(
        &self,
        deadline: Instant,
        gone: &mut dyn FnMut() -> Option<String>,
    ) -> Result<(String, Vec<OwnedFd>), String> {
        loop {
            match self.recv(TICK) {
                Ok(Received::Message(text, fds)) => return Ok((text, fds)),
                Ok(Received::Closed) => {
                    // Closed: the other process is ending; give its exit a
                    // moment to be seen, for the reason.
                    std::thread::sleep(TICK);
                    return Err(gone().unwrap_or_else(|| "closed the connection".into()));
                }
                Ok(Received::Nothing) => {}
                Err(e) => return Err(e.to_string()),
            }
            if let Some(why) = gone() {
                return Err(why);
            }
            if Instant::now() > deadline {
                return Err("no answer in time".into());
            }
        }
    }
}

fn is_timeout(e: rustix::io::Errno) -> bool {
    e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR
}

/// `text` cut to at most `limit` bytes, on a character boundary.
fn cut(text: &str, limit: usize) -> &str {
    let mut end = text.len().min(limit);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The sockets a new process was given, by key, until it takes them.
#[derive(Debug, Default)]
pub struct Inherited(BTreeMap<String, OwnedFd>);

impl Inherited {
    /// The TCP listening socket sent as `key`, if there is one.
    pub fn take_tcp(&mut self, key: &str) -> Option<io::Result<tokio::net::TcpListener>> {
        let fd = self.0.remove(key)?;
        let std = std::net::TcpListener::from(fd);
        Some(
            std.set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(std)),
        )
    }

    /// The socket sent as `key`, if there is one.
    pub fn take(&mut self, key: &str) -> Option<OwnedFd> {
        self.0.remove(key)
    }

    /// Keys not taken (their sockets close when this drops).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

/// The new process's end: what it was given, and how it answers.
pub struct Successor {
    peer: Peer,
}

impl Successor {
    /// Connects to the old process named in [`ENV`] and takes its sockets;
    /// `None` when this process was started some other way.
    pub fn from_env() -> Option<Result<(Successor, Inherited), String>> {
        let name = std::env::var(ENV).ok().filter(|n| !n.is_empty())?;
        Some(Successor::receive(&name))
    }

    fn receive(name: &str) -> Result<(Successor, Inherited), String> {
        let peer = Peer::connect(name)
            .map_err(|e| format!("cannot reach the process to replace ({ENV}={name}): {e}"))?;
        let mut sockets = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (text, mut fds) = peer.recv_until(deadline, &mut || None)?;
            if text == "end" {
                return Ok((Successor { peer }, Inherited(sockets)));
            }
            match (text.strip_prefix("socket "), fds.pop()) {
                (Some(key), Some(fd)) if fds.is_empty() => {
                    sockets.insert(key.to_string(), fd);
                }
                _ => return Err(format!("unexpected message from the old process: {text:?}")),
            }
        }
    }

    /// Says this process accepts on its sockets now.
    pub fn ready(&self) -> io::Result<()> {
        self.peer.send("ready", None)
    }

    /// Says why this process cannot take over; the old one keeps serving.
    pub fn failed(self, reason: &str) {
        if let Err(e) = self.peer.send(&format!("failed {reason}"), None) {
            tracing::warn!(error = %e, "cannot tell the old process why");
        }
    }

    /// Waits (blocking, up to `limit`) until the old process says `go`:
    /// `Ok` then or when it is gone, `Err` when it did not say in time.
    pub fn wait_go(self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            match self.peer.recv(TICK) {
                Ok(Received::Message(text, _)) if text == "go" => return Ok(()),
                Ok(Received::Message(text, _)) => {
                    return Err(format!("unexpected message from the old process: {text:?}"))
                }
                // The old process is gone: nothing of it runs any more.
                Ok(Received::Closed) => return Ok(()),
                Ok(Received::Nothing) if Instant::now() < deadline => {}
                Ok(Received::Nothing) => {
                    return Err(format!("no word from the old process within {limit:?}"))
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// Sends `sockets` (key, socket) and `end` to the new process.
pub fn send_sockets(peer: &Peer, sockets: &[(String, OwnedFd)]) -> io::Result<()> {
    for (key, fd) in sockets {
        peer.send(&format!("socket {key}"), Some(fd.as_fd()))?;
    }
    peer.send("end", None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_and_messages_cross_and_strangers_are_turned_away() {
        let offer = Offer::open().unwrap();
        let name = offer.name().to_string();
        // A connection from a process other than the one expected (pid 1):
        // turned away, and the wait goes on to its deadline.
        let stranger = Peer::connect(&name).unwrap();
        let soon = Instant::now() + Duration::from_millis(300);
        assert!(offer.accept(1, soon, &mut || None).is_err());
        assert!(matches!(
            stranger.recv(Duration::from_secs(1)).unwrap(),
            Received::Closed
        ));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Connected from this process: its pid is ours.
        let child = std::thread::spawn(move || {
            let (successor, mut inherited) = Successor::receive(&name).unwrap();
            assert_eq!(inherited.keys().collect::<Vec<_>>(), ["tcp 127.0.0.1:1"]);
            let got = std::net::TcpListener::from(inherited.take("tcp 127.0.0.1:1").unwrap());
            assert_eq!(got.local_addr().unwrap(), addr);
            successor.ready().unwrap();
            successor.wait_go(Duration::from_secs(5))
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let peer = offer
            .accept(std::process::id(), deadline, &mut || None)
            .unwrap();
        send_sockets(&peer, &[("tcp 127.0.0.1:1".into(), listener.into())]).unwrap();
        let (text, _) = peer.recv_until(deadline, &mut || None).unwrap();
        assert_eq!(text, "ready");
        peer.send("go", None).unwrap();
        assert_eq!(child.join().unwrap(), Ok(()));
        // The other side is gone: a wait ends at once, with the reason.
        let gone = peer.recv_until(deadline, &mut || Some("exited".into()));
        assert_eq!(gone.unwrap_err(), "exited");
    }

    #[test]
    fn a_successor_whose_old_process_is_gone_goes_ahead() {
        let offer = Offer::open().unwrap();
        let name = offer.name().to_string();
        let child = std::thread::spawn(move || {
            let (successor, _) = Successor::receive(&name).unwrap();
            successor.wait_go(Duration::from_secs(5))
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let peer = offer
            .accept(std::process::id(), deadline, &mut || None)
            .unwrap();
        send_sockets(&peer, &[]).unwrap();
        drop(peer);
        assert_eq!(child.join().unwrap(), Ok(()));
    }

    #[test]
    fn a_long_reason_is_cut_on_a_character_boundary() {
        let long = "é".repeat(MESSAGE);
        let cut = cut(&long, MESSAGE - 1);
        assert!(cut.len() < MESSAGE);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
