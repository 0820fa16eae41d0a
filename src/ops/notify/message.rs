//! What a notification says: the event, its subject, its plain-text body
//! (with what to do about it), its JSON for the webhook, and the email it
//! becomes (headers, 7-bit body).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// SMTP's line limit is 998 octets plus CRLF (RFC 5321 4.5.3.1.6).
const MAX_LINE: usize = 998;

/// Something the operator should hear about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A certificate was issued; `renewal` is false for the first one of this host.
    Issued {
        host: String,
        names: Vec<String>,
        serial: String,
        issuer: String,
        not_after: SystemTime,
        renewal: bool,
    },
    /// An issuance/renewal attempt failed; `not_after` of the certificate
    /// still served, if any real one.
    RenewalFailed {
        host: String,
        names: Vec<String>,
        error: String,
        next_try: SystemTime,
        not_after: Option<SystemTime>,
    },
    /// Sent by [`super::Notifier::check_expiry`] at most once per 24 h per host.
    Expiring {
        host: String,
        names: Vec<String>,
        not_after: SystemTime,
        source: String,
    },
    /// `key: rollover`: a next key was made; its TLSA records are to be
    /// published before portcullis uses it.
    PublishTlsa {
        host: String,
        names: Vec<String>,
        /// Zone-file lines.
        records: Vec<String>,
        /// The servers that must serve them (`acme.tlsa.check`), and for
        /// how many TTLs.
        check: Vec<String>,
        wait_ttls: u32,
    },
}

