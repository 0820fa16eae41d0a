//! The operator's side: the admin endpoint (`admin`), the control socket
//! behind `portcullis certs`, `renew` and `reload` (`control`), the runtime
//! view and switches behind `status`, `sessions`, `drain` and `enable`
//! (`status`, reading [`crate::proxy::runtime`]), what asks
//! for a reload (`reload`), notifications (`notify`), logs (`logging`).
//!
//! It reads the running server's state through one small interface, a
//! [`View`] per host that the server publishes, and hears what the ACME
//! tasks do through [`reports::AcmeReports`]; it tells systemd how the
//! server is (`systemd`). Nothing below imports it.

pub mod admin;
pub mod control;
pub mod handover;
pub mod logging;
pub mod notify;
pub mod reload;
pub mod reports;
pub mod status;
pub mod systemd;
pub mod tlsa;

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::acme::HostHandle;
use crate::tls::hosts::CertSlot;

/// A host as the operator side sees it: its names, the certificate it
/// serves now, and its ACME task if it has one.
#[derive(Clone, Debug)]
pub struct View {
    pub names: Vec<String>,
    pub slot: Arc<CertSlot>,
    pub acme: Option<HostHandle>,
}

/// Every host, swapped whole by the server on each reload.
pub type Views = Arc<ArcSwap<Vec<View>>>;
