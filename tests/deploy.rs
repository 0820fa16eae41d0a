//! The files an operator installs from `deploy/` and the commands and configs
//! of `docs/migrate-from-certbot.md`, checked with the tools that will read
//! them: `systemd-analyze` and `systemd-sysusers` for the unit and its user,
//! `postconf` and `doveconf` for the backend snippets, `portcullis check` for
//! every config in the guide. Where nothing here can run a file (the
//! Containerfile, the .deb metadata, the nftables set), what it must agree on
//! with the rest is checked instead: paths, ports, the command line.
//!
//! Nothing here opens a socket or resolves a name. A missing tool skips its
//! test with a SKIPPED line, or fails it under `PORTCULLIS_REQUIRE_TOOLS=1`
//! (see `common::tool`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use portcullis::config::{defaults, CertSource, Config};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Where the unit, the container and the .deb put the binary.
const INSTALLED_BIN: &str = "/usr/bin/portcullis";
const CONFIG: &str = "/etc/portcullis/config.yaml";
const STATE_DIR: &str = "/var/lib/portcullis";
/// How long a stop may take beyond the grace: `server::FINAL_WAIT`.
const FINAL_WAIT: Duration = Duration::from_secs(10);

fn repo(path: &str) -> PathBuf {
    Path::new(ROOT).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Runs a program to completion, feeding it `stdin`.
fn run(program: &str, args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let mut input = child.stdin.take().expect("piped stdin");
    input.write_all(stdin).expect("write stdin");
    drop(input);
    child.wait_with_output().expect("wait")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A command that must succeed; returns its stdout and stderr.
fn succeed(program: &str, args: &[&str]) -> (String, String) {
    let out = run(program, args, b"");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{stdout}{stderr}",
        out.status
    );
    (stdout, stderr)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("scratch paths are UTF-8")
}

// ---------------------------------------------------------------- systemd

/// `Key=value` settings of a unit file, in order (a key may repeat).
fn unit_settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(['#', ';', '[']))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The one value of `key`; a unit that sets it twice or not at all fails.
fn setting<'a>(settings: &'a [(String, String)], key: &str) -> &'a str {
    let values: Vec<&str> = settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(values.len(), 1, "{key}= should be set once: {values:?}");
    values[0]
}

/// `45s`, `2min`, `90`: what systemd's stop timeout reads as a duration.
fn systemd_seconds(value: &str) -> Duration {
    let secs = if let Some(m) = value.strip_suffix("min") {
        m.parse::<u64>().map(|m| m * 60)
    } else {
        value.strip_suffix('s').unwrap_or(value).parse::<u64>()
    };
    Duration::from_secs(secs.unwrap_or_else(|_| panic!("unexpected duration {value:?}")))
}

