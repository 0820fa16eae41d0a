//! Line framing for the plaintext dialogues: bytes in, whole lines out, with a
//! length limit. Pure; the driver feeds it whatever the socket returned, split
//! anywhere.

/// A line longer than the protocol allows (RFC 5321 §4.5.3.1.4: 512 octets for
/// an SMTP command line, CRLF included).
#[derive(Debug, PartialEq, Eq)]
pub struct TooLong;

#[derive(Debug)]
pub struct LineBuf {
    buf: Vec<u8>,
    /// Longest line accepted, CRLF included.
    limit: usize,
}

impl LineBuf {
    pub fn new(limit: usize) -> LineBuf {
        LineBuf {
            buf: Vec::new(),
            limit,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete line without its line ending (CRLF, or a bare LF from
    /// sloppy clients); `None` until one is complete.
    pub fn next_line(&mut self) -> Option<Result<Vec<u8>, TooLong>> {
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(i) if i + 1 > self.limit => Some(Err(TooLong)),
            Some(i) => {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Some(Ok(line))
            }
            None if self.buf.len() >= self.limit => Some(Err(TooLong)),
            None => None,
        }
    }

    /// Bytes received after the last line taken.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    pub fn take_pending(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// A literal announced at the end of an IMAP or ManageSieve command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Literal {
    /// `{12}`: the client waits for the server's `+` before sending it.
    Synchronizing,
    /// `{12+}` (LITERAL+, and every ManageSieve client literal): the bytes
    /// follow at once, and cannot be told from commands.
    NonSynchronizing,
}

/// The literal a line announces at its end, if it does.
pub fn literal(line: &[u8]) -> Option<Literal> {
    let body = line.strip_suffix(b"}")?;
    let (body, kind) = match body.strip_suffix(b"+") {
        Some(b) => (b, Literal::NonSynchronizing),
        None => (body, Literal::Synchronizing),
    };
    let open = body.iter().rposition(|&b| b == b'{')?;
    let digits = &body[open + 1..];
    (!digits.is_empty() && digits.iter().all(u8::is_ascii_digit)).then_some(kind)
}

/// The first word of a command line, uppercased, and the rest after one space.
pub fn verb(line: &[u8]) -> (String, &[u8]) {
    let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let word = String::from_utf8_lossy(&line[..end]).to_ascii_uppercase();
    let rest = line.get(end + 1..).unwrap_or(&[]);
    (word, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_out_whole_however_the_bytes_arrive() {
        let input = b"EHLO a\r\nNOOP\nQUIT\r\npartial";
        for split in 0..=input.len() {
            let mut lb = LineBuf::new(512);
            let mut out = Vec::new();
            for part in [&input[..split], &input[split..]] {
                lb.push(part);
                while let Some(l) = lb.next_line() {
                    out.push(l.unwrap());
                }
            }
            assert_eq!(out, [&b"EHLO a"[..], b"NOOP", b"QUIT"], "split at {split}");
            assert_eq!(lb.pending(), b"partial");
        }
    }

    #[test]
    fn a_line_over_the_limit_is_refused_complete_or_not() {
        let mut lb = LineBuf::new(8);
        lb.push(b"12345678");
        assert_eq!(lb.next_line(), Some(Err(TooLong)));
        let mut lb = LineBuf::new(8);
        lb.push(b"123456\r\n");
        assert_eq!(lb.next_line(), Some(Ok(b"123456".to_vec())));
        lb.push(b"1234567\r\n");
        assert_eq!(lb.next_line(), Some(Err(TooLong)));
    }

    #[test]
    fn literals_are_told_by_their_closing_brace() {
        assert_eq!(literal(b"a LOGIN {5}"), Some(Literal::Synchronizing));
        assert_eq!(
            literal(b"PUTSCRIPT \"a\" {10+}"),
            Some(Literal::NonSynchronizing)
        );
        for not in [
            &b"a NOOP"[..],
            b"x {}",
            b"x {+}",
            b"x {1a}",
            b"x \"}\"",
            b"}",
        ] {
            assert_eq!(literal(not), None, "{:?}", String::from_utf8_lossy(not));
        }
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(
            verb(b"ehlo client.test"),
            ("EHLO".to_string(), &b"client.test"[..])
        );
        assert_eq!(verb(b"QUIT"), ("QUIT".to_string(), &b""[..]));
    }
}
