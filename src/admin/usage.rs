//! `/admin/usage` (live usage of a key, user or tenant, SPEC §2 shape),
//! `/admin/transactions` (ledger rows, newest first, paged) and `/admin/spend` (sums over
//! the ledger of record, [`crate::spend`]).
//!
//! Paging: rows are ordered by `started_at` then `trace_id`, both descending. `next_cursor`
//! encodes the last row's `(started_at, trace_id)`, so the next page starts exactly after
//! it even when several rows share one microsecond; `before=<time>` is the simple form for
//! people (rows started strictly before that time), which can skip rows tied with the
//! boundary. Exactness holds while fewer than [`MAX_PAGE`] rows share one `started_at`
//! microsecond — far above what one instance can admit in a microsecond.

use std::str::FromStr;

use base64::Engine as _;
use hyper::StatusCode;

use super::{AdminError, Query, Resp, json};
use crate::engine::Engine;
use crate::keys::Subject;
use crate::ledger::{Ledger, LedgerError, Transaction, TxFilter};
use crate::quota::store::AppliedLimit;
use crate::spend::{SpendError, SpendParams, SpendStore};

/// Rows per page unless `limit` says otherwise.
pub const DEFAULT_PAGE: usize = 100;
/// Largest `limit`. Half of what one ledger query returns, leaving room to step over rows
/// tied with the cursor.
pub const MAX_PAGE: usize = 500;
/// Most rows one [`Ledger::list`] call returns.
const LIST_CAP: usize = 1000;

pub(super) async fn usage(engine: &Engine, q: &Query) -> Result<Resp, AdminError> {
    q.only(&["key", "user", "tenant"])?;
    let given: Vec<Subject> = [
        q.get("key").map(|v| Subject::Key(v.into())),
        q.get("user").map(|v| Subject::User(v.into())),
        q.get("tenant").map(|v| Subject::Tenant(v.into())),
    ]
    .into_iter()
    .flatten()
    .collect();
    let [subject] = given.as_slice() else {
        return Err(AdminError::BadRequest(
            "pass exactly one of key=, user= or tenant=".into(),
        ));
    };
    let dir = engine.authenticator().directory();
    // Names a failure of the quota store in the answer and the log.
    let trace_id = uuid::Uuid::now_v7().to_string();
    let body = match subject {
        Subject::Key(k) => match dir.by_id(k) {
            Some((p, _)) => engine.usage_json_for(&p, &trace_id).await,
            None => return Err(AdminError::NotFound(format!("no key with id `{k}`"))),
        },
        s => {
            let limits: Vec<AppliedLimit> = dir
                .limits_of(s)
                .iter()
                .map(|spec| AppliedLimit {
                    subject: s.clone(),
                    spec: spec.clone(),
                    plan: None,
                })
                .collect();
            engine.usage_json(&limits, &trace_id).await
        }
    };
    Ok(json(StatusCode::OK, &body))
}

/// Where a page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Start {
    Newest,
    /// Rows started strictly before this time.
    Before(String),
    /// Rows after this one in the listing order.
    After {
        started_at: String,
        trace_id: String,
    },
}

/// A timestamp parameter in the ledger's own text form, so text order is time order.
fn timestamp(name: &str, v: &str) -> Result<String, AdminError> {
    crate::time::from_text(v)
        .map(crate::time::to_text)
        .ok_or_else(|| {
            AdminError::BadRequest(format!(
                "`{name}` must be an RFC 3339 time such as 2026-01-31T00:00:00Z, got `{v}`"
            ))
        })
}

fn encode_cursor(t: &Transaction) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}|{}", t.started_at, t.trace_id))
}

fn decode_cursor(s: &str) -> Result<Start, AdminError> {
    let bad = || AdminError::BadRequest("`cursor` is not a cursor this API returned".into());
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    // The timestamp never contains `|`; the trace id may.
    let (started_at, trace_id) = text.split_once('|').ok_or_else(bad)?;
    if crate::time::from_text(started_at).is_none() || trace_id.is_empty() {
        return Err(bad());
    }
    Ok(Start::After {
        started_at: started_at.to_string(),
        trace_id: trace_id.to_string(),
    })
}

impl From<LedgerError> for AdminError {
    fn from(e: LedgerError) -> AdminError {
        match e {
            LedgerError::Invalid(m) => AdminError::BadRequest(m),
            LedgerError::Unavailable(m) => AdminError::Unavailable(m),
        }
    }
}

/// One page of at most `limit` rows, and the cursor of the next page if there is one.
async fn page(
    ledger: &dyn Ledger,
    key: Option<String>,
    since: Option<String>,
    start: &Start,
    limit: usize,
) -> Result<(Vec<Transaction>, Option<String>), AdminError> {
    let want = limit + 1;
    let before = match start {
        Start::Newest => None,
        Start::Before(t) => Some(t.clone()),
        // `Ledger::list` keeps rows strictly before `before`; DEL sorts after every
        // character of a timestamp, so this keeps the rows tied with the cursor's time.
        Start::After { started_at, .. } => Some(format!("{started_at}\u{7f}")),
    };
    let mut fetch = want;
    loop {
        let rows = ledger
            .list(&TxFilter {
                key_id: key.clone(),
                since: since.clone(),
                before: before.clone(),
                limit: fetch,
            })
            .await?;
        let exhausted = rows.len() < fetch;
        // Rows tied with the cursor's time and at or above its trace id were on earlier
        // pages; in listing order they come first.
        let skip = match start {
            Start::After {
                started_at,
                trace_id,
            } => rows
                .iter()
                .take_while(|r| &r.started_at == started_at && &r.trace_id >= trace_id)
                .count(),
            _ => 0,
        };
        if rows.len() - skip >= want || exhausted || fetch >= LIST_CAP {
            let mut kept: Vec<Transaction> = rows.into_iter().skip(skip).collect();
            let more = kept.len() > limit || !exhausted;
            kept.truncate(limit);
            let next = if more {
                kept.last().map(encode_cursor)
            } else {
                None
            };
            return Ok((kept, next));
        }
        fetch = (want + skip).min(LIST_CAP);
    }
}

