//! The PROXY header codec: `proxy_header::v1` and `v2` from arbitrary
//! addresses and TLS facts, decoded back with the `ppp` crate.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use portcullis::proxy::proxy_header::{v1, v2, TlsFacts};
use ppp::v2::{Addresses, Header, TypeLengthValues};

#[derive(Arbitrary, Debug)]
enum Addr {
    V4([u8; 4], u16),
    V6([u8; 16], u16),
    /// `::ffff:a.b.c.d`, as a dual-stack socket reports IPv4 clients.
    Mapped([u8; 4], u16),
}

impl Addr {
    fn socket(&self) -> SocketAddr {
        match *self {
            Addr::V4(ip, port) => SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port),
            Addr::V6(ip, port) => SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port),
            Addr::Mapped(ip, port) => {
                SocketAddr::new(IpAddr::V6(Ipv4Addr::from(ip).to_ipv6_mapped()), port)
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Tls {
    version: String,
    cipher: String,
    sni: Option<String>,
    /// Repeats `version`, `cipher` or `sni` this often, to reach the 64 KiB
    /// length fields without 64 KiB inputs.
    grow: (u8, u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    client: Addr,
    local: Addr,
    tls: Option<Tls>,
}

/// Both in one family, IPv4-mapped addresses as IPv4, or `None` if mixed.
fn canonical(c: SocketAddr, l: SocketAddr) -> Option<(SocketAddr, SocketAddr)> {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (cc, lc) = (canon(c), canon(l));
    match (cc.is_ipv4(), lc.is_ipv4(), c.is_ipv4(), l.is_ipv4()) {
        (a, b, _, _) if a == b => Some((cc, lc)),
        (_, _, a, b) if a == b => Some((c, l)),
        _ => None,
    }
}

fuzz_target!(|input: Input| {
    let (client, local) = (input.client.socket(), input.local.socket());
    let want = canonical(client, local);

    // v1: one text line that ppp reads back to the same addresses.
    let text = v1(client, local);
    let text = std::str::from_utf8(&text).expect("v1 is text");
    assert!(text.ends_with("\r\n") && text.len() <= 107, "{text:?}");
    let header = ppp::v1::Header::try_from(text).expect("v1 parses back");
    match (header.addresses, want) {
        (ppp::v1::Addresses::Tcp4(a), Some((SocketAddr::V4(c), SocketAddr::V4(l)))) => {
            assert_eq!((a.source_address, a.source_port), (*c.ip(), c.port()));
            assert_eq!(
                (a.destination_address, a.destination_port),
                (*l.ip(), l.port())
            );
        }
        (ppp::v1::Addresses::Tcp6(a), Some((SocketAddr::V6(c), SocketAddr::V6(l)))) => {
            assert_eq!((a.source_address, a.source_port), (*c.ip(), c.port()));
            assert_eq!(
                (a.destination_address, a.destination_port),
                (*l.ip(), l.port())
            );
        }
        (ppp::v1::Addresses::Unknown, None) => {}
        (got, want) => panic!("v1 says {got:?} for {want:?}"),
    }

    // v2: ppp reads back the addresses, the SSL TLV and the authority TLV.
    let grown = input.tls.as_ref().map(|t| {
        let n = usize::from(t.grow.1);
        let grow = |s: &str, which: u8| {
            if t.grow.0 % 4 == which && !s.is_empty() {
                s.repeat(n.min(70_000 / s.len()).max(1))
            } else {
                s.to_string()
            }
        };
        (
            grow(&t.version, 1),
            grow(&t.cipher, 2),
            t.sni.as_deref().map(|s| grow(s, 3)),
        )
    });
    let facts = grown.as_ref().map(|(version, cipher, sni)| TlsFacts {
        version,
        cipher,
        sni: sni.as_deref(),
    });
    // Refused exactly when a length does not fit its 16 bits.
    let too_long = facts.as_ref().is_some_and(|f| {
        let ssl = 5 + 3 + f.version.len() + 3 + f.cipher.len();
        let sni = f.sni.map_or(0, str::len);
        let addresses = match want {
            Some((SocketAddr::V4(_), _)) => 12,
            Some(_) => 36,
            None => 0,
        };
        let payload = addresses + 3 + ssl + f.sni.map_or(0, |s| 3 + s.len());
        ssl > 0xffff || sni > 0xffff || payload > 0xffff
    });
    let bytes = match v2(client, local, facts.as_ref()) {
        Ok(b) => b,
        Err(e) => {
            assert!(too_long, "v2 refused: {e}");
            return;
        }
    };
    assert!(!too_long, "v2 built a header whose lengths overflow");
    let header = Header::try_from(bytes.as_slice()).expect("v2 parses back");
    assert_eq!(header.len(), bytes.len(), "trailing bytes");
    match (header.addresses, want) {
        (Addresses::IPv4(a), Some((SocketAddr::V4(c), SocketAddr::V4(l)))) => {
            assert_eq!((a.source_address, a.source_port), (*c.ip(), c.port()));
            assert_eq!(
                (a.destination_address, a.destination_port),
                (*l.ip(), l.port())
            );
        }
        (Addresses::IPv6(a), Some((SocketAddr::V6(c), SocketAddr::V6(l)))) => {
            assert_eq!((a.source_address, a.source_port), (*c.ip(), c.port()));
            assert_eq!(
                (a.destination_address, a.destination_port),
                (*l.ip(), l.port())
            );
        }
        (Addresses::Unspecified, None) => {}
        (got, want) => panic!("v2 says {got:?} for {want:?}"),
    }
    // AF_UNSPEC has no address block: the TLVs follow the 16-byte prefix
    // (ppp, like HAProxy, reads that block as opaque and skips them).
    let tlv_bytes = match header.addresses {
        Addresses::Unspecified => &header.as_bytes()[16..],
        _ => header.tlv_bytes(),
    };
    let tlvs: Vec<_> = TypeLengthValues::from(tlv_bytes)
        .collect::<Result<_, _>>()
        .expect("TLVs parse back");
    let Some(f) = facts else {
        assert!(tlvs.is_empty(), "TLVs without TLS");
        return;
    };
    let mut tlvs = tlvs.iter();
    if let Some(sni) = f.sni {
        let t = tlvs.next().expect("authority TLV");
        assert_eq!(t.kind, 0x02);
        assert_eq!(&*t.value, sni.as_bytes());
    }
    let t = tlvs.next().expect("SSL TLV");
    assert_eq!(t.kind, 0x20);
    assert!(tlvs.next().is_none(), "no other TLV (never ALPN)");
    let v = &*t.value;
    assert_eq!(v[0], 0x01, "PP2_CLIENT_SSL");
    assert_eq!(&v[1..5], &[0, 0, 0, 0], "verify");
    let mut subs = Vec::new();
    let mut rest = &v[5..];
    while !rest.is_empty() {
        assert!(rest.len() >= 3, "cut sub-TLV");
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        assert!(rest.len() >= 3 + len, "sub-TLV longer than its TLV");
        subs.push((rest[0], &rest[3..3 + len]));
        rest = &rest[3 + len..];
    }
    assert_eq!(
        subs,
        [(0x21, f.version.as_bytes()), (0x23, f.cipher.as_bytes())]
    );
});
