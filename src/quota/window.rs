//! Time windows of limits.
//!
//! This module owns all window arithmetic, so that every backend (in-process counters, Redis
//! scripts fed by Rust-computed bounds, the reconciler reading the ledger) agrees on which
//! window a request belongs to:
//!
//! * [`Window`] — the `WINDOW` part of a limit spec: calendar `minute|hour|day|week|month`,
//!   rolling `Nm|Nh|Nd`, or `total`.
//! * [`calendar_bounds`] — the half-open `[start, end)` calendar window containing an instant,
//!   aligned in the configured time zone (`[quota].timezone`).
//! * [`RollingWindow`] — a sliding window split into [`ROLLING_BUCKETS`] buckets aligned on the
//!   Unix epoch; its bucket index math is public so a Redis backend can use the same buckets.
//! * [`Counter`] (in [`super::counter`], re-exported here) — the state of one limit for one
//!   subject, with usage attributed to the window that contains the request's *start* time.
//!
//! # Calendar alignment rules
//!
//! * `day`, `week` (starting Monday) and `month` (starting on day 1) begin at local midnight.
//!   When that midnight does not exist (a DST gap at midnight, e.g. America/Santiago or
//!   America/Havana) the window starts at the first instant after the gap; when it occurs twice
//!   (a fold), the window starts at the earlier one. Days therefore last 23–25 h around 1-hour
//!   DST changes (23.5–24.5 h for Australia/Lord_Howe).
//! * `minute` and `hour` are aligned on the local wall clock in force (so `:30` and `:45` zones
//!   get windows starting at `hh:00` local), and are cut at every UTC-offset change, so each
//!   window lies within one offset period. In a fold (the repeated hour of autumn) each real
//!   hour and minute is its own window. Around a 30-minute change (Australia/Lord_Howe) an
//!   hour window is cut to 30 minutes, or — when the clock goes back from 02:00 to 01:30 —
//!   the local hour 01:00–02:00 yields a 60-minute and then a 30-minute window.
//!
//! Both rules produce windows that tile time: the window after `[start, end)` starts at `end`.
//! No function here panics on any instant or zone; if the zone data is ever inconsistent
//! enough that these rules find no window, the fixed UTC offset in force at `now` is used.
//!
//! # Rolling accuracy
//!
//! A rolling window of length `L` is counted in 60 buckets of `L/60` (e.g. 5 minutes for `5h`),
//! aligned on the Unix epoch. At instant `now` the counted span is the bucket containing `now`
//! and the 59 before it, which starts somewhere in `(now − L, now − L + L/60]`. Hence:
//! usage started at or before `now − L` is never counted, usage started in
//! `[now − L + L/60, now]` is always counted, and usage in between may already have been
//! forgotten. Usage therefore expires between 0 and `L/60` *early*, never late: the limit errs
//! toward admitting, by at most what was used in one bucket.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{
    DateTime, Datelike, Days, FixedOffset, LocalResult, Months, NaiveDateTime, NaiveTime, Offset,
    TimeDelta, TimeZone, Timelike, Utc,
};
use chrono_tz::{GapInfo, Tz};
use thiserror::Error;

pub use super::counter::Counter;

/// Number of buckets a rolling window is split into (its accuracy is one bucket: `len / 60`).
pub const ROLLING_BUCKETS: usize = 60;

/// Largest rolling window accepted: 366 days. Longer allowances are better expressed as
/// `month` or `total`, and the bound keeps every bucket index far from `i64` overflow.
pub const MAX_ROLLING_SECS: i64 = 366 * 86_400;

/// A calendar unit, aligned in the configured time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CalendarUnit {
    /// `minute`: starts at `hh:mm:00` local.
    Minute,
    /// `hour`: starts at `hh:00:00` local.
    Hour,
    /// `day`: starts at local midnight.
    Day,
    /// `week`: starts at local midnight on Monday.
    Week,
    /// `month`: starts at local midnight on day 1.
    Month,
}

impl CalendarUnit {
    /// The spec keyword (`minute`, `hour`, `day`, `week`, `month`).
    pub fn as_str(self) -> &'static str {
        match self {
            CalendarUnit::Minute => "minute",
            CalendarUnit::Hour => "hour",
            CalendarUnit::Day => "day",
            CalendarUnit::Week => "week",
            CalendarUnit::Month => "month",
        }
    }
}

/// The unit of a rolling window's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RollingUnit {
    /// `m` — minutes.
    Minutes,
    /// `h` — hours.
    Hours,
    /// `d` — days (always 86 400 s: a rolling window ignores DST).
    Days,
}

impl RollingUnit {
    fn secs(self) -> i64 {
        match self {
            RollingUnit::Minutes => 60,
            RollingUnit::Hours => 3_600,
            RollingUnit::Days => 86_400,
        }
    }

    fn suffix(self) -> char {
        match self {
            RollingUnit::Minutes => 'm',
            RollingUnit::Hours => 'h',
            RollingUnit::Days => 'd',
        }
    }
}

