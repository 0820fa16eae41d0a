//! The proxy: a session's life from accept to its last relayed byte.
//! `listener` accepts (and `limiter` turns away), `session` drives one
//! connection through `starttls`, `handshake` and `backend` to `relay`.
//!
//! ```text
//! listener ─▶ session ─┬─ starttls (plaintext dialogue) ─┐
//!   limiter            │                                  ├─▶ handshake ─▶ backend ─▶ relay
//!                      └──────────────────────────────────┘    (tls::hosts)  proxy_header
//!                      └─ http (port 80: ACME http-01, redirect, forward) ─▶ backend ─▶ relay
//!                      handshake ─▶ web (443: MTA-STS, autoconfig for `domains:`)
//! ```
//!
//! `context` (what every connection of a listener reads) and `outcome`
//! (how a session ends) are shared by the session and the port-80 handler,
//! which never imports the session back. `tls_session` is a relayed
//! session's TLS, on buffers it holds only while bytes move; `read_ahead`
//! sits under rustls's ClientHello reader and the sessions `web` answers.
//! `runtime` is what the operator sees and steers without a reload: the
//! live sessions, drained listeners and backends.

mod backend;
pub mod context;
mod handshake;
pub mod http;
pub mod limiter;
pub mod listener;
mod outcome;
pub mod proxy_header;
pub mod read_ahead;
pub mod relay;
pub mod runtime;
mod session;
pub mod starttls;
pub mod tls_session;
mod web;
