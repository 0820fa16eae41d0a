//! SMTP before STARTTLS, through the line framer as `starttls::converse`
//! feeds it. Flags bit 0: `require_tls` (submission) or not (MX).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::protocol::Protocol;
use portcullis::protocol::{dialogue, Action};
use portcullis_fuzz::{check_dialogue, End, Segmented};

const HOST: &str = "mx.example.test";

/// 4xx/5xx replies count against the error budget (the 421 of QUIT does not
/// reach here: QUIT is a 221).
fn is_error(reply: &[u8]) -> bool {
    matches!(reply.first(), Some(b'4' | b'5'))
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Segmented::new(data) else {
        return;
    };
    let require_tls = input.flags & 1 == 1;
    let make =
        || dialogue(Protocol::Smtp, HOST, require_tls).expect("SMTP has a plaintext dialogue");
    let c = check_dialogue(&make, &input, &is_error);
    for (line, action) in &c.steps {
        let verb = line
            .split(|&b| b == b' ')
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        match action {
            // Credentials are never invited before TLS.
            Action::Reply(r) => {
                assert!(!r.windows(4).any(|w| w == b"AUTH"), "AUTH advertised");
                if verb == b"AUTH" || (require_tls && verb == b"MAIL") {
                    assert!(r.starts_with(b"5"), "{verb:?} not refused: {r:?}");
                }
            }
            Action::StartTls(_) => assert_eq!(verb, b"STARTTLS"),
            Action::PassThrough { .. } => {
                assert!(!require_tls, "plaintext mail on a require_tls listener");
                assert_eq!(verb, b"MAIL");
            }
            Action::Close(_) => {}
        }
    }
    if let End::PassThrough { hello, line, .. } = &c.end {
        // The backend is greeted with the client's own HELO/EHLO line.
        let hello_verb = hello.get(..5).map(<[u8]>::to_ascii_uppercase);
        assert!(
            matches!(hello_verb.as_deref(), Some(b"EHLO " | b"HELO ")),
            "pass-through without a hello: {hello:?}"
        );
        assert!(c
            .steps
            .iter()
            .any(|(l, _)| [l.as_slice(), b"\r\n"].concat() == *hello));
        assert!(line.to_ascii_uppercase().starts_with(b"MAIL"));
    }
});
