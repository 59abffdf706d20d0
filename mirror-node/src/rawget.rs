//! A lean blocking HTTP/1.1 client for blob bodies from plain-HTTP
//! upstreams.
//!
//! A full sync is bound by the CPU of a small machine: every byte is copied
//! from the socket, hashed and copied into the page cache. Through the async
//! client each byte was also copied from the client's buffers into a block,
//! in blocks allocated per blob, with a wake-up per chunk. Here one blocking
//! task streams one blob: the socket is read straight into a reused 1 MiB
//! buffer, which is hashed and written to the partial file as it fills.
//!
//! Only what Meridian's own read API answers is taken: `200`/`206` with a
//! `Content-Length`. Anything else (chunked bodies, HTTPS, a configured
//! proxy) is left to the async client ([`Raw::Unsupported`]).
//! Connections are kept alive and pooled per upstream address.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Body buffer per blocking thread: hashed and written as it fills.
const BUF: usize = 1 << 20;
/// Idle connections kept per upstream address.
const MAX_IDLE: usize = 32;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// No byte for this long fails the transfer (it resumes later).
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a raw GET did not deliver the whole body.
#[derive(Debug)]
pub(crate) enum Raw {
    /// Not something this client takes; use the async client.
    Unsupported(String),
    /// Transport trouble: what arrived was passed to the sink (a prefix).
    Transport(String),
    /// The upstream broke the protocol or its promise (more bytes than
    /// declared, a Content-Range that does not match the request).
    Bad(String),
    /// The sink failed (local disk trouble).
    Local(io::Error),
}

/// Where a plain-HTTP URL points.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// `host:port`, for the Host header and the pool.
    authority: String,
    /// Path and query.
    path: String,
}

impl Target {
    /// Parses an `http://` URL; `None` for anything else.
    pub(crate) fn parse(url: &str) -> Option<Target> {
        let rest = url.strip_prefix("http://")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        let has_port = authority.rsplit_once(':').is_some_and(|(h, p)| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.starts_with('[') || h.ends_with(']'))
        });
        let authority = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Some(Target {
            authority,
            path: path.to_owned(),
        })
    }
}

/// Keep-alive connections per upstream address.
#[derive(Debug)]
pub(crate) struct Pool {
    idle: Mutex<HashMap<String, Vec<TcpStream>>>,
    user_agent: &'static str,
}

/// Whether the environment names a proxy (then the async client, which
/// honours it, does every request).
pub(crate) fn proxy_configured() -> bool {
    ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
        .iter()
        .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()))
}