#[test]
fn the_systemd_unit_runs_the_proxy_as_the_readme_says() {
    let unit = read("deploy/portcullis.service");
    let s = unit_settings(&unit);
    let run_with = |sub: &str| format!("{INSTALLED_BIN} {sub} --config {CONFIG}");

    assert_eq!(setting(&s, "User"), "portcullis");
    assert_eq!(setting(&s, "Group"), "portcullis");
    // The config's state_dir must be the directory systemd creates and
    // leaves writable under ProtectSystem=strict.
    assert_eq!(setting(&s, "StateDirectory"), "portcullis");
    assert_eq!(setting(&s, "StateDirectoryMode"), "0700");
    assert_eq!(setting(&s, "ConfigurationDirectory"), "portcullis");
    assert_eq!(setting(&s, "ProtectSystem"), "strict");
    // A bad config fails the start, with the reason, before anything binds.
    assert_eq!(setting(&s, "ExecStartPre"), run_with("check"));
    assert_eq!(setting(&s, "ExecStart"), run_with("run"));
    // `systemctl reload` asks over the control socket and fails when the
    // reload is refused; readiness and reloads are notified (tests/systemd.rs).
    assert_eq!(setting(&s, "ExecReload"), run_with("reload"));
    assert_eq!(setting(&s, "Type"), "notify");
    // `portcullis upgrade`: the new process's READY=1 must be heard.
    assert_eq!(setting(&s, "NotifyAccess"), "all");
    assert_eq!(setting(&s, "KillSignal"), "SIGTERM");
    assert_eq!(setting(&s, "Restart"), "on-failure");
    // systemd must not SIGKILL a drain it was told to wait for.
    let stop = systemd_seconds(setting(&s, "TimeoutStopSec"));
    assert!(
        stop > defaults::SHUTDOWN_GRACE + FINAL_WAIT,
        "TimeoutStopSec={stop:?} cuts the default drain ({:?} grace + {FINAL_WAIT:?}) short",
        defaults::SHUTDOWN_GRACE
    );
    // Two descriptors per session, at the default max_connections.
    let nofile: usize = setting(&s, "LimitNOFILE").parse().expect("a number");
    assert!(
        nofile > 2 * defaults::MAX_CONNECTIONS,
        "LimitNOFILE={nofile}"
    );
    // Privileged ports as a non-root user, and no other capability.
    assert_eq!(setting(&s, "AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(setting(&s, "CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert_eq!(setting(&s, "NoNewPrivileges"), "yes");
    // AF_UNIX for state_dir/control.sock: certs, renew and reload use it.
    let families: Vec<&str> = setting(&s, "RestrictAddressFamilies")
        .split_whitespace()
        .collect();
    for family in ["AF_INET", "AF_INET6", "AF_UNIX"] {
        assert!(families.contains(&family), "{family} missing: {families:?}");
    }
}

#[test]
fn systemd_analyze_accepts_the_unit_without_a_warning() {
    let test = "systemd_analyze_accepts_the_unit_without_a_warning";
    if !common::tool("systemd-analyze", test) {
        return;
    }
    let unit = read("deploy/portcullis.service");
    // verify insists that ExecStart's program exists: point the unit at the
    // binary just built, and change nothing else.
    assert_eq!(
        unit.matches(INSTALLED_BIN).count(),
        3,
        "ExecStartPre, ExecStart, ExecReload"
    );
    let copy = unit.replace(INSTALLED_BIN, BIN);
    let original: Vec<&str> = unit.lines().collect();
    let changed: Vec<&str> = copy.lines().collect();
    assert_eq!(original.len(), changed.len());
    for (a, b) in original.iter().zip(&changed) {
        assert!(a == b || a.replace(INSTALLED_BIN, BIN) == *b);
    }

    let dir = common::scratch();
    let path = dir.path().join("portcullis.service");
    std::fs::write(&path, copy).unwrap();
    let (stdout, stderr) = succeed("systemd-analyze", &["verify", path_str(&path)]);
    // verify exits 0 on an unknown key or a bad value, and only says so.
    let about_us: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.contains("portcullis"))
        .collect();
    assert!(
        about_us.is_empty(),
        "systemd-analyze verify:\n{stdout}{stderr}"
    );

    // The sandbox, as systemd rates it (0 is locked down, 10 is wide open).
    let (stdout, stderr) = succeed(
        "systemd-analyze",
        &["security", "--offline=yes", path_str(&path)],
    );
    let level = stdout
        .lines()
        .chain(stderr.lines())
        .find_map(|l| {
            l.split("Overall exposure level for portcullis.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{stdout}{stderr}"));
    assert!(level <= 2.0, "exposure level {level}:\n{stdout}");
}

#[test]
fn sysusers_creates_the_account_the_unit_runs_as() {
    let test = "sysusers_creates_the_account_the_unit_runs_as";
    if !common::tool("systemd-sysusers", test) {
        return;
    }
    let root = common::scratch();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let root_arg = format!("--root={}", path_str(root.path()));
    let out = run(
        "systemd-sysusers",
        &[&root_arg, "-"],
        read("deploy/portcullis.sysusers").as_bytes(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let entry = |file: &str| -> Vec<String> {
        let db = std::fs::read_to_string(root.path().join("etc").join(file)).unwrap();
        db.lines()
            .find(|l| l.starts_with("portcullis:"))
            .unwrap_or_else(|| panic!("no portcullis in {file}:\n{db}"))
            .split(':')
            .map(str::to_string)
            .collect()
    };
    let (user, group) = (entry("passwd"), entry("group"));
    assert_eq!(user[3], group[2], "the user's primary group is portcullis");
    assert_eq!(user[5], STATE_DIR);
    assert!(user[6].ends_with("nologin"), "{user:?}");
    let uid: u32 = user[2].parse().unwrap();
    assert!(uid < 1000, "a system account: {uid}");

    let unit = unit_settings(&read("deploy/portcullis.service"));
    assert_eq!(setting(&unit, "User"), user[0]);
    assert_eq!(setting(&unit, "Group"), group[0]);
}

// ---------------------------------------------------------------- Postfix

/// The public services a mail guide leaves in master.cf: postscreen or a
/// plain smtpd on 25, submission on 587, submissions on 465.
fn guide_master_cf(postscreen: bool) -> String {
    let smtp = if postscreen {
        "smtp      inet  n       -       y       -       1       postscreen\n\
         smtpd     pass  -       -       y       -       -       smtpd\n\
         dnsblog   unix  -       -       y       -       0       dnsblog\n\
         tlsproxy  unix  -       -       y       -       0       tlsproxy\n"
    } else {
        "smtp      inet  n       -       y       -       -       smtpd\n"
    };
    format!(
        "{smtp}\
         submission inet n       -       y       -       -       smtpd\n  \
           -o syslog_name=postfix/submission\n  \
           -o smtpd_tls_security_level=encrypt\n  \
           -o smtpd_sasl_auth_enable=yes\n\
         submissions inet n      -       y       -       -       smtpd\n  \
           -o syslog_name=postfix/submissions\n  \
           -o smtpd_tls_wrappermode=yes\n  \
           -o smtpd_sasl_auth_enable=yes\n\
         pickup    unix  n       -       y       60      1       pickup\n\
         cleanup   unix  n       -       y       -       0       cleanup\n\
         qmgr      unix  n       -       n       300     1       qmgr\n"
    )
}

/// Writes a file a minute in the past: Postfix pauses on a main.cf or
/// master.cf modified within the last second.
fn write_old(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap();
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - Duration::from_secs(60))
        .unwrap();
}

/// `postconf -c DIR <args>`, which must succeed without a word on stderr
/// (`unused parameter` warnings for a mistyped `-o` go there).
fn postconf(dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["-c", path_str(dir)];
    all.extend(args);
    let (stdout, stderr) = succeed("postconf", &all);
    assert!(stderr.is_empty(), "postconf {args:?}:\n{stderr}");
    stdout
}

/// master.cf services as Postfix reads them: (service, type, command line).
fn services(postconf_m: &str) -> Vec<(String, String, String)> {
    postconf_m
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8).then(|| (f[0].to_string(), f[1].to_string(), f[7..].join(" ")))
        })
        .collect()
}

