//! PROXY protocol headers (HAProxy's proxy-protocol.txt) that tell a backend who
//! the client really is. Pure: addresses and TLS facts in, bytes out.
//!
//! v2 is the default because it is the only version that can carry what Dovecot
//! needs to treat a session as secured: the `PP2_TYPE_SSL` TLV with the
//! `PP2_CLIENT_SSL` bit. We also send the TLS version and cipher as sub-TLVs and
//! the SNI name as `PP2_TYPE_AUTHORITY` (Dovecot's `local_name`), and never an
//! ALPN TLV (Dovecot 2.4 drops sessions whose ALPN is not imap/pop3/submission).

use std::io;
use std::net::SocketAddr;

use ppp::v2::{Builder, Command, Protocol, Type, Version};

/// `PP2_CLIENT_SSL`: the client connected over SSL/TLS.
const PP2_CLIENT_SSL: u8 = 0x01;

/// What a TLS session looks like to the backend.
#[derive(Clone, Copy, Debug)]
pub struct TlsFacts<'a> {
    /// `TLSv1.3` / `TLSv1.2`, as OpenSSL and HAProxy spell it.
    pub version: &'a str,
    /// IANA cipher suite name, e.g. `TLS_AES_256_GCM_SHA384`.
    pub cipher: &'a str,
    pub sni: Option<&'a str>,
}

/// Both addresses in one family: a dual-stack socket reports IPv4 clients as
/// `::ffff:a.b.c.d`, which backends log better as plain IPv4.
fn same_family(client: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (c, l) = (canon(client), canon(local));
    match (c, l) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (c, l),
        _ => (client, local),
    }
}

/// `PROXY TCP4 <client> <local> <cport> <lport>\r\n`
pub fn v1(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (c, l) = same_family(client, local);
    let addrs = match (c, l) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            ppp::v1::Addresses::new_tcp4(*c.ip(), *l.ip(), c.port(), l.port())
        }
        (SocketAddr::V6(c), SocketAddr::V6(l)) => {
            ppp::v1::Addresses::new_tcp6(*c.ip(), *l.ip(), c.port(), l.port())
        }
        _ => ppp::v1::Addresses::Unknown,
    };
    addrs.to_string().into_bytes()
}

/// A v2 `PROXY` header; with `tls`, the SSL and authority TLVs.
pub fn v2(
    client: SocketAddr,
    local: SocketAddr,
    tls: Option<&TlsFacts<'_>>,
) -> io::Result<Vec<u8>> {
    let mut b = Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        same_family(client, local),
    );
    if let Some(tls) = tls {
        if let Some(sni) = tls.sni {
            b = b.write_tlv(Type::Authority, sni.as_bytes())?;
        }
        b = b.write_tlv(Type::SSL, &ssl_tlv_value(tls))?;
    }
    b.build()
}

/// The `PP2_TYPE_SSL` value: client flags, verify result, then sub-TLVs.
fn ssl_tlv_value(tls: &TlsFacts<'_>) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + 6 + tls.version.len() + tls.cipher.len());
    v.push(PP2_CLIENT_SSL);
    // verify: 0, as HAProxy sends when no client certificate was asked for.
    v.extend_from_slice(&0u32.to_be_bytes());
    for (kind, value) in [
        (Type::SSLVersion, tls.version),
        (Type::SSLCipher, tls.cipher),
    ] {
        v.push(kind.into());
        v.extend_from_slice(&(value.len() as u16).to_be_bytes());
        v.extend_from_slice(value.as_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_is_one_text_line() {
        let h = v1(
            "192.0.2.7:40000".parse().unwrap(),
            "127.0.0.1:993".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 993\r\n");
        let h = v1(
            "[::ffff:192.0.2.7]:1".parse().unwrap(),
            "[::ffff:127.0.0.1]:2".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 127.0.0.1 1 2\r\n");
    }

    #[test]
    fn v2_carries_the_ssl_and_authority_tlvs() {
        let facts = TlsFacts {
            version: "TLSv1.3",
            cipher: "TLS_AES_256_GCM_SHA384",
            sni: Some("mail.example.test"),
        };
        let bytes = v2(
            "[2001:db8::7]:40000".parse().unwrap(),
            "[2001:db8::1]:993".parse().unwrap(),
            Some(&facts),
        )
        .unwrap();
        let header = ppp::v2::Header::try_from(bytes.as_slice()).unwrap();
        assert_eq!(header.length(), bytes.len() - 16);
        let tlvs: Vec<_> = header.tlvs().collect::<Result<_, _>>().unwrap();
        assert_eq!(tlvs[0].kind, u8::from(Type::Authority));
        assert_eq!(&*tlvs[0].value, b"mail.example.test");
        assert_eq!(tlvs[1].kind, 0x20);
        let ssl = &tlvs[1].value;
        assert_eq!(ssl[0], PP2_CLIENT_SSL);
        assert_eq!(&ssl[1..5], &[0, 0, 0, 0]);
        assert_eq!(&ssl[5..8], &[0x21, 0, 7]);
        assert_eq!(&ssl[8..15], b"TLSv1.3");
        assert_eq!(&ssl[15..18], &[0x23, 0, 22]);
        assert_eq!(&ssl[18..], b"TLS_AES_256_GCM_SHA384");
        assert_eq!(tlvs.len(), 2, "no ALPN or other TLV");
    }
}