impl Event {
    /// The event's name in the JSON and the log: issued, renewed,
    /// renewal_failed, expiring.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Issued { renewal: false, .. } => "issued",
            Event::Issued { renewal: true, .. } => "renewed",
            Event::RenewalFailed { .. } => "renewal_failed",
            Event::Expiring { .. } => "expiring",
            Event::PublishTlsa { .. } => "publish_tlsa",
        }
    }

    pub fn host(&self) -> &str {
        match self {
            Event::Issued { host, .. }
            | Event::RenewalFailed { host, .. }
            | Event::Expiring { host, .. }
            | Event::PublishTlsa { host, .. } => host,
        }
    }

    fn names(&self) -> &[String] {
        match self {
            Event::Issued { names, .. }
            | Event::RenewalFailed { names, .. }
            | Event::Expiring { names, .. }
            | Event::PublishTlsa { names, .. } => names,
        }
    }

    /// A subject an operator can filter on: `[portcullis] ` and a fixed phrase.
    pub fn subject(&self, now: SystemTime) -> String {
        let host = one_line(self.host());
        match self {
            Event::Issued { renewal: false, .. } => {
                format!("[portcullis] certificate issued: {host}")
            }
            Event::Issued { renewal: true, .. } => {
                format!("[portcullis] certificate renewed: {host}")
            }
            Event::RenewalFailed { .. } => format!("[portcullis] RENEWAL FAILED: {host}"),
            Event::PublishTlsa { .. } => {
                format!("[portcullis] publish the next key's TLSA records: {host}")
            }
            Event::Expiring { not_after, .. } => match days_left(*not_after, now) {
                Some(1) => format!("[portcullis] certificate expires in 1 day: {host}"),
                Some(n) => format!("[portcullis] certificate expires in {n} days: {host}"),
                None => format!("[portcullis] certificate EXPIRED: {host}"),
            },
        }
    }

    /// The plain-text body, `\n` line endings; `config` is the config
    /// file for the commands it suggests (`FILE` when unknown).
    pub fn body(&self, now: SystemTime, config: Option<&Path>) -> String {
        let config = config.map_or("FILE".into(), |p| p.display().to_string());
        let host = self.host();
        let names = self.names().join(", ");
        let mut b = String::new();
        // Writing to a String cannot fail: the results below are ignored.
        match self {
            Event::Issued {
                serial,
                issuer,
                not_after,
                renewal,
                ..
            } => {
                let what = if *renewal {
                    "renewed the certificate"
                } else {
                    "obtained the first certificate"
                };
                let _ = writeln!(b, "portcullis {what} for {host}.\n");
                let _ = writeln!(b, "Names:     {names}");
                let _ = writeln!(b, "Serial:    {serial}");
                let _ = writeln!(b, "Issuer:    {issuer}");
                let _ = writeln!(b, "Not after: {}", rfc3339(*not_after));
                let _ = writeln!(
                    b,
                    "\nIt is served already, on every listener: nothing was restarted \
                     and nothing needs to be done."
                );
            }
            Event::RenewalFailed {
                error,
                next_try,
                not_after,
                ..
            } => {
                let _ = writeln!(b, "portcullis could not obtain a certificate for {host}.\n");
                let _ = writeln!(b, "Names:     {names}");
                let _ = writeln!(b, "Error:     {}", indent(error));
                let _ = writeln!(b, "Next try:  {}", rfc3339(*next_try));
                match not_after {
                    Some(t) => {
                        let _ = writeln!(b, "Served:    a certificate valid until {}", rfc3339(*t));
                        let _ = writeln!(b, "           ({})", left(*t, now));
                    }
                    None => {
                        let _ = writeln!(
                            b,
                            "Served:    no certificate from the CA yet (clients see a placeholder)"
                        );
                    }
                }
                let _ = writeln!(b, "\nWhat to do:");
                write_todo(&mut b, host, "acme", &config);
            }
            Event::PublishTlsa {
                records,
                check,
                wait_ttls,
                ..
            } => Self::publish_body(&mut b, host, records, check, *wait_ttls),
            Event::Expiring {
                not_after, source, ..
            } => {
                let _ = writeln!(
                    b,
                    "The certificate for {host} {}, on {}.\n",
                    left(*not_after, now),
                    rfc3339(*not_after)
                );
                let _ = writeln!(b, "Names:     {names}");
                let _ = writeln!(b, "Source:    {source}");
                let _ = writeln!(b, "\nWhat to do:");
                write_todo(&mut b, host, source, &config);
                let _ = writeln!(
                    b,
                    "\nThis reminder comes once a day until the certificate is replaced."
                );
            }
        }
        b
    }

    /// The body of [`Event::PublishTlsa`].
    fn publish_body(
        b: &mut String,
        host: &str,
        records: &[String],
        check: &[String],
        wait_ttls: u32,
    ) {
        let _ = writeln!(
            b,
            "portcullis made the next key for {host} (acme key: rollover).\n"
        );
        let _ = writeln!(b, "Publish these records now, beside the current ones:\n");
        for r in records {
            let _ = writeln!(b, "  {r}");
        }
        let _ = writeln!(
            b,
            "\nportcullis switches to this key at a renewal once {} served them for {wait_ttls} of their TTLs.",
            if check.is_empty() {
                "the acme.tlsa.check servers have".to_string()
            } else {
                format!("{} have", check.join(", "))
            }
        );
        let _ = writeln!(
            b,
            "Until then the current key stays; after the switch, remove the old key's 3 1 1 records \
             (portcullis tlsa prints the records in use)."
        );
    }

    /// The webhook's JSON document.
    pub fn json(&self, now: SystemTime) -> serde_json::Value {
        let mut v = serde_json::json!({
            "event": self.kind(),
            "host": self.host(),
            "names": self.names(),
        });
        let fields: Vec<(&str, serde_json::Value)> = match self {
            Event::Issued {
                serial,
                issuer,
                not_after,
                ..
            } => vec![
                ("not_after", rfc3339(*not_after).into()),
                ("serial", serial.as_str().into()),
                ("issuer", issuer.as_str().into()),
            ],
            Event::RenewalFailed {
                error,
                next_try,
                not_after,
                ..
            } => vec![
                ("not_after", not_after.map(rfc3339).into()),
                ("error", error.as_str().into()),
                ("next_try", rfc3339(*next_try).into()),
            ],
            Event::PublishTlsa {
                records,
                check,
                wait_ttls,
                ..
            } => vec![
                ("records", records.clone().into()),
                ("check", check.clone().into()),
                ("wait_ttls", (*wait_ttls).into()),
            ],
            Event::Expiring {
                not_after, source, ..
            } => vec![
                ("not_after", rfc3339(*not_after).into()),
                ("source", source.as_str().into()),
                ("days_left", days_left(*not_after, now).unwrap_or(0).into()),
            ],
        };
        if let Some(map) = v.as_object_mut() {
            for (k, value) in fields {
                map.insert(k.to_string(), value);
            }
            map.insert("time".into(), rfc3339(now).into());
        }
        v
    }
}

