//! PROXY protocol v1 (text) and v2 (binary) headers, as load balancers such as
//! HAProxy send them ahead of the client's bytes. Sans-IO: [`detect`] looks at
//! what has arrived so far and says "need more", "no header" or "header of N
//! bytes from this client address".

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature; a v1 header starts with `PROXY `.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The longest v1 header the specification allows, CRLF included.
const V1_MAX: usize = 107;
/// Upper bound on v2 address block plus TLVs; HAProxy's own TLVs are far smaller.
const V2_MAX_BODY: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Bytes the header takes at the start of the stream.
    pub len: usize,
    /// The original client, or `None` for LOCAL/UNKNOWN/UNSPEC headers (health
    /// checks), where the socket peer stays the client.
    pub source: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// The bytes so far are a prefix of a header (or too few to tell).
    NeedMore,
    /// The stream does not start with a PROXY header.
    Absent,
    Header(ProxyHeader),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("PROXY v1 header longer than {V1_MAX} bytes")]
    V1TooLong,
    #[error("PROXY v1 header is malformed: {0}")]
    V1Malformed(&'static str),
    #[error("PROXY v2 version/command byte {0:#04x} is not supported")]
    V2Version(u8),
    #[error("PROXY v2 address family/protocol {0:#04x} is not supported")]
    V2Family(u8),
    #[error("PROXY v2 header length {0} is out of range")]
    V2Length(usize),
}

impl ProxyError {
    /// A short stable label for logs and counters.
    pub fn label(&self) -> &'static str {
        match self {
            ProxyError::V1TooLong | ProxyError::V1Malformed(_) => "proxy_v1_malformed",
            ProxyError::V2Version(_) | ProxyError::V2Family(_) | ProxyError::V2Length(_) => {
                "proxy_v2_malformed"
            }
        }
    }
}

/// Classifies the start of a stream.
pub fn detect(buf: &[u8]) -> Result<Detected, ProxyError> {
    if is_prefix_of(buf, V2_SIGNATURE) {
        return if buf.len() < V2_SIGNATURE.len() {
            Ok(Detected::NeedMore)
        } else {
            parse_v2(buf)
        };
    }
    if is_prefix_of(buf, V1_PREFIX) {
        return if buf.len() < V1_PREFIX.len() {
            Ok(Detected::NeedMore)
        } else {
            parse_v1(buf)
        };
    }
    Ok(Detected::Absent)
}

/// Whether `buf` and `pattern` agree on their common length.
fn is_prefix_of(buf: &[u8], pattern: &[u8]) -> bool {
    let n = buf.len().min(pattern.len());
    buf[..n] == pattern[..n]
}

fn parse_v1(buf: &[u8]) -> Result<Detected, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::V1TooLong)
        } else {
            Ok(Detected::NeedMore)
        };
    };
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..end])
        .map_err(|_| ProxyError::V1Malformed("not ASCII"))?;
    let len = end + 2;
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or_default();
    if family == "UNKNOWN" {
        return Ok(Detected::Header(ProxyHeader { len, source: None }));
    }
    let src = fields
        .next()
        .ok_or(ProxyError::V1Malformed("no source address"))?;
    let dst = fields
        .next()
        .ok_or(ProxyError::V1Malformed("no destination address"))?;
    let sport = fields
        .next()
        .ok_or(ProxyError::V1Malformed("no source port"))?;
    let dport = fields
        .next()
        .ok_or(ProxyError::V1Malformed("no destination port"))?;
    if fields.next().is_some() {
        return Err(ProxyError::V1Malformed("extra fields"));
    }
    // The destination is validated but unused: the gateway knows its own address.
    let (src, _dst): (IpAddr, IpAddr) = match family {
        "TCP4" => (parse_v1_ip::<Ipv4Addr>(src)?, parse_v1_ip::<Ipv4Addr>(dst)?),
        "TCP6" => (parse_v1_ip::<Ipv6Addr>(src)?, parse_v1_ip::<Ipv6Addr>(dst)?),
        _ => return Err(ProxyError::V1Malformed("unknown protocol family")),
    };
    let sport = parse_v1_port(sport)?;
    parse_v1_port(dport)?;
    Ok(Detected::Header(ProxyHeader {
        len,
        source: Some(SocketAddr::new(src, sport)),
    }))
}