/// The guide's step-4 command that comments out the public services.
fn guide_postconf_switch() -> Vec<String> {
    let guide = read("docs/migrate-from-certbot.md");
    let line = guide
        .lines()
        .find(|l| l.starts_with("postconf -M# "))
        .expect("the guide comments the public services out with postconf -M#");
    let command = line.split("&&").next().unwrap_or(line);
    command
        .split_whitespace()
        .skip(1)
        .map(String::from)
        .collect()
}

/// The service entry starting at `name` (its line and its `-o` lines).
fn entry<'a>(master_cf: &'a str, name: &str) -> Vec<&'a str> {
    let mut lines = master_cf.lines().skip_while(|l| !l.starts_with(name));
    let first = lines.next().unwrap_or_else(|| panic!("no {name} entry"));
    std::iter::once(first)
        .chain(lines.take_while(|l| l.starts_with(char::is_whitespace) && !l.trim().is_empty()))
        .collect()
}

#[test]
fn postfix_snippets_parse_and_the_switch_leaves_only_loopback_services() {
    let test = "postfix_snippets_parse_and_the_switch_leaves_only_loopback_services";
    if !common::tool("postconf", test) {
        return;
    }
    let plain = read("deploy/postfix/master.cf.portcullis");
    let screened = read("deploy/postfix/master.cf.portcullis-postscreen");
    assert_eq!(
        entry(&plain, "127.0.0.1:20587"),
        entry(&screened, "127.0.0.1:20587"),
        "both files carry the same submission service"
    );

    for (snippet, postscreen) in [(&plain, false), (&screened, true)] {
        let dir = common::scratch();
        write_old(
            &dir.path().join("main.cf"),
            "compatibility_level = 3.6\nsmtpd_sasl_type = dovecot\nsmtpd_sasl_path = private/auth\n",
        );
        let master = dir.path().join("master.cf");
        write_old(&master, &(guide_master_cf(postscreen) + "\n" + snippet));
        postconf(dir.path(), &["-n"]);
        postconf(dir.path(), &["-P"]);
        let before = services(&postconf(dir.path(), &["-M"]));
        let inet = |svcs: &[(String, String, String)]| -> BTreeSet<String> {
            svcs.iter()
                .filter(|(_, kind, _)| kind == "inet")
                .map(|(name, _, _)| name.clone())
                .collect()
        };
        let proxied: BTreeSet<String> = ["127.0.0.1:20025", "127.0.0.1:20587"]
            .map(String::from)
            .into();
        assert!(inet(&before).is_superset(&proxied), "{before:?}");
        assert!(
            inet(&before).contains("smtp"),
            "the public services stay until the switch"
        );

        // Step 4 of the guide, as written there.
        let mut args: Vec<String> = vec!["-c".into(), path_str(dir.path()).into()];
        args.extend(guide_postconf_switch());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_, stderr) = succeed("postconf", &args);
        assert!(stderr.is_empty(), "{stderr}");
        let after = services(&postconf(dir.path(), &["-M"]));
        assert_eq!(
            inet(&after),
            proxied,
            "nothing public left for portcullis to collide with"
        );

        if postscreen {
            // postscreen hands clients to the pass service it names; a typo
            // there refuses every sender that passed the screen.
            let (_, _, command) = after
                .iter()
                .find(|(name, _, _)| name == "127.0.0.1:20025")
                .unwrap();
            let target = command
                .split_whitespace()
                .find_map(|w| w.strip_prefix("smtpd_service_name="))
                .expect("smtpd_service_name set");
            assert!(
                after
                    .iter()
                    .any(|(n, kind, _)| n == target && kind == "pass"),
                "no pass service {target}: {after:?}"
            );
        }
    }
}

