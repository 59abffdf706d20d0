//! A strict reader for the parts of a query GeoDNS acts on: the question
//! and the OPT record with its Client Subnet option. hickory has already
//! decoded the message; this pass re-reads the raw bytes to apply the
//! RFC 7871 checks hickory's lenient decoder does not (it ignores extra
//! address bytes and drops the option's length), the way gdnsd does:
//! FORMERR for a non-zero scope in a query, an unknown family, a source
//! prefix too long for the family, an address length that does not match
//! the source prefix, or address bits set past the prefix.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The FORMERR reply to a message whose header (12 bytes or more) is
/// readable but whose rest is not: the id, opcode and RD copied, QR set.
pub(crate) fn formerr_reply(pkt: &[u8]) -> [u8; 12] {
    let mut r = [0u8; 12];
    r[..2].copy_from_slice(&pkt[..2]);
    r[2] = 0x80 | (pkt[2] & 0x79);
    r[3] = 1; // FORMERR
    r
}

/// EDNS as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EdnsInfo {
    pub payload: u16,
    pub version: u8,
    pub ecs: Option<Ecs>,
}

/// A validated Client Subnet option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ecs {
    pub addr: IpAddr,
    pub source: u8,
}

/// The query, read strictly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawQuery {
    pub qdcount: u16,
    pub edns: Option<EdnsInfo>,
}

