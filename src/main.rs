//! The `portcullis` command: parses the command line, starts logging, and maps
//! outcomes to exit codes (0 ok, 1 bad config or failed start). Everything else
//! lives in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use portcullis::config::Config;

/// Where every subcommand looks for the config without `--config`.
const CONFIG: &str = portcullis::config::defaults::CONFIG_PATH;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use portcullis::ops::control::{self, ClientError, Request, Response};
use portcullis::ops::handover::{Inherited, Successor};
use portcullis::server::{load_certificates, Server};

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "TLS-terminating front proxy for mail and web servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run in the foreground; SIGHUP reloads, SIGTERM or SIGINT drains and exits.
    Run {
        #[arg(long, short, value_name = "FILE", default_value = CONFIG)]
        config: PathBuf,
    },
    /// Validate a config file and its certificates; exit 1 on any problem.
    Check {
        #[arg(long, short, value_name = "FILE", default_value = CONFIG)]
        config: PathBuf,
    },
    /// List every host's certificate: names, source, issuer, expiry and next
    /// renewal (asks the running instance; reads the disk when none runs).
    Certs {
        #[arg(long, short, value_name = "FILE", default_value = CONFIG)]
        config: PathBuf,
        /// One JSON object per host, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running instance to renew ACME certificates that are due, or
    /// all of them with --force; waits for the outcome. Exit 1 if any failed.
    Renew {
        #[arg(long, short, value_name = "FILE", default_value = CONFIG)]
        config: PathBuf,
        /// Renew even if not due.
        #[arg(long)]
        force: bool,
        /// Order from the CA's staging directory (acme.staging; Let's
        /// Encrypt's for Let's Encrypt) and keep nothing: tests the
        /// account, the challenges and DNS without touching what is served.
        #[arg(long, conflicts_with = "force")]
        dry_run: bool,
        /// Only the host that has this name (default: every ACME host).
        name: Option<String>,
    },
    /// Ask the running instance to reload its config and certificate files
    /// and print what changed (exit 1 if the new config was refused).
    Reload {
        #[arg(long, short, value_name = "FILE", default_value = CONFIG)]
        config: PathBuf,
    },
    /// Replace the running instance with a new process of the binary at its
    /// path (after a package upgrade: the new version), or of --binary,
    /// without closing a listener or cutting a session: the new process
    /// takes over every listening socket, the old one drains. Exit 1, with
    /// the reason, if the new process did not start; the old one serves on.
    /// SIGUSR2 does the same without an answer.
    Upgrade {
        #[arg(long, short, value_name = "FILE", default_value = CONFIG)]
        config: PathBuf,
        /// The binary to start instead of the running one's path.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// Ask the running instance for its listeners (accepting or drained,
    /// open sessions), backends (drained, connect failures, last error) and
    /// a certificates summary.
    Status {
        #[arg(long, short, value_name = "FILE", default_value = CONFIG)]
        config: PathBuf,
        /// One JSON object per line, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List the live sessions (at most 1,000): id (as in the log's
    /// `session=`), listener, client, SNI, backend, age, bytes up and down.
    Sessions {
        #[arg(long, short, value_name = "FILE", default_value = CONFIG)]
        config: PathBuf,
        /// Only this listener's sessions.
        #[arg(long, value_name = "LISTENER")]
        listener: Option<String>,
        /// One JSON object per session, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Take a listener (by name) or a backend (by address:port) out of
    /// service without a reload; open sessions continue. Kept across
    /// reloads while the config still names it; `enable` undoes it.
    Drain {
        #[arg(long, short, value_name = "FILE", default_value = CONFIG)]
        config: PathBuf,
        /// A listener name or a backend's address:port.
        name: String,
    },
    /// Put a drained listener or backend back in service.
    Enable {
        #[arg(long, short, value_name = "FILE", default_value = CONFIG)]
        config: PathBuf,
        /// A listener name or a backend's address:port.
        name: String,
    },
    /// Print the DANE TLSA records of a host's certificate on disk, in
    /// zone-file form: `3 1 1` for each TLS port the host is served on.
    Tlsa {
        #[arg(long, short, value_name = "FILE", default_value = CONFIG)]
        config: PathBuf,
        /// Also the issuing CA's key (`2 1 1`).
        #[arg(long)]
        issuer: bool,
        /// A name of the host.
        name: String,
    },
    /// Print the DNS records for a mail domain of `domains:`, in zone-file
    /// form: the MTA-STS `_mta-sts` TXT (its id changes with the policy),
    /// the TLS-RPT `_smtp._tls` TXT, and the RFC 6186 SRV records of the
    /// services clients can use.
    Dns {
        #[arg(long, short, value_name = "FILE", default_value = CONFIG)]
        config: PathBuf,
        /// The mail domain (the part after the @).
        domain: String,
    },
    /// Print the version.
    Version,
    /// Write the man pages (portcullis.1, portcullis-run.1, …) into DIR,
    /// as the .deb ships them.
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config } => check(&config),
        Command::Certs { config, json } => certs(&config, json),
        Command::Renew {
            config,
            force,
            dry_run,
            name,
        } => renew(&config, force, dry_run, name),
        Command::Reload { config } => reload(&config),
        Command::Upgrade { config, binary } => upgrade(&config, binary),
        Command::Status { config, json } => runtime_view(&config, Request::Status, json),
        Command::Sessions {
            config,
            listener,
            json,
        } => runtime_view(&config, Request::Sessions { listener }, json),
        Command::Drain { config, name } => runtime_view(&config, Request::Drain { name }, false),
        Command::Enable { config, name } => runtime_view(&config, Request::Enable { name }, false),
        Command::Tlsa {
            config,
            issuer,
            name,
        } => tlsa(&config, &name, issuer),
        Command::Dns { config, domain } => dns(&config, &domain),
        Command::Man { dir } => man(&dir),
        Command::Version => {
            println!("portcullis {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}

fn check(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            eprintln!(
                "{}: {} problem(s), config not valid",
                path.display(),
                e.problems.len()
            );
            return ExitCode::FAILURE;
        }
    };
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let (loaded, errors) = load_certificates(&config, &provider, false);
    let mut errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
    // The TSIG secret files, read as an order reads them: a warning, not
    // an error, as `run` serves without them (only dns-01 orders fail).
    let mut tsig_warnings = Vec::new();
    if let Some(acme) = &config.acme {
        let all = std::iter::once(acme.dns.as_ref())
            .chain(acme.per_host.values().map(|h| h.dns.as_ref()));
        for dns in all.flatten() {
            if let Err(e) = portcullis::acme::dns01::updater(dns) {
                tsig_warnings.push(format!("warning: dns-01 orders will fail: {e}"));
            }
        }
    }
    // The etcd TLS files and password file, read as `run` reads them.
    if let Some(Err(e)) = config.store.as_ref().map(portcullis::cluster::Cluster::new) {
        errors.push(e.to_string());
    }
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("{}: {e}", path.display());
        }
        eprintln!(
            "{}: {} problem(s), config not valid",
            path.display(),
            errors.len()
        );
        return ExitCode::FAILURE;
    }
    for w in &tsig_warnings {
        eprintln!("{}: {w}", path.display());
    }
    for cert in loaded
        .iter()
        .flatten()
        .flat_map(|(a, b)| std::iter::once(a).chain(b))
    {
        if !cert.info.uncovered.is_empty() {
            eprintln!(
                "{}: warning: certificate for {} does not cover {}",
                path.display(),
                cert.info.sans.join(", "),
                cert.info.uncovered.join(", ")
            );
        }
    }
    for (plain, tls, addr) in config.plaintext_auth_risks() {
        eprintln!(
            "{}: warning: listener {plain} passes plaintext SMTP to {addr}, which TLS-only listener {tls} also uses: \
             if that backend allows AUTH without TLS, credentials can cross in plaintext; give {plain} its own backend without SASL",
            path.display()
        );
    }
    for warning in config.mta_sts_warnings() {
        eprintln!("{}: warning: {warning}", path.display());
    }
    for warning in config.acme_port_warnings() {
        eprintln!("{}: warning: acme: {warning}", path.display());
    }
    for (listener, host) in config.unrouted() {
        eprintln!(
            "{}: warning: no backend for host {host} on listener {listener}: its clients there get a goodbye",
            path.display()
        );
    }
    let addrs: usize = config.listeners.values().map(|l| l.bind.len()).sum();
    let names: usize = config.hosts.iter().map(|h| h.names.len()).sum();
    println!(
        "{}: ok: {} listeners on {} addresses, {} hosts with {} names, {} routes",
        path.display(),
        config.listeners.len(),
        addrs,
        config.hosts.len(),
        names,
        config.route_count()
    );
    ExitCode::SUCCESS
}

/// Sends one request to the running instance of the config's `state_dir`.
fn ask(config: &Config, request: Request) -> Result<Response, ClientError> {
    let limit = control::RENEW_TIMEOUT + std::time::Duration::from_secs(30);
    ask_within(config, request, limit)
}

/// [`ask`], with an answer expected within `limit`.
fn ask_within(
    config: &Config,
    request: Request,
    limit: std::time::Duration,
) -> Result<Response, ClientError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ClientError::Io {
            path: control::socket_path(&config.state_dir),
            source,
        })?;
    runtime.block_on(control::request(&config.state_dir, &request, limit))
}