/// A sliding window of `count` units (`5h`, `30m`, `7d`), counted in [`ROLLING_BUCKETS`]
/// buckets of `len / 60` seconds aligned on the Unix epoch.
///
/// The length is kept as written (`60m` stays `60m`, distinct from `1h` textually) so that a
/// spec's canonical text round-trips; both have the same buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RollingWindow {
    count: u32,
    unit: RollingUnit,
}

impl RollingWindow {
    /// A rolling window of `count` units; `count` must be ≥ 1 and the length ≤ 366 days.
    pub fn new(count: u32, unit: RollingUnit) -> Result<Self, WindowParseError> {
        let secs = i64::from(count) * unit.secs();
        if count == 0 {
            return Err(WindowParseError::ZeroLength);
        }
        if secs > MAX_ROLLING_SECS {
            return Err(WindowParseError::TooLong(format!(
                "{count}{}",
                unit.suffix()
            )));
        }
        Ok(RollingWindow { count, unit })
    }

    /// The number of units as written.
    pub fn count(self) -> u32 {
        self.count
    }

    /// The unit as written.
    pub fn unit(self) -> RollingUnit {
        self.unit
    }

    /// Length of the window in seconds (1 minute ..= 366 days).
    pub fn len_secs(self) -> i64 {
        i64::from(self.count) * self.unit.secs()
    }

    /// Length of one bucket in seconds: `len_secs / 60`, exact (every unit is a multiple of 60 s).
    pub fn bucket_secs(self) -> i64 {
        self.len_secs() / ROLLING_BUCKETS as i64
    }

    /// Index of the bucket containing `at`: `floor(unix_seconds / bucket_secs)`.
    pub fn bucket_index(self, at: DateTime<Utc>) -> i64 {
        at.timestamp().div_euclid(self.bucket_secs())
    }

    /// Start of bucket `index` (`None` only outside chrono's representable range).
    pub fn bucket_start(self, index: i64) -> Option<DateTime<Utc>> {
        let secs = index.checked_mul(self.bucket_secs())?;
        DateTime::from_timestamp(secs, 0)
    }

    /// Oldest bucket index counted at `now`: the 60 counted buckets are
    /// `oldest_counted_bucket(now) ..= bucket_index(now)`.
    pub fn oldest_counted_bucket(self, now: DateTime<Utc>) -> i64 {
        self.bucket_index(now) - (ROLLING_BUCKETS as i64 - 1)
    }

    /// When bucket `index` stops being counted: the start of bucket `index + 60`.
    pub fn bucket_expiry(self, index: i64) -> Option<DateTime<Utc>> {
        self.bucket_start(index.checked_add(ROLLING_BUCKETS as i64)?)
    }
}

impl fmt::Display for RollingWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.count, self.unit.suffix())
    }
}

/// The `WINDOW` part of a limit spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Window {
    /// A calendar unit aligned in `[quota].timezone`, rolled over lazily.
    Calendar(CalendarUnit),
    /// A sliding window (`Nm`, `Nh`, `Nd`).
    Rolling(RollingWindow),
    /// The lifetime of the subject: never resets.
    Total,
}

/// Why a window could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WindowParseError {
    /// Unknown keyword or malformed rolling length.
    #[error(
        "unknown window `{0}` (expected minute, hour, day, week, month, total, or a rolling \
         length like 30m, 5h, 7d)"
    )]
    Unknown(String),
    /// `0m`, `0h`, `0d`.
    #[error("a rolling window must be at least 1 unit long")]
    ZeroLength,
    /// Longer than [`MAX_ROLLING_SECS`].
    #[error("rolling window `{0}` is longer than 366 days (use `month` or `total` instead)")]
    TooLong(String),
}

impl FromStr for Window {
    type Err = WindowParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let calendar = match s {
            "minute" => Some(CalendarUnit::Minute),
            "hour" => Some(CalendarUnit::Hour),
            "day" => Some(CalendarUnit::Day),
            "week" => Some(CalendarUnit::Week),
            "month" => Some(CalendarUnit::Month),
            "total" => return Ok(Window::Total),
            _ => None,
        };
        if let Some(unit) = calendar {
            return Ok(Window::Calendar(unit));
        }
        let unknown = || WindowParseError::Unknown(s.to_owned());
        let (digits, unit) = match s.char_indices().last() {
            Some((i, 'm')) => (&s[..i], RollingUnit::Minutes),
            Some((i, 'h')) => (&s[..i], RollingUnit::Hours),
            Some((i, 'd')) => (&s[..i], RollingUnit::Days),
            _ => return Err(unknown()),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(unknown());
        }
        // Any digit string too long for u32 is far beyond the 366-day bound anyway.
        let count: u32 = digits
            .parse()
            .map_err(|_| WindowParseError::TooLong(s.to_owned()))?;
        RollingWindow::new(count, unit).map(Window::Rolling)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Window::Calendar(unit) => f.write_str(unit.as_str()),
            Window::Rolling(rolling) => rolling.fmt(f),
            Window::Total => f.write_str("total"),
        }
    }
}

