//! ManageSieve before STARTTLS, through the line framer as
//! `starttls::converse` feeds it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::protocol::Protocol;
use portcullis::protocol::{dialogue, Action};
use portcullis_fuzz::{check_dialogue, Segmented};

fn is_error(reply: &[u8]) -> bool {
    reply.starts_with(b"NO ")
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Segmented::new(data) else {
        return;
    };
    let make = || dialogue(Protocol::Sieve, "sieve.example.test", true).expect("sieve dialogue");
    let c = check_dialogue(&make, &input, &is_error);
    for (line, action) in &c.steps {
        let (Action::Reply(r) | Action::Close(r) | Action::StartTls(r)) = action else {
            panic!("ManageSieve passed through: {action:?}");
        };
        let verb = line
            .split(|&b| b == b' ')
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        // A literal's payload would be read as commands: the session ends.
        if portcullis::protocol::line::literal(line).is_some() {
            assert!(
                matches!(action, Action::Close(_)) && r.starts_with(b"NO "),
                "literal accepted"
            );
        }
        if verb == b"AUTHENTICATE" {
            assert!(!r.starts_with(b"OK"), "AUTHENTICATE before TLS");
        }
        // The last line of every response is OK, NO or BYE (RFC 5804 §4).
        let last = r
            .strip_suffix(b"\r\n")
            .unwrap_or(r)
            .rsplit(|&b| b == b'\n')
            .next()
            .unwrap_or_default();
        assert!(
            last.starts_with(b"OK") || last.starts_with(b"NO") || last.starts_with(b"BYE"),
            "{r:?}"
        );
        if matches!(action, Action::StartTls(_)) {
            assert_eq!(verb, b"STARTTLS");
        }
    }
});
