//! Handing the listening sockets of a running portcullis to the new process
//! that replaces it (`portcullis upgrade`, SIGUSR2): the wire between the
//! two. What each side does around it is [`crate::server`]'s.
//!
//! The old process listens on an abstract Unix socket whose name it gives
//! the new one in `$PORTCULLIS_UPGRADE_SOCKET`, with a random token in
//! `$PORTCULLIS_UPGRADE_TOKEN` (a process's environment is readable by its
//! own user only); it takes only a connection that says the token first.
//! No file is left behind, no `state_dir` is needed, and no other local
//! process can take the sockets. It is a `SOCK_SEQPACKET` socket, so every
//! message arrives whole and alone, with the descriptor sent with it
//! (`SCM_RIGHTS`).
//!
//! - new → old: `hello TOKEN`.
//! - old → new: `socket KEY` with the socket, once for each; `drained
//!   NAME` for each listener or backend drained there; then `end`.
//! - new → old: `ready VERSION` once it accepts on them; or `failed REASON`.
//! - old → new: `go` once it no longer accepts and its ACME tasks, control
//!   socket and admin endpoint have stopped. Or `abort`: the old process
//!   gave up, serves on, and the new one drains what it accepted and exits
//!   without starting anything. The old process says `abort` whenever it
//!   gives up, so a connection closed without it means the old process
//!   died.
//! - new → old: `started` (it is systemd's main process now, and starts
//!   its services), or `failed REASON` (it was told to stop). Only then
//!   does the old process drain; without it, it accepts again.
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
/// What it says first, so that the old one knows it.
pub const TOKEN_ENV: &str = "PORTCULLIS_UPGRADE_TOKEN";

/// The longest message either side sends (a `failed` reason is cut there).
const MESSAGE: usize = 4096;
/// How often a wait looks whether the other process is still there.
const TICK: Duration = Duration::from_millis(100);

static HANDED_OVER: AtomicBool = AtomicBool::new(false);

/// Marks this process as having handed its sockets on (or not, once more):
/// the control socket file is the new process's and stays when this one
/// stops.
pub fn mark_handed_over(handed: bool) {
    HANDED_OVER.store(handed, Ordering::SeqCst);
}

/// Whether this process handed its sockets to a new one.
pub fn handed_over() -> bool {
    HANDED_OVER.load(Ordering::SeqCst)
}

/// The old process's end before the new one connects.
pub struct Offer {
    listener: OwnedFd,
    name: String,
    token: String,
}

impl Offer {
    /// Listens on a fresh abstract name.
    pub fn open() -> io::Result<Offer> {
        let mut random = [0u8; 16];
        aws_lc_rs::rand::fill(&mut random)
            .map_err(|_| io::Error::other("no random bytes for the upgrade token"))?;
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let name = format!(
            "portcullis-upgrade-{}-{}",
            std::process::id(),
            hex(&random[..4])
        );
        let token = hex(&random[4..]);
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
        Ok(Offer {
            listener,
            name,
            token,
        })
    }

