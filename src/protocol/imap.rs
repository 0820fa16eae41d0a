//! IMAP (RFC 9051, RFC 3501) before STARTTLS, and the replies portcullis sends
//! itself. LOGIN and AUTHENTICATE are refused with `[PRIVACYREQUIRED]`
//! (RFC 5530); literals are refused outright, since their payload would be
//! read as commands: a synchronizing one (`{5}`) is never sent after the
//! refusal, a non-synchronizing one (`{5+}`, LITERAL+) already is, and ends
//! the session.
//!
//! ```text
//! ExpectCommand ─STARTTLS─▶ StartTls      (CAPABILITY, NOOP: Reply; LOGOUT: Close)
//! ```

use super::line::Literal;
use super::{Action, BackendGreeting, Dialogue, ErrorBudget};

/// Untagged BYE with the RFC 5530 response code for a temporary failure.
pub const BYE_UNAVAILABLE: &[u8] =
    b"* BYE [UNAVAILABLE] Service temporarily unavailable, try again later\r\n";

/// Untagged BYE for a client over its per-address limit (RFC 5530 code).
pub fn too_many(phrase: &str) -> Vec<u8> {
    format!("* BYE [UNAVAILABLE] {phrase}\r\n").into_bytes()
}

/// Command lines longer than this are refused (RFC 7162 §4 asks for at least 8000).
pub const LINE_LIMIT: usize = 8 * 1024;

const CAPABILITIES: &str = "IMAP4rev1 STARTTLS LOGINDISABLED";

#[derive(Debug)]
pub struct ImapDialogue {
    host: String,
    errors: ErrorBudget,
}

/// The tag of a command line, if it has a valid one (RFC 9051 `tag`: ASTRING-CHAR but `+`).
fn tag(line: &[u8]) -> Option<&[u8]> {
    let end = line.iter().position(|&b| b == b' ')?;
    let tag = &line[..end];
    let valid = !tag.is_empty()
        && tag.iter().all(|&b| {
            b.is_ascii_graphic()
                && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b'+')
        });
    valid.then_some(tag)
}

impl ImapDialogue {
    pub fn new(hostname: &str) -> ImapDialogue {
        ImapDialogue {
            host: hostname.to_string(),
            errors: ErrorBudget::default(),
        }
    }

    fn error(&mut self, tag: &str, text: &str) -> Action {
        self.errors.refuse(
            format!("{tag} {text}\r\n"),
            "* BYE Too many invalid commands\r\n",
        )
    }
}

impl Dialogue for ImapDialogue {
    fn greeting(&self) -> Vec<u8> {
        format!("* OK [CAPABILITY {CAPABILITIES}] {} ready\r\n", self.host).into_bytes()
    }

    fn line(&mut self, line: &[u8]) -> Action {
        // Before the tag: a line with no valid tag may announce one too.
        let tag = tag(line).map(|t| String::from_utf8_lossy(t).into_owned());
        let quoted = tag.as_deref().unwrap_or("*");
        match super::line::literal(line) {
            // Its bytes follow at once and would be read as commands: the
            // two sides cannot agree on where commands start any more.
            Some(Literal::NonSynchronizing) => {
                return Action::Close(
                    format!("{quoted} BAD Literals are not allowed before STARTTLS\r\n* BYE Closing connection\r\n")
                        .into_bytes(),
                )
            }
            // The client waits for "+" before it sends the bytes: refused, it never does.
            Some(Literal::Synchronizing) => {
                return self.error(quoted, "BAD Literals are not allowed before STARTTLS")
            }
            None => {}
        }
        let Some(tag) = tag else {
            return self.error("*", "BAD Invalid tag or command");
        };
        let rest = &line[tag.len() + 1..];
        let command = super::line::verb(rest).0;
        match command.as_str() {
            "CAPABILITY" => Action::Reply(
                format!("* CAPABILITY {CAPABILITIES}\r\n{tag} OK CAPABILITY completed\r\n")
                    .into_bytes(),
            ),
            "NOOP" => Action::Reply(format!("{tag} OK NOOP completed\r\n").into_bytes()),
            "LOGOUT" => Action::Close(
                format!(
                    "* BYE {} logging out\r\n{tag} OK LOGOUT completed\r\n",
                    self.host
                )
                .into_bytes(),
            ),
            "STARTTLS" => {
                Action::StartTls(format!("{tag} OK Begin TLS negotiation now\r\n").into_bytes())
            }
            "LOGIN" | "AUTHENTICATE" => self.error(
                &tag,
                "NO [PRIVACYREQUIRED] Plaintext authentication is disallowed, use STARTTLS",
            ),
            _ => self.error(&tag, "BAD Command not permitted before STARTTLS"),
        }
    }

