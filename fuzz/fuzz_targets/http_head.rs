//! The port-80 request head: `http::parse` as `read_head` calls it, then
//! `http::answer`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::config::names::Hostname;
use portcullis::proxy::http::{answer, parse, Answer};

/// `read_head`'s limit on port 80.
const HEAD_LIMIT: usize = 8 * 1024;
const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(HEAD_LIMIT + 1024)];
    let whole = parse(data);
    let Ok(Some(head)) = &whole else {
        return;
    };
    assert!(head.len > 0 && head.len <= data.len());
    // The head is what its bytes say, whatever follows it, and every shorter
    // prefix is "read more" (read_head parses after each read: a prefix
    // refused would make the answer depend on how the bytes arrived).
    assert_eq!(parse(&data[..head.len]), whole);
    for cut in [head.len - 1, head.len / 2, head.len.saturating_sub(2), 1] {
        if cut < head.len {
            assert_eq!(parse(&data[..cut]), Ok(None), "prefix of {cut} bytes");
        }
    }
    if let Some(h) = &head.host {
        assert_eq!(
            Hostname::parse(h.as_str()).as_ref(),
            Ok(h),
            "host not canonical"
        );
    }

    let open = |token: &str| (token == "tok").then(|| "tok.thumbprint".to_string());
    let forwards = |h: &Hostname| h.as_str().starts_with("webmail.");
    match answer(head, open, forwards) {
        Answer::Challenge(k) => {
            assert_eq!(k, "tok.thumbprint");
            assert_eq!(head.path, format!("{CHALLENGE_PREFIX}tok"));
            assert!(head.method == "GET" || head.method == "HEAD");
        }
        Answer::NotFound => assert!(head.path.starts_with(CHALLENGE_PREFIX)),
        Answer::Forward(h) => {
            assert_eq!(head.host.as_ref(), Some(&h));
            assert!(forwards(&h));
        }
        Answer::Redirect(to) => {
            let host = head.host.as_ref().expect("a redirect names the host");
            assert!(head.path.starts_with('/'));
            assert_eq!(to, format!("https://{}{}", host.as_str(), head.path));
            // It becomes a Location header: one line, no control bytes.
            assert!(
                !to.bytes().any(|b| b.is_ascii_control() || b == b' '),
                "{to:?}"
            );
        }
        Answer::BadRequest(why) => assert!(!why.is_empty()),
    }
});