    /// The values of [`ENV`] and [`TOKEN_ENV`] for the new process.
    pub fn env(&self) -> [(&'static str, &str); 2] {
        [(ENV, &self.name), (TOKEN_ENV, &self.token)]
    }

    /// Waits until the new process connects and says the token, or `gone`
    /// says it ended, or `deadline`. Others that connect are turned away.
    pub fn accept(
        &self,
        deadline: Instant,
        gone: &mut dyn FnMut() -> Option<String>,
    ) -> Result<Peer, String> {
        let hello = format!("hello {}", self.token);
        loop {
            match net::accept_with(&self.listener, SocketFlags::CLOEXEC) {
                Ok(fd) => {
                    let peer = Peer(fd);
                    match peer.recv(Duration::from_secs(1)) {
                        Ok(Received::Message(text, _)) if text == hello => return Ok(peer),
                        _ => tracing::warn!(
                            "upgrade: a connection without the token was turned away"
                        ),
                    }
                }
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
    /// Connects to the old process named `name` (the value of [`ENV`])
    /// and says `token`.
    pub fn connect(name: &str, token: &str) -> io::Result<Peer> {
        let fd = net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        net::connect(&fd, &SocketAddrUnix::new_abstract_name(name.as_bytes())?)?;
        let peer = Peer(fd);
        peer.send(&format!("hello {token}"), None)?;
        Ok(peer)
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

/// A listening TCP socket, handed over or copied, as tokio's.
pub fn tcp_listener(fd: OwnedFd) -> io::Result<tokio::net::TcpListener> {
    let socket = std::net::TcpListener::from(fd);
    socket.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(socket)
}

/// The sockets a new process was given, by key, until it takes them; and
/// what was drained in the old one.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: BTreeMap<String, OwnedFd>,
    /// Listener names and backend addresses, as `portcullis drain` takes them.
    pub drained: Vec<String>,
}

impl Inherited {
    /// The TCP listening socket sent as `key`, if there is one.
    pub fn take_tcp(&mut self, key: &str) -> Option<io::Result<tokio::net::TcpListener>> {
        self.sockets.remove(key).map(tcp_listener)
    }

    /// The socket sent as `key`, if there is one.
    pub fn take(&mut self, key: &str) -> Option<OwnedFd> {
        self.sockets.remove(key)
    }

    /// Keys not taken (their sockets close when this drops).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.sockets.keys().map(String::as_str)
    }
}

/// The new process's end: what it was given, and how it answers.
pub struct Successor {
    peer: Peer,
}

/// What the old process said after `ready`.
#[derive(Debug, PartialEq, Eq)]
pub enum Word {
    /// It stopped its services: take over.
    Go,
    /// Nothing within the wait: it is stuck; take over anyway.
    Silent,
    /// It ended without a word (a crash): nothing of it runs any more.
    Gone,
    /// It gave up on this process and serves on, or this process was told
    /// to stop: drain and exit, and start nothing that would run twice.
    Abandoned(String),
}

impl Successor {
    /// Connects to the old process named in [`ENV`] and takes its sockets;
    /// `None` when this process was started some other way.
    pub fn from_env() -> Option<Result<(Successor, Inherited), String>> {
        let name = std::env::var(ENV).ok().filter(|n| !n.is_empty())?;
        let token = std::env::var(TOKEN_ENV).unwrap_or_default();
        Some(Successor::receive(&name, &token))
    }

    fn receive(name: &str, token: &str) -> Result<(Successor, Inherited), String> {
        let peer = Peer::connect(name, token)
            .map_err(|e| format!("cannot reach the process to replace ({ENV}={name}): {e}"))?;
        let mut inherited = Inherited::default();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (text, mut fds) = peer.recv_until(deadline, &mut || None)?;
            if text == "end" {
                return Ok((Successor { peer }, inherited));
            }
            if let Some(name) = text.strip_prefix("drained ") {
                inherited.drained.push(name.to_string());
                continue;
            }
            match (text.strip_prefix("socket "), fds.pop()) {
                (Some(key), Some(fd)) if fds.is_empty() => {
                    inherited.sockets.insert(key.to_string(), fd);
                }
                _ => return Err(format!("unexpected message from the old process: {text:?}")),
            }
        }
    }

    /// Says this process accepts on its sockets now.
    pub fn ready(&self) -> io::Result<()> {
        self.peer
            .send(&format!("ready {}", env!("CARGO_PKG_VERSION")), None)
    }

    /// Says why this process cannot take over; the old one keeps serving.
    pub fn failed(self, reason: &str) {
        if let Err(e) = self.peer.send(&format!("failed {reason}"), None) {
            tracing::warn!(error = %e, "cannot tell the old process why");
        }
    }

    /// Waits (blocking, up to `limit`) for the old process's word. When
    /// `stop` is set meanwhile, tells the old one so (it accepts again).
    pub fn wait_go(&self, limit: Duration, stop: &AtomicBool) -> Word {
        let deadline = Instant::now() + limit;
        loop {
            if stop.load(Ordering::SeqCst) {
                let _ = self.peer.send("failed this process was told to stop", None);
                return Word::Abandoned("this process was told to stop".into());
            }
            match self.peer.recv(TICK) {
                Ok(Received::Message(text, _)) if text == "go" => return Word::Go,
                Ok(Received::Message(text, _)) if text == "abort" => {
                    return Word::Abandoned("it gave up waiting for this one".into())
                }
                Ok(Received::Message(text, _)) => {
                    return Word::Abandoned(format!("unexpected message {text:?}"))
                }
                Ok(Received::Nothing) if Instant::now() < deadline => {}
                Ok(Received::Nothing) => return Word::Silent,
                Ok(Received::Closed) | Err(_) => return Word::Gone,
            }
        }
    }

    /// Says this process took over: the old one drains now.
    pub fn started(&self) -> io::Result<()> {
        self.peer.send("started", None)
    }
}

/// Sends `sockets` (key, socket), the `drained` names and `end` to the
/// new process.
pub fn send_sockets(
    peer: &Peer,
    sockets: &[(String, OwnedFd)],
    drained: &[String],
) -> io::Result<()> {
    for (key, fd) in sockets {
        peer.send(&format!("socket {key}"), Some(fd.as_fd()))?;
    }
    for name in drained {
        peer.send(&format!("drained {name}"), None)?;
    }
    peer.send("end", None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The old side's accept, on a thread, for a successor in this process.
    fn accept(offer: Offer) -> std::thread::JoinHandle<Result<Peer, String>> {
        std::thread::spawn(move || {
            offer.accept(Instant::now() + Duration::from_secs(5), &mut || None)
        })
    }

    fn names(offer: &Offer) -> (String, String) {
        let [(_, name), (_, token)] = offer.env().map(|(k, v)| (k, v.to_string()));
        (name, token)
    }

    #[test]
    fn sockets_and_messages_cross_and_strangers_are_turned_away() {
        let offer = Offer::open().unwrap();
        let (name, token) = names(&offer);
        // Without the token: turned away, and the wait goes on.
        let stranger = Peer::connect(&name, "guess").unwrap();
        let soon = Instant::now() + Duration::from_millis(300);
        assert!(offer.accept(soon, &mut || None).is_err());
        assert!(matches!(
            stranger.recv(Duration::from_secs(1)).unwrap(),
            Received::Closed
        ));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let old = accept(offer);
        let new = std::thread::spawn(move || {
            let (successor, mut inherited) = Successor::receive(&name, &token).unwrap();
            assert_eq!(inherited.keys().collect::<Vec<_>>(), ["tcp 127.0.0.1:1"]);
            assert_eq!(inherited.drained, ["imaps", "127.0.0.1:143"]);
            let got = std::net::TcpListener::from(inherited.take("tcp 127.0.0.1:1").unwrap());
            assert_eq!(got.local_addr().unwrap(), addr);
            successor.ready().unwrap();
            let word = successor.wait_go(Duration::from_secs(5), &AtomicBool::new(false));
            successor.started().unwrap();
            word
        });
        let peer = old.join().unwrap().unwrap();
        let drained = ["imaps".to_string(), "127.0.0.1:143".to_string()];
        send_sockets(
            &peer,
            &[("tcp 127.0.0.1:1".into(), listener.into())],
            &drained,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let (text, _) = peer.recv_until(deadline, &mut || None).unwrap();
        assert_eq!(text, format!("ready {}", env!("CARGO_PKG_VERSION")));
        peer.send("go", None).unwrap();
        let (text, _) = peer.recv_until(deadline, &mut || None).unwrap();
        assert_eq!(text, "started");
        assert_eq!(new.join().unwrap(), Word::Go);
        // The other side is gone: a wait ends at once, with the reason.
        let gone = peer.recv_until(deadline, &mut || Some("exited".into()));
        assert_eq!(gone.unwrap_err(), "exited");
    }

    /// What the new process makes of each thing the old one can do after
    /// `ready`: give up (`abort`), die (a close without a word), say
    /// nothing; and what it says when it is told to stop itself.
    #[test]
    fn every_answer_to_ready_is_understood() {
        for (case, expect) in [
            ("abort", "abandoned"),
            ("close", "gone"),
            ("silence", "silent"),
            ("stop", "abandoned"),
        ] {
            let offer = Offer::open().unwrap();
            let (name, token) = names(&offer);
            let old = accept(offer);
            let new = std::thread::spawn(move || {
                let (successor, _) = Successor::receive(&name, &token).unwrap();
                let stop = AtomicBool::new(case == "stop");
                successor.wait_go(Duration::from_millis(300), &stop)
            });
            let peer = old.join().unwrap().unwrap();
            send_sockets(&peer, &[], &[]).unwrap();
            match case {
                "abort" => peer.send("abort", None).unwrap(),
                "close" => drop(peer),
                _ => {}
            }
            let word = new.join().unwrap();
            let got = match &word {
                Word::Abandoned(_) => "abandoned",
                Word::Gone => "gone",
                Word::Silent => "silent",
                Word::Go => "go",
            };
            assert_eq!(got, expect, "{case}: {word:?}");
        }
    }

    #[test]
    fn a_successor_told_to_stop_says_so() {
        let offer = Offer::open().unwrap();
        let (name, token) = names(&offer);
        let old = accept(offer);
        let new = std::thread::spawn(move || {
            let (successor, _) = Successor::receive(&name, &token).unwrap();
            successor.wait_go(Duration::from_secs(5), &AtomicBool::new(true))
        });
        let peer = old.join().unwrap().unwrap();
        send_sockets(&peer, &[], &[]).unwrap();
        assert!(matches!(new.join().unwrap(), Word::Abandoned(_)));
        let deadline = Instant::now() + Duration::from_secs(5);
        let (text, _) = peer.recv_until(deadline, &mut || None).unwrap();
        assert_eq!(text, "failed this process was told to stop");
    }

    #[test]
    fn a_long_reason_is_cut_on_a_character_boundary() {
        let long = "é".repeat(MESSAGE);
        let cut = cut(&long, MESSAGE - 1);
        assert_eq!(cut.len(), MESSAGE - 2);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
