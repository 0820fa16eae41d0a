//! POP3 before STLS, through the line framer as `starttls::converse` feeds it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::protocol::Protocol;
use portcullis::protocol::{dialogue, Action};
use portcullis_fuzz::{check_dialogue, Segmented};

fn is_error(reply: &[u8]) -> bool {
    reply.starts_with(b"-ERR")
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Segmented::new(data) else {
        return;
    };
    let make = || dialogue(Protocol::Pop3, "pop.example.test", true).expect("POP3 dialogue");
    let c = check_dialogue(&make, &input, &is_error);
    for (line, action) in &c.steps {
        let (Action::Reply(r) | Action::Close(r) | Action::StartTls(r)) = action else {
            panic!("POP3 passed through: {action:?}");
        };
        // POP3 speaks +OK/-ERR (never IMAP's `* BYE`), and takes no
        // credentials before TLS.
        assert!(r.starts_with(b"+OK") || r.starts_with(b"-ERR"), "{r:?}");
        let verb = line
            .split(|&b| b == b' ')
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        if matches!(verb.as_slice(), b"USER" | b"PASS" | b"APOP" | b"AUTH") {
            assert!(r.starts_with(b"-ERR [AUTH]"), "{verb:?} not refused");
        }
        assert_eq!(matches!(action, Action::StartTls(_)), verb == b"STLS");
    }
});
