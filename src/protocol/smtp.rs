//! SMTP (RFC 5321) before STARTTLS (RFC 3207), and the replies portcullis
//! sends itself.
//!
//! With `require_tls` (submission, 587) everything but EHLO, HELO, NOOP, RSET,
//! QUIT and STARTTLS gets `530 5.7.0`: credentials and mail never cross in
//! plaintext. Without it (MX, 25: RFC 3207 §4 forbids a public MX to insist),
//! a MAIL command after HELO/EHLO hands the session to the backend in
//! plaintext ([`Action::PassThrough`]); the backend is greeted with the
//! client's own HELO/EHLO first. We never advertise PIPELINING, so a client
//! waits for each reply and nothing it sends is lost in the switch.
//!
//! ```text
//! ExpectHello ─EHLO/HELO─▶ ExpectCommand ─STARTTLS─▶ StartTls
//!      │                        └─MAIL (require_tls: false)─▶ PassThrough
//!      └─STARTTLS─▶ StartTls
//! ```

use super::line::verb;
use super::{Action, BackendGreeting, Dialogue, ErrorBudget};

/// RFC 5321 §4.5.3.1.4: 512 octets for a command line, CRLF included.
pub const LINE_LIMIT: usize = 512;

/// `421`: service not available, closing the channel (RFC 5321 §4.2.3); the
/// enhanced code 4.3.0 is "other or undefined mail system status" (RFC 3463).
pub fn unavailable(hostname: &str) -> Vec<u8> {
    format!("421 4.3.0 {hostname} Service temporarily unavailable, try again later\r\n")
        .into_bytes()
}

/// `421 4.7.0` for a client over its per-address limit: 4.7.0 is "other
/// security status" (RFC 3463), as Postfix's own connection limits say.
pub fn too_many(hostname: &str, phrase: &str) -> Vec<u8> {
    format!("421 4.7.0 {hostname} {phrase}\r\n").into_bytes()
}

#[derive(Debug)]
pub struct SmtpDialogue {
    host: String,
    require_tls: bool,
    /// The client's HELO/EHLO line, replayed to the backend on pass-through.
    hello: Option<Vec<u8>>,
    errors: ErrorBudget,
}

impl SmtpDialogue {
    pub fn new(hostname: &str, require_tls: bool) -> SmtpDialogue {
        SmtpDialogue {
            host: hostname.to_string(),
            require_tls,
            hello: None,
            errors: ErrorBudget::default(),
        }
    }

    /// A refusal that counts against the error budget.
    fn error(&mut self, reply: &str) -> Action {
        let bye = format!(
            "421 4.7.0 {} Too many errors, closing connection\r\n",
            self.host
        );
        self.errors.refuse(format!("{reply}\r\n"), &bye)
    }

    fn ok(&self, reply: &str) -> Action {
        Action::Reply(format!("{reply}\r\n").into_bytes())
    }
}

impl Dialogue for SmtpDialogue {
    fn greeting(&self) -> Vec<u8> {
        format!("220 {} ESMTP\r\n", self.host).into_bytes()
    }

