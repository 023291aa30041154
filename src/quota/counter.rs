//! The in-memory counter of one limit for one subject (window arithmetic is in
//! [`super::window`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use super::window::{CalendarUnit, ROLLING_BUCKETS, RollingWindow, Window, calendar_bounds};

fn until(now: DateTime<Utc>, later: DateTime<Utc>) -> Duration {
    // A negative span (a time already passed) is zero: the caller may retry at once.
    (later - now).to_std().unwrap_or(Duration::ZERO)
}

/// The state of one limit for one subject, held in memory.
///
/// Usage is attributed to the window containing the request's **start** time (`at`), so a
/// request that started at 23:59 and settles at 00:01 is billed to the day it started in.
/// Usage whose window is already gone when it is added is dropped (it can no longer affect
/// any decision), and usage dated in the future (clock skew between instances) is attributed
/// to the current window.
///
/// Amounts may be negative (corrections). Each window or bucket is clamped at zero: a
/// correction removes at most what was recorded in the same bucket, so `used` is never
/// negative. A correction attributed to the same start time as the original usage — the normal
/// case — is therefore exact.
///
/// Size: calendar and total counters are a few words; a rolling counter keeps a boxed array
/// of 60 `i64` plus one index (≈ 0.5 KiB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    state: CounterState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum CounterState {
    Calendar {
        unit: CalendarUnit,
        tz: Tz,
        /// Current window; `MIN_UTC..MIN_UTC` (empty) before first use, so the first `add`
        /// rolls over.
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        used: i64,
    },
    Rolling {
        window: RollingWindow,
        /// Newest bucket index seen. Slot `k mod 60` holds bucket `k` for
        /// `k in head-59 ..= head`; older content is cleared as `head` advances.
        head: i64,
        buckets: Box<[i64; ROLLING_BUCKETS]>,
    },
    Total {
        used: i64,
    },
}

fn slot(index: i64) -> usize {
    // rem_euclid of a positive modulus is in 0..60.
    index.rem_euclid(ROLLING_BUCKETS as i64) as usize
}

impl Counter {
    /// An empty counter for `window`; `tz` aligns calendar windows (ignored otherwise).
    pub fn new(window: Window, tz: Tz) -> Self {
        let state = match window {
            Window::Calendar(unit) => CounterState::Calendar {
                unit,
                tz,
                start: DateTime::<Utc>::MIN_UTC,
                end: DateTime::<Utc>::MIN_UTC,
                used: 0,
            },
            Window::Rolling(window) => CounterState::Rolling {
                window,
                head: 0,
                buckets: Box::new([0; ROLLING_BUCKETS]),
            },
            Window::Total => CounterState::Total { used: 0 },
        };
        Counter { state }
    }

    /// The window this counter tracks.
    pub fn window(&self) -> Window {
        match &self.state {
            CounterState::Calendar { unit, .. } => Window::Calendar(*unit),
            CounterState::Rolling { window, .. } => Window::Rolling(*window),
            CounterState::Total { .. } => Window::Total,
        }
    }

    /// Usage counted at `now` (never negative).
    ///
    /// Calendar: the stored window's usage, or 0 once `now` has reached its end. If the clock
    /// went backwards past the stored window's start, its usage is still reported (the strict
    /// choice). Rolling: the sum of the 60 buckets ending with the one containing `now` (see the
    /// module docs for the bound); buckets newer than `now` (clock went backwards) are counted too.
    pub fn used(&self, now: DateTime<Utc>) -> i64 {
        match &self.state {
            CounterState::Calendar { end, used, .. } => {
                if now >= *end {
                    0
                } else {
                    *used
                }
            }
            CounterState::Rolling {
                window,
                head,
                buckets,
            } => {
                let oldest = window.oldest_counted_bucket(now).max(head - 59);
                (oldest..=*head).fold(0i64, |sum, k| sum.saturating_add(buckets[slot(k)]))
            }
            CounterState::Total { used } => *used,
        }
    }

