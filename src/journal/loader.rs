//! Counter rebuild in shared mode: the Postgres ledger's settled rows of a window plus this
//! instance's journaled rows that have not shipped yet.
//!
//! Nothing is counted twice or missed: the journal is read *first* — the latest row of
//! every trace id with an unshipped event — and those trace ids are excluded from the
//! Postgres sum. A trace id shipped between the two reads is therefore counted once, from
//! the journal; an event appended after the journal read is a settle racing the load,
//! which the memory store detects and reloads for (see [`crate::quota::memory`]).
//!
//! Bound on what a rebuild can miss: settles that *other* instances have journaled but not
//! yet shipped. With Postgres up their shippers run within milliseconds of each settle,
//! so the miss is the few settles in flight across the fleet; while Postgres is down it
//! grows to every settle other instances made since it went down, and it is made good at
//! the next rebuild after their backlogs ship (`tollgate reconcile --fix`).
//!
//! If Postgres is unreachable when a counter is first needed, the rebuild falls back to
//! this instance's local trace index (its settled rows of the retention period) and logs
//! a warning: it then misses other instances' usage and anything older than
//! `storage.journal_retention`, until `reconcile --fix` reloads it.

use chrono::{DateTime, TimeZone, Utc};

use crate::keys::Subject;
use crate::ledger::Transaction;
use std::sync::Arc;

use crate::journal::outbox::{self, Reader};
use crate::ledger::postgres::PgLedger;
use crate::quota::fallback::LastKnown;
use crate::quota::memory::CounterLoader;
use crate::quota::store::{Amounts, AppliedLimit, QuotaError};
use crate::quota::window::{Counter, Window};

pub struct SharedLoader {
    pg: PgLedger,
    reader: Reader,
    degraded: Degraded,
}

/// What a load does when the ledger of record cannot be read.
#[derive(Clone)]
enum Degraded {
    /// This instance's journal alone (local counters, dropped when Redis is back).
    JournalOnly,
    /// The journal, never below the last state the shared store reported; nothing known
    /// of the counter → refuse (fail closed). For counters written into Redis, which
    /// outlive the outage.
    NotBelow(Arc<LastKnown>),
    /// Refuse (`reconcile`: comparing with or fixing from a partial ledger would lie).
    Refuse,
}

impl SharedLoader {
    pub fn new(pg: PgLedger, reader: Reader) -> SharedLoader {
        SharedLoader {
            pg,
            reader,
            degraded: Degraded::JournalOnly,
        }
    }

    /// A loader for the shared store's counters: with the ledger of record unreachable it
    /// never goes below `known`, and refuses a counter it knows nothing of.
    pub fn not_below(mut self, known: Arc<LastKnown>) -> SharedLoader {
        self.degraded = Degraded::NotBelow(known);
        self
    }

    /// A loader that refuses while the ledger of record is unreachable.
    pub fn strict(mut self) -> SharedLoader {
        self.degraded = Degraded::Refuse;
        self
    }
}

fn belongs(row: &Transaction, subject: &Subject) -> bool {
    match subject {
        Subject::Key(k) => &row.key_id == k,
        Subject::User(u) => row.user_id.as_ref() == Some(u),
        Subject::Tenant(t) => row.tenant_id.as_ref() == Some(t),
    }
}

/// Add the settled `rows` of `limit`'s subject, scope and window to `counter`.
fn add_rows<'a>(
    limit: &AppliedLimit,
    rows: impl Iterator<Item = &'a Transaction>,
    since: Option<DateTime<Utc>>,
    counter: &mut Counter,
    now: DateTime<Utc>,
) {
    for row in rows {
        if row.status != "settled" || !belongs(row, &limit.subject) {
            continue;
        }
        if limit
            .spec
            .upstream
            .as_ref()
            .is_some_and(|u| u != &row.upstream)
        {
            continue;
        }
        let Some(started) = crate::time::from_text(&row.started_at) else {
            continue;
        };
        if since.is_some_and(|s| started < s) {
            continue;
        }
        let amount = Amounts {
            requests: 1,
            input_tokens: row.input_tokens,
            output_tokens: row.output_tokens,
            cost_micros: row.cost_micros,
        }
        .for_spec(&limit.spec);
        // Same attribution as the embedded loader: rolling windows by start time, the
        // others at the window start (or now for `total`).
        let at = match limit.spec.window {
            Window::Rolling(_) => started,
            _ => since.unwrap_or(now),
        };
        counter.add(at, amount, now);
    }
}

