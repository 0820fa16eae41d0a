//! The runtime view and switches over the control socket (`portcullis
//! status`, `sessions`, `drain`, `enable`), and the session id every log line
//! of a session carries. Real portcullis, real echo backends, real TLS
//! clients on loopback.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::process::{path_str, portcullis, QUICK};
use common::{log_line, log_lines, read_until, tls_connect, Backend, Proxy};
use portcullis::ops::control::{self, Request, Response};
use portcullis::ops::status::{SessionRow, SessionsReport, StatusReport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONTROL: Duration = Duration::from_secs(10);

/// Two hosts on an implicit-TLS and a STARTTLS IMAP listener: `a` routed to
/// an echo backend, `dead` to an address nobody listens on.
struct World {
    proxy: Proxy,
    a: Backend,
    dead: SocketAddr,
}

async fn world() -> World {
    let dir = common::scratch();
    let (crt, key) = common::cert_files(dir.path(), "a", &["a.example.test"]);
    let a = Backend::start("* OK backend-a\r\n", false).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let yaml = format!(
        r#"
state_dir: state
listeners:
  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
  imap: {{ bind: "127.0.0.1:0", protocol: imap, tls: starttls }}
backends:
  imaps: {{ address: "{a}", proxy_protocol: none }}
  imap: {{ address: "{a}", proxy_protocol: none }}
hosts:
  - names: [a.example.test]
    certificate: {{ cert: {crt}, key: {key} }}
  - names: [dead.example.test]
    certificate: self-signed
    backends:
      imaps: {{ address: "{dead}", proxy_protocol: none }}
default_host: a.example.test
"#,
        a = a.addr,
        crt = crt.display(),
        key = key.display(),
    );
    World {
        proxy: Proxy::start_file(dir, &yaml).await,
        a,
        dead,
    }
}

impl World {
    fn state(&self) -> PathBuf {
        self.proxy.dir.path().join("state")
    }

    async fn ask(&self, request: Request) -> Response {
        control::request(&self.state(), &request, CONTROL)
            .await
            .expect("the control socket answers")
    }

    async fn status(&self) -> StatusReport {
        match self.ask(Request::Status).await {
            Response::Status(r) => r,
            other => panic!("status: {other:?}"),
        }
    }

    async fn sessions(&self, listener: Option<&str>) -> SessionsReport {
        let listener = listener.map(str::to_string);
        match self.ask(Request::Sessions { listener }).await {
            Response::Sessions(r) => r,
            other => panic!("sessions: {other:?}"),
        }
    }

    async fn switch(&self, drain: bool, name: &str) -> String {
        let name = name.to_string();
        let request = match drain {
            true => Request::Drain { name },
            false => Request::Enable { name },
        };
        match self.ask(request).await {
            Response::Switched(words) => words,
            other => panic!("drain/enable: {other:?}"),
        }
    }
}

/// An IMAPS session through to backend `a`, past its greeting.
async fn session(w: &World) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tls = tls_connect(w.proxy.addr("imaps"), Some("a.example.test"))
        .await
        .expect("handshake");
    let greeting = read_until(&mut tls, b"\r\n").await;
    assert_eq!(greeting, b"* OK backend-a\r\n");
    tls
}

