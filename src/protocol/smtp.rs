//! SMTP (RFC 5321) replies portcullis sends itself.

/// `421`: service not available, closing the channel (RFC 5321 §4.2.3); the
/// enhanced code 4.3.0 is "other or undefined mail system status" (RFC 3463).
pub fn unavailable(hostname: &str) -> Vec<u8> {
    format!("421 4.3.0 {hostname} Service temporarily unavailable, try again later\r\n")
        .into_bytes()
}
