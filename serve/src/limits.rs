//! Admission of TCP connections, shared by every Meridian listener (the
//! HTTP server of origin and mirror, GeoDNS over TCP): a cap on open
//! connections in all and per client, backing off (and saying so once)
//! when the process runs out of descriptors, and the kernel's TCP memory
//! pressure, under which stalled clients are given less time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Caps on open connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// In all (0: no cap).
    pub total: usize,
    /// From one client: one IPv4 address or one IPv6 /64 (0: no cap).
    pub per_client: usize,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerClient,
}

/// Open connections, in all and per client. The caps can be changed while
/// connections are open ([`Admission::set_limits`]): they apply to the
/// next connection, and open ones keep their places.
#[derive(Debug)]
pub struct Admission {
    total_cap: AtomicUsize,
    per_client_cap: AtomicUsize,
    total: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; dropping it gives its place back.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    client: IpAddr,
    /// Counted against its client's cap.
    per_client: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.total.fetch_sub(1, Ordering::AcqRel);
        crate::memory::closed();
        if self.per_client
            && let Ok(mut m) = self.admission.per_client.lock()
            && let Some(n) = m.get_mut(&self.client)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.client);
            }
        }
    }
}

/// The unit a per-client cap counts: an IPv4 address (IPv4-mapped IPv6
/// included) or an IPv6 /64, the block one subscriber usually holds.
pub(crate) fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Admission {
    pub fn new(limits: ConnLimits) -> Arc<Self> {
        Arc::new(Admission {
            total_cap: AtomicUsize::new(limits.total),
            per_client_cap: AtomicUsize::new(limits.per_client),
            total: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
        })
    }

    /// New caps, from the next connection on.
    pub fn set_limits(&self, limits: ConnLimits) {
        self.total_cap.store(limits.total, Ordering::Relaxed);
        self.per_client_cap
            .store(limits.per_client, Ordering::Relaxed);
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Admits a connection from `ip`, or says which cap it hit.
    pub fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refusal> {
        let cap = self.total_cap.load(Ordering::Relaxed);
        self.total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (cap == 0 || n < cap).then_some(n + 1)
            })
            .map_err(|_| Refusal::Total)?;
        crate::memory::opened();
        let client = client_key(ip);
        let per_cap = self.per_client_cap.load(Ordering::Relaxed);
        if per_cap > 0 {
            let admitted = self.per_client.lock().is_ok_and(|mut m| {
                let n = m.entry(client).or_insert(0);
                if *n < per_cap {
                    *n += 1;
                    true
                } else {
                    false
                }
            });
            if !admitted {
                self.total.fetch_sub(1, Ordering::AcqRel);
                crate::memory::closed();
                return Err(Refusal::PerClient);
            }
        }
        Ok(Permit {
            admission: self.clone(),
            client,
            per_client: per_cap > 0,
        })
    }
}

/// What an accept loop does after a failed `accept(2)`: for running out of
/// descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) it waits,
/// doubling the wait up to a second, and logs once per episode (a loop
/// that retried at once would spin on the pending connection); for
/// anything else it waits a little.
#[derive(Debug, Default)]
pub struct AcceptErrors {
    backoff: Option<Duration>,
    role: &'static str,
}

impl AcceptErrors {
    pub fn new(role: &'static str) -> Self {
        AcceptErrors {
            backoff: None,
            role,
        }
    }

    /// Call after every successful accept.
    pub fn accepted(&mut self) {
        if self.backoff.take().is_some() {
            tracing::info!(role = self.role, "accepting connections again");
        }
    }

    /// Call after a failed accept; waits as it should.
    pub async fn failed(&mut self, e: &std::io::Error) {
        let exhausted = matches!(
            e.raw_os_error(),
            Some(
                libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM
            )
        );
        let wait = if exhausted {
            let next = match self.backoff {
                None => {
                    tracing::warn!(
                        role = self.role,
                        error = %e,
                        "cannot accept connections: out of file descriptors or memory; backing off until some close (raise the descriptor limit, e.g. LimitNOFILE, or lower the connection caps)"
                    );
                    Duration::from_millis(10)
                }
                Some(b) => (b * 2).min(Duration::from_secs(1)),
            };
            self.backoff = Some(next);
            next
        } else {
            tracing::debug!(role = self.role, error = %e, "accept failed");
            Duration::from_millis(5)
        };
        tokio::time::sleep(wait).await;
    }
}

/// The errno values [`AcceptErrors`] tells apart (Linux).
mod libc_errno {
    pub(super) const ENOMEM: i32 = 12;
    pub(super) const ENFILE: i32 = 23;
    pub(super) const EMFILE: i32 = 24;
    pub(super) const ENOBUFS: i32 = 105;
}