fn certs(path: &Path, json: bool) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::FAILURE;
    };
    let (rows, live) = match ask(&config, Request::Certs) {
        Ok(Response::Certs(rows)) => (rows, true),
        Err(ClientError::NotRunning(_)) => {
            let provider = rustls::crypto::aws_lc_rs::default_provider();
            (control::offline_rows(&config, &provider), false)
        }
        other => return refused(other, path),
    };
    let cluster = match (&config.store, live) {
        (Some(_), true) => match ask(&config, Request::Cluster) {
            Ok(Response::Cluster(row)) => Some(row),
            other => return refused(other, path),
        },
        _ => None,
    };
    if json {
        for row in &rows {
            match serde_json::to_string(row) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("{e}"),
            }
        }
        if let Some(c) = &cluster {
            match serde_json::to_string(&serde_json::json!({ "cluster": c })) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("{e}"),
            }
        }
        return ExitCode::SUCCESS;
    }
    if !live {
        println!("(no running instance: certificates on disk, no renewal times)");
    }
    use portcullis::ops::status::{or_dash, table};
    let now = std::time::SystemTime::now();
    let mut cells = vec![[
        "NAMES",
        "SOURCE",
        "KEY",
        "NOT AFTER",
        "DAYS",
        "NEXT RENEWAL",
        "ISSUER",
    ]
    .map(String::from)
    .to_vec()];
    for row in &rows {
        cells.push(vec![
            row.names.join(","),
            row.source.clone(),
            or_dash(Some(&row.key_type)),
            or_dash(Some(&row.not_after)),
            days_left(&row.not_after, now),
            or_dash(row.next_renewal.as_deref()),
            row.issuer.clone(),
        ]);
    }
    // The rows, each followed by its details.
    for (i, line) in table(&cells).lines().enumerate() {
        println!("{line}");
        let Some(row) = i.checked_sub(1).and_then(|r| rows.get(r)) else {
            continue;
        };
        if !row.serial.is_empty() {
            println!("    serial: {}", row.serial);
        }
        if let (Some(cert), Some(key)) = (&row.cert_path, &row.key_path) {
            println!("    files: {} {}", cert.display(), key.display());
        }
        if let Some(key) = &row.key {
            println!("    key: {key}");
        }
        if let Some(node) = &row.locked_by {
            println!("    order lock held by node {node}");
        }
        if let Some(e) = &row.last_error {
            println!("    last error: {e}");
        }
    }
    if let Some(c) = &cluster {
        print_cluster(c);
    }
    ExitCode::SUCCESS
}