thread_local! {
    static BODY: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Pool {
    pub(crate) fn new(user_agent: &'static str) -> Pool {
        Pool {
            idle: Mutex::default(),
            user_agent,
        }
    }

    fn take(&self, authority: &str) -> Option<TcpStream> {
        self.idle.lock().ok()?.get_mut(authority)?.pop()
    }

    fn put(&self, authority: &str, s: TcpStream) {
        if let Ok(mut idle) = self.idle.lock() {
            let v = idle.entry(authority.to_owned()).or_default();
            if v.len() < MAX_IDLE {
                v.push(s);
            }
        }
    }

    fn connect(authority: &str) -> Result<TcpStream, Raw> {
        let addrs = authority
            .to_socket_addrs()
            .map_err(|e| Raw::Transport(format!("resolving {authority}: {e}")))?;
        let mut last = format!("{authority}: no address");
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    s.set_read_timeout(Some(READ_TIMEOUT))
                        .and_then(|()| s.set_write_timeout(Some(READ_TIMEOUT)))
                        .map_err(|e| Raw::Transport(e.to_string()))?;
                    return Ok(s);
                }
                Err(e) => last = format!("connecting to {a}: {e}"),
            }
        }
        Err(Raw::Transport(last))
    }

    /// GETs `t` from byte `from` on, expecting `size` bytes in all, and
    /// passes the body to `sink` in large pieces. If the upstream answers a
    /// range request with the whole body (200), `sink(None)` comes first:
    /// start again from byte 0. `counted` sees every body byte as it
    /// arrives.
    pub(crate) fn get(
        &self,
        t: &Target,
        from: u64,
        size: u64,
        deadline: Instant,
        sink: &mut dyn FnMut(Option<&[u8]>) -> io::Result<()>,
        counted: &dyn Fn(u64),
    ) -> Result<(), Raw> {
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {}\r\nAccept-Encoding: identity\r\n",
            t.path, t.authority, self.user_agent
        );
        if from > 0 {
            req.push_str(&format!("Range: bytes={from}-\r\n"));
        }
        req.push_str("\r\n");
        // A pooled connection may have been closed by the upstream while
        // idle: one retry on a fresh one if nothing at all came back.
        let mut conn = self.take(&t.authority);
        loop {
            let reused = conn.is_some();
            let mut s = match conn.take() {
                Some(s) => s,
                None => Self::connect(&t.authority)?,
            };
            match Self::exchange(&mut s, &req, from, size, deadline, sink, counted) {
                Ok(keep) => {
                    if keep {
                        self.put(&t.authority, s);
                    }
                    return Ok(());
                }
                Err(Exchange::Stale) if reused => {
                    conn = None;
                    continue;
                }
                Err(Exchange::Stale) => {
                    return Err(Raw::Transport("connection closed before a response".into()));
                }
                Err(Exchange::Failed(e)) => return Err(e),
            }
        }
    }

    /// One request and response on `s`; `Ok(keep_alive)`.
    fn exchange(
        s: &mut TcpStream,
        req: &str,
        from: u64,
        size: u64,
        deadline: Instant,
        sink: &mut dyn FnMut(Option<&[u8]>) -> io::Result<()>,
        counted: &dyn Fn(u64),
    ) -> Result<bool, Exchange> {
        let fail = |e: Raw| Exchange::Failed(e);
        let transport = |m: String| Exchange::Failed(Raw::Transport(m));
        if let Err(e) = s.write_all(req.as_bytes()) {
            return Err(if is_stale(&e) {
                Exchange::Stale
            } else {
                transport(format!("sending the request: {e}"))
            });
        }
        BODY.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.len() < BUF {
                buf.resize(BUF, 0);
            }
            // The head.
            let mut filled = 0usize;
            let (status, len, range_start, close, head_len) = loop {
                if filled == MAX_HEAD {
                    return Err(fail(Raw::Bad("response head too large".into())));
                }
                let n = match s.read(&mut buf[filled..MAX_HEAD]) {
                    Ok(0) if filled == 0 => return Err(Exchange::Stale),
                    Ok(0) => return Err(transport("connection closed in the head".into())),
                    Ok(n) => n,
                    Err(e) if filled == 0 && is_stale(&e) => return Err(Exchange::Stale),
                    Err(e) => return Err(transport(format!("reading the head: {e}"))),
                };
                filled += n;
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(&buf[..filled]) {
                    Ok(httparse::Status::Partial) => continue,
                    Err(e) => return Err(fail(Raw::Bad(format!("bad response head: {e}")))),
                    Ok(httparse::Status::Complete(head_len)) => {
                        let mut len = None;
                        let mut range_start = None;
                        let mut close = resp.version == Some(0);
                        for h in resp.headers.iter() {
                            let v = std::str::from_utf8(h.value).unwrap_or("").trim();
                            if h.name.eq_ignore_ascii_case("content-length") {
                                len = Some(v.parse::<u64>().map_err(|_| {
                                    fail(Raw::Bad(format!("bad Content-Length {v:?}")))
                                })?);
                            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                                return Err(fail(Raw::Unsupported(format!(
                                    "Transfer-Encoding {v}"
                                ))));
                            } else if h.name.eq_ignore_ascii_case("content-range") {
                                range_start = v
                                    .strip_prefix("bytes ")
                                    .and_then(|r| r.split_once('-'))
                                    .and_then(|(a, _)| a.parse::<u64>().ok());
                            } else if h.name.eq_ignore_ascii_case("connection") {
                                close = v.eq_ignore_ascii_case("close");
                            }
                        }
                        break (resp.code.unwrap_or(0), len, range_start, close, head_len);
                    }
                }
            };
            match status {
                206 if from > 0 => {
                    if range_start != Some(from) {
                        return Err(fail(Raw::Bad(
                            "Content-Range does not match the requested resume point".into(),
                        )));
                    }
                }
                200 => {
                    if from > 0 {
                        sink(None).map_err(|e| fail(Raw::Local(e)))?;
                    }
                }
                s => return Err(transport(format!("HTTP {s}"))),
            }
            let start = if status == 200 { 0 } else { from };
            let Some(len) = len else {
                return Err(fail(Raw::Unsupported("no Content-Length".into())));
            };
            if start + len > size {
                return Err(fail(Raw::Bad(format!(
                    "upstream sent more than the declared {size} bytes"
                ))));
            }
            // The body: what came with the head first, then straight reads.
            let mut left = len;
            let mut fill = filled - head_len;
            if fill as u64 > left {
                return Err(fail(Raw::Bad(format!(
                    "upstream sent more than the declared {size} bytes"
                ))));
            }
            buf.copy_within(head_len..filled, 0);
            counted(fill as u64);
            left -= fill as u64;
            let mut err = None;
            while left > 0 {
                if Instant::now() > deadline {
                    err = Some(transport(format!(
                        "transfer took too long; {left} bytes left, will resume"
                    )));
                    break;
                }
                let want = (BUF - fill).min(usize::try_from(left).unwrap_or(usize::MAX));
                match s.read(&mut buf[fill..fill + want]) {
                    Ok(0) => {
                        err = Some(transport(format!(
                            "truncated: {} of {size} bytes; will resume",
                            start + len - left
                        )));
                        break;
                    }
                    Ok(n) => {
                        fill += n;
                        left -= n as u64;
                        counted(n as u64);
                        if fill == BUF {
                            sink(Some(&buf[..fill])).map_err(|e| fail(Raw::Local(e)))?;
                            fill = 0;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        err = Some(transport(format!(
                            "after {} of {size} bytes: {e}",
                            start + len - left
                        )));
                        break;
                    }
                }
            }
            // What arrived is kept: a cut transfer resumes from it.
            if fill > 0 {
                sink(Some(&buf[..fill])).map_err(|e| fail(Raw::Local(e)))?;
            }
            match err {
                Some(e) => Err(e),
                None => Ok(!close),
            }
        })
    }
}

