//! IMAP before STARTTLS (tags, literals `{n}` / `{n+}`), through the line
//! framer as `starttls::converse` feeds it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::protocol::line::Literal;
use portcullis::protocol::Protocol;
use portcullis::protocol::{dialogue, Action};
use portcullis_fuzz::{check_dialogue, Segmented};

/// A tagged or untagged BAD/NO: counts against the error budget.
fn is_error(reply: &[u8]) -> bool {
    reply
        .split(|&b| b == b'\n')
        .any(|l| l.windows(5).any(|w| w == b" BAD " || w == b" NO [") || l.ends_with(b" BAD\r"))
}

/// The tag a line's answer must carry: its first word if a valid IMAP tag.
fn tag(line: &[u8]) -> Option<&[u8]> {
    let end = line.iter().position(|&b| b == b' ')?;
    let t = &line[..end];
    let ok = !t.is_empty()
        && t.iter()
            .all(|&b| b.is_ascii_graphic() && !b"(){%*\"\\+".contains(&b));
    ok.then_some(t)
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Segmented::new(data) else {
        return;
    };
    let make = || dialogue(Protocol::Imap, "imap.example.test", true).expect("IMAP dialogue");
    let c = check_dialogue(&make, &input, &is_error);
    for (line, action) in &c.steps {
        let (Action::Reply(r) | Action::Close(r) | Action::StartTls(r)) = action else {
            panic!("IMAP passed through: {action:?}");
        };
        // A literal's payload would be read as commands: never accepted
        // (tagged or not), and one that is already on its way ends the
        // session.
        let refused = r
            .windows(b"BAD Literals are not allowed".len())
            .any(|w| w == b"BAD Literals are not allowed");
        match portcullis::protocol::line::literal(line) {
            Some(Literal::NonSynchronizing) => {
                assert!(refused, "literal accepted: {line:?}");
                assert!(matches!(action, Action::Close(_)), "{line:?}");
            }
            Some(Literal::Synchronizing) => assert!(refused, "literal accepted: {line:?}"),
            None => {}
        }
        // Every reply line is untagged or carries the command's own tag; the
        // last names the command's tag (or `*` when it had none).
        let want = tag(line).unwrap_or(b"*");
        let lines: Vec<&[u8]> = r
            .strip_suffix(b"\r\n")
            .unwrap_or(r)
            .split(|&b| b == b'\n')
            .collect();
        for l in &lines {
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            assert!(
                l.starts_with(b"* ") || (l.starts_with(want) && l.get(want.len()) == Some(&b' ')),
                "reply line {l:?} to {line:?}"
            );
        }
        let Some(last) = lines.iter().rev().find(|l| !l.starts_with(b"* ")) else {
            assert!(
                tag(line).is_none() || matches!(action, Action::Close(_)),
                "no tagged reply to {line:?}"
            );
            continue;
        };
        let status = &last[want.len() + 1..];
        if status.starts_with(b"OK") {
            let verb = line[want.len() + 1..]
                .split(|&b| b == b' ')
                .next()
                .unwrap_or_default()
                .to_ascii_uppercase();
            assert!(
                matches!(
                    verb.as_slice(),
                    b"CAPABILITY" | b"NOOP" | b"LOGOUT" | b"STARTTLS"
                ),
                "{verb:?} accepted before TLS"
            );
            assert_eq!(matches!(action, Action::StartTls(_)), verb == b"STARTTLS");
        }
    }
});
