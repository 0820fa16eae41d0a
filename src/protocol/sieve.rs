//! ManageSieve (RFC 5804) before STARTTLS. The greeting is the capability
//! list, with STARTTLS and no SASL mechanism; AUTHENTICATE is refused with
//! `NO (ENCRYPT-NEEDED)`. After the upgrade the backend's own capability
//! greeting reaches the client, as §2.2 requires.
//!
//! The list always carries `SIEVE` (§1.7: "always present"; sieve-connect
//! refuses a server without it). Which Sieve extensions the backend has is
//! not known before TLS, so it is empty here: the client must discard this
//! list after STARTTLS and read the backend's.
//!
//! ```text
//! ExpectCommand ─STARTTLS─▶ StartTls      (CAPABILITY, NOOP: Reply; LOGOUT: Close)
//! ```

use super::{Action, BackendGreeting, Dialogue, ErrorBudget};

pub const BYE_UNAVAILABLE: &[u8] =
    b"BYE (TRYLATER) \"Service temporarily unavailable, try again later\"\r\n";

/// `BYE (TRYLATER)` for a client over its per-address limit; `phrase` has
/// no quote or backslash to escape.
pub fn too_many(phrase: &str) -> Vec<u8> {
    format!("BYE (TRYLATER) \"{phrase}\"\r\n").into_bytes()
}

pub const LINE_LIMIT: usize = 8 * 1024;

#[derive(Debug)]
pub struct SieveDialogue {
    errors: ErrorBudget,
}

const CAPABILITIES: &str = "\"IMPLEMENTATION\" \"portcullis\"\r\n\"SIEVE\" \"\"\r\n\"SASL\" \"\"\r\n\"STARTTLS\"\r\n\"VERSION\" \"1.0\"\r\n";

impl SieveDialogue {
    pub fn new(_hostname: &str) -> SieveDialogue {
        SieveDialogue {
            errors: ErrorBudget::default(),
        }
    }

    fn error(&mut self, reply: &str) -> Action {
        self.errors.refuse(
            format!("{reply}\r\n"),
            "BYE \"Too many invalid commands\"\r\n",
        )
    }
}

impl Dialogue for SieveDialogue {
    fn greeting(&self) -> Vec<u8> {
        format!("{CAPABILITIES}OK \"ManageSieve ready, STARTTLS first\"\r\n").into_bytes()
    }

    fn line(&mut self, line: &[u8]) -> Action {
        // RFC 5804 clients send literals non-synchronizing (`{n+}`): the
        // bytes follow at once and would be read as commands.
        if super::line::literal(line).is_some() {
            return Action::Close(
                b"NO \"Literals are not allowed before STARTTLS\"\r\nBYE \"Closing connection\"\r\n"
                    .to_vec(),
            );
        }
        match super::line::verb(line).0.as_str() {
            "CAPABILITY" => {
                Action::Reply(format!("{CAPABILITIES}OK \"Capability completed\"\r\n").into_bytes())
            }
            "NOOP" => Action::Reply(b"OK \"NOOP completed\"\r\n".to_vec()),
            "STARTTLS" => Action::StartTls(b"OK \"Begin TLS negotiation now\"\r\n".to_vec()),
            "LOGOUT" => Action::Close(b"OK \"Logout completed\"\r\n".to_vec()),
            "AUTHENTICATE" => {
                self.error("NO (ENCRYPT-NEEDED) \"Authentication requires STARTTLS\"")
            }
            _ => self.error("NO \"Command not permitted before STARTTLS\""),
        }
    }

    fn line_limit(&self) -> usize {
        LINE_LIMIT
    }

    fn too_long(&self) -> Vec<u8> {
        b"BYE \"Line too long\"\r\n".to_vec()
    }

    fn injected(&self, _after: &[u8]) -> Vec<u8> {
        b"BYE \"Command pipelined after STARTTLS\"\r\n".to_vec()
    }

    fn shutting_down(&self) -> Vec<u8> {
        b"BYE (TRYLATER) \"Server shutting down\"\r\n".to_vec()
    }

    fn timed_out(&self) -> Vec<u8> {
        b"BYE \"Disconnected for inactivity\"\r\n".to_vec()
    }

    fn backend_greeting(&self) -> BackendGreeting {
        BackendGreeting::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{assert_script, close, reply, starttls};

    fn sieve() -> Box<dyn Dialogue> {
        Box::new(SieveDialogue::new("mail.example.test"))
    }

    #[test]
    fn greeting_offers_starttls_and_no_sasl() {
        let g = String::from_utf8(sieve().greeting()).unwrap();
        assert!(
            g.contains("\"STARTTLS\"\r\n") && g.contains("\"SASL\" \"\"\r\n"),
            "{g}"
        );
        // RFC 5804 §1.7: IMPLEMENTATION and SIEVE are always present.
        assert!(
            g.starts_with("\"IMPLEMENTATION\" \"portcullis\"\r\n"),
            "{g}"
        );
        assert!(g.contains("\r\n\"SIEVE\" \"\"\r\n"), "{g}");
        assert!(g.ends_with("\r\nOK \"ManageSieve ready, STARTTLS first\"\r\n"));
    }

    #[test]
    fn dialogue_table() {
        assert_script(
            &sieve,
            b"AUTHENTICATE \"PLAIN\" \"AGFsaWNlAHNlY3JldA==\"\r\nNOOP \"{tag}\"\r\nSTARTTLS\r\n",
            &[
                reply("NO (ENCRYPT-NEEDED) \"Authentication requires STARTTLS\"\r\n"),
                reply("OK \"NOOP completed\"\r\n"),
                starttls("OK \"Begin TLS negotiation now\"\r\n"),
            ],
        );
        // A literal's bytes follow its line at once: they would be read as
        // commands (here, a STARTTLS), so the session ends.
        assert_script(
            &sieve,
            b"AUTHENTICATE \"PLAIN\" {10+}\r\nSTARTTLS\r\n",
            &[close(
                "NO \"Literals are not allowed before STARTTLS\"\r\nBYE \"Closing connection\"\r\n",
            )],
        );
        assert_script(
            &sieve,
            b"logout\r\n",
            &[close("OK \"Logout completed\"\r\n")],
        );
    }
}