    fn line_limit(&self) -> usize {
        LINE_LIMIT
    }

    fn too_long(&self) -> Vec<u8> {
        b"* BYE Line too long\r\n".to_vec()
    }

    fn injected(&self, after: &[u8]) -> Vec<u8> {
        let tag = tag(after).map(|t| String::from_utf8_lossy(t).into_owned());
        let tag = tag.as_deref().unwrap_or("*");
        format!("{tag} BAD Command pipelined after STARTTLS\r\n* BYE Closing connection\r\n")
            .into_bytes()
    }

    fn shutting_down(&self) -> Vec<u8> {
        b"* BYE Server shutting down\r\n".to_vec()
    }

    fn timed_out(&self) -> Vec<u8> {
        b"* BYE Autologout; idle for too long\r\n".to_vec()
    }

    fn backend_greeting(&self) -> BackendGreeting {
        BackendGreeting::DropLine
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{assert_script, close, reply, starttls, MAX_ERRORS};

    fn imap() -> Box<dyn Dialogue> {
        Box::new(ImapDialogue::new("mail.example.test"))
    }

    #[test]
    fn capability_noop_and_starttls_answer_with_the_clients_tag() {
        assert_eq!(
            imap().greeting(),
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] mail.example.test ready\r\n"
        );
        assert_script(
            &imap,
            b"a1 CAPABILITY\r\nA2 noop\r\nx.3 STARTTLS\r\n",
            &[
                reply("* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\na1 OK CAPABILITY completed\r\n"),
                reply("A2 OK NOOP completed\r\n"),
                starttls("x.3 OK Begin TLS negotiation now\r\n"),
            ],
        );
    }

    #[test]
    fn credentials_and_literals_are_refused_before_tls() {
        assert_script(
            &imap,
            b"a1 LOGIN alice secret\r\na2 AUTHENTICATE PLAIN\r\na3 LOGIN {5}\r\nnotag\r\na5 SELECT INBOX\r\na6 LOGOUT\r\n",
            &[
                reply("a1 NO [PRIVACYREQUIRED] Plaintext authentication is disallowed, use STARTTLS\r\n"),
                reply("a2 NO [PRIVACYREQUIRED] Plaintext authentication is disallowed, use STARTTLS\r\n"),
                reply("a3 BAD Literals are not allowed before STARTTLS\r\n"),
                reply("* BAD Invalid tag or command\r\n"),
                reply("a5 BAD Command not permitted before STARTTLS\r\n"),
                close("* BYE mail.example.test logging out\r\na6 OK LOGOUT completed\r\n"),
            ],
        );
        // A non-synchronizing literal's bytes are already on their way.
        assert_script(
            &imap,
            b"a4 LOGIN {5+}\r\nalice a5 STARTTLS\r\n",
            &[close(
                "a4 BAD Literals are not allowed before STARTTLS\r\n* BYE Closing connection\r\n",
            )],
        );
        // With no valid tag as well.
        assert_script(
            &imap,
            b"a{ X {14+}\r\nx STARTTLS\r\n",
            &[close(
                "* BAD Literals are not allowed before STARTTLS\r\n* BYE Closing connection\r\n",
            )],
        );
    }

    #[test]
    fn injection_is_answered_with_the_injected_tag() {
        assert_eq!(
            imap().injected(b"a9 LOGIN x y\r\n"),
            b"a9 BAD Command pipelined after STARTTLS\r\n* BYE Closing connection\r\n"
        );
    }

    #[test]
    fn the_error_budget_and_line_limit_end_the_session() {
        let input = b"a BOGUS\r\n".repeat(MAX_ERRORS as usize);
        let actions = crate::protocol::script(imap().as_mut(), &[&input]);
        assert_eq!(actions.len(), MAX_ERRORS as usize);
        assert!(
            matches!(actions.last(), Some(Action::Close(b)) if b.ends_with(b"* BYE Too many invalid commands\r\n"))
        );
        assert_script(
            &imap,
            &vec![b'x'; LINE_LIMIT + 1],
            &[close("* BYE Line too long\r\n")],
        );
    }
}
