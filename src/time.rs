//! Timestamps as stored in the ledger: UTC, fixed-width text with microseconds, so that
//! text order equals time order (SQLite compares them as strings).

use chrono::{DateTime, SecondsFormat, Utc};

pub fn now() -> DateTime<Utc> {
    Utc::now()
}

/// `2026-11-22T01:02:03.123456Z`
pub fn to_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub fn now_text() -> String {
    to_text(now())
}

/// Parse any RFC 3339 timestamp back to UTC.
pub fn from_text(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The start of the UTC hour containing `t`.
pub fn hour_floor(t: DateTime<Utc>) -> DateTime<Utc> {
    let secs = t.timestamp().div_euclid(3_600) * 3_600;
    DateTime::from_timestamp(secs, 0).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_sorts() {
        let a = now();
        let b = a + chrono::Duration::microseconds(1);
        assert_eq!(from_text(&to_text(a)), Some(a.with_nanosecond_floor()));
        assert!(to_text(a) < to_text(b));
    }

    trait Floor {
        fn with_nanosecond_floor(self) -> Self;
    }
    impl Floor for DateTime<Utc> {
        fn with_nanosecond_floor(self) -> Self {
            use chrono::Timelike;
            self.with_nanosecond(self.nanosecond() / 1000 * 1000)
                .unwrap()
        }
    }
}
