//! DNS over TCP (RFC 7766): our own accept loop around the same handler as
//! UDP's general path. Connections are admitted under a cap in all and per
//! client (an IPv4 address or an IPv6 /64), so a flood of stalled
//! connections from one host cannot take the process's descriptors; the
//! cap in all is kept below the descriptor limit. Running out of
//! descriptors anyway (EMFILE) backs off and is logged once, instead of
//! spinning on the pending connection. A connection idle for
//! [`IDLE_TIMEOUT`] (no whole message, or a reply the client does not
//! read) is closed.

use crate::dns::GeoHandler;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler};
use meridian_serve::limits::{AcceptErrors, Admission, ConnLimits, Permit};
use meridian_serve::shutdown::Stopping;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A connection that completes no message (or does not take its reply)
/// within this long is closed.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Descriptors kept free of TCP connections for everything else the
/// process opens (UDP sockets, health probes, GeoIP and config files).
const FD_RESERVE: usize = 128;

/// `limits` with the cap in all lowered to fit the descriptor limit.
pub(crate) fn fit_to_descriptors(mut limits: ConnLimits) -> ConnLimits {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let room = usize::try_from(soft)
        .unwrap_or(usize::MAX)
        .saturating_sub(FD_RESERVE)
        .max(16);
    if limits.total == 0 || limits.total > room {
        tracing::info!(
            configured = limits.total,
            descriptors = soft,
            "DNS over TCP: at most {room} connections at once (the descriptor limit less {FD_RESERVE})"
        );
        limits.total = room;
    }
    limits
}

/// Serves DNS over TCP on `listener` until `stop` changes.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    handler: Arc<GeoHandler>,
    limits: ConnLimits,
    mut stop: Stopping,
) {
    let admission = Admission::new(limits);
    let mut errors = AcceptErrors::new("geodns tcp");
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                errors.accepted();
                x
            }
            Err(e) => {
                errors.failed(&e).await;
                continue;
            }
        };
        let permit = match admission.try_admit(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                handler.metrics.tcp_refused.inc();
                tracing::debug!(%peer, ?why, "DNS over TCP: connection cap reached, closing");
                continue;
            }
        };
        let (h, stop) = (handler.clone(), stop.clone());
        tokio::spawn(connection(stream, peer, h, permit, stop));
    }
}

async fn connection(
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    handler: Arc<GeoHandler>,
    _permit: Permit,
    mut stop: Stopping,
) {
    let _ = stream.set_nodelay(true);
    loop {
        let read = async {
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await?;
            let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut msg).await?;
            Ok::<_, std::io::Error>(msg)
        };
        let msg = tokio::select! {
            r = tokio::time::timeout(IDLE_TIMEOUT, read) => match r {
                Ok(Ok(m)) => m,
                _ => return,
            },
            _ = stop.wait() => return,
        };
        let t0 = std::time::Instant::now();
        let Some(reply) = answer(&handler, msg, peer).await else {
            continue;
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            return;
        };
        let write = async {
            stream.write_all(&n.to_be_bytes()).await?;
            stream.write_all(&reply).await
        };
        if !matches!(tokio::time::timeout(IDLE_TIMEOUT, write).await, Ok(Ok(()))) {
            return;
        }
        handler.metrics.answered("tcp", t0.elapsed());
    }
}

/// The reply to one message (none for a response sent to us).
async fn answer(handler: &GeoHandler, msg: Vec<u8>, peer: SocketAddr) -> Option<Vec<u8>> {
    if msg.len() < 12 {
        return None;
    }
    let formerr = crate::wire::formerr_reply(&msg);
    match Request::from_bytes(msg, peer, Protocol::Tcp) {
        Ok(req) => {
            if req.metadata.message_type == hickory_server::proto::op::MessageType::Response {
                return None;
            }
            let out = crate::dns::Collected::new(u16::MAX);
            let _ = handler
                .handle_request::<_, TokioTime>(&req, out.clone())
                .await;
            out.take()
        }
        Err(_) => {
            handler.metrics.rcode("FORMERR");
            Some(formerr.to_vec())
        }
    }
}