    fn line(&mut self, line: &[u8]) -> Action {
        // The framer strips the CR of CRLF, so any CR left is bare. RFC 5321
        // §2.3.8: a client MUST NOT send one, and we must not pass one on to
        // the backend in the HELO/EHLO and MAIL lines we replay.
        if line.contains(&b'\r') {
            return self.error("500 5.5.2 Error: bare <CR> received");
        }
        let (verb, arg) = verb(line);
        let arg_empty = arg.iter().all(|b| *b == b' ');
        match verb.as_str() {
            "EHLO" | "HELO" if arg_empty => {
                self.error(&format!("501 5.5.4 Syntax: {verb} hostname"))
            }
            "EHLO" => {
                self.hello = Some(line.to_vec());
                let reply = format!(
                    "250-{}\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n",
                    self.host
                );
                Action::Reply(reply.into_bytes())
            }
            "HELO" => {
                self.hello = Some(line.to_vec());
                self.ok(&format!("250 {}", self.host))
            }
            "STARTTLS" if !arg_empty => self.error("501 5.5.4 Syntax: STARTTLS"),
            "STARTTLS" => Action::StartTls(b"220 2.0.0 Ready to start TLS\r\n".to_vec()),
            "NOOP" => self.ok("250 2.0.0 OK"),
            "RSET" => self.ok("250 2.0.0 OK"),
            "QUIT" => Action::Close(format!("221 2.0.0 {} Bye\r\n", self.host).into_bytes()),
            _ if self.require_tls => self.error("530 5.7.0 Must issue a STARTTLS command first"),
            "AUTH" => self.error("530 5.7.0 Must issue a STARTTLS command first"),
            "MAIL" => match &self.hello {
                Some(hello) => {
                    let mut hello = hello.clone();
                    hello.extend_from_slice(b"\r\n");
                    let mut line = line.to_vec();
                    line.extend_from_slice(b"\r\n");
                    Action::PassThrough { hello, line }
                }
                None => self.error("503 5.5.1 Error: send HELO/EHLO first"),
            },
            "RCPT" | "DATA" | "BDAT" => self.error("503 5.5.1 Error: need MAIL command"),
            "VRFY" | "EXPN" => self.error("502 5.5.1 Command not available"),
            _ => self.error("500 5.5.2 Error: command not recognized"),
        }
    }

    fn line_limit(&self) -> usize {
        LINE_LIMIT
    }

    fn too_long(&self) -> Vec<u8> {
        format!(
            "500 5.5.6 Line too long\r\n421 4.7.0 {} Closing connection\r\n",
            self.host
        )
        .into_bytes()
    }

    fn injected(&self, _after: &[u8]) -> Vec<u8> {
        b"554 5.5.1 Error: command pipelined after STARTTLS, closing connection\r\n".to_vec()
    }

    fn shutting_down(&self) -> Vec<u8> {
        format!(
            "421 4.3.2 {} Service shutting down, closing connection\r\n",
            self.host
        )
        .into_bytes()
    }

    fn timed_out(&self) -> Vec<u8> {
        format!("421 4.4.2 {} Error: timeout exceeded\r\n", self.host).into_bytes()
    }

    fn backend_greeting(&self) -> BackendGreeting {
        BackendGreeting::DropSmtpReply
    }
}

