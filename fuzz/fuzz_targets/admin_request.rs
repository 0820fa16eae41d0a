//! The admin endpoint's request handling: `http::read_head`'s framing with
//! the admin limit, `http::parse`, then `admin::page` (its routing).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::ops::admin::{page, Page};
use portcullis::proxy::http::parse;

/// `admin.rs`'s HEAD_LIMIT; `read_head` reads 1 KiB at a time.
const HEAD_LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // read_head: parse after each 1 KiB read; refuse once the limit is passed.
    let mut head = None;
    let mut end = 0;
    while end < data.len() {
        end = (end + 1024).min(data.len());
        match parse(&data[..end]) {
            Ok(Some(h)) => {
                head = Some(h);
                break;
            }
            Ok(None) if end < HEAD_LIMIT => continue,
            Ok(None) | Err(_) => break,
        }
    }
    let page = page(head.as_ref());
    let Some(head) = head else {
        assert_eq!(page, Page::BadRequest);
        return;
    };
    let path = head.path.split('?').next().unwrap_or_default();
    let want = match (head.method.as_str(), path) {
        ("GET", "/metrics") => Page::Metrics,
        ("GET", "/healthz") => Page::Health,
        (_, "/metrics" | "/healthz") => Page::MethodNotAllowed,
        _ => Page::NotFound,
    };
    assert_eq!(page, want, "{head:?}");
    // Only an exact GET of the two paths reads the metrics or certificates.
    if matches!(page, Page::Metrics | Page::Health) {
        assert_eq!(head.method, "GET");
        assert!(head.path == "/metrics" || head.path == "/healthz" || head.path.contains('?'));
    }
});