// ---------------------------------------------------------------- Dovecot

/// A listener in `doveconf -a` output.
#[derive(Debug)]
struct DovecotListener {
    service: String,
    name: String,
    address: String,
    port: u16,
    haproxy: bool,
}

/// The inet listeners of the login services, and the top-level settings.
fn dovecot(conf_d: &[&str]) -> (Vec<DovecotListener>, BTreeMap<String, String>) {
    let dir = common::scratch();
    std::fs::create_dir(dir.path().join("conf.d")).unwrap();
    for file in conf_d {
        let name = Path::new(file).file_name().unwrap();
        std::fs::write(dir.path().join("conf.d").join(name), read(file)).unwrap();
    }
    let conf = dir.path().join("dovecot.conf");
    std::fs::write(
        &conf,
        format!(
            "protocols = imap pop3\nbase_dir = {}/run\n!include conf.d/*.conf\n",
            path_str(dir.path())
        ),
    )
    .unwrap();
    let (stdout, stderr) = succeed("doveconf", &["-a", "-c", path_str(&conf)]);
    assert!(stderr.is_empty(), "doveconf:\n{stderr}");

    let (mut listeners, mut top) = (Vec::new(), BTreeMap::new());
    let mut path: Vec<String> = Vec::new();
    for line in stdout.lines().map(str::trim) {
        if let Some(section) = line.strip_suffix('{') {
            path.push(section.trim().to_string());
            if let [service, listener] = &path[..] {
                if let (Some(service), Some(name)) = (
                    service.strip_prefix("service "),
                    listener.strip_prefix("inet_listener "),
                ) {
                    listeners.push(DovecotListener {
                        service: service.to_string(),
                        name: name.to_string(),
                        address: String::new(),
                        port: 0,
                        haproxy: false,
                    });
                }
            }
        } else if line == "}" {
            path.pop();
        } else if let Some((key, value)) = line
            .split_once(" = ")
            .or_else(|| Some((line.strip_suffix(" =")?, "")))
        {
            match (path.len(), listeners.last_mut()) {
                (0, _) => {
                    top.insert(key.to_string(), value.to_string());
                }
                (2, Some(l)) if path[1].starts_with("inet_listener ") => match key {
                    "address" => l.address = value.to_string(),
                    "port" => l.port = value.parse().unwrap(),
                    "haproxy" => l.haproxy = value == "yes",
                    _ => {}
                },
                _ => {}
            }
        }
    }
    let login = ["imap-login", "pop3-login", "managesieve-login"];
    listeners.retain(|l| login.contains(&l.service.as_str()));
    (listeners, top)
}