    /// Records `amount` (may be negative) for a request that started at `at`, observed at `now`.
    ///
    /// Returns `false` when the usage was dropped because the window or bucket containing `at`
    /// is no longer counted at `now`.
    pub fn add(&mut self, at: DateTime<Utc>, amount: i64, now: DateTime<Utc>) -> bool {
        match &mut self.state {
            CounterState::Calendar {
                unit,
                tz,
                start,
                end,
                used,
            } => {
                if now >= *end {
                    (*start, *end) = calendar_bounds(*unit, now, *tz);
                    *used = 0;
                }
                if at < *start {
                    return false;
                }
                *used = used.saturating_add(amount).max(0);
                true
            }
            CounterState::Rolling {
                window,
                head,
                buckets,
            } => {
                let now_index = window.bucket_index(now);
                if now_index > *head {
                    let stale = (now_index - *head).min(ROLLING_BUCKETS as i64);
                    for k in (now_index - stale + 1)..=now_index {
                        buckets[slot(k)] = 0;
                    }
                    *head = now_index;
                }
                let index = window.bucket_index(at).min(*head);
                if index <= *head - ROLLING_BUCKETS as i64 {
                    return false;
                }
                let cell = &mut buckets[slot(index)];
                *cell = cell.saturating_add(amount).max(0);
                true
            }
            CounterState::Total { used } => {
                *used = used.saturating_add(amount).max(0);
                true
            }
        }
    }

    /// Start of the window counted at `now`: the calendar window's start, the start of the
    /// oldest counted bucket for a rolling window, `None` for `total`.
    pub fn window_start(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.state {
            CounterState::Calendar { .. } => self.calendar_window(now).map(|(start, _)| start),
            CounterState::Rolling { window, .. } => {
                window.bucket_start(window.oldest_counted_bucket(now))
            }
            CounterState::Total { .. } => None,
        }
    }

    /// When usage counted at `now` starts to free up.
    ///
    /// Calendar: the end of the current window. Rolling: when the oldest non-empty counted
    /// bucket expires, or `now` when nothing is counted. Total: `None` (never).
    pub fn resets_at(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.state {
            CounterState::Calendar { .. } => self.calendar_window(now).map(|(_, end)| end),
            CounterState::Rolling { window, .. } => match self.rolling_nonempty(now).next() {
                Some((index, _)) => window.bucket_expiry(index),
                None => Some(now),
            },
            CounterState::Total { .. } => None,
        }
    }

    /// How long until `needed` more fits under `limit`, given `used_plus_reserved` now (this
    /// counter's usage plus the holds of in-flight requests, as the caller's store sees them).
    ///
    /// * Already fits: `Some(ZERO)`.
    /// * Calendar: the time until the window ends (everything frees then).
    /// * Rolling: the time until enough of the oldest buckets expire to make room. When expiry
    ///   alone can never make room — the excess is held by reservations, or `needed > limit` —
    ///   the whole window length is returned: by then every counted bucket has expired and the
    ///   holds of the requests in flight now have normally settled, so it is the longest
    ///   plausible wait, and a client retrying then gets a fresh answer.
    /// * Total: `None` — time never frees a lifetime allowance (no `Retry-After`).
    pub fn retry_after(
        &self,
        now: DateTime<Utc>,
        used_plus_reserved: i64,
        needed: i64,
        limit: i64,
    ) -> Option<Duration> {
        let excess = used_plus_reserved
            .saturating_add(needed)
            .saturating_sub(limit);
        match &self.state {
            CounterState::Total { .. } => None,
            _ if excess <= 0 => Some(Duration::ZERO),
            CounterState::Calendar { .. } => {
                self.calendar_window(now).map(|(_, end)| until(now, end))
            }
            CounterState::Rolling { window, .. } => {
                let whole = Duration::from_secs(window.len_secs().unsigned_abs());
                if needed > limit {
                    return Some(whole);
                }
                let mut freed = 0i64;
                for (index, amount) in self.rolling_nonempty(now) {
                    freed = freed.saturating_add(amount);
                    if freed >= excess {
                        return Some(
                            window
                                .bucket_expiry(index)
                                .map_or(whole, |expiry| until(now, expiry)),
                        );
                    }
                }
                Some(whole)
            }
        }
    }

    /// Non-empty rolling buckets counted at `now`, oldest first, as `(bucket index, amount)`;
    /// empty for calendar and total counters. Lets a store that keeps buckets elsewhere (Redis)
    /// copy a counter filled from the ledger bucket for bucket.
    pub fn counted_buckets(&self, now: DateTime<Utc>) -> Vec<(i64, i64)> {
        self.rolling_nonempty(now).collect()
    }

