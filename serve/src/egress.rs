//! Egress: body bytes sent, counted, and held to a rate in all and per
//! connection when caps are set.
//!
//! The caps are a generic cell rate: a shared "theoretical arrival time"
//! that each send moves on by its bytes' worth of time at the cap. A sender
//! reserves the bytes it is about to hand the socket ([`Egress::reserve`]),
//! waits until that time less [`BURST`], sends, and gives back what the
//! socket did not take ([`Egress::refund`]). Up to a burst's worth goes at
//! once; over any longer span the rate is the cap, however many
//! connections share it. No lock: one atomic per cap.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How far ahead of the cap a sender may run.
const BURST: Duration = Duration::from_millis(20);

/// A connection's body bytes, counted and capped.
#[derive(Debug, Default)]
pub struct Egress {
    /// Body bytes sent, all time.
    pub sent: AtomicU64,
    /// The cap in all, bytes per second (0: none).
    total: AtomicU64,
    /// The cap per connection, bytes per second (0: none).
    per_connection: AtomicU64,
    /// When the bytes sent so far are paid for at the total cap
    /// (nanoseconds since [`epoch`]).
    paid_until: AtomicU64,
}

/// A connection's own pacing (its per-connection cap).
#[derive(Debug, Default, Clone, Copy)]
pub struct Pace {
    paid_until: u64,
}

fn epoch() -> Instant {
    static E: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

impl Egress {
    /// Sets the caps (0: none); they apply from the next send.
    pub fn set_caps(&self, total: u64, per_connection: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.per_connection.store(per_connection, Ordering::Relaxed);
    }

    /// The caps in force: (in all, per connection), 0 for none.
    pub fn caps(&self) -> (u64, u64) {
        (
            self.total.load(Ordering::Relaxed),
            self.per_connection.load(Ordering::Relaxed),
        )
    }

    /// The most to hand the socket at once: small enough under a cap that
    /// paying after the send keeps to it (a hundredth of a second's worth,
    /// 16 KiB at least), else `max`.
    pub fn chunk(&self, max: usize) -> usize {
        let (t, c) = self.caps();
        let cap = match (t, c) {
            (0, 0) => return max,
            (0, c) => c,
            (t, 0) => t,
            (t, c) => t.min(c),
        };
        ((cap / 100) as usize)
            .clamp(16 << 10, max.max(16 << 10))
            .min(max)
    }

    /// Counts `n` body bytes sent.
    pub fn count(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Reserves `n` bytes about to be sent on a connection paced by
    /// `pace`; returns how long to wait before sending them (zero without
    /// caps).
    pub fn reserve(&self, n: u64, pace: &mut Pace) -> Duration {
        let (total, per) = self.caps();
        if total == 0 && per == 0 {
            return Duration::ZERO;
        }
        let now = now_ns();
        let mut until = now;
        if total > 0 {
            let c = cost(n, total);
            let prev = self
                .paid_until
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                    Some(p.max(now).saturating_add(c))
                })
                .unwrap_or(now);
            until = until.max(prev.max(now).saturating_add(c));
        }
        if per > 0 {
            pace.paid_until = pace.paid_until.max(now).saturating_add(cost(n, per));
            until = until.max(pace.paid_until);
        }
        Duration::from_nanos(until.saturating_sub(now)).saturating_sub(BURST)
    }

    /// Gives back `n` reserved bytes that were not sent.
    pub fn refund(&self, n: u64, pace: &mut Pace) {
        if n == 0 {
            return;
        }
        let (total, per) = self.caps();
        if total > 0 {
            let c = cost(n, total);
            let _ = self
                .paid_until
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                    Some(p.saturating_sub(c))
                });
        }
        if per > 0 {
            pace.paid_until = pace.paid_until.saturating_sub(cost(n, per));
        }
    }

    /// Counts `n` bytes sent without a reservation (small bodies sent at
    /// once): they still count against the cap in all, which the next
    /// reservation waits out.
    pub fn count_unreserved(&self, n: u64) {
        self.count(n);
        let _ = self.reserve(n, &mut Pace::default());
    }
}

/// Nanoseconds `n` bytes take at `rate` bytes per second.
fn cost(n: u64, rate: u64) -> u64 {
    (n as u128 * 1_000_000_000 / rate.max(1) as u128).min(u64::MAX as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends as fast as the caps let it for `secs`, from `conns`
    /// connections taking turns (each reserves, waits, sends); returns
    /// bytes per second.
    fn rate(e: &Egress, conns: usize, secs: f64) -> f64 {
        let mut paces = vec![Pace::default(); conns];
        let t0 = Instant::now();
        let start = e.sent.load(Ordering::Relaxed);
        let mut waits = vec![(Instant::now(), 0u64); conns];
        let mut turn = 0u64;
        while t0.elapsed().as_secs_f64() < secs {
            for (p, (w, pending)) in paces.iter_mut().zip(waits.iter_mut()) {
                if Instant::now() >= *w {
                    e.count(*pending);
                    // A socket that takes half now and then: the rest is
                    // given back.
                    let n = e.chunk(256 << 10) as u64;
                    let wait = e.reserve(n, p);
                    turn += 1;
                    let took = if turn.is_multiple_of(3) { n / 2 } else { n };
                    e.refund(n - took, p);
                    *w = Instant::now() + wait;
                    *pending = took;
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        (e.sent.load(Ordering::Relaxed) - start) as f64 / t0.elapsed().as_secs_f64()
    }

    #[test]
    fn the_total_cap_holds_for_many_connections_and_the_per_connection_one_for_each() {
        let e = Egress::default();
        e.set_caps(8 << 20, 0);
        let r = rate(&e, 8, 1.0);
        let cap = (8 << 20) as f64;
        assert!((r - cap).abs() / cap < 0.05, "total: {r} against {cap}");
        let e = Egress::default();
        e.set_caps(0, 2 << 20);
        let r = rate(&e, 3, 1.0);
        let cap = (6 << 20) as f64;
        assert!(
            (r - cap).abs() / cap < 0.05,
            "3 connections at 2 MiB/s: {r}"
        );
        let e = Egress::default();
        assert_eq!(e.reserve(1 << 30, &mut Pace::default()), Duration::ZERO);
        assert_eq!(e.chunk(1 << 20), 1 << 20);
    }
}
