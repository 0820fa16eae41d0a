//! What portcullis answers itself for `domains:` (MTA-STS, autoconfig,
//! autodiscover): `http::parse` of the head, then `Discovery::answer` with
//! the rest as the body, as `proxy::web` does.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use portcullis::config::Config;
use portcullis::discovery::Discovery;
use portcullis::proxy::http::parse;

const CONFIG: &str = r#"
state_dir: /nonexistent
listeners:
  imaps: { bind: "127.0.0.1:993", protocol: imap, tls: implicit }
  submission: { bind: "127.0.0.1:587", protocol: smtp, tls: starttls }
  https: { bind: "127.0.0.1:443", protocol: tcp, tls: implicit, alpn: [http/1.1] }
backends: { imaps: "127.0.0.1:1", submission: "127.0.0.1:1", https: "127.0.0.1:1" }
hosts: [ { names: [mail.one.test], certificate: self-signed } ]
domains:
  one.test:
    mta_sts: { mode: enforce, mx: [mail.one.test] }
    autoconfig: { server: mail.one.test, username: localpart }
"#;

fn discovery() -> &'static Discovery {
    static D: OnceLock<Discovery> = OnceLock::new();
    D.get_or_init(|| {
        let config = Config::parse(CONFIG, Path::new("/")).expect("the fuzz config is valid");
        Discovery::new(&config)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(Some(head)) = parse(data) else { return };
    let body = &data[head.len..];
    let host = head
        .host
        .as_ref()
        .map_or("mta-sts.one.test", |h| h.as_str());
    let reply = discovery().answer(host, &head.method, &head.path, body);
    assert!(
        [200, 400, 404, 405, 421].contains(&reply.status),
        "{reply:?}"
    );
    if reply.status == 200 {
        assert!(matches!(head.method.as_str(), "GET" | "HEAD" | "POST"));
    }
    // Whatever the request said, the login name in an answer is escaped:
    // no markup of the client's reaches the XML.
    if let Some(login) = reply.body.split("<LoginName>").nth(1) {
        let login = login.split("</LoginName>").next().unwrap_or_default();
        assert!(!login.contains(['<', '>', '"']), "{login:?}");
    }
});