/// The "what to do" lines for a certificate from `source`; `config` is the
/// config file the commands need.
fn write_todo(b: &mut String, host: &str, source: &str, config: &str) {
    let _ = writeln!(b, "  portcullis certs --config {config}");
    let _ = writeln!(
        b,
        "      every certificate, its next renewal and last error"
    );
    if source == "files" {
        let _ = writeln!(
            b,
            "  This certificate comes from files that portcullis does not renew\n  \
             (certbot's, for example): check the tool that renews them.\n  \
             portcullis picks up the new files by itself when they change."
        );
        return;
    }
    let _ = writeln!(b, "  portcullis renew --config {config} {host}");
    let _ = writeln!(b, "      tries again now");
    let _ = writeln!(
        b,
        "  Check that ports 80 and 443 reach portcullis from the internet:\n  \
         the CA's challenges (http-01, tls-alpn-01) come in there."
    );
}

/// Continuation lines of a multi-line value, indented under its label.
fn indent(s: &str) -> String {
    s.trim_end().replace('\n', "\n           ")
}

/// A header value on one line: control characters (CR, LF) become spaces.
pub(super) fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Whole days until `not_after`, rounded up; `None` once it has passed.
fn days_left(not_after: SystemTime, now: SystemTime) -> Option<u64> {
    let left = not_after.duration_since(now).ok()?;
    if left.is_zero() {
        return None;
    }
    Some(left.as_secs().div_ceil(24 * 3600).max(1))
}