/// Whether the kernel's TCP memory is past its pressure threshold (the
/// middle value of `net.ipv4.tcp_mem`), refreshed once a second by a
/// background task started with the first listener. Under pressure the
/// kernel starts refusing socket memory, and the first casualties are
/// legitimate downloads; so a client that stopped reading is then given
/// [`PRESSURE_SEND_TIMEOUT`] instead of the configured send timeout, and
/// its buffered data is freed sooner.
pub(crate) fn tcp_memory_pressure() -> bool {
    PRESSURE.load(Ordering::Relaxed)
}

/// The send timeout for a stalled client while TCP memory is under
/// pressure.
pub(crate) const PRESSURE_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The time a stalled write may take now: `configured`, or less under TCP
/// memory pressure.
pub fn send_timeout(configured: Duration) -> Duration {
    if tcp_memory_pressure() {
        configured.min(PRESSURE_SEND_TIMEOUT)
    } else {
        configured
    }
}

static PRESSURE: AtomicBool = AtomicBool::new(false);
static PRESSURE_WATCH: OnceLock<()> = OnceLock::new();

/// Starts the pressure watch (once per process; needs a runtime).
pub(crate) fn watch_tcp_memory() {
    PRESSURE_WATCH.get_or_init(|| {
        tokio::spawn(async {
            let mut was = false;
            let mut peak = 0;
            loop {
                crate::memory::after_flood(&mut peak);
                let now = tokio::task::spawn_blocking(read_pressure)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(false);
                PRESSURE.store(now, Ordering::Relaxed);
                if now != was {
                    if now {
                        tracing::warn!("kernel TCP memory is under pressure; clients that stop reading are now closed after {PRESSURE_SEND_TIMEOUT:?}");
                    } else {
                        tracing::info!("kernel TCP memory pressure is over");
                    }
                    was = now;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    });
}

fn read_pressure() -> Option<bool> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let limits = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem").ok()?;
    pressure_from(&sockstat, &limits)
}

/// From `/proc/net/sockstat` (`TCP: … mem N`, in pages) and `tcp_mem`
/// (`low pressure high`, in pages): whether use is at or past `pressure`.
fn pressure_from(sockstat: &str, tcp_mem: &str) -> Option<bool> {
    let line = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    let mem: u64 = loop {
        match words.next()? {
            "mem" => break words.next()?.parse().ok()?,
            _ => continue,
        }
    };
    let pressure: u64 = tcp_mem.split_whitespace().nth(1)?.parse().ok()?;
    Some(mem >= pressure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_client_and_in_all_and_give_places_back() {
        let a = Admission::new(ConnLimits {
            total: 3,
            per_client: 2,
        });
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let p1 = a.try_admit(ip("10.0.0.1")).expect("1st");
        let _p2 = a
            .try_admit(ip("::ffff:10.0.0.1"))
            .expect("2nd, same client");
        assert_eq!(a.try_admit(ip("10.0.0.1")).err(), Some(Refusal::PerClient));
        // One IPv6 /64 is one client.
        let _p3 = a.try_admit(ip("2001:db8:1:2::5")).expect("v6");
        assert_eq!(
            a.try_admit(ip("2001:db8:1:3::5")).err(),
            Some(Refusal::Total)
        );
        assert_eq!(a.open(), 3);
        drop(p1);
        assert_eq!(a.open(), 2);
        let _p4 = a
            .try_admit(ip("2001:db8:1:2::ffff"))
            .expect("place given back");
        assert_eq!(
            a.try_admit(ip("2001:db8:1:2::1")).err(),
            Some(Refusal::Total)
        );
        let unlimited = Admission::new(ConnLimits {
            total: 0,
            per_client: 0,
        });
        let many: Vec<_> = (0..1000)
            .map(|_| unlimited.try_admit(ip("10.0.0.9")).expect("no caps"))
            .collect();
        assert_eq!(unlimited.open(), many.len());
    }

    #[test]
    fn pressure_is_read_from_sockstat_against_tcp_mem() {
        let sockstat = "sockets: used 300\nTCP: inuse 20 orphan 0 tw 3 alloc 25 mem 4000\nUDP: inuse 3 mem 2\n";
        assert_eq!(pressure_from(sockstat, "1000 3000 6000\n"), Some(true));
        assert_eq!(pressure_from(sockstat, "1000 4001 6000\n"), Some(false));
        assert_eq!(pressure_from("TCP: inuse 1\n", "1 2 3"), None);
        // This machine's own files parse.
        assert!(read_pressure().is_some());
    }
}
