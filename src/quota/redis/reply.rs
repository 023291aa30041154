//! Decoding of the scripts' replies: `{status, server time ms, ...}` arrays.

use ::redis::Value;
use chrono::{DateTime, Utc};

use crate::quota::store::QuotaError;

/// One counter as a script reports it: `{reserved, used, [bucket index, amount]...}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawState {
    pub reserved: i64,
    pub used: i64,
    /// Counted non-empty rolling buckets (empty for calendar and total counters).
    pub buckets: Vec<(i64, i64)>,
}

/// A decoded reply.
#[derive(Debug)]
pub struct Reply {
    pub status: String,
    pub now: DateTime<Utc>,
    pub now_ms: i64,
    pub rest: Vec<Value>,
}

fn bad(what: &str) -> QuotaError {
    QuotaError::Other(format!("unexpected script reply: {what}"))
}

pub fn int(v: &Value) -> Result<i64, QuotaError> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("not an integer")),
        Value::SimpleString(s) => s.parse().map_err(|_| bad("not an integer")),
        _ => Err(bad("not an integer")),
    }
}

fn text(v: &Value) -> Result<String, QuotaError> {
    match v {
        Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Okay => Ok("OK".into()),
        _ => Err(bad("status is not a string")),
    }
}

/// A 1-based index from a script, as a 0-based index below `len`.
pub fn index(v: &Value, len: usize) -> Result<usize, QuotaError> {
    let i = int(v)?;
    usize::try_from(i)
        .ok()
        .and_then(|i| i.checked_sub(1))
        .filter(|i| *i < len)
        .ok_or_else(|| bad("index out of range"))
}

pub fn states(v: &Value) -> Result<Vec<RawState>, QuotaError> {
    let Value::Array(items) = v else {
        return Err(bad("states are not an array"));
    };
    items
        .iter()
        .map(|s| {
            let Value::Array(f) = s else {
                return Err(bad("state is not an array"));
            };
            if f.len() < 2 || f.len() % 2 != 0 {
                return Err(bad("state has the wrong length"));
            }
            let buckets = f[2..]
                .chunks(2)
                .map(|p| Ok((int(&p[0])?, int(&p[1])?)))
                .collect::<Result<Vec<_>, QuotaError>>()?;
            Ok(RawState {
                reserved: int(&f[0])?,
                used: int(&f[1])?,
                buckets,
            })
        })
        .collect()
}

pub fn parse(v: Value) -> Result<Reply, QuotaError> {
    let Value::Array(mut items) = v else {
        return Err(bad("not an array"));
    };
    if items.len() < 2 {
        return Err(bad("too short"));
    }
    let rest = items.split_off(2);
    let status = text(&items[0])?;
    let now_ms = int(&items[1])?;
    let now = DateTime::from_timestamp_millis(now_ms).ok_or_else(|| bad("time out of range"))?;
    Ok(Reply {
        status,
        now,
        now_ms,
        rest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_status_time_and_states() {
        let v = Value::Array(vec![
            Value::BulkString(b"OK".to_vec()),
            Value::Int(1_700_000_000_123),
            Value::Array(vec![
                Value::Array(vec![Value::Int(3), Value::Int(10)]),
                Value::Array(vec![
                    Value::Int(0),
                    Value::Int(7),
                    Value::Int(100),
                    Value::Int(4),
                    Value::Int(101),
                    Value::Int(3),
                ]),
            ]),
        ]);
        let r = parse(v).unwrap();
        assert_eq!(r.status, "OK");
        assert_eq!(r.now.timestamp_millis(), 1_700_000_000_123);
        let s = states(&r.rest[0]).unwrap();
        assert_eq!(s[0].reserved, 3);
        assert_eq!(s[1].buckets, vec![(100, 4), (101, 3)]);
        assert!(index(&Value::Int(0), 2).is_err());
        assert_eq!(index(&Value::Int(2), 2).unwrap(), 1);
        assert!(parse(Value::Int(1)).is_err());
    }
}
