//! Helpers shared by the fuzz targets: the dialogue driver of
//! `src/proxy/starttls.rs::converse` replayed without a socket, and the input
//! layouts. Targets assert properties; a failed assertion is a crash.

use portcullis::protocol::line::LineBuf;
use portcullis::protocol::{Action, Dialogue, MAX_ERRORS};

/// First byte of a TLS handshake record (what must follow STARTTLS's go-ahead).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A dialogue input: one flags byte, three chunk sizes (each `1 + byte`, used
/// in turn), then the client's bytes. The corpus files start with 4 bytes of
/// header and then a real client dialogue.
pub struct Segmented<'a> {
    pub flags: u8,
    pub stream: &'a [u8],
    pub chunks: Vec<&'a [u8]>,
}

impl<'a> Segmented<'a> {
    pub fn new(data: &'a [u8]) -> Option<Segmented<'a>> {
        let (&[flags, a, b, c], stream) = data.split_first_chunk::<4>()?;
        let sizes = [a, b, c].map(|s| usize::from(s) + 1);
        let mut chunks = Vec::new();
        let mut rest = stream;
        for size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at((*size).min(rest.len()));
            chunks.push(chunk);
            rest = tail;
        }
        Some(Segmented {
            flags,
            stream,
            chunks,
        })
    }
}

/// How the plaintext phase ended in the replayed driver.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The client stopped sending; the dialogue is still open.
    Open,
    /// The dialogue closed the session with this goodbye.
    Close(Vec<u8>),
    /// STARTTLS with plaintext behind it: closed with the dialogue's `injected`.
    Injected(Vec<u8>),
    /// STARTTLS accepted with nothing pending and a TLS record (or nothing) next.
    Upgrade,
    PassThrough {
        hello: Vec<u8>,
        line: Vec<u8>,
        pending: Vec<u8>,
    },
}

/// Everything the replayed driver did.
#[derive(Debug)]
pub struct Conversation {
    /// Each line given to the dialogue and its action, in order.
    pub steps: Vec<(Vec<u8>, Action)>,
    /// Everything written to the client, greeting first.
    pub written: Vec<Vec<u8>>,
    pub end: End,
}

/// Replays `converse` and `expect_client_hello` of `src/proxy/starttls.rs` on the
/// given reads (each non-empty: an empty read is EOF there).
pub fn converse(d: &mut dyn Dialogue, reads: &[&[u8]]) -> Conversation {
    let limit = d.line_limit();
    let mut lines = LineBuf::new(limit);
    let mut steps = Vec::new();
    let mut written = vec![d.greeting()];
    let mut reads = reads.iter();
    let end = 'outer: loop {
        while let Some(line) = lines.next_line() {
            let Ok(line) = line else {
                break 'outer End::Close(d.too_long());
            };
            // A line longer than the limit never reaches the dialogue.
            assert!(line.len() < limit, "line of {} bytes passed", line.len());
            assert!(!line.contains(&b'\n'), "line with a line feed passed");
            let action = d.line(&line);
            steps.push((line, action.clone()));
            match action {
                Action::Reply(r) => written.push(r),
                Action::Close(r) => break 'outer End::Close(r),
                Action::StartTls(r) => {
                    if !lines.pending().is_empty() {
                        break 'outer End::Injected(d.injected(lines.pending()));
                    }
                    written.push(r);
                    // The driver peeks at up to 512 bytes of the next read.
                    break 'outer match reads.next() {
                        Some(next) if next[0] != TLS_HANDSHAKE_RECORD => {
                            End::Injected(d.injected(&next[..next.len().min(512)]))
                        }
                        _ => {
                            assert!(lines.pending().is_empty(), "upgrade with bytes pending");
                            End::Upgrade
                        }
                    };
                }
                Action::PassThrough { hello, line } => {
                    break 'outer End::PassThrough {
                        hello,
                        line,
                        pending: lines.take_pending(),
                    }
                }
            }
        }
        match reads.next() {
            Some(read) => {
                assert!(!read.is_empty());
                lines.push(read);
            }
            None => break End::Open,
        }
    };
    Conversation {
        steps,
        written,
        end,
    }
}

/// A complete reply: not empty, ends in CRLF, and no bare CR or LF inside.
pub fn assert_crlf_lines(bytes: &[u8]) {
    assert!(bytes.ends_with(b"\r\n"), "reply without CRLF: {bytes:?}");
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\n' => assert!(i > 0 && bytes[i - 1] == b'\r', "bare LF: {bytes:?}"),
            b'\r' => assert!(bytes.get(i + 1) == Some(&b'\n'), "bare CR: {bytes:?}"),
            _ => {}
        }
    }
}

/// Checks shared by every dialogue target, on the segmented and the whole
/// input: replies are CRLF lines, the dialogue sees the same lines and gives
/// the same actions however the bytes arrive, STARTTLS never upgrades with
/// bytes behind it, and the error budget ends the session.
pub fn check_dialogue(
    make: &dyn Fn() -> Box<dyn Dialogue>,
    input: &Segmented<'_>,
    is_error: &dyn Fn(&[u8]) -> bool,
) -> Conversation {
    let mut d = make();
    let split = converse(d.as_mut(), &input.chunks);
    let mut d = make();
    let whole: Vec<&[u8]> = if input.stream.is_empty() {
        Vec::new()
    } else {
        vec![input.stream]
    };
    let once = converse(d.as_mut(), &whole);

    assert_eq!(
        split.steps, once.steps,
        "actions depend on how bytes arrive"
    );
    for w in split.written.iter().chain(&once.written) {
        assert_crlf_lines(w);
    }
    for c in [&split, &once] {
        match &c.end {
            End::Close(r) | End::Injected(r) => assert_crlf_lines(r),
            End::PassThrough { hello, line, .. } => {
                assert_crlf_lines(hello);
                assert_crlf_lines(line);
            }
            End::Open | End::Upgrade => {}
        }
        // Only the last step may end the dialogue.
        if let Some((_, rest)) = c.steps.split_last() {
            for (_, a) in rest {
                assert!(
                    matches!(a, Action::Reply(_)),
                    "dialogue went on after {a:?}"
                );
            }
        }
        let errors = c
            .steps
            .iter()
            .filter(|(_, a)| match a {
                Action::Reply(r) | Action::Close(r) => is_error(r),
                _ => false,
            })
            .count();
        assert!(errors <= MAX_ERRORS as usize, "{errors} errors tolerated");
        if errors == MAX_ERRORS as usize {
            assert!(
                matches!(c.steps.last(), Some((_, Action::Close(_)))),
                "the error budget did not end the session"
            );
        }
    }
    // With the whole input in one read, STARTTLS followed by anything is
    // injection: an upgrade means the STARTTLS line was the last thing sent.
    if once.end == End::Upgrade {
        let last = once.steps.last().map(|(l, _)| l.as_slice());
        let sent = input.stream.strip_suffix(b"\n");
        let sent = sent.map(|s| s.strip_suffix(b"\r").unwrap_or(s));
        assert!(
            matches!((sent, last), (Some(s), Some(l)) if s.ends_with(l)),
            "upgrade with bytes behind STARTTLS"
        );
    }
    if split.end == End::Upgrade {
        assert!(matches!(split.steps.last(), Some((_, Action::StartTls(_)))));
    }
    split
}