/// Whole days until `not_after` (RFC 3339), marked `!` within 14 days,
/// as certbot's `certificates` warns; `expired` once past; `-` if unknown.
fn days_left(not_after: &str, now: std::time::SystemTime) -> String {
    let Ok(at) = humantime::parse_rfc3339(not_after) else {
        return "-".into();
    };
    match at.duration_since(now) {
        Ok(left) if left.as_secs() < 14 * 86_400 => format!("{} !", left.as_secs() / 86_400),
        Ok(left) => (left.as_secs() / 86_400).to_string(),
        Err(_) => "expired".into(),
    }
}

/// The cluster part of `portcullis certs`: the store as this node sees it,
/// and when each node last synced.
fn print_cluster(c: &control::ClusterRow) {
    println!();
    println!("cluster store: etcd {}", c.endpoints.join(","));
    match (&c.down_since, &c.last_error) {
        (Some(since), e) => println!(
            "  DOWN since {since}: {}; serving the local copies, no new orders",
            e.as_deref().unwrap_or("no answer")
        ),
        (None, _) => println!("  up"),
    }
    println!("  this node: {}", c.node);
    println!("  {:<24} LAST SYNC", "NODE");
    for n in &c.nodes {
        println!("  {:<24} {}", n.node, n.synced_at);
    }
}

