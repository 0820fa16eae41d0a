//! POP3 (RFC 1939) replies portcullis sends itself.

/// `-ERR` with the RFC 3206 `SYS/TEMP` code: a transient system failure.
pub const ERR_UNAVAILABLE: &[u8] =
    b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n";