/// "expires in 10 days", or "expired".
fn left(not_after: SystemTime, now: SystemTime) -> String {
    match days_left(not_after, now) {
        Some(1) => "expires in 1 day".into(),
        Some(n) => format!("expires in {n} days"),
        None => "has EXPIRED".into(),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// RFC 5322 3.3 date-time in UTC: `Tue, 01 Jul 2025 12:00:00 +0000`.
fn rfc5322_date(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(0),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(0),
    };
    let dt =
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let weekday = &dt.weekday().to_string()[..3];
    let month = &dt.month().to_string()[..3];
    format!(
        "{weekday}, {:02} {month} {} {:02}:{:02}:{:02} +0000",
        dt.day(),
        dt.year(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

/// The domain of an address (the config walk has checked there is one).
pub(super) fn domain(address: &str) -> &str {
    address.rsplit_once('@').map_or(address, |(_, d)| d)
}

/// The whole message, headers and body, CRLF line endings, not yet
/// dot-stuffed. A body that is not ASCII goes as base64, so the message is
/// 7-bit whatever the server supports.
pub(super) fn message(
    from: &str,
    to: &[String],
    subject: &str,
    body: &str,
    date: SystemTime,
    id: &str,
) -> Vec<u8> {
    let subject = if subject.is_ascii() {
        subject.to_string()
    } else {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD.encode(subject);
        format!("=?utf-8?b?{b}?=")
    };
    let mut m = String::new();
    let _ = write!(m, "From: portcullis <{from}>\r\n");
    let _ = write!(m, "To: {}\r\n", to.join(",\r\n "));
    let _ = write!(m, "Subject: {subject}\r\n");
    let _ = write!(m, "Date: {}\r\n", rfc5322_date(date));
    let _ = write!(m, "Message-ID: <{id}@{}>\r\n", domain(from));
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    // RFC 3834: no vacation replies or other auto-answers to this.
    m.push_str("Auto-Submitted: auto-generated\r\n");
    if body.is_ascii() {
        m.push_str("Content-Transfer-Encoding: 7bit\r\n\r\n");
        for line in body.lines() {
            // The body is ASCII, so any byte boundary is a char boundary.
            let mut rest = line.trim_end_matches('\r');
            while rest.len() > MAX_LINE {
                let (head, tail) = rest.split_at(MAX_LINE);
                m.push_str(head);
                m.push_str("\r\n");
                rest = tail;
            }
            m.push_str(rest);
            m.push_str("\r\n");
        }
    } else {
        use base64::Engine as _;
        m.push_str("Content-Transfer-Encoding: base64\r\n\r\n");
        let crlf = body.lines().collect::<Vec<_>>().join("\r\n") + "\r\n";
        let b = base64::engine::general_purpose::STANDARD.encode(crlf);
        for chunk in b.as_bytes().chunks(76) {
            m.push_str(&String::from_utf8_lossy(chunk));
            m.push_str("\r\n");
        }
    }
    m.into_bytes()
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::smtp::dot_stuff;
    use super::*;
    use std::time::Duration;

    pub(in crate::ops::notify) const DAY: Duration = Duration::from_secs(24 * 3600);

    /// 2025-07-01T12:00:00Z, a Tuesday.
    pub(in crate::ops::notify) fn noon() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_751_371_200)
    }

    fn names() -> Vec<String> {
        vec!["mail.example.org".into(), "imap.example.org".into()]
    }

    fn issued(renewal: bool) -> Event {
        Event::Issued {
            host: "mail.example.org".into(),
            names: names(),
            serial: "04a1b2".into(),
            issuer: "CN=R11, O=Let's Encrypt, C=US".into(),
            not_after: noon() + 90 * DAY,
            renewal,
        }
    }

    fn failed() -> Event {
        Event::RenewalFailed {
            host: "mail.example.org".into(),
            names: names(),
            error: "order invalid: urn:ietf:params:acme:error:connection\nsecond line".into(),
            next_try: noon() + Duration::from_secs(3600),
            not_after: Some(noon() + 12 * DAY),
        }
    }

    fn expiring(days: u32, source: &str) -> Event {
        Event::Expiring {
            host: "mail.example.org".into(),
            names: names(),
            not_after: noon() + DAY * days,
            source: source.into(),
        }
    }

    #[test]
    fn a_next_key_notice_says_what_to_publish_and_when() {
        let e = Event::PublishTlsa {
            host: "mx.example.org".into(),
            names: vec!["mx.example.org".into()],
            records: vec!["_25._tcp.mx.example.org. IN TLSA 3 1 1 ab12".into()],
            check: vec!["192.0.2.53:53".into()],
            wait_ttls: 2,
        };
        let now = noon();
        assert_eq!(
            e.subject(now),
            "[portcullis] publish the next key's TLSA records: mx.example.org"
        );
        let body = e.body(now, None);
        assert!(
            body.contains("\n  _25._tcp.mx.example.org. IN TLSA 3 1 1 ab12\n"),
            "{body}"
        );
        assert!(
            body.contains("once 192.0.2.53:53 have served them for 2 of their TTLs"),
            "{body}"
        );
        assert!(
            body.contains("remove the old key's 3 1 1 records"),
            "{body}"
        );
        let j = e.json(now);
        assert_eq!(j["event"], "publish_tlsa");
        assert_eq!(
            j["records"][0],
            "_25._tcp.mx.example.org. IN TLSA 3 1 1 ab12"
        );
        assert_eq!(j["wait_ttls"], 2);
    }

    #[test]
    fn subjects_are_filterable() {
        let now = noon();
        assert_eq!(
            issued(false).subject(now),
            "[portcullis] certificate issued: mail.example.org"
        );
        assert_eq!(
            issued(true).subject(now),
            "[portcullis] certificate renewed: mail.example.org"
        );
        assert_eq!(
            failed().subject(now),
            "[portcullis] RENEWAL FAILED: mail.example.org"
        );
        assert_eq!(
            expiring(10, "acme").subject(now),
            "[portcullis] certificate expires in 10 days: mail.example.org"
        );
        // Part of a day left counts as a day.
        assert_eq!(
            expiring(1, "acme").subject(now + Duration::from_secs(60)),
            "[portcullis] certificate expires in 1 day: mail.example.org"
        );
        assert_eq!(
            expiring(0, "files").subject(now + Duration::from_secs(1)),
            "[portcullis] certificate EXPIRED: mail.example.org"
        );
        let sneaky = Event::Expiring {
            host: "a\r\nBcc: x@y".into(),
            names: vec![],
            not_after: now,
            source: "acme".into(),
        };
        assert!(!sneaky.subject(now).contains('\n'));
    }

    #[test]
    fn bodies_carry_the_facts() {
        let now = noon();
        let b = issued(false).body(now, None);
        assert!(b.contains("first certificate for mail.example.org"), "{b}");
        assert!(
            b.contains("Names:     mail.example.org, imap.example.org"),
            "{b}"
        );
        assert!(b.contains("Serial:    04a1b2"), "{b}");
        assert!(
            b.contains("Issuer:    CN=R11, O=Let's Encrypt, C=US"),
            "{b}"
        );
        assert!(b.contains("Not after: 2025-09-29T12:00:00Z"), "{b}");
        assert!(issued(true)
            .body(now, None)
            .contains("renewed the certificate"));

        let b = failed().body(now, None);
        assert!(
            b.contains("Error:     order invalid: urn:ietf:params:acme:error:connection\n           second line"),
            "{b}"
        );
        assert!(b.contains("Next try:  2025-07-01T13:00:00Z"), "{b}");
        assert!(b.contains("valid until 2025-07-13T12:00:00Z"), "{b}");
        assert!(b.contains("expires in 12 days"), "{b}");
        assert!(
            b.contains("portcullis renew --config FILE mail.example.org\n"),
            "{b}"
        );
        assert!(b.contains("ports 80 and 443"), "{b}");

        let b = expiring(10, "acme").body(now, None);
        assert!(
            b.contains("expires in 10 days, on 2025-07-11T12:00:00Z"),
            "{b}"
        );
        assert!(b.contains("portcullis certs --config FILE\n"), "{b}");
        assert!(
            b.contains("portcullis renew --config FILE mail.example.org\n"),
            "{b}"
        );
        let etc = Path::new("/etc/portcullis/config.yaml");
        let b = expiring(10, "acme").body(now, Some(etc));
        assert!(
            b.contains("portcullis renew --config /etc/portcullis/config.yaml mail.example.org\n"),
            "{b}"
        );
        let b = expiring(10, "files").body(now, None);
        assert!(b.contains("does not renew"), "{b}");
        assert!(!b.contains("portcullis renew"), "{b}");
    }

    #[test]
    fn dates_are_rfc5322_utc() {
        assert_eq!(rfc5322_date(noon()), "Tue, 01 Jul 2025 12:00:00 +0000");
        assert_eq!(
            rfc5322_date(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3723)),
            "Tue, 29 Feb 2000 01:02:03 +0000"
        );
    }

    pub(in crate::ops::notify) fn to() -> Vec<String> {
        vec!["alice@example.test".into(), "bob@example.test".into()]
    }

    #[test]
    fn message_has_headers_and_crlf_only() {
        let body = "first\n.dot line\n.\nlast\r\n";
        let m = message(
            "portcullis@example.org",
            &to(),
            "[portcullis] certificate issued: x",
            body,
            noon(),
            "123.abc",
        );
        let text = String::from_utf8(m.clone()).unwrap();
        for h in [
            "From: portcullis <portcullis@example.org>\r\n",
            "To: alice@example.test,\r\n bob@example.test\r\n",
            "Subject: [portcullis] certificate issued: x\r\n",
            "Date: Tue, 01 Jul 2025 12:00:00 +0000\r\n",
            "Message-ID: <123.abc@example.org>\r\n",
            "MIME-Version: 1.0\r\n",
            "Content-Type: text/plain; charset=utf-8\r\n",
            "Content-Transfer-Encoding: 7bit\r\n",
            "Auto-Submitted: auto-generated\r\n",
        ] {
            assert!(text.contains(h), "{h:?} missing in {text}");
        }
        for (i, &b) in m.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(m[i - 1], b'\r', "bare LF at {i} in {text:?}");
            }
            if b == b'\r' {
                assert_eq!(m.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
        }
        assert!(
            text.ends_with("\r\n\r\nfirst\r\n.dot line\r\n.\r\nlast\r\n"),
            "{text:?}"
        );

        let data = dot_stuff(&m);
        let data = String::from_utf8(data).unwrap();
        assert!(
            data.ends_with("\r\nfirst\r\n..dot line\r\n..\r\nlast\r\n.\r\n"),
            "{data:?}"
        );
        // Only the terminator is a lone dot.
        assert_eq!(data.matches("\r\n.\r\n").count(), 1);
        assert_eq!(dot_stuff(b".a\r\nb"), b"..a\r\nb\r\n.\r\n");
    }

    #[test]
    fn long_lines_are_split_and_non_ascii_goes_as_base64() {
        let long = "x".repeat(2500);
        let m = message("a@b.c", &to(), "s", &long, noon(), "1");
        assert!(m.split(|&b| b == b'\n').all(|l| l.len() <= MAX_LINE + 1));
        let text = String::from_utf8(m).unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1;
        assert_eq!(body.replace("\r\n", ""), long);

        let m = message(
            "a@b.c",
            &to(),
            "grüße",
            "Fehler: Zertifikat ungültig\n",
            noon(),
            "1",
        );
        let text = String::from_utf8(m).unwrap();
        assert!(text.is_ascii(), "{text}");
        assert!(
            text.contains("Subject: =?utf-8?b?Z3LDvMOfZQ==?=\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Content-Transfer-Encoding: base64\r\n\r\n"),
            "{text}"
        );
        use base64::Engine as _;
        let encoded = text.split("\r\n\r\n").nth(1).unwrap().replace("\r\n", "");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(decoded, "Fehler: Zertifikat ungültig\r\n".as_bytes());
    }

    #[test]
    fn json_shapes() {
        let now = noon();
        let v = issued(true).json(now);
        assert_eq!(
            v,
            serde_json::json!({
                "event": "renewed",
                "host": "mail.example.org",
                "names": ["mail.example.org", "imap.example.org"],
                "not_after": "2025-09-29T12:00:00Z",
                "serial": "04a1b2",
                "issuer": "CN=R11, O=Let's Encrypt, C=US",
                "time": "2025-07-01T12:00:00Z",
            })
        );
        assert_eq!(issued(false).json(now)["event"], "issued");
        let v = failed().json(now);
        assert_eq!(v["event"], "renewal_failed");
        assert_eq!(v["not_after"], "2025-07-13T12:00:00Z");
        assert_eq!(v["next_try"], "2025-07-01T13:00:00Z");
        assert!(v["error"].as_str().unwrap().starts_with("order invalid"));
        let none = Event::RenewalFailed {
            host: "h".into(),
            names: vec![],
            error: "e".into(),
            next_try: now,
            not_after: None,
        };
        assert_eq!(none.json(now)["not_after"], serde_json::Value::Null);
        let v = expiring(10, "files").json(now);
        assert_eq!(v["event"], "expiring");
        assert_eq!(v["source"], "files");
        assert_eq!(v["days_left"], 10);
        assert_eq!(v["not_after"], "2025-07-11T12:00:00Z");
        assert_eq!(v["time"], "2025-07-01T12:00:00Z");
    }
}
