//! The control socket's request line: what `ops/control.rs::answer` reads (one
//! line, at most 4096 bytes, UTF-8) into `serde_json` and `control::Request`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::ops::control::{Request, Response};

const REQUEST_LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // `take(4096)` then `read_line`: up to the first LF, within the limit.
    let data = &data[..data.len().min(REQUEST_LIMIT)];
    let line = match data.iter().position(|&b| b == b'\n') {
        Some(i) => &data[..=i],
        None => data,
    };
    // read_line fails on invalid UTF-8: no answer at all.
    let Ok(line) = std::str::from_utf8(line) else {
        return;
    };
    let response = match serde_json::from_str::<Request>(line) {
        Ok(request) => {
            // What a client writes for this request is read back the same.
            let json = serde_json::to_string(&request).expect("a request serializes");
            assert_eq!(serde_json::from_str::<Request>(&json).ok(), Some(request));
            return;
        }
        Err(e) => Response::Error(format!("bad request: {e}")),
    };
    // The answer is one JSON line, and the client reads back what was meant.
    let json = serde_json::to_vec(&response).expect("a response serializes");
    assert!(!json.contains(&b'\n'), "answer spans lines");
    let back: Response = serde_json::from_slice(&json).expect("the answer parses");
    assert_eq!(back, response);
});