/// Why one exchange on one connection failed.
enum Exchange {
    /// A kept-alive connection the upstream had already closed.
    Stale,
    Failed(Raw),
}

fn is_stale(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_parsed_from_plain_http_urls_only() {
        let t = Target::parse("http://127.0.0.1:8080/.meridian/v1/objects/ab").expect("parses");
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(t.path, "/.meridian/v1/objects/ab");
        let t = Target::parse("http://mirror.example").expect("parses");
        assert_eq!(t.authority, "mirror.example:80");
        assert_eq!(t.path, "/");
        let t = Target::parse("http://[::1]:9000/x?y=1").expect("parses");
        assert_eq!(t.authority, "[::1]:9000");
        assert_eq!(t.path, "/x?y=1");
        assert_eq!(
            Target::parse("http://[::1]/x").expect("parses").authority,
            "[::1]:80"
        );
        assert!(Target::parse("https://127.0.0.1/x").is_none());
        assert!(Target::parse("http://user@host/x").is_none());
        assert!(Target::parse("http:///x").is_none());
    }

    /// A scripted upstream on loopback: each entry is sent in answer to
    /// one request, then the connection is closed if the entry says so.
    fn upstream(
        script: Vec<(&'static [u8], bool)>,
    ) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut conn: Option<TcpStream> = None;
            for (answer, close) in script {
                let mut s = match conn.take() {
                    Some(s) => s,
                    None => l.accept().expect("accept").0,
                };
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).expect("read") == 0 {
                        // The client dropped this connection: take the next.
                        s = l.accept().expect("accept").0;
                        head.clear();
                        continue;
                    }
                    head.push(b[0]);
                }
                seen.push(String::from_utf8(head).expect("utf-8"));
                s.write_all(answer).expect("write");
                if !close {
                    conn = Some(s);
                }
            }
            seen
        });
        (addr, h)
    }

    fn fetch(
        pool: &Pool,
        addr: &str,
        from: u64,
        size: u64,
    ) -> (Result<(), Raw>, Vec<u8>, bool, u64) {
        let t = Target::parse(&format!("http://{addr}/.meridian/v1/objects/x")).expect("parses");
        let mut got = Vec::new();
        let mut restarted = false;
        let counted = std::cell::Cell::new(0u64);
        let r = pool.get(
            &t,
            from,
            size,
            Instant::now() + Duration::from_secs(10),
            &mut |p: Option<&[u8]>| {
                match p {
                    Some(b) => got.extend_from_slice(b),
                    None => {
                        restarted = true;
                        got.clear();
                    }
                }
                Ok(())
            },
            &|n| counted.set(counted.get() + n),
        );
        (r, got, restarted, counted.get())
    }

    #[test]
    fn bodies_resumes_keep_alive_and_bad_answers_over_a_real_socket() {
        let (addr, server) = upstream(vec![
            // Whole body; the upstream then closes the kept-alive connection
            // behind the client's back.
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", true),
            // A resume, answered on a fresh connection after the stale one.
            (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 2-4/5\r\nContent-Length: 3\r\n\r\nllo", false),
            // A range answered with the whole body: start again.
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHELLO", false),
            // A resume point the upstream did not honour.
            (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4/5\r\nContent-Length: 5\r\n\r\nhello", true),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", true),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello!", true),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", true),
            (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", true),
        ]);
        let pool = Pool::new("meridian-test");

        let (r, got, restarted, n) = fetch(&pool, &addr, 0, 5);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!((got.as_slice(), restarted, n), (&b"hello"[..], false, 5));

        let (r, got, restarted, _) = fetch(&pool, &addr, 2, 5);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!((got.as_slice(), restarted), (&b"llo"[..], false));

        let (r, got, restarted, _) = fetch(&pool, &addr, 2, 5);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!((got.as_slice(), restarted), (&b"HELLO"[..], true));

        let (r, got, _, _) = fetch(&pool, &addr, 2, 5);
        assert!(matches!(r, Err(Raw::Bad(_))), "{r:?}");
        assert!(got.is_empty());

        let (r, got, _, _) = fetch(&pool, &addr, 0, 5);
        assert!(matches!(r, Err(Raw::Unsupported(_))), "{r:?}");
        assert!(got.is_empty());

        let (r, got, _, _) = fetch(&pool, &addr, 0, 5);
        assert!(
            matches!(&r, Err(Raw::Bad(m)) if m.contains("more than the declared")),
            "{r:?}"
        );
        assert!(got.is_empty(), "nothing of an oversized answer is kept");

        // A cut transfer hands over what arrived (the prefix to resume from).
        let (r, got, _, _) = fetch(&pool, &addr, 0, 5);
        assert!(
            matches!(&r, Err(Raw::Transport(m)) if m.contains("truncated")),
            "{r:?}"
        );
        assert_eq!(got, b"hel");

        let (r, _, _, _) = fetch(&pool, &addr, 0, 5);
        assert!(
            matches!(&r, Err(Raw::Transport(m)) if m.contains("404")),
            "{r:?}"
        );

        let seen = server.join().expect("server");
        assert_eq!(seen.len(), 8);
        assert!(seen[0].starts_with("GET /.meridian/v1/objects/x HTTP/1.1\r\n"));
        assert!(seen[0].contains(&format!("Host: {addr}\r\n")));
        assert!(!seen[0].contains("Range:"));
        assert!(seen[1].contains("Range: bytes=2-\r\n"), "{}", seen[1]);
    }
}