fn tlsa(path: &Path, name: &str, issuer: bool) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::FAILURE;
    };
    print_lines(portcullis::ops::tlsa::records(&config, name, issuer))
}

fn man(dir: &Path) -> ExitCode {
    use clap::CommandFactory;
    match clap_mangen::generate_to(Cli::command(), dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

fn dns(path: &Path, domain: &str) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::FAILURE;
    };
    print_lines(portcullis::discovery::records(&config, domain))
}

/// Records to stdout, or the reason there are none to stderr and exit 1.
fn print_lines(lines: Result<Vec<String>, String>) -> ExitCode {
    match lines {
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn renew(path: &Path, force: bool, dry_run: bool, name: Option<String>) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::FAILURE;
    };
    let request = Request::Renew {
        force,
        name,
        dry_run,
    };
    let rows = match ask(&config, request) {
        Ok(Response::Renew(rows)) => rows,
        other => return refused(other, path),
    };
    for r in &rows {
        println!("{}: {}: {}", r.host, r.outcome, r.detail);
    }
    if rows.iter().any(|r| r.outcome == "failed") {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn reload(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            eprintln!(
                "{}: not valid, so not sent; the running instance keeps its configuration",
                path.display()
            );
            return ExitCode::FAILURE;
        }
    };
    match ask(&config, Request::Reload) {
        Ok(Response::Reload(changes)) => {
            println!("reloaded: {changes}");
            ExitCode::SUCCESS
        }
        other => refused(other, path),
    }
}

/// `status`, `sessions`, `drain` and `enable`: asks, prints the answer.
fn upgrade(path: &Path, binary: Option<PathBuf>) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::FAILURE;
    };
    // The running instance has another working directory.
    let binary = match binary.map(std::path::absolute).transpose() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("--binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A new process reads its config and certificates within a minute.
    let limit = std::time::Duration::from_secs(120);
    match ask_within(&config, Request::Upgrade { binary }, limit) {
        Ok(Response::Upgraded(words)) => {
            println!("{words}");
            ExitCode::SUCCESS
        }
        // A version from before `upgrade` (0.3) does not know the request.
        Ok(Response::Error(e)) if e.starts_with("bad request: unknown variant") => {
            eprintln!(
                "the running portcullis predates `portcullis upgrade`: restart it once (systemctl restart portcullis); later versions upgrade in place"
            );
            ExitCode::FAILURE
        }
        other => refused(other, path),
    }
}

fn runtime_view(path: &Path, request: Request, json: bool) -> ExitCode {
    use portcullis::ops::status;
    let Some(config) = load(path) else {
        return ExitCode::FAILURE;
    };
    // These answer from memory at once: a wedged instance must not wedge
    // the command too.
    let limit = std::time::Duration::from_secs(10);
    let lines = match (ask_within(&config, request, limit), json) {
        (Ok(Response::Status(r)), false) => vec![status::status_text(&r)],
        (Ok(Response::Status(r)), true) => status::status_json(&r),
        (Ok(Response::Sessions(r)), false) => vec![status::sessions_text(&r)],
        (Ok(Response::Sessions(r)), true) => status::sessions_json(&r),
        (Ok(Response::Switched(words)), _) => vec![words],
        (other, _) => return refused(other, path),
    };
    for l in lines {
        println!("{}", l.trim_end());
    }
    ExitCode::SUCCESS
}

/// The config, or its problems on stderr.
fn load(path: &Path) -> Option<Config> {
    Config::load(path).map_err(|e| eprintln!("{e}")).ok()
}

