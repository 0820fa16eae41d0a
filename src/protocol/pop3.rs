//! POP3 (RFC 1939) before STLS (RFC 2595), and the replies portcullis sends
//! itself. USER, PASS, APOP and AUTH are refused with `-ERR [AUTH]` (RFC 3206).
//!
//! ```text
//! ExpectCommand ─STLS─▶ StartTls      (CAPA: Reply; QUIT: Close)
//! ```

use super::{Action, BackendGreeting, Dialogue, ErrorBudget};

/// `-ERR` with the RFC 3206 `SYS/TEMP` code: a transient system failure.
pub const ERR_UNAVAILABLE: &[u8] =
    b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n";

/// `-ERR [SYS/TEMP]` (RFC 3206) for a client over its per-address limit.
pub fn too_many(phrase: &str) -> Vec<u8> {
    format!("-ERR [SYS/TEMP] {phrase}\r\n").into_bytes()
}

/// RFC 2449 allows 255 octets; clients with long AUTH lines need more after TLS,
/// not before. The listener limit is generous anyway.
pub const LINE_LIMIT: usize = 8 * 1024;

#[derive(Debug)]
pub struct Pop3Dialogue {
    host: String,
    errors: ErrorBudget,
}

impl Pop3Dialogue {
    pub fn new(hostname: &str) -> Pop3Dialogue {
        Pop3Dialogue {
            host: hostname.to_string(),
            errors: ErrorBudget::default(),
        }
    }

    fn error(&mut self, text: &str) -> Action {
        self.errors.refuse(
            format!("-ERR {text}\r\n"),
            "-ERR Too many invalid commands\r\n",
        )
    }
}

impl Dialogue for Pop3Dialogue {
    fn greeting(&self) -> Vec<u8> {
        format!("+OK {} POP3 ready\r\n", self.host).into_bytes()
    }

    fn line(&mut self, line: &[u8]) -> Action {
        match super::line::verb(line).0.as_str() {
            "CAPA" => Action::Reply(b"+OK Capability list follows\r\nSTLS\r\n.\r\n".to_vec()),
            "STLS" => Action::StartTls(b"+OK Begin TLS negotiation\r\n".to_vec()),
            "QUIT" => {
                Action::Close(format!("+OK {} closing connection\r\n", self.host).into_bytes())
            }
            "USER" | "PASS" | "APOP" | "AUTH" => {
                self.error("[AUTH] Plaintext authentication is disallowed, use STLS")
            }
            _ => self.error("Command not permitted before STLS"),
        }
    }

    fn line_limit(&self) -> usize {
        LINE_LIMIT
    }

    fn too_long(&self) -> Vec<u8> {
        b"-ERR Line too long\r\n".to_vec()
    }

    fn injected(&self, _after: &[u8]) -> Vec<u8> {
        b"-ERR Command pipelined after STLS, closing connection\r\n".to_vec()
    }

    fn shutting_down(&self) -> Vec<u8> {
        b"-ERR [SYS/TEMP] Server shutting down\r\n".to_vec()
    }

    fn timed_out(&self) -> Vec<u8> {
        b"-ERR Disconnected for inactivity\r\n".to_vec()
    }

    fn backend_greeting(&self) -> BackendGreeting {
        BackendGreeting::DropLine
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{assert_script, close, reply, starttls, MAX_ERRORS};

    fn pop3() -> Box<dyn Dialogue> {
        Box::new(Pop3Dialogue::new("mail.example.test"))
    }

    #[test]
    fn capa_lists_stls_and_stls_upgrades() {
        assert_eq!(pop3().greeting(), b"+OK mail.example.test POP3 ready\r\n");
        assert_script(
            &pop3,
            b"CAPA\r\nstls\r\n",
            &[
                reply("+OK Capability list follows\r\nSTLS\r\n.\r\n"),
                starttls("+OK Begin TLS negotiation\r\n"),
            ],
        );
    }

    #[test]
    fn credentials_are_refused_before_tls() {
        let auth = "-ERR [AUTH] Plaintext authentication is disallowed, use STLS\r\n";
        assert_script(
            &pop3,
            b"USER alice\r\nPASS secret\r\nAPOP alice 0123\r\nAUTH PLAIN\r\nSTAT\r\nQUIT\r\n",
            &[
                reply(auth),
                reply(auth),
                reply(auth),
                reply(auth),
                reply("-ERR Command not permitted before STLS\r\n"),
                close("+OK mail.example.test closing connection\r\n"),
            ],
        );
    }

    #[test]
    fn the_error_budget_and_line_limit_end_the_session() {
        let input = b"BOGUS\r\n".repeat(MAX_ERRORS as usize);
        let actions = crate::protocol::script(pop3().as_mut(), &[&input]);
        assert_eq!(actions.len(), MAX_ERRORS as usize);
        assert!(matches!(actions.last(), Some(Action::Close(_))));
        assert_script(
            &pop3,
            &vec![b'x'; LINE_LIMIT],
            &[close("-ERR Line too long\r\n")],
        );
    }
}