pub(super) async fn transactions(ledger: &dyn Ledger, q: &Query) -> Result<Resp, AdminError> {
    q.only(&["key", "since", "before", "cursor", "limit"])?;
    let limit = match q.get("limit") {
        None => DEFAULT_PAGE,
        Some(v) => match usize::from_str(v) {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(AdminError::BadRequest(format!(
                    "`limit` must be an integer from 1 to {MAX_PAGE}, got `{v}`"
                )));
            }
        },
    };
    let since = q.get("since").map(|v| timestamp("since", v)).transpose()?;
    let start = match (q.get("before"), q.get("cursor")) {
        (Some(_), Some(_)) => {
            return Err(AdminError::BadRequest(
                "pass `before` or `cursor`, not both".into(),
            ));
        }
        (Some(b), None) => Start::Before(timestamp("before", b)?),
        (None, Some(c)) => decode_cursor(c)?,
        (None, None) => Start::Newest,
    };
    let key = q.get("key").map(str::to_string);
    let (rows, next) = page(ledger, key, since, &start, limit).await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"transactions": rows, "next_cursor": next}),
    ))
}

pub(super) async fn spend(
    engine: &Engine,
    store: &dyn SpendStore,
    q: &Query,
) -> Result<Resp, AdminError> {
    q.only(&SpendParams::NAMES)?;
    let params = SpendParams::from_lookup(|n| q.get(n));
    let tz = engine.config().quota.timezone;
    match crate::spend::report(store, &params, chrono::Utc::now(), tz).await {
        Ok(v) => Ok(json(StatusCode::OK, &v)),
        Err(SpendError::Invalid(m)) => Err(AdminError::BadRequest(m)),
        Err(e @ SpendError::Unavailable(_)) => Err(AdminError::Unavailable(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;

    fn row(trace: &str, at: &str, key: &str) -> Transaction {
        Transaction {
            trace_id: trace.into(),
            key_id: key.into(),
            upstream: "openai".into(),
            model: "gpt-4o-mini".into(),
            status: "reserved".into(),
            started_at: at.into(),
            instance_id: "i".into(),
            ..Default::default()
        }
    }

    /// Walk every page with the cursor and return the trace ids in order.
    async fn walk(ledger: &dyn Ledger, key: Option<&str>, limit: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut start = Start::Newest;
        loop {
            let (rows, next) = page(ledger, key.map(str::to_string), None, &start, limit)
                .await
                .unwrap();
            assert!(rows.len() <= limit);
            out.extend(rows.into_iter().map(|r| r.trace_id));
            match next {
                Some(n) => start = decode_cursor(&n).unwrap(),
                None => return out,
            }
        }
    }

    #[tokio::test]
    async fn cursor_pages_visit_every_row_once_even_with_tied_times() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::Db::open(&dir.path().join("t.db"), Durability::Normal).unwrap();
        let expected = db
            .call(|c| {
                let mut expected = Vec::new();
                // 7 rows share one microsecond; 5 more are spread out; one of another key.
                let tied = "2026-03-01T10:00:00.000001Z";
                for i in 0..7 {
                    crate::ledger::sqlite::open_reservation(
                        c,
                        &row(&format!("t{i}"), tied, "k_a"),
                    )?;
                }
                for i in 0..5 {
                    let at = format!("2026-03-01T1{}:00:00.000000Z", i + 1);
                    crate::ledger::sqlite::open_reservation(c, &row(&format!("u{i}"), &at, "k_a"))?;
                }
                crate::ledger::sqlite::open_reservation(c, &row("other", tied, "k_b"))?;
                for i in (0..5).rev() {
                    expected.push(format!("u{i}"));
                }
                for i in (0..7).rev() {
                    expected.push(format!("t{i}"));
                }
                Ok(expected)
            })
            .await
            .unwrap();
        let ledger = crate::ledger::sqlite::SqliteLedger::new(db.clone());
        for limit in [1, 2, 3, 5, 12, 100] {
            assert_eq!(
                walk(&ledger, Some("k_a"), limit).await,
                expected,
                "limit {limit}"
            );
        }
        let others: Vec<String> = walk(&ledger, None, 4)
            .await
            .into_iter()
            .filter(|t| t == "other")
            .collect();
        assert_eq!(others, vec!["other".to_string()]);
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let t = row("k_1:idem|with|bars", "2026-03-01T10:00:00.000001Z", "k_1");
        assert_eq!(
            decode_cursor(&encode_cursor(&t)).unwrap(),
            Start::After {
                started_at: t.started_at.clone(),
                trace_id: t.trace_id.clone()
            }
        );
        assert!(decode_cursor("not base64!").is_err());
        let no_time = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("yesterday|t");
        assert!(decode_cursor(&no_time).is_err());
    }

    #[test]
    fn timestamps_are_normalised_to_ledger_text() {
        assert_eq!(
            timestamp("since", "2026-03-01T12:00:00+02:00").unwrap(),
            "2026-03-01T10:00:00.000000Z"
        );
        assert!(timestamp("since", "2026-03-01").is_err());
    }
}