fn parse_v1_ip<T: std::str::FromStr + Into<IpAddr>>(s: &str) -> Result<IpAddr, ProxyError> {
    s.parse::<T>()
        .map(Into::into)
        .map_err(|_| ProxyError::V1Malformed("bad address"))
}

/// Ports are decimal without leading zeros (the specification forbids them).
fn parse_v1_port(s: &str) -> Result<u16, ProxyError> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(ProxyError::V1Malformed("bad port"));
    }
    s.parse().map_err(|_| ProxyError::V1Malformed("bad port"))
}

fn parse_v2(buf: &[u8]) -> Result<Detected, ProxyError> {
    const FIXED: usize = 16;
    if buf.len() < FIXED {
        return Ok(Detected::NeedMore);
    }
    let version_command = buf[12];
    let family = buf[13];
    let body_len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let local = match version_command {
        0x20 => true,
        0x21 => false,
        other => return Err(ProxyError::V2Version(other)),
    };
    if body_len > V2_MAX_BODY {
        return Err(ProxyError::V2Length(body_len));
    }
    // Address block sizes by family; UNIX sockets carry no client IP.
    let needed = match family {
        0x00 => 0,
        0x11 | 0x12 => 12,
        0x21 | 0x22 => 36,
        0x31 | 0x32 => 216,
        _ if local => 0,
        other => return Err(ProxyError::V2Family(other)),
    };
    if body_len < needed {
        return Err(ProxyError::V2Length(body_len));
    }
    let len = FIXED + body_len;
    if buf.len() < len {
        return Ok(Detected::NeedMore);
    }
    let body = &buf[FIXED..len];
    // LOCAL: a health check from the proxy itself; addresses are ignored.
    let source = if local {
        None
    } else {
        match family {
            0x11 | 0x12 => {
                let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
                let port = u16::from_be_bytes([body[8], body[9]]);
                Some(SocketAddr::new(ip.into(), port))
            }
            0x21 | 0x22 => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&body[..16]);
                let port = u16::from_be_bytes([body[32], body[33]]);
                Some(SocketAddr::new(Ipv6Addr::from(octets).into(), port))
            }
            _ => None,
        }
    };
    Ok(Detected::Header(ProxyHeader { len, source }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(command);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn v2_tcp4() -> Vec<u8> {
        let mut body = vec![192, 0, 2, 7, 10, 0, 0, 1];
        body.extend_from_slice(&51000u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(&[0x04, 0x00, 0x02, 0xab, 0xcd]); // a NOOP TLV
        v2(0x21, 0x11, &body)
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let mut stream = b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 10443\r\n".to_vec();
        stream.extend_from_slice(&[0xef, 1, 2]);
        assert_eq!(
            detect(&stream),
            Ok(Detected::Header(ProxyHeader {
                len: stream.len() - 3,
                source: Some("203.0.113.9:40000".parse().unwrap()),
            }))
        );
        let line = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n";
        assert_eq!(
            detect(line),
            Ok(Detected::Header(ProxyHeader {
                len: line.len(),
                source: Some("[2001:db8::1]:1".parse().unwrap()),
            }))
        );
        let line = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n";
        assert_eq!(
            detect(line),
            Ok(Detected::Header(ProxyHeader {
                len: line.len(),
                source: None
            }))
        );
    }

    #[test]
    fn v1_malformed_headers_are_refused() {
        for line in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY \xff\r\n",
        ] {
            assert!(
                matches!(detect(line), Err(ProxyError::V1Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        let long = [b"PROXY ".as_slice(), &[b'A'; 120]].concat();
        assert_eq!(detect(&long), Err(ProxyError::V1TooLong));
    }

    #[test]
    fn v2_tcp4_tcp6_local_and_unix() {
        let header = v2_tcp4();
        let mut stream = header.clone();
        stream.extend_from_slice(b"\xee\xee\xee\xee");
        assert_eq!(
            detect(&stream),
            Ok(Detected::Header(ProxyHeader {
                len: header.len(),
                source: Some("192.0.2.7:51000".parse().unwrap()),
            }))
        );
        let mut body = Vec::new();
        body.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&[0; 16]);
        body.extend_from_slice(&[0x01, 0xbb, 0, 1]);
        assert_eq!(
            detect(&v2(0x21, 0x21, &body)),
            Ok(Detected::Header(ProxyHeader {
                len: 16 + 36,
                source: Some("[2001:db8::7]:443".parse().unwrap()),
            }))
        );
        assert_eq!(
            detect(&v2(0x20, 0x00, &[])),
            Ok(Detected::Header(ProxyHeader {
                len: 16,
                source: None
            }))
        );
        assert_eq!(
            detect(&v2(0x21, 0x31, &[0; 216])),
            Ok(Detected::Header(ProxyHeader {
                len: 16 + 216,
                source: None
            }))
        );
    }

    #[test]
    fn v2_malformed_headers_are_refused() {
        assert_eq!(
            detect(&v2(0x11, 0x11, &[0; 12])),
            Err(ProxyError::V2Version(0x11))
        );
        assert_eq!(
            detect(&v2(0x22, 0x11, &[0; 12])),
            Err(ProxyError::V2Version(0x22))
        );
        assert_eq!(
            detect(&v2(0x21, 0x41, &[0; 12])),
            Err(ProxyError::V2Family(0x41))
        );
        assert_eq!(
            detect(&v2(0x21, 0x11, &[0; 11])),
            Err(ProxyError::V2Length(11))
        );
        assert_eq!(
            detect(&v2(0x21, 0x21, &[0; 12])),
            Err(ProxyError::V2Length(12))
        );
        let mut huge = v2(0x21, 0x11, &[0; 12]);
        huge[14..16].copy_from_slice(&4000u16.to_be_bytes());
        assert_eq!(detect(&huge), Err(ProxyError::V2Length(4000)));
    }

    #[test]
    fn mtproto_starts_are_not_headers() {
        for start in [
            &[0xefu8][..],
            &[0xee; 4],
            &[0xdd; 4],
            &[0x28, 0, 0, 0, 0, 0, 0, 0],
        ] {
            assert_eq!(detect(start), Ok(Detected::Absent));
        }
        assert_eq!(detect(b"PROXX"), Ok(Detected::Absent));
        assert_eq!(detect(b"\r\n\r\n\0X"), Ok(Detected::Absent));
    }

    #[test]
    fn every_prefix_of_a_valid_header_asks_for_more() {
        let v1 = b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 10443\r\n".to_vec();
        for header in [v1, v2_tcp4()] {
            for n in 0..header.len() {
                assert_eq!(detect(&header[..n]), Ok(Detected::NeedMore), "prefix {n}");
            }
        }
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let seeds = [
            v2_tcp4(),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n".to_vec(),
            V2_SIGNATURE.to_vec(),
        ];
        for _ in 0..20_000 {
            let mut input = seeds[rng.gen_range(0..seeds.len())].clone();
            for _ in 0..rng.gen_range(0..4) {
                let i = rng.gen_range(0..input.len());
                input[i] = rng.gen();
            }
            input.truncate(rng.gen_range(0..=input.len()));
            let extra = rng.gen_range(0..8);
            input.extend((0..extra).map(|_| rng.gen::<u8>()));
            if let Ok(Detected::Header(h)) = detect(&input) {
                assert!(h.len <= input.len());
            }
            let garbage: Vec<u8> = (0..rng.gen_range(0..300)).map(|_| rng.gen()).collect();
            let _ = detect(&garbage);
        }
    }
}