/// Any answer but the one expected: said on stderr, exit 1.
fn refused(answer: Result<Response, ClientError>, path: &Path) -> ExitCode {
    match answer {
        Ok(Response::Error(e)) => eprintln!("{e}"),
        Ok(other) => eprintln!("unexpected answer: {other:?}"),
        Err(ClientError::NotRunning(p)) => eprintln!(
            "no running portcullis answers on {}: start it with `portcullis run --config {}`; it orders due certificates by itself",
            p.display(),
            path.display()
        ),
        Err(e) => eprintln!("{e}"),
    }
    ExitCode::FAILURE
}

/// Raises the open-file limit to its hard limit: each proxied session holds
/// two descriptors, and the usual soft limit of 1,024 would cap portcullis
/// near 500 sessions. Says so when even the hard limit is too low for
/// `max_connections`.
fn raise_open_files(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::debug!(error = %e, "cannot raise the open-file limit");
            limit.current = before;
        }
    }
    // Sessions need two descriptors each, plus listeners, logs, ACME.
    let needed = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(64);
    match limit.current {
        Some(n) if n < needed => tracing::warn!(
            open_files = n,
            max_connections,
            "the open-file limit is below 2 x max_connections: accepts will fail with 'Too many open files' first (raise LimitNOFILE= or ulimit -n, or lower max_connections)"
        ),
        _ => tracing::debug!(open_files = ?limit.current, "open-file limit"),
    }
}

fn run(path: &Path) -> ExitCode {
    // Started by `portcullis upgrade`: the running process's sockets first,
    // so that any failure below reaches it (it then serves on).
    let handover = Successor::from_env();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            if let Some(Ok((successor, _))) = handover {
                successor.failed(&format!("config not valid: {e}"));
            }
            return ExitCode::FAILURE;
        }
    };
    portcullis::ops::logging::init(config.log.format, &config.log.level);
    let (successor, inherited) = match handover {
        None => (None, Inherited::default()),
        Some(Ok((successor, inherited))) => (Some(successor), inherited),
        Some(Err(e)) => {
            tracing::error!(error = %e, "upgrade: cannot take over");
            return ExitCode::FAILURE;
        }
    };
    raise_open_files(config.max_connections);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            if let Some(s) = successor {
                s.failed(&format!("cannot start the async runtime: {e}"));
            }
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        // Installed before the first "listening" line: a SIGTERM right after
        // it must drain, not kill.
        let signals = Signals::install();
        let server = match Server::bind_file_with(path, inherited) {
            Ok(s) => s,
            Err(errors) => {
                for e in &errors {
                    tracing::error!(error = %e, "cannot start");
                }
                if let Some(s) = successor {
                    s.failed(&errors.join("; "));
                }
                return ExitCode::FAILURE;
            }
        };
        let reloader = server.reloader();
        let shutdown = signals.serve(reloader);
        match successor {
            Some(s) => server.run_replacing(s, shutdown).await,
            None => server.run(shutdown).await,
        }
        ExitCode::SUCCESS
    });
    // Sessions are drained by now; a blocking wait of an upgrade given up
    // (at most a tick from noticing) need not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}

/// SIGTERM and SIGINT end the process (after a drain); SIGHUP
/// (`systemctl reload`, `kill -HUP`) asks for a reload; SIGUSR2 for an
/// upgrade to the binary at this process's path (as nginx).
struct Signals(
    Option<(
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
    )>,
);

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined2()),
        ) {
            (Ok(term), Ok(int), Ok(hup), Ok(usr2)) => Signals(Some((term, int, hup, usr2))),
            _ => {
                tracing::error!("cannot install signal handlers; stop with SIGKILL");
                Signals(None)
            }
        }
    }

    /// Resolves on SIGTERM or SIGINT.
    async fn serve(self, reloader: portcullis::ops::reload::Reloader) {
        let Some((mut term, mut int, mut hup, mut usr2)) = self.0 else {
            return std::future::pending().await;
        };
        loop {
            tokio::select! {
                _ = term.recv() => return tracing::info!(signal = "SIGTERM", "signal received"),
                _ = int.recv() => return tracing::info!(signal = "SIGINT", "signal received"),
                _ = hup.recv() => reloader.trigger("SIGHUP"),
                _ = usr2.recv() => reloader.trigger_upgrade("SIGUSR2"),
            }
        }
    }
}