/// The calendar window `[start, end)` containing `now`, aligned in `tz` (see the module docs
/// for DST gaps and folds). Guarantees `start <= now < end`, and windows tile:
/// `calendar_bounds(unit, end, tz).0 == end` and `calendar_bounds(unit, start, tz) == (start, end)`.
pub fn calendar_bounds(
    unit: CalendarUnit,
    now: DateTime<Utc>,
    tz: Tz,
) -> (DateTime<Utc>, DateTime<Utc>) {
    let found = match unit {
        CalendarUnit::Minute | CalendarUnit::Hour => clock_bounds(unit, now, tz),
        CalendarUnit::Day | CalendarUnit::Week | CalendarUnit::Month => date_bounds(unit, now, tz),
    };
    match found {
        Some((start, end)) if start <= now && now < end => (start, end),
        _ => fixed_offset_bounds(unit, now, tz),
    }
}

/// The first instant of the local date `date` in `tz`: its midnight, or the end of the gap
/// when midnight is skipped, the earlier one in a fold — exactly where that date's `day`
/// window starts. `None` only at the edges of chrono's range.
pub fn local_day_start(date: chrono::NaiveDate, tz: Tz) -> Option<DateTime<Utc>> {
    first_instant_at_or_after(tz, date.and_time(NaiveTime::MIN))
}

/// The local time `local` truncated to the start of its `unit`.
fn floor_local(unit: CalendarUnit, local: NaiveDateTime) -> Option<NaiveDateTime> {
    let date = local.date();
    match unit {
        CalendarUnit::Minute => local.with_second(0)?.with_nanosecond(0),
        CalendarUnit::Hour => local.with_minute(0)?.with_second(0)?.with_nanosecond(0),
        CalendarUnit::Day => Some(date.and_time(NaiveTime::MIN)),
        CalendarUnit::Week => {
            let back = u64::from(date.weekday().num_days_from_monday());
            Some(
                date.checked_sub_days(Days::new(back))?
                    .and_time(NaiveTime::MIN),
            )
        }
        CalendarUnit::Month => Some(date.with_day(1)?.and_time(NaiveTime::MIN)),
    }
}

/// The local start of the unit after the one starting at `start` (an output of [`floor_local`]).
fn next_local(unit: CalendarUnit, start: NaiveDateTime) -> Option<NaiveDateTime> {
    match unit {
        CalendarUnit::Minute => start.checked_add_signed(TimeDelta::minutes(1)),
        CalendarUnit::Hour => start.checked_add_signed(TimeDelta::hours(1)),
        CalendarUnit::Day => start.checked_add_days(Days::new(1)),
        CalendarUnit::Week => start.checked_add_days(Days::new(7)),
        CalendarUnit::Month => start.checked_add_months(Months::new(1)),
    }
}

fn offset_at(tz: Tz, at: DateTime<Utc>) -> FixedOffset {
    tz.offset_from_utc_datetime(&at.naive_utc()).fix()
}

/// The local wall-clock time of `at` in `tz`; `None` only at the edges of chrono's range
/// (`DateTime::naive_local` would panic there).
fn local_time(tz: Tz, at: DateTime<Utc>) -> Option<NaiveDateTime> {
    at.naive_utc().checked_add_offset(offset_at(tz, at))
}

/// The first instant whose local time in `tz` is at or after `local`: the instant itself when it
/// exists once, the earlier one in a fold, the end of the gap in a gap.
fn first_instant_at_or_after(tz: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(a, b) => Some(a.min(b).with_timezone(&Utc)),
        LocalResult::None => {
            if let Some(end) = GapInfo::new(&local, &tz).and_then(|gap| gap.end) {
                return Some(end.with_timezone(&Utc));
            }
            gap_end_by_search(tz, local)
        }
    }
}

