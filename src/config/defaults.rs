//! Every default of the config in one place: what a key left out means.

use std::time::Duration;

/// ClientHello read plus the rest of the handshake.
pub const HANDSHAKE: Duration = Duration::from_secs(10);
/// Greeting to STARTTLS takes a client well under a second.
pub const DIALOGUE: Duration = Duration::from_secs(60);
pub const CONNECT: Duration = Duration::from_secs(5);
/// Longer than the 29 minutes RFC 2177 lets an IMAP IDLE client stay silent.
pub const IDLE: Duration = Duration::from_secs(31 * 60);
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Each proxied session costs two descriptors; 20,000 per process is common.
pub const MAX_CONNECTIONS: usize = 9_000;
pub const STATE_DIR: &str = "./state";

/// The config file every subcommand reads unless `--config` names another.
pub const CONFIG_PATH: &str = "/etc/portcullis/config.yaml";
/// Per client address and listener: an office of a hundred behind one
/// NAT address (Thunderbird keeps up to five IMAP connections per
/// account, a phone two or three) stays below it; eight mail listeners
/// of one address still leave most of `max_connections` to others.
pub const CONNECTIONS_PER_IP: u32 = 500;
/// New connections (TLS handshakes) per second from one address,
/// sustained; a mail client opens a handful per minute.
pub const HANDSHAKES_PER_IP: u32 = 20;
/// New connections allowed at once above that rate (a client starting
/// up, a webmail after a restart).
pub const HANDSHAKE_BURST: u32 = 100;
/// Never limited: a webmail or load balancer on the same machine.
pub const EXEMPT: [&str; 2] = ["127.0.0.0/8", "::1/128"];
pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";
/// How long the authoritative servers get to serve a dns-01 record
/// (`acme.dns.propagation_timeout`) before the attempt fails.
pub const DNS_PROPAGATION_TIMEOUT: Duration = Duration::from_secs(120);