#[test]
fn dovecot_snippets_add_proxied_listeners_then_close_the_public_ones() {
    let test = "dovecot_snippets_add_proxied_listeners_then_close_the_public_ones";
    if !common::tool("doveconf", test) {
        return;
    }
    let proxied = |ls: &[DovecotListener]| -> BTreeMap<String, u16> {
        ls.iter()
            .filter(|l| l.haproxy && l.port != 0)
            .inspect(|l| assert_eq!(l.address, "127.0.0.1", "{l:?}"))
            // Not a stock name: the switch closes those.
            .inspect(|l| assert!(l.name.ends_with("_portcullis"), "{l:?}"))
            .map(|l| (l.service.clone(), l.port))
            .collect()
    };
    let want: BTreeMap<String, u16> = [
        ("imap-login", 20143),
        ("managesieve-login", 24190),
        ("pop3-login", 20110),
    ]
    .map(|(s, p)| (s.to_string(), p))
    .into();

    // Step 2: the proxied listeners join the public ones.
    let (listeners, _) = dovecot(&["deploy/dovecot/99-portcullis.conf"]);
    assert_eq!(proxied(&listeners), want);
    let public: BTreeSet<u16> = listeners
        .iter()
        .filter(|l| !l.haproxy && l.port != 0)
        .map(|l| l.port)
        .collect();
    // 4190 only where dovecot-managesieved is installed.
    let stock: BTreeSet<u16> = [110, 143, 993, 995].into();
    assert!(
        public == stock || public == &stock | &[4190].into(),
        "{listeners:?}"
    );

    // Step 4: only they are left, and Dovecot does no TLS of its own.
    let (listeners, top) = dovecot(&[
        "deploy/dovecot/99-portcullis.conf",
        "deploy/dovecot/99-portcullis-public-off.conf",
    ]);
    assert_eq!(proxied(&listeners), want);
    let open: Vec<&DovecotListener> = listeners.iter().filter(|l| l.port != 0).collect();
    assert!(open.iter().all(|l| l.haproxy), "{open:?}");
    assert_eq!(top.get("ssl").map(String::as_str), Some("no"));
    assert_eq!(
        top.get("haproxy_trusted_networks").map(String::as_str),
        Some("127.0.0.1/32 ::1/128")
    );
}

// ---------------------------------------------------------------- ports

/// Listener name → backend port of a config's top-level `backends:`.
fn backend_ports(yaml: &str) -> BTreeMap<String, u16> {
    let root: serde_yaml::Value = serde_yaml::from_str(yaml).expect("YAML");
    let backends = root
        .get("backends")
        .and_then(|b| b.as_mapping())
        .expect("a backends: mapping");
    backends
        .iter()
        .map(|(k, v)| {
            let address = v.get("address").unwrap_or(v).as_str().expect("an address");
            let addr: std::net::SocketAddr = address.parse().expect("IP:port");
            (k.as_str().unwrap().to_string(), addr.port())
        })
        .collect()
}

/// `port = N` (Dovecot) or `127.0.0.1:N inet` (Postfix) in a snippet.
fn snippet_ports(snippet: &str) -> BTreeSet<u16> {
    snippet
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("port = ")
                .or_else(|| l.strip_prefix("127.0.0.1:")?.split_whitespace().next())
                .and_then(|p| p.parse().ok())
        })
        .collect()
}

fn ports_of(map: &BTreeMap<String, u16>, listeners: &[&str]) -> BTreeSet<u16> {
    listeners.iter().map(|l| map[*l]).collect()
}

#[test]
fn backend_ports_agree_across_example_snippets_firewall_and_guide() {
    let example = backend_ports(&read("config.example.yaml"));
    assert_eq!(
        snippet_ports(&read("deploy/postfix/master.cf.portcullis")),
        ports_of(&example, &["submissions", "submission", "smtp"])
    );
    assert_eq!(
        snippet_ports(&read("deploy/postfix/master.cf.portcullis-postscreen")),
        ports_of(&example, &["submissions", "submission", "smtp"])
    );
    assert_eq!(
        snippet_ports(&read("deploy/dovecot/99-portcullis.conf")),
        ports_of(&example, &["imaps", "imap", "pop3s", "pop3", "sieve"])
    );

    // Every backend port is firewalled, and nothing else.
    let nft = read("deploy/nftables-portcullis.nft");
    let elements = nft
        .lines()
        .find_map(|l| l.trim().strip_prefix("elements = {"))
        .and_then(|l| l.strip_suffix('}'))
        .expect("the backend_ports set");
    let firewalled: BTreeSet<u16> = elements
        .split(',')
        .map(|p| p.trim().parse().expect("a port"))
        .collect();
    assert_eq!(firewalled, example.values().copied().collect());

    for yaml in guide_configs() {
        assert_eq!(
            backend_ports(&yaml),
            example,
            "a guide config's backends:\n{yaml}"
        );
    }
}

// ---------------------------------------------------------------- the guide

