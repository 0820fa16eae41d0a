//! IMAP (RFC 9051) replies portcullis sends itself.

/// Untagged BYE with the RFC 5530 response code for a temporary failure.
pub const BYE_UNAVAILABLE: &[u8] =
    b"* BYE [UNAVAILABLE] Service temporarily unavailable, try again later\r\n";
