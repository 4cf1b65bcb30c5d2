//! How the agent's blocking waits poll a backend that cannot wake them: spin briefly
//! (a short transfer ends within microseconds), then nap for 1/64 of the time waited
//! so far, between [`MIN_NAP`] and [`MAX_NAP`]. A wait thus wakes a few hundred times
//! however long it lasts (a fixed 20 µs nap woke ~12 000 times per second, taking CPU
//! from the lanes that move the data) and finishes at most 1/64 (~1.6 %) after the
//! transfer did.

use std::time::{Duration, Instant};

/// Polls that only spin before the first nap.
const SPINS: u32 = 200;
/// The shortest nap.
pub(crate) const MIN_NAP: Duration = Duration::from_micros(20);
/// The longest nap (what a wait may finish late at most, once it lasted 64 ms).
pub(crate) const MAX_NAP: Duration = Duration::from_millis(1);

/// The nap after waiting `waited` (a pure function, for the tests).
pub(crate) fn nap(waited: Duration) -> Duration {
    (waited / 64).clamp(MIN_NAP, MAX_NAP)
}

/// One wait's pacing: call [`Pace::idle`] after each poll that found the wait not over.
#[derive(Debug, Default)]
pub(crate) struct Pace {
    spins: u32,
    since: Option<Instant>,
}

impl Pace {
    /// Spins, or naps in proportion to how long this wait has napped so far.
    pub(crate) fn idle(&mut self) {
        self.spins = self.spins.saturating_add(1);
        if self.spins <= SPINS {
            std::hint::spin_loop();
            return;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        std::thread::sleep(nap(since.elapsed()));
    }

    /// Something moved: spin again before the next nap.
    pub(crate) fn reset(&mut self) {
        *self = Pace::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naps_grow_with_the_wait_and_stay_bounded() {
        assert_eq!(nap(Duration::ZERO), MIN_NAP);
        assert_eq!(nap(Duration::from_millis(1)), MIN_NAP);
        assert_eq!(
            nap(Duration::from_millis(6400) / 1000),
            Duration::from_micros(100)
        );
        assert_eq!(nap(Duration::from_secs(60)), MAX_NAP);
        // Wake-ups over a 1 s wait: a few hundred, not the ~50 000 of a fixed 20 µs.
        let (mut t, mut wakes) = (Duration::ZERO, 0);
        while t < Duration::from_secs(1) {
            t += nap(t);
            wakes += 1;
        }
        assert!((300..1300).contains(&wakes), "{wakes}");
    }

    #[test]
    fn a_short_wait_only_spins() {
        let mut p = Pace::default();
        let t = Instant::now();
        for _ in 0..SPINS {
            p.idle();
        }
        assert!(p.since.is_none(), "no nap within the spins");
        p.idle();
        assert!(p.since.is_some());
        p.reset();
        assert!(p.since.is_none() && p.spins == 0);
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