/// Every ```yaml block of the migration guide: each one a whole config.
fn guide_configs() -> Vec<String> {
    let guide = read("docs/migrate-from-certbot.md");
    let blocks: Vec<String> = guide
        .split("```yaml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap_or_default().to_string())
        .collect();
    assert!(blocks.len() >= 3, "trial, public and ACME configs");
    blocks
}

#[test]
fn every_config_in_the_migration_guide_passes_check() {
    let guide = read("docs/migrate-from-certbot.md");
    let dir = common::scratch();
    let mut summaries = Vec::new();
    for (i, yaml) in guide_configs().into_iter().enumerate() {
        let config = Config::parse(&yaml, Path::new("/etc/portcullis"))
            .unwrap_or_else(|p| panic!("guide config {i} is not valid: {p:#?}\n{yaml}"));
        assert_eq!(
            config.state_dir,
            Path::new(STATE_DIR),
            "the unit's StateDirectory"
        );

        // certbot's files, for the same names, where the test can write them.
        let mut local = yaml.clone();
        for (h, host) in config.hosts.iter().enumerate() {
            if let CertSource::Files { cert, key, .. } = &host.certificate {
                let names: Vec<String> = host.names.iter().map(|n| n.to_string()).collect();
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let (c, k) = common::cert_files(dir.path(), &format!("{i}-{h}"), &names);
                assert!(cert.starts_with("/etc/letsencrypt/live/"), "{cert:?}");
                local = local
                    .replace(cert.to_str().unwrap(), path_str(&c))
                    .replace(key.to_str().unwrap(), path_str(&k));
            }
        }
        let file = dir.path().join(format!("config-{i}.yaml"));
        std::fs::write(&file, &local).unwrap();
        let out = run(BIN, &["check", "--config", path_str(&file)], b"");
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(
            out.status.success(),
            "guide config {i}:\n{stdout}{stderr}\n{yaml}"
        );
        assert!(
            stderr.is_empty(),
            "warnings for guide config {i}:\n{stderr}"
        );
        let summary = stdout
            .split(": ok: ")
            .nth(1)
            .unwrap_or_else(|| panic!("{stdout}"))
            .trim()
            .to_string();
        summaries.push(summary);
    }
    // What the guide tells the operator to expect is what check prints.
    let shown: Vec<&str> = guide
        .lines()
        .filter_map(|l| l.split(": ok: ").nth(1))
        .collect();
    assert!(!shown.is_empty());
    for s in shown {
        assert!(
            summaries.iter().any(|x| x == s.trim()),
            "{s:?} vs {summaries:?}"
        );
    }
}

// ---------------------------------------------------------------- container

/// Instructions of a Containerfile, continuation lines joined, comments out.
fn instructions(file: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in file.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        let (op, args) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((op.to_uppercase(), args.trim().to_string()));
        current.clear();
    }
    out
}

/// A JSON-array instruction argument (`["run", "--config", ...]`).
fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("{args}: {e}"))
}

/// Cargo's view of the package: targets and `[package.metadata]`.
fn cargo_metadata() -> serde_json::Value {
    metadata("--no-deps")["packages"][0].clone()
}

/// `cargo metadata` with `flags`, offline.
fn metadata_with(flags: &[&str]) -> serde_json::Value {
    let manifest = repo("Cargo.toml");
    let mut args = vec!["metadata"];
    args.extend_from_slice(flags);
    args.extend([
        "--offline",
        "--format-version",
        "1",
        "--manifest-path",
        path_str(&manifest),
    ]);
    let (stdout, _) = succeed(env!("CARGO"), &args);
    serde_json::from_str(&stdout).expect("cargo metadata JSON")
}

fn metadata(flag: &str) -> serde_json::Value {
    metadata_with(&[flag])
}

/// The platform this is built on (`rustc -vV`'s host).
fn host_triple() -> String {
    let (stdout, _) = succeed("rustc", &["-vV"]);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names its host")
        .to_string()
}