#[async_trait::async_trait]
impl CounterLoader for SharedLoader {
    async fn load(
        &self,
        limit: &AppliedLimit,
        counter: &mut Counter,
        now: DateTime<Utc>,
    ) -> Result<(), QuotaError> {
        let since = match limit.spec.window {
            Window::Total => None,
            _ => counter.window_start(now),
        };
        // 1. The journal first (see the module doc for why the order matters).
        let pending = self
            .reader
            .read(outbox::pending_rows)
            .await
            .map_err(|e| QuotaError::Unavailable(format!("journal: {e}")))?;
        let mine: Vec<&Transaction> = pending
            .iter()
            .filter(|r| belongs(r, &limit.subject))
            .collect();
        let exclude: Vec<String> = mine.iter().map(|r| r.trace_id.clone()).collect();
        // 2. The ledger of record, without those trace ids.
        let rolling = matches!(limit.spec.window, Window::Rolling(_));
        let sums = self
            .pg
            .settled_sums(
                &limit.subject,
                limit.spec.metric,
                limit.spec.upstream.as_deref(),
                since.map(crate::time::to_text),
                &exclude,
                rolling,
            )
            .await;
        let pg_failed = sums.is_err();
        match sums {
            Ok(rows) => {
                for (at, amount) in rows {
                    let at = match at {
                        Some(us) if rolling => Utc.timestamp_micros(us).single().unwrap_or(now),
                        _ => since.unwrap_or(now),
                    };
                    counter.add(at, amount, now);
                }
            }
            Err(e) => {
                if matches!(self.degraded, Degraded::Refuse) {
                    return Err(QuotaError::Unavailable(format!(
                        "the ledger of record is unreachable: {e}"
                    )));
                }
                tracing::warn!(
                    limit = %limit.describe(),
                    error = %e,
                    "postgres unavailable for a counter rebuild; using this instance's journal (other instances' usage is missing until `tollgate reconcile --fix`)"
                );
                let local = self
                    .reader
                    .read(outbox::settled_rows)
                    .await
                    .map_err(|e| QuotaError::Unavailable(format!("journal: {e}")))?;
                add_rows(
                    limit,
                    local.iter().filter(|r| !exclude.contains(&r.trace_id)),
                    since,
                    counter,
                    now,
                );
            }
        }
        // 3. This instance's unshipped rows.
        add_rows(limit, mine.into_iter(), since, counter, now);
        // 4. Postgres unreachable and the counter outlives the outage: never below what
        // the shared store last reported, and nothing known → refuse.
        if pg_failed && let Degraded::NotBelow(known) = &self.degraded {
            let start = counter.window_start(now);
            match known.known(limit, start) {
                Some(k) => {
                    let have = counter.used(now);
                    if k > have {
                        counter.add(start.unwrap_or(now), k - have, now);
                    }
                }
                None => {
                    return Err(QuotaError::Other(format!(
                        "cannot rebuild {}: the ledger of record is unreachable and nothing is known of this counter; refused until it is back",
                        limit.describe()
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn row(key: &str, status: &str, cost: i64, upstream: &str) -> Transaction {
        Transaction {
            trace_id: format!("{key}-{cost}"),
            key_id: key.into(),
            user_id: Some("u".into()),
            upstream: upstream.into(),
            model: "m".into(),
            status: status.into(),
            input_tokens: 3,
            output_tokens: 4,
            cost_micros: cost,
            started_at: crate::time::now_text(),
            instance_id: "i".into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_settled_rows_of_the_subject_and_scope_count() {
        let limit = AppliedLimit {
            subject: Subject::User("u".into()),
            spec: crate::quota::LimitSpec::from_str("usd:day@openai=5").unwrap(),
            plan: None,
        };
        let now = Utc::now();
        let mut c = Counter::new(limit.spec.window, chrono_tz::UTC);
        let since = c.window_start(now);
        let rows = [
            row("k1", "settled", 10, "openai"),
            row("k2", "settled", 20, "openai"),
            row("k1", "reserved", 40, "openai"),
            row("k1", "settled", 80, "anthropic"),
        ];
        add_rows(&limit, rows.iter(), since, &mut c, now);
        assert_eq!(c.used(now), 30);
        let tokens = AppliedLimit {
            subject: Subject::Key("k1".into()),
            spec: crate::quota::LimitSpec::from_str("tokens:total=100").unwrap(),
            plan: None,
        };
        let mut c = Counter::new(tokens.spec.window, chrono_tz::UTC);
        add_rows(&tokens, rows.iter(), None, &mut c, now);
        assert_eq!(c.used(now), 14);
    }
}