/// Sends a line and reads its echo.
async fn echo<S: AsyncReadExt + AsyncWriteExt + Unpin>(s: &mut S, line: &str) {
    s.write_all(line.as_bytes()).await.unwrap();
    let got = read_until(s, line.as_bytes()).await;
    assert!(
        got.ends_with(line.as_bytes()),
        "echo of {line:?}: {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// Polls `sessions` until `pick` finds a row (5 s at most): the registry is
/// written by the session's task, the test's client may be a step ahead.
async fn row_where(w: &World, pick: impl Fn(&SessionRow) -> bool) -> SessionRow {
    for _ in 0..100 {
        if let Some(r) = w.sessions(None).await.sessions.into_iter().find(&pick) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no such session: {:?}", w.sessions(None).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_sessions_show_what_the_test_did() {
    let w = world().await;
    let mut tls = session(&w).await;
    echo(&mut tls, "a1 NOOP\r\n").await;

    // A session to the dead backend: a failure with its error.
    let mut dead = tls_connect(w.proxy.addr("imaps"), Some("dead.example.test"))
        .await
        .expect("handshake");
    let bye = read_until(&mut dead, b"\r\n").await;
    assert!(
        bye.starts_with(b"* BYE"),
        "{:?}",
        String::from_utf8_lossy(&bye)
    );

    let row = row_where(&w, |r| {
        r.sni.as_deref() == Some("a.example.test") && r.bytes_down >= 25
    })
    .await;
    assert_eq!(row.listener, "imaps");
    assert_eq!(row.backend, Some(w.a.addr.to_string()));
    assert_eq!(row.bytes_up, 9, "a1 NOOP and its CRLF: {row:?}");
    assert_eq!(row.bytes_down, 16 + 9, "greeting and echo: {row:?}");
    let local = tls.get_ref().0.local_addr().unwrap();
    assert_eq!(row.client, local.to_string());
    let only = w.sessions(Some("imap")).await;
    assert!(only.sessions.is_empty() && only.more == 0, "{only:?}");

    // The dead backend's session ends on its own, a moment after its BYE.
    let mut status = w.status().await;
    for _ in 0..100 {
        if status.listeners.iter().map(|l| l.sessions).sum::<usize>() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = w.status().await;
    }
    let imaps = status.listeners.iter().find(|l| l.name == "imaps").unwrap();
    assert_eq!(imaps.state, "accepting");
    assert_eq!(imaps.sessions, 1, "{status:?}");
    assert_eq!(imaps.addresses, vec![w.proxy.addr("imaps").to_string()]);
    let imap = status.listeners.iter().find(|l| l.name == "imap").unwrap();
    assert_eq!(imap.sessions, 0);
    let a = status
        .backends
        .iter()
        .find(|b| b.address == w.a.addr.to_string())
        .unwrap();
    assert_eq!(a.listeners, ["imap", "imaps"]);
    assert_eq!((a.state.as_str(), a.failures), ("up", 0));
    let dead_row = status
        .backends
        .iter()
        .find(|b| b.address == w.dead.to_string())
        .unwrap();
    assert_eq!(dead_row.failures, 1, "{status:?}");
    assert!(dead_row.last_error.is_some() && dead_row.last_error_at.is_some());
    assert_eq!(status.certificates.count, 2);
    assert!(status.certificates.soonest_expiry.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_listener_turns_clients_away_and_keeps_its_sessions() {
    let w = world().await;
    let mut old = session(&w).await;

    let said = w.switch(true, "imaps").await;
    assert!(said.contains("listener imaps drained"), "{said}");
    assert!(said.contains("1 open session(s) continue"), "{said}");
    // Implicit TLS: the connection is accepted and closed at once.
    let refused = tls_connect(w.proxy.addr("imaps"), Some("a.example.test")).await;
    assert!(refused.is_err(), "a drained listener completed a handshake");
    echo(&mut old, "a2 NOOP\r\n").await;

    // Where the server speaks first, its goodbye.
    w.switch(true, "imap").await;
    let mut plain = TcpStream::connect(w.proxy.addr("imap")).await.unwrap();
    let mut heard = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut heard))
        .await
        .expect("closed at once")
        .unwrap();
    assert!(
        heard.starts_with(b"* BYE"),
        "{:?}",
        String::from_utf8_lossy(&heard)
    );

    // A reload keeps the switches of listeners the config still names.
    w.proxy.reload().await.expect("reload");
    let status = w.status().await;
    for l in &status.listeners {
        assert_eq!(l.state, "drained", "{status:?}");
    }
    assert!(tls_connect(w.proxy.addr("imaps"), Some("a.example.test"))
        .await
        .is_err());

    let said = w.switch(false, "imaps").await;
    assert!(said.contains("listener imaps enabled"), "{said}");
    let mut new = session(&w).await;
    echo(&mut new, "a3 NOOP\r\n").await;
    echo(&mut old, "a4 NOOP\r\n").await;
    let said = w.switch(false, "imaps").await;
    assert!(said.contains("(already)"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_says_goodbye_to_new_sessions_only() {
    let w = world().await;
    let mut old = session(&w).await;
    let backend = w.a.addr.to_string();
    let said = w.switch(true, &backend).await;
    assert!(
        said.contains(&format!("backend {backend} drained")),
        "{said}"
    );
    assert!(said.contains("1 open session(s) continue"), "{said}");

    let mut new = tls_connect(w.proxy.addr("imaps"), Some("a.example.test"))
        .await
        .expect("the listener still accepts");
    let bye = read_until(&mut new, b"\r\n").await;
    assert!(
        bye.starts_with(b"* BYE"),
        "{:?}",
        String::from_utf8_lossy(&bye)
    );
    log_line(&["outcome=backend_drained", "sni=\"a.example.test\""]).await;
    echo(&mut old, "a1 NOOP\r\n").await;
    let status = w.status().await;
    let row = status
        .backends
        .iter()
        .find(|b| b.address == backend)
        .unwrap();
    assert_eq!((row.state.as_str(), row.failures), ("drained", 0));

    w.switch(false, &backend).await;
    let mut again = session(&w).await;
    echo(&mut again, "a2 NOOP\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_are_refused_with_what_there_is() {
    let w = world().await;
    for name in ["nosuch", "127.0.0.1:1"] {
        match w.ask(Request::Drain { name: name.into() }).await {
            Response::Error(e) => {
                assert!(e.contains(name), "{e}");
                assert!(
                    e.contains("imaps") || e.contains(&w.a.addr.to_string()),
                    "{e}"
                );
            }
            other => panic!("drain {name}: {other:?}"),
        }
    }
    let listener = Some("nosuch".to_string());
    assert!(matches!(
        w.ask(Request::Sessions { listener }).await,
        Response::Error(e) if e.contains("nosuch")
    ));
}

/// The command line: aligned tables, JSON lines, exit 1 on an unknown name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_print_tables_and_json() {
    let w = world().await;
    let mut tls = session(&w).await;
    echo(&mut tls, "a1 NOOP\r\n").await;
    let config = w.proxy.config_path();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            portcullis(&args, QUICK)
        })
    };
    let cfg = path_str(&config).to_string();
    let args = |a: &[&str]| {
        let mut v: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        v.extend(["--config".to_string(), cfg.clone()]);
        v
    };

    let (code, out, err) = run(args(&["status"])).await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["LISTENER", "STATE", "SESSIONS", "ADDRESSES"],
        "{out}"
    );
    // Columns line up: every row's second column starts where STATE does.
    let at = lines[0].find("STATE").unwrap();
    let imaps = lines.iter().find(|l| l.starts_with("imaps ")).unwrap();
    assert_eq!(&imaps[at..at + 9], "accepting", "{out}");
    let cells: Vec<&str> = imaps.split_whitespace().collect();
    assert_eq!(cells[2], "1", "{out}");
    assert!(out.contains("\nBACKEND "), "{out}");
    let a = lines
        .iter()
        .find(|l| l.starts_with(&w.a.addr.to_string()))
        .unwrap();
    assert_eq!(
        a.split_whitespace().collect::<Vec<_>>()[..4],
        [&w.a.addr.to_string()[..], "up", "0", "imap,imaps"]
    );
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("certificates: 2, soonest expiry "),
        "{out}"
    );

    let (code, out, err) = run(args(&["status", "--json"])).await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let objects: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objects.len(), 2 + 2 + 1, "{out}");
    assert_eq!(objects[0]["listener"]["name"], "imap");
    assert_eq!(objects[4]["certificates"]["count"], 2);

    let (code, out, err) = run(args(&["sessions", "--listener", "imaps"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "LISTENER", "CLIENT", "SNI", "BACKEND", "AGE", "UP", "DOWN"]
    );
    let row: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[3], "a.example.test", "{out}");
    assert_eq!(row[6..], ["9", "25"], "{out}");

    let (code, out, err) = run(args(&["drain", "nosuch"])).await.unwrap();
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("no listener is named \"nosuch\""), "{err}");
    let (code, out, err) = run(args(&["drain", "imap"])).await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("listener imap drained"), "{out}");
    let (code, out, _) = run(args(&["enable", "imap"])).await.unwrap();
    assert_eq!(code, 0);
    assert!(out.starts_with("listener imap enabled"), "{out}");
}

/// Every line of a session carries its id, the one `sessions` shows; a
/// client that closes TCP without close_notify ends a plain `closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_lines_carry_its_id_and_a_bare_close_is_closed() {
    let w = world().await;
    let mut tls = session(&w).await;
    echo(&mut tls, "a1 NOOP\r\n").await;
    let local = tls.get_ref().0.local_addr().unwrap().to_string();
    let row = row_where(&w, |r| r.client == local).await;
    let id = format!("session={} ", row.id);
    // Without close_notify: the TCP connection just closes.
    let (tcp, _) = tls.into_inner();
    drop(tcp);
    let closed = log_line(&["session closed", &id]).await;
    assert!(closed.contains("outcome=closed"), "{closed}");
    assert!(
        !closed.contains("docs.rs") && !closed.contains("reason="),
        "{closed}"
    );
    let client = format!("client.addr={local}");
    let lines = log_lines(&[&client]);
    assert!(lines.len() >= 2, "{lines:#?}");
    for l in &lines {
        assert!(l.contains(&id), "a line of the session without its id: {l}");
    }
}