/// Whether `buf` holds a complete SMTP reply (the last line has a space after
/// the code); returns its length.
pub fn reply_len(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(i) = buf[start..].iter().position(|&b| b == b'\n') {
        let line = &buf[start..start + i + 1];
        start += i + 1;
        if line.len() < 5 || line[3] != b'-' {
            return Some(start);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{assert_script, close, reply, starttls, MAX_ERRORS};

    fn submission() -> Box<dyn Dialogue> {
        Box::new(SmtpDialogue::new("mx.example.test", true))
    }

    fn mx() -> Box<dyn Dialogue> {
        Box::new(SmtpDialogue::new("mx.example.test", false))
    }

    const EHLO_REPLY: &str =
        "250-mx.example.test\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n";

    #[test]
    fn submission_upgrades_and_refuses_everything_else_before_tls() {
        assert_eq!(submission().greeting(), b"220 mx.example.test ESMTP\r\n");
        assert_script(
            &submission,
            b"EHLO client.test\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<a@b>\r\nnoop\r\nHELO c\r\nRSET\r\nSTARTTLS\r\n",
            &[
                reply(EHLO_REPLY),
                reply("530 5.7.0 Must issue a STARTTLS command first\r\n"),
                reply("530 5.7.0 Must issue a STARTTLS command first\r\n"),
                reply("250 2.0.0 OK\r\n"),
                reply("250 mx.example.test\r\n"),
                reply("250 2.0.0 OK\r\n"),
                starttls("220 2.0.0 Ready to start TLS\r\n"),
            ],
        );
    }

    #[test]
    fn ehlo_never_invites_credentials_before_tls() {
        assert!(!EHLO_REPLY.contains("AUTH"));
        assert_script(
            &submission,
            b"QUIT\r\n",
            &[close("221 2.0.0 mx.example.test Bye\r\n")],
        );
        assert_script(
            &submission,
            b"EHLO\r\nSTARTTLS now\r\n",
            &[
                reply("501 5.5.4 Syntax: EHLO hostname\r\n"),
                reply("501 5.5.4 Syntax: STARTTLS\r\n"),
            ],
        );
    }

    #[test]
    fn mx_passes_plaintext_mail_through_with_the_clients_hello() {
        assert_script(
            &mx,
            b"MAIL FROM:<a@b>\r\nEHLO sender.test\r\nAUTH LOGIN\r\nMAIL FROM:<a@sender.test>\r\n",
            &[
                reply("503 5.5.1 Error: send HELO/EHLO first\r\n"),
                reply(EHLO_REPLY),
                reply("530 5.7.0 Must issue a STARTTLS command first\r\n"),
                Action::PassThrough {
                    hello: b"EHLO sender.test\r\n".to_vec(),
                    line: b"MAIL FROM:<a@sender.test>\r\n".to_vec(),
                },
            ],
        );
        assert_script(
            &mx,
            b"EHLO s\r\nSTARTTLS\r\n",
            &[
                reply(EHLO_REPLY),
                starttls("220 2.0.0 Ready to start TLS\r\n"),
            ],
        );
    }

    #[test]
    fn the_error_budget_ends_the_session() {
        let input = b"BOGUS\r\n".repeat(MAX_ERRORS as usize);
        let actions = crate::protocol::script(submission().as_mut(), &[&input]);
        assert_eq!(actions.len(), MAX_ERRORS as usize);
        let last = String::from_utf8(match actions.last().unwrap() {
            Action::Close(b) => b.clone(),
            other => panic!("{other:?}"),
        })
        .unwrap();
        assert!(last.ends_with("421 4.7.0 mx.example.test Too many errors, closing connection\r\n"));
    }

    #[test]
    fn an_endless_line_is_refused() {
        let long = vec![b'A'; 600];
        assert_script(
            &submission,
            &long,
            &[close(
                "500 5.5.6 Line too long\r\n421 4.7.0 mx.example.test Closing connection\r\n",
            )],
        );
    }

    /// Found by fuzz/fuzz_targets/smtp_dialogue.rs: a bare CR inside the
    /// client's EHLO was replayed to the backend on pass-through.
    #[test]
    fn a_bare_cr_is_refused_and_never_replayed() {
        const FUZZ_INPUT: &[u8] = b"EHLO split.test\r\xff\xff\xff\xff\r\nMAIL FROM:<x@y>\r\n";
        const BARE_CR: &str = "500 5.5.2 Error: bare <CR> received\r\n";
        assert_script(
            &mx,
            FUZZ_INPUT,
            &[
                reply(BARE_CR),
                reply("503 5.5.1 Error: send HELO/EHLO first\r\n"),
            ],
        );
        assert_script(
            &mx,
            b"EHLO a\r\nMAIL FROM:<x@y>\rRCPT TO:<z@w>\r\nSTARTTLS\r\n",
            &[
                reply(EHLO_REPLY),
                reply(BARE_CR),
                starttls("220 2.0.0 Ready to start TLS\r\n"),
            ],
        );
    }

    #[test]
    fn multi_line_replies_are_measured_whole() {
        assert_eq!(reply_len(b"220 ok\r\n"), Some(8));
        assert_eq!(reply_len(b"220-a\r\n220-b\r\n220 c\r\nEXTRA"), Some(21));
        assert_eq!(reply_len(b"220-a\r\n220-b"), None);
    }
}