/// Bisects for the first second whose local time reaches `local` (used only when chrono-tz
/// cannot describe the gap itself). No UTC offset exceeds ±16 h, so the answer lies within
/// ±27 h of `local` read as UTC.
fn gap_end_by_search(tz: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    let base = local.and_utc().timestamp();
    let reached = |secs: i64| {
        DateTime::from_timestamp(secs, 0)
            .and_then(|u| local_time(tz, u))
            .is_some_and(|l| l >= local)
    };
    let (mut lo, mut hi) = (base.checked_sub(27 * 3_600)?, base.checked_add(27 * 3_600)?);
    if reached(lo) || !reached(hi) {
        return None;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if reached(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    DateTime::from_timestamp(hi, 0)
}

/// Bisects `(lo, hi]` (Unix seconds, `same(lo) == false`, `same(hi) == true`) for the first
/// second where `same` holds. UTC-offset changes happen on whole seconds.
fn first_second_where(mut lo: i64, mut hi: i64, same: impl Fn(i64) -> bool) -> i64 {
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if same(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// Minute and hour windows: aligned on the local clock of the offset in force at `now`, cut at
/// the offset changes just before and after `now`. A minute or hour contains at most one
/// offset change in any real zone data, which the bisection relies on.
fn clock_bounds(
    unit: CalendarUnit,
    now: DateTime<Utc>,
    tz: Tz,
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let offset = offset_at(tz, now);
    let local = now.naive_utc().checked_add_offset(offset)?;
    let aligned = floor_local(unit, local)?
        .checked_sub_offset(offset)?
        .and_utc();
    let step = match unit {
        CalendarUnit::Minute => 60,
        _ => 3_600,
    };
    let same_offset =
        |secs: i64| DateTime::from_timestamp(secs, 0).is_some_and(|u| offset_at(tz, u) == offset);
    let now_secs = now.timestamp();
    let mut start = aligned.timestamp();
    if !same_offset(start) {
        // The offset changed after the aligned start: the window begins at that change.
        start = first_second_where(start, now_secs, same_offset);
    }
    let mut end = aligned.timestamp().checked_add(step)?;
    if !same_offset(end - 1) {
        // The offset changes before the aligned end: the window ends at that change.
        end = first_second_where(now_secs, end - 1, |s| !same_offset(s));
    }
    Some((
        DateTime::from_timestamp(start, 0)?,
        DateTime::from_timestamp(end, 0)?,
    ))
}

/// Day, week and month windows: from the first instant at or after a local midnight to the
/// first instant at or after the next one. In a fold across midnight the local clock of `now`
/// can lag behind a boundary already passed, so the window is advanced until it holds `now`.
fn date_bounds(
    unit: CalendarUnit,
    now: DateTime<Utc>,
    tz: Tz,
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    // Folds never exceed a few hours, so two or three steps suffice; the bound only guards
    // against corrupt zone data.
    const MAX_STEPS: usize = 64;
    let mut start_local = floor_local(unit, local_time(tz, now)?)?;
    let mut start = first_instant_at_or_after(tz, start_local)?;
    for _ in 0..MAX_STEPS {
        let next = next_local(unit, start_local)?;
        let end = first_instant_at_or_after(tz, next)?;
        if end > now {
            return Some((start, end));
        }
        start_local = next;
        start = end;
    }
    None
}

/// Last resort: the window as if the offset in force at `now` never changed. Saturates to the
/// representable range, so it always contains `now`.
fn fixed_offset_bounds(
    unit: CalendarUnit,
    now: DateTime<Utc>,
    tz: Tz,
) -> (DateTime<Utc>, DateTime<Utc>) {
    let offset = offset_at(tz, now);
    let compute = || {
        let local = now.naive_utc().checked_add_offset(offset)?;
        let start_local = floor_local(unit, local)?;
        let end_local = next_local(unit, start_local)?;
        Some((
            start_local.checked_sub_offset(offset)?.and_utc(),
            end_local.checked_sub_offset(offset)?.and_utc(),
        ))
    };
    match compute() {
        Some((start, end)) if start <= now && now < end => (start, end),
        _ => (DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC),
    }
}

/// Rounds a duration up to whole seconds, as `Retry-After` wants (`1.2 s → 2`).
pub fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::Weekday;
    use proptest::prelude::*;

    pub(crate) fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .with_timezone(&Utc)
    }

    fn local(t: DateTime<Utc>, tz: Tz) -> NaiveDateTime {
        t.with_timezone(&tz).naive_local()
    }

    pub(crate) fn zone(name: &str) -> Tz {
        name.parse().unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn bounds(unit: CalendarUnit, now: &str, tz: &str) -> (DateTime<Utc>, DateTime<Utc>) {
        calendar_bounds(unit, utc(now), zone(tz))
    }

    fn hours(start: DateTime<Utc>, end: DateTime<Utc>) -> f64 {
        (end - start).num_seconds() as f64 / 3600.0
    }

    /// Zones the brief singles out, plus a few with unusual offsets or midnight transitions.
    pub(crate) const ZONES: &[&str] = &[
        "UTC",
        "America/New_York",
        "Europe/Berlin",
        "Australia/Lord_Howe",
        "Asia/Kolkata",
        "Asia/Kathmandu",
        "America/Santiago",
        "America/Havana",
        "Pacific/Chatham",
        "America/St_Johns",
        "Asia/Tehran",
        "Australia/Adelaide",
        "Europe/London",
        "America/Los_Angeles",
    ];

    const UNITS: [CalendarUnit; 5] = [
        CalendarUnit::Minute,
        CalendarUnit::Hour,
        CalendarUnit::Day,
        CalendarUnit::Week,
        CalendarUnit::Month,
    ];

    #[test]
    fn parses_and_displays_windows() {
        for text in [
            "minute", "hour", "day", "week", "month", "total", "1m", "5h", "7d", "60m",
        ] {
            let window: Window = text.parse().unwrap();
            assert_eq!(window.to_string(), text);
        }
        assert_eq!("05h".parse::<Window>().unwrap().to_string(), "5h");
        for bad in [
            "", "m", "5", "5s", "5w", "Day", "-1h", "1.5h", "+5h", " 5h", "5hh",
        ] {
            assert!(bad.parse::<Window>().is_err(), "{bad:?}");
        }
        assert_eq!("0m".parse::<Window>(), Err(WindowParseError::ZeroLength));
        assert!(matches!(
            "99999999999999999999d".parse::<Window>(),
            Err(WindowParseError::TooLong(_))
        ));
    }

    #[test]
    fn rolling_bucket_math() {
        let w = RollingWindow::new(5, RollingUnit::Hours).unwrap();
        assert_eq!(w.len_secs(), 18_000);
        assert_eq!(w.bucket_secs(), 300);
        let t = utc("2024-05-01T10:07:00Z");
        let k = w.bucket_index(t);
        assert_eq!(w.bucket_start(k), Some(utc("2024-05-01T10:05:00Z")));
        assert_eq!(w.bucket_expiry(k), Some(utc("2024-05-01T15:05:00Z")));
        assert_eq!(w.oldest_counted_bucket(t), k - 59);
        let before_epoch = RollingWindow::new(1, RollingUnit::Minutes).unwrap();
        assert_eq!(before_epoch.bucket_index(utc("1969-12-31T23:59:59.5Z")), -1);
    }

    #[test]
    fn utc_calendar_windows() {
        let now = "2024-02-29T13:45:30.25Z";
        assert_eq!(
            bounds(CalendarUnit::Minute, now, "UTC"),
            (utc("2024-02-29T13:45:00Z"), utc("2024-02-29T13:46:00Z"))
        );
        assert_eq!(
            bounds(CalendarUnit::Hour, now, "UTC"),
            (utc("2024-02-29T13:00:00Z"), utc("2024-02-29T14:00:00Z"))
        );
        assert_eq!(
            bounds(CalendarUnit::Day, now, "UTC"),
            (utc("2024-02-29T00:00:00Z"), utc("2024-03-01T00:00:00Z"))
        );
        // 2024-02-29 is a Thursday; its week starts Monday 26th.
        assert_eq!(
            bounds(CalendarUnit::Week, now, "UTC"),
            (utc("2024-02-26T00:00:00Z"), utc("2024-03-04T00:00:00Z"))
        );
        assert_eq!(
            bounds(CalendarUnit::Month, now, "UTC"),
            (utc("2024-02-01T00:00:00Z"), utc("2024-03-01T00:00:00Z"))
        );
        // January 31st: the month ends on February 1st, and February has 28 or 29 days.
        assert_eq!(
            bounds(CalendarUnit::Month, "2023-01-31T23:59:59Z", "UTC"),
            (utc("2023-01-01T00:00:00Z"), utc("2023-02-01T00:00:00Z"))
        );
        let (s, e) = bounds(CalendarUnit::Month, "2023-02-15T00:00:00Z", "UTC");
        assert_eq!((e - s).num_days(), 28);
        let (s, e) = bounds(CalendarUnit::Month, "2000-02-15T00:00:00Z", "UTC");
        assert_eq!((e - s).num_days(), 29);
        let (s, e) = bounds(CalendarUnit::Month, "2100-02-15T00:00:00Z", "UTC");
        assert_eq!((e - s).num_days(), 28, "2100 is not a leap year");
        // The window end belongs to the next window.
        assert_eq!(
            bounds(CalendarUnit::Day, "2024-03-01T00:00:00Z", "UTC").0,
            utc("2024-03-01T00:00:00Z")
        );
    }

    #[test]
    fn half_and_quarter_hour_offsets_align_on_local_clock() {
        // Kolkata is +05:30: local hours start at :30 UTC.
        assert_eq!(
            bounds(CalendarUnit::Hour, "2024-05-01T10:10:00Z", "Asia/Kolkata"),
            (utc("2024-05-01T09:30:00Z"), utc("2024-05-01T10:30:00Z"))
        );
        // Kathmandu is +05:45.
        assert_eq!(
            bounds(CalendarUnit::Hour, "2024-05-01T10:10:00Z", "Asia/Kathmandu"),
            (utc("2024-05-01T09:15:00Z"), utc("2024-05-01T10:15:00Z"))
        );
        assert_eq!(
            bounds(CalendarUnit::Day, "2024-05-01T10:10:00Z", "Asia/Kathmandu"),
            (utc("2024-04-30T18:15:00Z"), utc("2024-05-01T18:15:00Z"))
        );
        // Chatham standard time is +12:45.
        assert_eq!(
            bounds(
                CalendarUnit::Hour,
                "2024-06-01T10:10:00Z",
                "Pacific/Chatham"
            ),
            (utc("2024-06-01T09:15:00Z"), utc("2024-06-01T10:15:00Z"))
        );
    }

    #[test]
    fn new_york_dst_days_and_hours() {
        let ny = "America/New_York";
        let (s, e) = bounds(CalendarUnit::Day, "2024-03-10T12:00:00Z", ny);
        assert_eq!(
            (s, e),
            (utc("2024-03-10T05:00:00Z"), utc("2024-03-11T04:00:00Z"))
        );
        assert_eq!(hours(s, e), 23.0);
        let (s, e) = bounds(CalendarUnit::Day, "2024-11-03T12:00:00Z", ny);
        assert_eq!(
            (s, e),
            (utc("2024-11-03T04:00:00Z"), utc("2024-11-04T05:00:00Z"))
        );
        assert_eq!(hours(s, e), 25.0);
        // The repeated hour 01:00–02:00 on 2024-11-03 is two windows, one per real hour.
        assert_eq!(
            bounds(CalendarUnit::Hour, "2024-11-03T05:30:00Z", ny),
            (utc("2024-11-03T05:00:00Z"), utc("2024-11-03T06:00:00Z"))
        );
        assert_eq!(
            bounds(CalendarUnit::Hour, "2024-11-03T06:30:00Z", ny),
            (utc("2024-11-03T06:00:00Z"), utc("2024-11-03T07:00:00Z"))
        );
        assert_eq!(
            bounds(CalendarUnit::Minute, "2024-11-03T06:30:30Z", ny),
            (utc("2024-11-03T06:30:00Z"), utc("2024-11-03T06:31:00Z"))
        );
        // Spring forward: 01:59:59 EST is followed by 03:00 EDT.
        assert_eq!(
            bounds(CalendarUnit::Hour, "2024-03-10T06:30:00Z", ny),
            (utc("2024-03-10T06:00:00Z"), utc("2024-03-10T07:00:00Z"))
        );
        assert_eq!(
            bounds(CalendarUnit::Hour, "2024-03-10T07:30:00Z", ny),
            (utc("2024-03-10T07:00:00Z"), utc("2024-03-10T08:00:00Z"))
        );
    }

    #[test]
    fn midnight_gaps_start_at_the_first_valid_instant() {
        // Chile: 2024-09-08 00:00 -04 does not exist, clocks jump to 01:00 -03.
        let santiago = zone("America/Santiago");
        let (s, e) = calendar_bounds(CalendarUnit::Day, utc("2024-09-08T15:00:00Z"), santiago);
        assert_eq!(s, utc("2024-09-08T04:00:00Z"));
        assert_eq!(local(s, santiago).to_string(), "2024-09-08 01:00:00");
        assert_eq!(hours(s, e), 23.0);
        // The previous day ends where this one starts.
        assert_eq!(
            calendar_bounds(CalendarUnit::Day, utc("2024-09-08T03:59:59Z"), santiago).1,
            s
        );
        // Havana: 2024-03-10 00:00 -05 jumps to 01:00 -04.
        let havana = zone("America/Havana");
        let (s, e) = calendar_bounds(CalendarUnit::Day, utc("2024-03-10T15:00:00Z"), havana);
        assert_eq!(local(s, havana).to_string(), "2024-03-10 01:00:00");
        assert_eq!(hours(s, e), 23.0);
        // The month of September 2024 in Santiago starts at a normal midnight.
        let (s, _) = calendar_bounds(CalendarUnit::Month, utc("2024-09-08T15:00:00Z"), santiago);
        assert_eq!(local(s, santiago).to_string(), "2024-09-01 00:00:00");
    }

    #[test]
    fn a_local_date_starts_where_its_day_window_starts() {
        for name in ZONES {
            let tz = zone(name);
            for date in [
                "2024-09-08",
                "2024-03-10",
                "2024-04-07",
                "2024-10-06",
                "2025-01-01",
            ] {
                let d: chrono::NaiveDate = date.parse().unwrap();
                let start = local_day_start(d, tz).unwrap();
                assert_eq!(
                    calendar_bounds(CalendarUnit::Day, start, tz).0,
                    start,
                    "{name} {date}"
                );
                assert_eq!(local(start, tz).date(), d, "{name} {date}");
            }
        }
        let santiago = zone("America/Santiago");
        assert_eq!(
            local_day_start("2024-09-08".parse().unwrap(), santiago),
            Some(utc("2024-09-08T04:00:00Z"))
        );
    }

    #[test]
    fn folds_across_midnight_use_the_earliest_midnight() {
        // Havana 2024-11-03: 01:00 -04 goes back to 00:00 -05, so midnight happens twice.
        let havana = zone("America/Havana");
        let first_midnight = utc("2024-11-03T04:00:00Z");
        let second_pass = utc("2024-11-03T05:30:00Z"); // 00:30 -05, again
        let (s, e) = calendar_bounds(CalendarUnit::Day, second_pass, havana);
        assert_eq!(s, first_midnight);
        assert_eq!(hours(s, e), 25.0);
        let (s, e) = calendar_bounds(CalendarUnit::Day, utc("2024-11-02T12:00:00Z"), havana);
        assert_eq!((hours(s, e), e), (24.0, first_midnight));
        // Santiago 2024-04-07: 00:00 -03 goes back to 23:00 -04 on the 6th; the 6th lasts 25 h
        // and a request at the second 23:30 still belongs to the 6th.
        let santiago = zone("America/Santiago");
        let (s, e) = calendar_bounds(CalendarUnit::Day, utc("2024-04-07T03:30:00Z"), santiago);
        assert_eq!(
            (s, e),
            (utc("2024-04-06T03:00:00Z"), utc("2024-04-07T04:00:00Z"))
        );
    }

    #[test]
    fn lord_howe_half_hour_dst() {
        let lh = zone("Australia/Lord_Howe");
        // DST starts 2024-10-06 02:00 +10:30 → 02:30 +11, ends 2024-04-07 02:00 +11 → 01:30.
        let (s, e) = calendar_bounds(CalendarUnit::Day, utc("2024-10-06T06:00:00Z"), lh);
        assert_eq!(hours(s, e), 23.5);
        let (s, e) = calendar_bounds(CalendarUnit::Day, utc("2024-04-07T06:00:00Z"), lh);
        assert_eq!(hours(s, e), 24.5);
        // The local hour 02:00–03:00 on the spring day is cut at the jump: 02:30–03:00.
        let (s, e) = calendar_bounds(CalendarUnit::Hour, utc("2024-10-05T15:45:00Z"), lh);
        assert_eq!(local(s, lh).to_string(), "2024-10-06 02:30:00");
        assert_eq!(local(e, lh).to_string(), "2024-10-06 03:00:00");
    }

    #[test]
    fn a_skipped_day_leaves_no_empty_window() {
        // Samoa skipped 2011-12-30 entirely.
        let apia = zone("Pacific/Apia");
        let (s, e) = calendar_bounds(CalendarUnit::Day, utc("2011-12-30T09:59:59Z"), apia);
        assert_eq!(local(s, apia).to_string(), "2011-12-29 00:00:00");
        assert_eq!(hours(s, e), 24.0);
        let (s2, e2) = calendar_bounds(CalendarUnit::Day, e, apia);
        assert_eq!(s2, e);
        assert_eq!(local(s2, apia).to_string(), "2011-12-31 00:00:00");
        assert_eq!(hours(s2, e2), 24.0);
    }

    #[test]
    fn extreme_instants_never_panic() {
        for tz in [
            "UTC",
            "America/New_York",
            "Pacific/Kiritimati",
            "Etc/GMT+12",
        ] {
            for now in [
                DateTime::<Utc>::MIN_UTC,
                DateTime::<Utc>::MAX_UTC,
                utc("1800-01-01T00:00:00Z"),
                DateTime::from_timestamp(0, 0).unwrap(),
            ] {
                for unit in UNITS {
                    let (s, e) = calendar_bounds(unit, now, zone(tz));
                    assert!(
                        s <= now && now < e || e == DateTime::<Utc>::MAX_UTC,
                        "{tz} {unit:?}"
                    );
                }
            }
        }
    }

    fn check_window(
        unit: CalendarUnit,
        tz: Tz,
        now: DateTime<Utc>,
    ) -> (DateTime<Utc>, DateTime<Utc>) {
        let (start, end) = calendar_bounds(unit, now, tz);
        assert!(
            start <= now && now < end,
            "{tz} {unit:?} {now}: [{start}, {end})"
        );
        assert_eq!(
            calendar_bounds(unit, start, tz),
            (start, end),
            "{tz} {unit:?} {now}"
        );
        assert_eq!(
            calendar_bounds(unit, end, tz).0,
            end,
            "{tz} {unit:?} {now}: tiling"
        );
        let last = end - TimeDelta::nanoseconds(1);
        assert_eq!(
            calendar_bounds(unit, last, tz),
            (start, end),
            "{tz} {unit:?} {now}"
        );
        (start, end)
    }

    fn offset_changes_at(tz: Tz, t: DateTime<Utc>) -> bool {
        offset_at(tz, t) != offset_at(tz, t - TimeDelta::seconds(1))
    }

    /// Checks local alignment of a window start: the local clock reads a unit boundary, or
    /// (for gaps and offset cuts) the start is an offset change.
    fn check_alignment(unit: CalendarUnit, tz: Tz, start: DateTime<Utc>, end: DateTime<Utc>) {
        let l = local(start, tz);
        let aligned = floor_local(unit, l) == Some(l);
        match unit {
            CalendarUnit::Minute | CalendarUnit::Hour => {
                assert!(
                    aligned || offset_changes_at(tz, start),
                    "{tz} {unit:?} {start}"
                );
                let secs = (end - start).num_seconds();
                let full = if unit == CalendarUnit::Minute {
                    60
                } else {
                    3_600
                };
                assert!(
                    secs > 0 && secs <= full + 3_600,
                    "{tz} {unit:?} {start}: {secs}s"
                );
            }
            CalendarUnit::Day | CalendarUnit::Week | CalendarUnit::Month => {
                // Midnight exists (then the start is exactly it) or it fell in a gap (then the
                // start is the end of that gap, still on the same local date).
                let midnight = l.date().and_time(NaiveTime::MIN);
                let midnight_exists =
                    !matches!(tz.from_local_datetime(&midnight), LocalResult::None);
                assert!(
                    aligned || (!midnight_exists && offset_changes_at(tz, start)),
                    "{tz} {unit:?} {start}"
                );
                if unit == CalendarUnit::Week {
                    assert_eq!(l.weekday(), Weekday::Mon, "{tz} {start}");
                }
                if unit == CalendarUnit::Month {
                    assert_eq!(l.day(), 1, "{tz} {start}");
                    let el = local(end, tz).date();
                    assert_eq!(el.day(), 1);
                    assert_eq!(
                        el.checked_sub_months(Months::new(1)),
                        Some(l.date()),
                        "{tz} {start}: one month"
                    );
                }
            }
        }
    }

    /// Walks consecutive windows from `from` to `to`, checking tiling and alignment.
    fn walk(unit: CalendarUnit, tz: Tz, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<f64> {
        let mut lengths = Vec::new();
        let (mut start, mut end) = calendar_bounds(unit, from, tz);
        while start < to {
            check_alignment(unit, tz, start, end);
            lengths.push(hours(start, end));
            let (next_start, next_end) = calendar_bounds(unit, end, tz);
            assert_eq!(next_start, end, "{tz} {unit:?}: gap or overlap after {end}");
            assert!(next_end > next_start);
            (start, end) = (next_start, next_end);
        }
        lengths
    }

    #[test]
    fn day_week_month_windows_tile_1990_to_2100() {
        let (from, to) = (utc("1990-01-01T00:00:00Z"), utc("2100-12-31T00:00:00Z"));
        for name in ZONES {
            let tz = zone(name);
            for hours in walk(CalendarUnit::Day, tz, from, to) {
                assert!((23.0..=25.0).contains(&hours), "{name}: day of {hours} h");
            }
            for hours in walk(CalendarUnit::Week, tz, from, to) {
                assert!(
                    (167.0..=169.0).contains(&hours),
                    "{name}: week of {hours} h"
                );
            }
            // 1990-01 ..= 2100-12, plus 1989-12 for zones west of UTC.
            let months = walk(CalendarUnit::Month, tz, from, to);
            assert!((111 * 12..=111 * 12 + 1).contains(&months.len()), "{name}");
        }
    }

    #[test]
    fn hour_and_minute_windows_tile_across_transitions() {
        for name in ZONES {
            let tz = zone(name);
            let hours = walk(
                CalendarUnit::Hour,
                tz,
                utc("2023-12-25T00:00:00Z"),
                utc("2025-01-05T00:00:00Z"),
            );
            assert!(hours.len() > 9_000, "{name}");
            for (from, to) in [
                ("2024-03-09T00:00:00Z", "2024-03-12T00:00:00Z"),
                ("2024-03-30T00:00:00Z", "2024-04-08T00:00:00Z"),
                ("2024-10-04T00:00:00Z", "2024-10-08T00:00:00Z"),
                ("2024-10-26T00:00:00Z", "2024-11-05T00:00:00Z"),
            ] {
                walk(CalendarUnit::Minute, tz, utc(from), utc(to));
            }
        }
    }

    pub(crate) fn arb_instant() -> impl Strategy<Value = DateTime<Utc>> {
        // 1990-01-01 ..= 2100-12-31, with sub-second parts.
        (631_152_000i64..=4_133_980_799, 0u32..1_000_000_000)
            .prop_map(|(s, n)| DateTime::from_timestamp(s, n).unwrap())
    }

    pub(crate) fn arb_unit() -> impl Strategy<Value = CalendarUnit> {
        prop::sample::select(UNITS.to_vec())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn windows_contain_now_and_tile(
            name in prop::sample::select(ZONES.to_vec()),
            unit in arb_unit(),
            now in arb_instant(),
        ) {
            let tz = zone(name);
            let (start, end) = check_window(unit, tz, now);
            check_alignment(unit, tz, start, end);
            if unit == CalendarUnit::Day {
                let h = hours(start, end);
                prop_assert!((23.0..=25.0).contains(&h), "{} day of {} h", name, h);
            }
        }

        #[test]
        fn every_zone_tiles(
            index in 0..chrono_tz::TZ_VARIANTS.len(),
            unit in arb_unit(),
            now in arb_instant(),
        ) {
            check_window(unit, chrono_tz::TZ_VARIANTS[index], now);
        }
    }

    #[test]
    fn ceil_secs_rounds_up() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(3)), 3);
        assert_eq!(ceil_secs(Duration::from_millis(3_001)), 4);
    }
}
