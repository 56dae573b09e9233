//! Warnings about what arrives from outside (a dropped frame, a refused connection)
//! at most once per period: a flood of them costs a count, not a line each.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The period of every such warning.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// At most one line per period; the events in between are counted into the next one.
/// One per kind of line.
#[derive(Debug)]
pub struct LogEvery {
    period: Duration,
    /// When the last line went out, and events since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Default for LogEvery {
    fn default() -> Self {
        LogEvery::new(WARN_EVERY)
    }
}

impl LogEvery {
    pub fn new(period: Duration) -> LogEvery {
        LogEvery {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// Counts one event; Some(events since the last line, this one included) when a
    /// line is due.
    pub fn hit(&self) -> Option<u64> {
        self.hit_at(Instant::now())
    }

    /// [`LogEvery::hit`] at `now`.
    fn hit_at(&self, now: Instant) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.1 += 1;
        let due =
            st.0.is_none_or(|t| now.saturating_duration_since(t) >= self.period);
        if !due {
            return None;
        }
        let n = st.1;
        *st = (Some(now), 0);
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_period_counts_what_it_held_back() {
        let l = LogEvery::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        assert_eq!(l.hit_at(at(0.0)), Some(1));
        for s in [0.1, 1.0, 9.9] {
            assert_eq!(l.hit_at(at(s)), None, "{s}");
        }
        // the three held back and this one
        assert_eq!(l.hit_at(at(10.0)), Some(4));
        assert_eq!(l.hit_at(at(19.9)), None);
        assert_eq!(l.hit_at(at(20.0)), Some(2));
        // a quiet spell: the next one is written at once
        assert_eq!(l.hit_at(at(100.0)), Some(1));
        let l = LogEvery::new(Duration::ZERO);
        assert_eq!(l.hit(), Some(1));
        assert_eq!(l.hit(), Some(1));
    }

    #[test]
    fn a_flood_gives_one_line() {
        let l = LogEvery::default();
        let lines = (0..10_000).filter_map(|_| l.hit()).count();
        assert_eq!(lines, 1);
    }
}
