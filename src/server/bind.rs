//! Sockets: which one serves a configured address ([`BindKey`]), and
//! binding them (dual-stack `[::]` unless `0.0.0.0` takes the same port).

use std::collections::BTreeSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;

use super::snapshot::listener_ctx;
use super::BuildError;
use crate::acme::challenge::Challenges;
use crate::config::{Config, Listener};
use crate::metrics::Metrics;
use crate::ops::handover::Inherited;
use crate::proxy::context::ListenerCtx;
use crate::proxy::runtime::Runtime;
use crate::tls::hosts::HostTable;
use crate::tls::TlsContext;

/// Which socket serves a configured address. An address with port 0 gets
/// a fresh port when bound, so it is only "the same" within its listener.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum BindKey {
    Addr(SocketAddr),
    Ephemeral(String, SocketAddr),
}

impl BindKey {
    pub(super) fn new(listener: &str, addr: SocketAddr) -> BindKey {
        if addr.port() == 0 {
            BindKey::Ephemeral(listener.to_string(), addr)
        } else {
            BindKey::Addr(addr)
        }
    }

    /// The key's name between an old and a new process (`handover`).
    pub(super) fn wire(&self) -> String {
        match self {
            BindKey::Addr(a) => format!("tcp {a}"),
            BindKey::Ephemeral(listener, a) => format!("tcp {a} {listener}"),
        }
    }
}

/// The admin endpoint's socket between an old and a new process.
pub(super) fn admin_key(addr: SocketAddr) -> String {
    format!("admin {addr}")
}

/// The socket for `key`: the one a replaced process handed over, or a new
/// one bound to `addr`.
fn take_or_bind(
    inherited: &mut Inherited,
    key: &str,
    addr: SocketAddr,
    v4_any: &BTreeSet<u16>,
) -> io::Result<TcpListener> {
    match inherited.take_tcp(key) {
        Some(socket) => socket,
        None => bind_socket(addr, v4_any),
    }
}

/// Sockets bound at start, each with its accept loop's settings and its
/// listener's name, for `Server::run` to hand to their accept loops.
pub(super) type Sockets = Vec<(BindKey, Arc<ArcSwap<ListenerCtx>>, TcpListener, String)>;

/// Binds every listener address of `config`; an address that cannot be
/// bound is an error in the list, the others go on.
pub(super) fn bind_listeners(
    config: &Config,
    tls: &TlsContext,
    table: &Arc<HostTable>,
    challenges: &Arc<Challenges>,
    metrics: &Arc<Metrics>,
    runtime: &Arc<Runtime>,
    inherited: &mut Inherited,
) -> Result<(Sockets, Vec<BuildError>), Vec<BuildError>> {
    let v4_any = v4_any_ports(config.listeners.values());
    let mut sockets = Vec::new();
    let mut errors = Vec::new();
    for l in config.listeners.values() {
        let ctx = Arc::new(
            listener_ctx(config, l, tls, table, challenges, metrics, runtime)
                .map_err(|e| vec![e])?,
        );
        for addr in &l.bind {
            // Each address its own: a reload may give it to another listener.
            let settings = Arc::new(ArcSwap::new(ctx.clone()));
            let key = BindKey::new(&l.name, *addr);
            match take_or_bind(inherited, &key.wire(), *addr, &v4_any) {
                Ok(s) => sockets.push((key, settings, s, l.name.clone())),
                Err(source) => errors.push(BuildError::Bind {
                    listener: l.name.clone(),
                    addr: *addr,
                    source,
                }),
            }
        }
    }
    Ok((sockets, errors))
}

/// The admin endpoint's socket, if `admin.bind` is set; a failure goes
/// into `errors`.
pub(super) fn bind_admin(
    config: &Config,
    errors: &mut Vec<BuildError>,
    inherited: &mut Inherited,
) -> Option<TcpListener> {
    let a = config.admin.as_ref()?;
    let v4_any = v4_any_ports(config.listeners.values());
    match take_or_bind(inherited, &admin_key(a.bind), a.bind, &v4_any) {
        Ok(s) => Some(s),
        Err(source) => {
            errors.push(BuildError::AdminBind {
                addr: a.bind,
                source,
            });
            None
        }
    }
}

/// Ports on which some listener binds `0.0.0.0`: an `[::]` socket on the same
/// port must then be IPv6-only, or the two binds collide. Elsewhere `[::]` is
/// dual-stack and takes IPv4 clients too.
pub(super) fn v4_any_ports<'a>(listeners: impl Iterator<Item = &'a Listener>) -> BTreeSet<u16> {
    let mut v4_any = BTreeSet::new();
    for l in listeners {
        for a in &l.bind {
            if a.ip() == Ipv4Addr::UNSPECIFIED {
                v4_any.insert(a.port());
            }
        }
    }
    v4_any
}

pub(super) fn bind_socket(
    addr: SocketAddr,
    v4_any_ports: &BTreeSet<u16>,
) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if let SocketAddr::V6(v6) = addr {
        let dual = v6.ip().is_unspecified() && !v4_any_ports.contains(&addr.port());
        socket.set_only_v6(!dual)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}