    /// Calendar window counted at `now` (the stored one if still current).
    fn calendar_window(&self, now: DateTime<Utc>) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        match &self.state {
            CounterState::Calendar {
                unit,
                tz,
                start,
                end,
                ..
            } => Some(if now < *end && now >= *start {
                (*start, *end)
            } else {
                calendar_bounds(*unit, now, *tz)
            }),
            _ => None,
        }
    }

    /// Non-empty counted rolling buckets at `now`, oldest first, as `(index, amount)`.
    fn rolling_nonempty(&self, now: DateTime<Utc>) -> impl Iterator<Item = (i64, i64)> + '_ {
        let counted = match &self.state {
            CounterState::Rolling {
                window,
                head,
                buckets,
            } => Some((
                window.oldest_counted_bucket(now).max(head - 59)..=*head,
                buckets,
            )),
            _ => None,
        };
        counted.into_iter().flat_map(|(range, buckets)| {
            range.filter_map(move |k| {
                let amount = buckets[slot(k)];
                (amount != 0).then_some((k, amount))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::window::tests::{ZONES, arb_instant, arb_unit, utc, zone};
    use crate::quota::window::{RollingUnit, ceil_secs};
    use chrono::TimeDelta;
    use proptest::prelude::*;

    fn rolling(count: u32, unit: RollingUnit) -> Window {
        Window::Rolling(RollingWindow::new(count, unit).unwrap())
    }

    #[test]
    fn calendar_counter_rolls_over_lazily() {
        let mut c = Counter::new(Window::Calendar(CalendarUnit::Day), Tz::UTC);
        let t = utc("2024-05-01T23:59:00Z");
        assert_eq!(c.used(t), 0);
        assert!(c.add(t, 5, t));
        assert_eq!(c.used(t), 5);
        // A request that started at 23:59 and settles after midnight bills the 1st.
        let next_day = utc("2024-05-02T00:01:00Z");
        assert_eq!(c.used(next_day), 0);
        assert!(!c.add(t, 3, next_day), "yesterday's window is gone");
        assert_eq!(c.used(next_day), 0);
        assert!(c.add(next_day, 2, next_day));
        assert_eq!(c.used(next_day), 2);
        assert_eq!(c.window_start(next_day), Some(utc("2024-05-02T00:00:00Z")));
        assert_eq!(c.resets_at(next_day), Some(utc("2024-05-03T00:00:00Z")));
    }

    #[test]
    fn calendar_window_in_time_zone() {
        let tz = zone("Europe/Berlin");
        let mut c = Counter::new(Window::Calendar(CalendarUnit::Day), tz);
        let t = utc("2024-07-01T21:30:00Z"); // 23:30 in Berlin
        c.add(t, 1, t);
        let after_local_midnight = utc("2024-07-01T22:00:00Z");
        assert_eq!(c.used(after_local_midnight), 0);
        assert_eq!(c.resets_at(t), Some(after_local_midnight));
    }

    #[test]
    fn rolling_counter_and_retry_after() {
        let mut c = Counter::new(rolling(60, RollingUnit::Minutes), Tz::UTC);
        let t0 = utc("2024-05-01T10:00:00Z");
        let m = |n: i64| t0 + TimeDelta::minutes(n);
        c.add(m(0), 10, m(0));
        c.add(m(10), 20, m(10));
        c.add(m(30), 30, m(30));
        let now = m(40);
        assert_eq!(c.used(now), 60);
        assert_eq!(c.window_start(now), Some(m(-19)));
        assert_eq!(c.resets_at(now), Some(m(60)));
        // 15 over the limit: the first bucket (10) is not enough, the second (20) is.
        assert_eq!(
            c.retry_after(now, 75, 40, 100),
            Some(Duration::from_secs(30 * 60))
        );
        // Already fits.
        assert_eq!(c.retry_after(now, 60, 40, 100), Some(Duration::ZERO));
        // 60 over: every counted bucket must expire, the last one at 11:30.
        assert_eq!(
            c.retry_after(now, 140, 20, 100),
            Some(Duration::from_secs(50 * 60))
        );
        // 70 over with only 60 counted: the rest is held by reservations, which expiry does
        // not free, so the whole window length is the bound.
        assert_eq!(
            c.retry_after(now, 150, 20, 100),
            Some(Duration::from_secs(3_600))
        );
        // Needing more than the limit never fits.
        assert_eq!(
            c.retry_after(now, 0, 101, 100),
            Some(Duration::from_secs(3_600))
        );
        // The first addition expires at 11:00.
        assert_eq!(c.used(m(59)), 60);
        assert_eq!(c.used(m(60)), 50);
        assert_eq!(c.used(m(89) + TimeDelta::seconds(59)), 30);
        assert_eq!(c.used(m(90)), 0, "the 10:30 bucket expires at 11:30");
        assert_eq!(c.used(m(91)), 0);
        assert_eq!(
            c.resets_at(m(91)),
            Some(m(91)),
            "empty window: nothing to wait for"
        );
        // Late settle of a request started 50 minutes before `now`: still counted.
        assert!(c.add(m(50), 4, m(100)));
        assert_eq!(c.used(m(100)), 4);
        // Started 61 minutes ago: its bucket is gone.
        assert!(!c.add(m(39), 4, m(100)));
    }

    #[test]
    fn rolling_counter_sub_minute_buckets() {
        // 5m → 5-second buckets.
        let mut c = Counter::new(rolling(5, RollingUnit::Minutes), Tz::UTC);
        let t0 = utc("2024-05-01T10:00:02Z");
        c.add(t0, 1, t0);
        assert_eq!(c.used(utc("2024-05-01T10:04:59Z")), 1);
        assert_eq!(
            c.used(utc("2024-05-01T10:05:00Z")),
            0,
            "bucket 10:00:00–10:00:05 expired"
        );
        assert_eq!(c.resets_at(t0), Some(utc("2024-05-01T10:05:00Z")));
    }

    #[test]
    fn total_counter_never_resets() {
        let mut c = Counter::new(Window::Total, Tz::UTC);
        let t = utc("2024-05-01T10:00:00Z");
        assert!(c.add(t, 7, t));
        let years_later = utc("2090-01-01T00:00:00Z");
        assert!(c.add(t, 3, years_later));
        assert_eq!(c.used(years_later), 10);
        assert_eq!(c.window_start(t), None);
        assert_eq!(c.resets_at(t), None);
        assert_eq!(c.retry_after(t, 10, 1, 10), None);
        assert_eq!(c.window(), Window::Total);
    }

    #[test]
    fn calendar_retry_after_is_time_to_window_end() {
        let mut c = Counter::new(Window::Calendar(CalendarUnit::Day), Tz::UTC);
        let now = utc("2024-05-01T20:00:00.5Z");
        c.add(now, 9, now);
        let wait = c.retry_after(now, 9, 2, 10).unwrap();
        assert_eq!(wait, Duration::from_millis(4 * 3_600_000 - 500));
        assert_eq!(ceil_secs(wait), 4 * 3_600);
        assert_eq!(c.retry_after(now, 8, 2, 10), Some(Duration::ZERO));
    }

    #[test]
    fn corrections_clamp_at_zero() {
        let t = utc("2024-05-01T10:00:00Z");
        for window in [
            Window::Total,
            Window::Calendar(CalendarUnit::Hour),
            rolling(1, RollingUnit::Hours),
        ] {
            let mut c = Counter::new(window, Tz::UTC);
            c.add(t, 5, t);
            c.add(t, -3, t);
            assert_eq!(c.used(t), 2, "{window}");
            c.add(t, -10, t);
            assert_eq!(c.used(t), 0, "{window}");
        }
    }

    #[test]
    fn future_start_times_count_now() {
        let now = utc("2024-05-01T10:00:00Z");
        let skewed = now + TimeDelta::seconds(90);
        let mut r = Counter::new(rolling(1, RollingUnit::Hours), Tz::UTC);
        assert!(r.add(skewed, 1, now));
        assert_eq!(r.used(now), 1);
        let mut m = Counter::new(Window::Calendar(CalendarUnit::Minute), Tz::UTC);
        assert!(m.add(skewed, 1, now));
        assert_eq!(m.used(now), 1);
    }

    fn arb_rolling() -> impl Strategy<Value = RollingWindow> {
        prop_oneof![
            (1u32..=120).prop_map(|n| RollingWindow::new(n, RollingUnit::Minutes).unwrap()),
            (1u32..=48).prop_map(|n| RollingWindow::new(n, RollingUnit::Hours).unwrap()),
            (1u32..=30).prop_map(|n| RollingWindow::new(n, RollingUnit::Days).unwrap()),
        ]
    }

    proptest! {
        #[test]
        fn rolling_used_matches_brute_force(
            window in arb_rolling(),
            start in 631_152_000i64..=4_133_980_799,
            // (advance of now, age of the request's start, amount), as fractions of the length
            // in thousandths so every window size gets overlapping and expiring events.
            steps in prop::collection::vec((0i64..=400, 0i64..=1_100, 0i64..=1_000), 1..80),
            probe in 0i64..=1_200,
        ) {
            let len = window.len_secs();
            let b = window.bucket_secs();
            let mut c = Counter::new(Window::Rolling(window), Tz::UTC);
            let mut now = start;
            let mut events: Vec<(i64, i64)> = Vec::new();
            let at = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
            let check = |c: &Counter, events: &[(i64, i64)], q: i64| {
                let kq = q.div_euclid(b);
                let in_buckets: i64 = events.iter()
                    .filter(|(t, _)| (kq - 59..=kq).contains(&t.div_euclid(b)))
                    .map(|(_, a)| a).sum();
                let certain: i64 = events.iter()
                    .filter(|(t, _)| *t >= q - len + b && *t <= q)
                    .map(|(_, a)| a).sum();
                let possible: i64 = events.iter()
                    .filter(|(t, _)| *t > q - len && *t <= q)
                    .map(|(_, a)| a).sum();
                let used = c.used(at(q));
                assert_eq!(used, in_buckets);
                assert!(certain <= used && used <= possible, "{certain} <= {used} <= {possible}");
            };
            for (advance, age, amount) in steps {
                now += advance * len / 1_000;
                let started = now - age * len / 1_000;
                let kept = c.add(at(started), amount, at(now));
                prop_assert_eq!(kept, started.div_euclid(b) > now.div_euclid(b) - 60);
                if kept {
                    events.push((started, amount));
                }
                check(&c, &events, now);
            }
            check(&c, &events, now + probe * len / 1_000);
        }

        #[test]
        fn calendar_rollover_drops_old_usage(
            name in prop::sample::select(ZONES.to_vec()),
            unit in arb_unit(),
            now in arb_instant(),
            amount in 1i64..1_000_000,
        ) {
            let tz = zone(name);
            let mut c = Counter::new(Window::Calendar(unit), tz);
            prop_assert!(c.add(now, amount, now));
            prop_assert_eq!(c.used(now), amount);
            let (start, end) = calendar_bounds(unit, now, tz);
            prop_assert_eq!(c.window_start(now), Some(start));
            prop_assert_eq!(c.resets_at(now), Some(end));
            prop_assert_eq!(c.used(end - TimeDelta::nanoseconds(1)), amount);
            prop_assert_eq!(c.used(end), 0);
            prop_assert!(!c.add(now, amount, end), "old window's usage is dropped");
            prop_assert_eq!(c.used(end), 0);
            prop_assert!(c.add(end, 1, end));
            prop_assert_eq!(c.used(end), 1);
            prop_assert_eq!(c.window_start(end), Some(end));
        }

        #[test]
        fn corrections_never_make_used_negative(
            kind in 0usize..3,
            steps in prop::collection::vec((0i64..=7_200, 0i64..=3_600, -1_000i64..=1_000), 1..60),
        ) {
            let window = [Window::Total, Window::Calendar(CalendarUnit::Hour), rolling(1, RollingUnit::Hours)][kind];
            let mut c = Counter::new(window, Tz::UTC);
            let mut now = 1_700_000_000i64;
            let mut added = 0i64;
            for (advance, age, amount) in steps {
                now += advance;
                let t = DateTime::from_timestamp(now, 0).unwrap();
                let started = DateTime::from_timestamp(now - age, 0).unwrap();
                if c.add(started, amount, t) && amount > 0 {
                    added += amount;
                }
                let used = c.used(t);
                prop_assert!(used >= 0 && used <= added);
            }
        }
    }
}