#[test]
fn the_container_image_builds_and_runs_what_the_unit_runs() {
    let file = instructions(&read("deploy/Containerfile"));
    let stages: Vec<usize> = (0..file.len()).filter(|&i| file[i].0 == "FROM").collect();
    assert_eq!(stages.len(), 2, "a build stage and a final stage");
    let (build, last) = (&file[stages[0]..stages[1]], &file[stages[1]..]);
    // Fully qualified: podman (Debian's, without short-name aliases)
    // refuses `FROM debian:…`; a registry host has a dot.
    for &i in &stages {
        let image = file[i].1.split_whitespace().next().unwrap_or_default();
        let registry = image.split('/').next().unwrap_or_default();
        assert!(
            image.matches('/').count() >= 2 && registry.contains('.'),
            "FROM {image}: name the registry, e.g. docker.io/library/{image}"
        );
    }

    // The binary links against the build stage's glibc: same Debian release.
    let release = |from: &str| {
        ["bookworm", "trixie", "bullseye"]
            .into_iter()
            .find(|r| from.contains(r))
            .unwrap_or_else(|| panic!("which Debian release is {from}?"))
    };
    let build_from = &build[0].1;
    assert_eq!(release(build_from), release(&last[0].1));
    let stage_name = build_from.rsplit(' ').next().unwrap();
    assert!(build_from.to_uppercase().contains(" AS "), "{build_from}");
    assert!(build
        .iter()
        .any(|(op, a)| op == "RUN" && a.contains("cargo build --release --locked")));

    let workdir = build
        .iter()
        .rfind(|(op, _)| op == "WORKDIR")
        .map(|(_, a)| a.as_str())
        .expect("WORKDIR in the build stage");
    let copied_binary =
        format!("--from={stage_name} {workdir}/target/release/portcullis {INSTALLED_BIN}");
    assert!(
        last.iter()
            .any(|(op, a)| op == "COPY" && *a == copied_binary),
        "COPY {copied_binary}"
    );

    // Not root, and the uid the docs give for file ownership and nftables.
    let user = last
        .iter()
        .rfind(|(op, _)| op == "USER")
        .map(|(_, a)| a.as_str())
        .expect("a USER");
    assert_eq!(user.split(':').next(), Some("10001"));

    // The unit's command line: `portcullis run --config /etc/portcullis/config.yaml`.
    let unit = unit_settings(&read("deploy/portcullis.service"));
    let exec_start: Vec<&str> = setting(&unit, "ExecStart").split_whitespace().collect();
    let arg = |op: &str| {
        let (_, a) = last
            .iter()
            .rfind(|(o, _)| o == op)
            .unwrap_or_else(|| panic!("{op}"));
        exec_form(a)
    };
    assert_eq!(arg("ENTRYPOINT"), ["portcullis"]);
    assert_eq!(arg("CMD"), &exec_start[1..]);
    assert_eq!(arg("VOLUME"), [STATE_DIR]);
    let exposed: BTreeSet<u16> = last
        .iter()
        .filter(|(op, _)| op == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace().map(|p| p.parse::<u16>().unwrap()))
        .collect();
    assert_eq!(
        exposed,
        [25, 80, 110, 143, 443, 465, 587, 993, 995, 4190].into()
    );

    // What the build copies from the context exists, and .dockerignore
    // leaves in every file Cargo needs.
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_string())
        .collect();
    assert!(
        ignored.iter().all(|p| !p.contains(['*', '?', '!', '['])),
        "{ignored:?}"
    );
    for must in ["target", ".git"] {
        assert!(
            ignored.iter().any(|p| p == must),
            "{must} not in .dockerignore"
        );
    }
    let is_ignored = |rel: &Path| ignored.iter().any(|p| rel.starts_with(p));
    for (op, a) in build.iter().chain(last) {
        if op != "COPY" || a.starts_with("--from") {
            continue;
        }
        let words: Vec<&str> = a.split_whitespace().collect();
        for source in &words[..words.len() - 1] {
            assert!(
                repo(source).exists(),
                "COPY {source}: not in the repository"
            );
            assert!(
                !is_ignored(Path::new(source)) || *source == ".",
                "COPY {source} is ignored"
            );
        }
    }
    let package = cargo_metadata();
    let mut needed = vec![repo("Cargo.toml"), repo("Cargo.lock")];
    for t in package["targets"].as_array().unwrap() {
        needed.push(PathBuf::from(t["src_path"].as_str().unwrap()));
    }
    for path in needed {
        let rel = path.strip_prefix(ROOT).unwrap();
        assert!(
            !is_ignored(rel),
            "{} is needed for the build but ignored",
            rel.display()
        );
    }
}

