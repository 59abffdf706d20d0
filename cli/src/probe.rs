//! `meridian probe URL`: a health check for a container with no shell and
//! no curl (the image is `FROM scratch`): one HTTP/1.1 GET to a loopback
//! or cluster address, exit 0 on a 2xx answer and 1 otherwise, with the
//! answer's first line or the reason on stderr.

use anyhow::{Context, bail};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Most bytes of the answer read: a status line and a short reason.
const MAX_ANSWER: u64 = 4096;

/// `http://HOST[:PORT][/PATH]` split into (host, port, path).
fn split(url: &str) -> anyhow::Result<(String, u16, String)> {
    let Some(rest) = url.strip_prefix("http://") else {
        bail!(
            "probe URL {url:?} is not http://HOST:PORT/PATH (only plain HTTP is probed; probe a mirror's HTTP listener)"
        );
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let port_of = |p: &str| -> anyhow::Result<u16> {
        p.parse()
            .with_context(|| format!("probe URL {url:?}: port {p:?} is not a number"))
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .with_context(|| format!("probe URL {url:?}: no ']' after an IPv6 address"))?;
        match after.strip_prefix(':') {
            Some(p) => (h, port_of(p)?),
            None if after.is_empty() => (h, 80),
            None => bail!("probe URL {url:?}: {after:?} after the IPv6 address"),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, port_of(p)?),
            None => (authority, 80),
        }
    };
    if host.is_empty() {
        bail!("probe URL {url:?} names no host");
    }
    Ok((host.to_owned(), port, path.to_owned()))
}

/// The status code and first body line of one GET.
fn get(url: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let (host, port, path) = split(url)?;
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: meridian-probe\r\nConnection: close\r\n\r\n"
    )
    .with_context(|| format!("cannot send the request to {addr}"))?;
    let mut answer = Vec::new();
    s.take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .with_context(|| format!("no answer from {addr} within {timeout:?}"))?;
    let text = String::from_utf8_lossy(&answer);
    let status_line = text.lines().next().unwrap_or_default();
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{addr} did not answer HTTP: {status_line:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.lines().next().unwrap_or_default().to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

pub(crate) fn run(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let (code, line) = get(url, timeout)?;
    if (200..300).contains(&code) {
        println!("{code} {line}");
        Ok(())
    } else {
        bail!("{url} answered {code}: {line}")
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn urls_split_into_host_port_and_path() {
        assert_eq!(
            split("http://127.0.0.1:8080/.meridian/ready").expect("splits"),
            ("127.0.0.1".into(), 8080, "/.meridian/ready".into())
        );
        assert_eq!(
            split("http://[::1]:81").expect("splits"),
            ("::1".into(), 81, "/".into())
        );
        assert_eq!(
            split("http://[::1]/x").expect("splits"),
            ("::1".into(), 80, "/x".into())
        );
        assert_eq!(
            split("http://host").expect("splits"),
            ("host".into(), 80, "/".into())
        );
        assert!(split("https://host/").is_err());
        assert!(split("http://host:x/").is_err());
        assert!(split("http:///x").is_err());
    }
}
