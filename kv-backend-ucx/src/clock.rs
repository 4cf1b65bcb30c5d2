//! The coarse monotonic clock the progress engine checks deadlines against: a post's
//! deadline is looked at precisely (`Instant::now`, about 25 ns here) only once this
//! clock (about 5 ns, updated once per kernel tick) says it is near.

use std::time::{Duration, Instant};

/// How early before a deadline the precise clock is consulted: more than the coarse
/// clock can lag behind (one kernel tick: 1–10 ms) at the post and at the check.
const SLACK: Duration = Duration::from_millis(25);

/// `CLOCK_MONOTONIC_COARSE` (the clock `Instant` reads, as of the last tick), ns.
fn coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we own; CLOCK_MONOTONIC_COARSE
    // exists on every Linux since 2.6.32 (on failure `ts` stays zero: every deadline
    // then looks near and is checked precisely).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// A deadline as the coarse clock sees it, for [`Deadline::passed`].
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// The deadline itself.
    pub at: Instant,
    /// Coarse time from which on `at` is checked precisely.
    near: u64,
}

impl Deadline {
    /// `at`, read against the coarse clock now; `now` is a precise reading just taken
    /// (`None`: read it here).
    pub fn new(at: Instant, now: Option<Instant>) -> Deadline {
        let left = at
            .saturating_duration_since(now.unwrap_or_else(Instant::now))
            .saturating_sub(SLACK);
        let near = coarse_ns().saturating_add(u64::try_from(left.as_nanos()).unwrap_or(u64::MAX));
        Deadline { at, near }
    }

    /// Whether the deadline passed; `coarse` is this round of checks' coarse clock
    /// (read once for many deadlines).
    #[inline]
    pub fn passed(&self, coarse: &mut Coarse) -> bool {
        coarse.ns() >= self.near && Instant::now() > self.at
    }
}

/// The coarse clock, read at most once per round of deadline checks.
#[derive(Default)]
pub struct Coarse(Option<u64>);

impl Coarse {
    fn ns(&mut self) -> u64 {
        *self.0.get_or_insert_with(coarse_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_passes_when_it_passed_and_not_before() {
        let soon = Instant::now() + Duration::from_millis(30);
        let d = Deadline::new(soon, None);
        assert!(
            !Deadline::new(Instant::now() + Duration::from_secs(10), None)
                .passed(&mut Coarse::default())
        );
        while Instant::now() <= soon + Duration::from_millis(1) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(d.passed(&mut Coarse::default()));
        let past = Deadline::new(Instant::now() - Duration::from_millis(1), None);
        assert!(past.passed(&mut Coarse::default()));
        // Far away: the precise clock is not even needed to say no.
        let far = Deadline::new(
            Instant::now() + Duration::from_secs(3600),
            Some(Instant::now()),
        );
        assert!(!far.passed(&mut Coarse::default()));
    }

    #[test]
    fn the_coarse_clock_keeps_up_with_instant() {
        // Each coarse reading bracketed by precise ones; the coarse clock lags by at most
        // a tick (10 ms at HZ=100), so its progress lies within the brackets' widened by
        // that, however long this thread was descheduled in between.
        let tick = 12_000_000i128;
        let (a0, c0, b0) = (Instant::now(), coarse_ns(), Instant::now());
        std::thread::sleep(Duration::from_millis(30));
        let (a1, c1, b1) = (Instant::now(), coarse_ns(), Instant::now());
        let coarse = c1 as i128 - c0 as i128;
        let least = a1.duration_since(b0).as_nanos() as i128 - tick;
        let most = b1.duration_since(a0).as_nanos() as i128 + tick;
        assert!(
            (least..=most).contains(&coarse),
            "{coarse} not in {least}..={most}"
        );
    }
}