#[test]
fn the_debian_package_installs_the_binary_where_the_unit_runs_it() {
    let package = cargo_metadata();
    let assets = package["metadata"]["deb"]["assets"]
        .as_array()
        .expect("[package.metadata.deb] assets");
    let mut dest = BTreeMap::new();
    for asset in assets {
        let (source, target) = (asset[0].as_str().unwrap(), asset[1].as_str().unwrap());
        dest.insert(source.to_string(), target.to_string());
        if source.starts_with("target/release/") {
            continue;
        }
        match source.strip_suffix("/*") {
            Some(dir) => assert!(
                std::fs::read_dir(repo(dir)).is_ok_and(|mut d| d.next().is_some()),
                "asset {source}: empty or missing"
            ),
            None => assert!(repo(source).is_file(), "asset {source}: missing"),
        }
    }
    let unit = unit_settings(&read("deploy/portcullis.service"));
    let exec_start = setting(&unit, "ExecStart");
    let binary = dest.get("target/release/portcullis").expect("the binary");
    assert!(
        exec_start.starts_with(&format!("/{binary} ")),
        "{binary} vs {exec_start}"
    );
    assert_eq!(
        dest.get("deploy/portcullis.service").map(String::as_str),
        Some("lib/systemd/system/portcullis.service")
    );
    assert_eq!(
        dest.get("deploy/portcullis.sysusers").map(String::as_str),
        Some("usr/lib/sysusers.d/portcullis.conf")
    );
}

/// The man pages the .deb ships are what `portcullis man` writes from
/// the CLI now (regenerate with `cargo run -q -- man deploy/man`), and the
/// package's changelog is of the version it packages.
#[test]
fn the_debian_package_ships_current_man_pages_and_changelog() {
    let dir = common::scratch();
    succeed(BIN, &["man", path_str(dir.path())]);
    let names = |d: &Path| -> BTreeSet<String> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let shipped = repo("deploy/man");
    assert_eq!(
        names(&shipped),
        names(dir.path()),
        "run: cargo run -q -- man deploy/man"
    );
    for page in names(dir.path()) {
        assert_eq!(
            std::fs::read_to_string(shipped.join(&page)).unwrap(),
            std::fs::read_to_string(dir.path().join(&page)).unwrap(),
            "deploy/man/{page} is stale: cargo run -q -- man deploy/man"
        );
    }
    let top = read("deploy/man/portcullis.1");
    for sub in [
        "run", "check", "certs", "renew", "reload", "upgrade", "tlsa", "dns",
    ] {
        assert!(
            top.contains(&format!("portcullis\\-{sub}(1)")),
            "{sub}: {top}"
        );
    }

    let package = cargo_metadata();
    let deb = &package["metadata"]["deb"];
    let changelog = read(deb["changelog"].as_str().expect("a changelog"));
    let first = changelog.lines().next().unwrap_or_default();
    let version = package["version"].as_str().unwrap();
    assert!(
        first.starts_with(&format!("portcullis ({version}-")),
        "deploy/debian/changelog is at {first:?}, the package at {version}"
    );
    let scripts = repo(
        deb["maintainer-scripts"]
            .as_str()
            .expect("maintainer scripts"),
    );
    let postinst = std::fs::read_to_string(scripts.join("postinst")).unwrap();
    assert!(
        postinst.contains("systemd-sysusers portcullis.conf"),
        "{postinst}"
    );
    assert!(
        !postinst.contains("systemctl start") && !postinst.contains("systemctl restart"),
        "starts nothing before a config is written, restarts nothing"
    );
    // A package upgrade hands a running instance over to the new binary.
    assert!(
        postinst.contains("portcullis upgrade --config /etc/portcullis/config.yaml"),
        "{postinst}"
    );
}

/// `rust-version` is true: no package in the lock file (dependencies of
/// every kind) needs a newer compiler than the one it names. No toolchain
/// for that version can be had here, so the lock file is what is checked.
#[test]
fn rust_version_is_at_least_what_every_locked_dependency_needs() {
    // The dependencies built here: offline, a fresh machine has fetched
    // only this platform's (Windows-only crates are never downloaded).
    let host = host_triple();
    let all = metadata_with(&["--locked", "--filter-platform", &host]);
    let version = |v: &str| -> (u64, u64) {
        let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    };
    let packages = all["packages"].as_array().unwrap();
    let ours = packages
        .iter()
        .find(|p| p["name"] == "portcullis")
        .and_then(|p| p["rust_version"].as_str())
        .expect("portcullis states a rust-version");
    let mut needs: Vec<((u64, u64), String)> = packages
        .iter()
        .filter_map(|p| {
            let v = p["rust_version"].as_str()?;
            Some((
                version(v),
                format!("{} {} needs {v}", p["name"], p["version"]),
            ))
        })
        .collect();
    needs.sort();
    let (newest, who) = needs.last().expect("some dependency states one");
    assert!(version(ours) >= *newest, "rust-version = {ours}, but {who}");
}