/// Why a query is answered FORMERR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed query: {0}")]
pub(crate) struct FormErr(pub &'static str);

struct Cur<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cur<'a> {
    fn u8(&mut self) -> Result<u8, FormErr> {
        let v = *self.b.get(self.i).ok_or(FormErr("truncated"))?;
        self.i += 1;
        Ok(v)
    }
    fn u16(&mut self) -> Result<u16, FormErr> {
        Ok(u16::from(self.u8()?) << 8 | u16::from(self.u8()?))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormErr> {
        let s = self.b.get(self.i..self.i + n).ok_or(FormErr("truncated"))?;
        self.i += n;
        Ok(s)
    }
    /// Skips a (possibly compressed) name without following pointers.
    fn skip_name(&mut self) -> Result<(), FormErr> {
        let mut labels = 0;
        loop {
            let len = self.u8()?;
            match len & 0xC0 {
                0xC0 => {
                    self.u8()?;
                    return Ok(());
                }
                0x00 if len == 0 => return Ok(()),
                0x00 => {
                    self.take(len as usize)?;
                    labels += 1;
                    if labels > 127 {
                        return Err(FormErr("too many labels"));
                    }
                }
                _ => return Err(FormErr("bad label type")),
            }
        }
    }
}

/// Reads the header counts, skips to the additional section and validates
/// the OPT record and any Client Subnet option.
pub(crate) fn read(raw: &[u8]) -> Result<RawQuery, FormErr> {
    let mut c = Cur { b: raw, i: 4 };
    let qd = c.u16()?;
    let an = c.u16()?;
    let ns = c.u16()?;
    let ar = c.u16()?;
    for _ in 0..qd {
        c.skip_name()?;
        c.take(4)?;
    }
    for _ in 0..(u32::from(an) + u32::from(ns)) {
        c.skip_name()?;
        c.take(8)?;
        let len = c.u16()? as usize;
        c.take(len)?;
    }
    let mut edns = None;
    for _ in 0..ar {
        c.skip_name()?;
        let rtype = c.u16()?;
        let class = c.u16()?;
        let ttl = c.take(4)?;
        let len = c.u16()? as usize;
        let data = c.take(len)?;
        if rtype != 41 {
            continue;
        }
        if edns.is_some() {
            return Err(FormErr("more than one OPT record"));
        }
        let mut info = EdnsInfo {
            payload: class,
            version: ttl[1],
            ecs: None,
        };
        let mut o = Cur { b: data, i: 0 };
        while o.i < data.len() {
            let code = o.u16()?;
            let olen = o.u16()? as usize;
            let body = o.take(olen)?;
            if code == 8 {
                if info.ecs.is_some() {
                    return Err(FormErr("more than one Client Subnet option"));
                }
                info.ecs = Some(ecs(body)?);
            }
        }
        edns = Some(info);
    }
    Ok(RawQuery { qdcount: qd, edns })
}

fn ecs(b: &[u8]) -> Result<Ecs, FormErr> {
    if b.len() < 4 {
        return Err(FormErr("Client Subnet option too short"));
    }
    let family = u16::from(b[0]) << 8 | u16::from(b[1]);
    let (source, scope) = (b[2], b[3]);
    let addr = &b[4..];
    if scope != 0 {
        return Err(FormErr("Client Subnet scope must be 0 in a query"));
    }
    let max = match family {
        1 => 32,
        2 => 128,
        _ => return Err(FormErr("Client Subnet family must be 1 or 2")),
    };
    if source > max {
        return Err(FormErr(
            "Client Subnet source prefix too long for its family",
        ));
    }
    if addr.len() != usize::from(source).div_ceil(8) {
        return Err(FormErr(
            "Client Subnet address length does not match the source prefix",
        ));
    }
    if source % 8 != 0 {
        let last = addr[addr.len() - 1];
        if last & (0xFFu8 >> (source % 8)) != 0 {
            return Err(FormErr(
                "Client Subnet address has bits set past the source prefix",
            ));
        }
    }
    let ip = if family == 1 {
        let mut o = [0u8; 4];
        o[..addr.len()].copy_from_slice(addr);
        IpAddr::V4(Ipv4Addr::from(o))
    } else {
        let mut o = [0u8; 16];
        o[..addr.len()].copy_from_slice(addr);
        IpAddr::V6(Ipv6Addr::from(o))
    };
    Ok(Ecs { addr: ip, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query_with_opt(opt_rdata: &[u8]) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
        q.extend_from_slice(b"\x02dl\x08meridian\x04test\x00\x00\x01\x00\x01");
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0]);
        q.extend_from_slice(&(opt_rdata.len() as u16).to_be_bytes());
        q.extend_from_slice(opt_rdata);
        q
    }
    fn ecs_opt(family: u16, source: u8, scope: u8, addr: &[u8]) -> Vec<u8> {
        let mut o = vec![0, 8];
        o.extend_from_slice(&((4 + addr.len()) as u16).to_be_bytes());
        o.extend_from_slice(&family.to_be_bytes());
        o.push(source);
        o.push(scope);
        o.extend_from_slice(addr);
        o
    }

    #[test]
    fn valid_ecs_is_read() {
        let q = read(&query_with_opt(&ecs_opt(1, 24, 0, &[81, 2, 69]))).expect("valid");
        let e = q.edns.expect("edns");
        assert_eq!(e.payload, 1232);
        assert_eq!(
            e.ecs,
            Some(Ecs {
                addr: "81.2.69.0".parse().expect("ip"),
                source: 24
            })
        );
        let q = read(&query_with_opt(&ecs_opt(
            2,
            48,
            0,
            &[0x20, 0x01, 0x0d, 0xb8, 0, 1],
        )))
        .expect("v6");
        assert_eq!(q.edns.and_then(|e| e.ecs).map(|e| e.source), Some(48));
        let q = read(&query_with_opt(&ecs_opt(1, 0, 0, &[]))).expect("source 0");
        assert_eq!(q.edns.and_then(|e| e.ecs).map(|e| e.source), Some(0));
    }

    #[test]
    fn every_gdnsd_rejection() {
        for (what, opt) in [
            ("scope", ecs_opt(1, 24, 8, &[81, 2, 69])),
            ("family", ecs_opt(3, 24, 0, &[81, 2, 69])),
            ("too long prefix", ecs_opt(1, 33, 0, &[1, 2, 3, 4, 5])),
            ("long address", ecs_opt(1, 24, 0, &[81, 2, 69, 0])),
            ("short address", ecs_opt(1, 24, 0, &[81, 2])),
            ("bits past prefix", ecs_opt(1, 23, 0, &[81, 2, 69])),
            ("short option", vec![0, 8, 0, 2, 0, 1]),
        ] {
            assert!(read(&query_with_opt(&opt)).is_err(), "{what} accepted");
        }
        assert!(
            read(&query_with_opt(
                &[ecs_opt(1, 8, 0, &[10]), ecs_opt(1, 8, 0, &[10])].concat()
            ))
            .is_err()
        );
    }

    #[test]
    fn never_panics_on_garbage() {
        for n in 0..512usize {
            let junk: Vec<u8> = (0..n).map(|i| (i * 31 + n) as u8).collect();
            let _ = read(&junk);
        }
    }
}
