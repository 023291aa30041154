//! `tollgate rerate`: what settled rows would cost under the current price table, and the
//! adjustment rows that bring the ledger to it (SPEC §4 "Price versions").
//!
//! A settled row is never rewritten. Re-rating a row appends an **adjustment row**: its own
//! trace id, the original's key, user, tenant, upstream, model and `started_at` (so it falls
//! in the same windows and report periods), `status = 'settled'`, zero tokens,
//! `cost_micros` = the difference (negative when the price went down), `price_version` = the
//! version that priced the difference, and `adjusts` = the original's trace id. Counters and
//! reports then include it like any settled row; it is never counted as a request.
//!
//! What a row has been billed so far is its own cost plus its earlier adjustments; the
//! difference is the current entry's cost of the row's recorded usage minus that. The
//! adjustment's trace id is derived from the original trace id, the new version and the
//! number of adjustments the row already has (`rerate:<version>:<n>:<trace id>`), so:
//! - running it again finds a difference of 0 and writes nothing (idempotent);
//! - two runs racing compute the same trace id, and the ledger keeps one;
//! - a price that changes back later gets a new adjustment, not a collision.
//!
//! Rows without a `price_version` (settled before versions were recorded, an unknown model
//! billed under `unknown_model = "free"`, a reservation recovered after a crash and billed at
//! its hold) are skipped: what priced them is not known exactly. So are rows whose model has
//! no entry in the current table.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use crate::api::{Modifiers, Usage};
use crate::billing::table::PriceTable;
use crate::ledger::Transaction;
use crate::money::{Micros, format_usd};

/// `instance_id` of adjustment rows.
pub const INSTANCE: &str = "rerate";

/// Which settled rows to re-rate: `started_at` in `[since, until)`, optionally one model.
/// Times are ledger text ([`crate::time::to_text`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub since: String,
    pub until: Option<String>,
    pub model: Option<String>,
}

/// What the rows of one trace id have been billed so far beyond the row itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Adjusted {
    /// Sum of the earlier adjustments' `cost_micros`.
    pub micros: Micros,
    /// How many earlier adjustments there are.
    pub count: u64,
}

/// Per model: rows re-rated, what they were billed (adjustments included), what they cost
/// now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelSummary {
    pub rows: u64,
    pub old_total: Micros,
    pub new_total: Micros,
}

/// The outcome of re-rating a set of rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub models: BTreeMap<String, ModelSummary>,
    /// The adjustment rows to write (one per row whose cost changed).
    pub adjustments: Vec<Transaction>,
    /// Rows without a recorded price version.
    pub skipped_unversioned: u64,
    /// Rows whose model has no entry in the current table.
    pub skipped_unpriced: u64,
}

/// The usage a settled row records, as the cost formula reads it.
fn usage_of(row: &Transaction) -> Usage {
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    Usage {
        input_tokens: n(row.input_tokens),
        cached_input_tokens: n(row.cached_input_tokens),
        cache_write_tokens: n(row.cache_write_tokens),
        cache_write_1h_tokens: n(row.cache_write_1h_tokens),
        audio_input_tokens: n(row.audio_input_tokens),
        output_tokens: n(row.output_tokens),
        reasoning_tokens: n(row.reasoning_tokens),
        audio_output_tokens: n(row.audio_output_tokens),
        tool_calls: n(row.tool_calls),
        served: Modifiers {
            service_tier: row.service_tier.clone(),
            speed: row.speed.clone(),
            inference_geo: row.inference_geo.clone(),
        },
    }
}

/// The trace id of the adjustment that re-rates `trace_id` to `version` when it already has
/// `earlier` adjustments.
pub fn adjustment_trace_id(trace_id: &str, version: &str, earlier: u64) -> String {
    format!("rerate:{version}:{earlier}:{trace_id}")
}

/// Re-rate `rows` (settled request rows; adjustment rows are ignored) under `table`.
/// `adjusted` holds the earlier adjustments by original trace id; `now` is the adjustments'
/// `settled_at`.
pub fn plan(
    rows: &[Transaction],
    adjusted: &HashMap<String, Adjusted>,
    table: &PriceTable,
    now: &str,
) -> Plan {
    let mut out = Plan::default();
    for row in rows
        .iter()
        .filter(|r| r.status == "settled" && r.adjusts.is_none())
    {
        if row.price_version.is_none() {
            out.skipped_unversioned += 1;
            continue;
        }
        let Some(entry) = table.lookup(&row.model) else {
            out.skipped_unpriced += 1;
            continue;
        };
        let before = adjusted.get(&row.trace_id).copied().unwrap_or_default();
        let old_total = row.cost_micros.saturating_add(before.micros);
        let new_total = entry.price.cost(&usage_of(row)).micros;
        let sum = out.models.entry(row.model.clone()).or_default();
        sum.rows += 1;
        sum.old_total = sum.old_total.saturating_add(old_total);
        sum.new_total = sum.new_total.saturating_add(new_total);
        let difference = new_total.saturating_sub(old_total);
        if difference == 0 {
            continue;
        }
        out.adjustments.push(Transaction {
            trace_id: adjustment_trace_id(&row.trace_id, &entry.version, before.count),
            key_id: row.key_id.clone(),
            user_id: row.user_id.clone(),
            tenant_id: row.tenant_id.clone(),
            upstream: row.upstream.clone(),
            model: row.model.clone(),
            status: "settled".into(),
            cost_micros: difference,
            started_at: row.started_at.clone(),
            settled_at: Some(now.to_owned()),
            instance_id: INSTANCE.into(),
            price_version: Some(entry.version.clone()),
            adjusts: Some(row.trace_id.clone()),
            ..Default::default()
        });
    }
    out
}

impl Plan {
    /// `{"models": [{"model", "rows", "old_total", "new_total", "difference"}], "total": {…},
    /// "adjustments", "skipped": {"unversioned", "unpriced"}}` — USD amounts as decimal
    /// strings, like every amount of the CLI's JSON.
    pub fn to_json(&self) -> Value {
        let line = |rows: u64, old: Micros, new: Micros| {
            json!({
                "rows": rows,
                "old_total": format_usd(old),
                "new_total": format_usd(new),
                "difference": format_usd(new.saturating_sub(old)),
            })
        };
        let models: Vec<Value> = self
            .models
            .iter()
            .map(|(m, s)| {
                let mut v = line(s.rows, s.old_total, s.new_total);
                v["model"] = json!(m);
                v
            })
            .collect();
        let (rows, old, new) = self.totals();
        json!({
            "models": models,
            "total": line(rows, old, new),
            "adjustments": self.adjustments.len(),
            "skipped": {"unversioned": self.skipped_unversioned, "unpriced": self.skipped_unpriced},
        })
    }

    /// (rows, old total, new total) over every model.
    pub fn totals(&self) -> (u64, Micros, Micros) {
        self.models.values().fold((0, 0, 0), |(r, o, n), s| {
            (
                r + s.rows,
                o.saturating_add(s.old_total),
                n.saturating_add(s.new_total),
            )
        })
    }
}

/// SQLite (embedded ledger): the settled request rows of `f` and their earlier adjustments.
pub fn sqlite_rows(
    c: &rusqlite::Connection,
    f: &Filter,
) -> Result<(Vec<Transaction>, HashMap<String, Adjusted>), crate::db::DbError> {
    let rows =
        crate::ledger::sqlite::settled_in(c, &f.since, f.until.as_deref(), f.model.as_deref())?;
    let mut adjusted = HashMap::new();
    // Adjustments share their original's started_at, so the same range finds them.
    let mut st = c.prepare(
        "SELECT adjusts, SUM(cost_micros), COUNT(*) FROM billing_transactions
         WHERE adjusts IS NOT NULL AND status = 'settled' AND started_at >= ?1
           AND (?2 IS NULL OR started_at < ?2) AND (?3 IS NULL OR model = ?3)
         GROUP BY adjusts",
    )?;
    let mut q = st.query(rusqlite::params![f.since, f.until, f.model])?;
    while let Some(r) = q.next()? {
        let count: i64 = r.get(2)?;
        adjusted.insert(
            r.get::<_, String>(0)?,
            Adjusted {
                micros: r.get(1)?,
                count: u64::try_from(count).unwrap_or(0),
            },
        );
    }
    Ok((rows, adjusted))
}

/// SQLite: insert adjustment rows; a trace id already present is left alone. Returns how
/// many were written.
pub fn sqlite_write(
    c: &rusqlite::Connection,
    rows: &[Transaction],
) -> Result<usize, crate::db::DbError> {
    let tx = c.unchecked_transaction()?;
    let mut written = 0;
    for r in rows {
        written += crate::ledger::sqlite::insert_final(&tx, r)?;
    }
    tx.commit()?;
    Ok(written)
}

/// Postgres (shared mode's ledger of record): the settled request rows of `f` and their
/// earlier adjustments.
pub async fn pg_rows(
    pg: &crate::ledger::postgres::PgLedger,
    f: &Filter,
) -> Result<(Vec<Transaction>, HashMap<String, Adjusted>), crate::pg::PgError> {
    let rows = pg
        .rows_where(
            "status = 'settled' AND adjusts IS NULL AND started_at >= ($1::text)::timestamptz
             AND ($2::text IS NULL OR started_at < ($2::text)::timestamptz)
             AND ($3::text IS NULL OR model = $3)",
            &[&f.since, &f.until, &f.model],
        )
        .await?;
    let client = pg.client().await?;
    let sums = client
        .query(
            "SELECT adjusts, SUM(cost_micros)::bigint, COUNT(*) FROM billing_transactions
             WHERE adjusts IS NOT NULL AND status = 'settled'
               AND started_at >= ($1::text)::timestamptz
               AND ($2::text IS NULL OR started_at < ($2::text)::timestamptz)
               AND ($3::text IS NULL OR model = $3)
             GROUP BY adjusts",
            &[&f.since, &f.until, &f.model],
        )
        .await?;
    let adjusted = sums
        .iter()
        .map(|r| {
            let count: i64 = r.get(2);
            (
                r.get::<_, String>(0),
                Adjusted {
                    micros: r.get(1),
                    count: u64::try_from(count).unwrap_or(0),
                },
            )
        })
        .collect();
    Ok((rows, adjusted))
}

/// Postgres: insert adjustment rows in one transaction; a trace id already present is left
/// alone. Returns how many were written.
pub async fn pg_write(
    pg: &crate::ledger::postgres::PgLedger,
    rows: &[Transaction],
) -> Result<u64, crate::pg::PgError> {
    pg.insert_new_rows(rows).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PriceTable {
        // input 1, output 2 USD per 1M tokens.
        let price = crate::billing::price::Price::new(1_000_000_000, 2_000_000_000);
        PriceTable::new(
            [(
                "m".to_string(),
                price,
                crate::billing::table::Source::Config,
            )],
            None,
        )
        .unwrap()
    }

    fn row(trace: &str, input: i64, output: i64, cost: i64) -> Transaction {
        Transaction {
            trace_id: trace.into(),
            key_id: "k_1".into(),
            upstream: "openai".into(),
            model: "m".into(),
            status: "settled".into(),
            input_tokens: input,
            output_tokens: output,
            cost_micros: cost,
            started_at: "2026-12-01T00:00:00.000000Z".into(),
            price_version: Some("0000000000000000".into()),
            ..Default::default()
        }
    }

    #[test]
    fn differences_are_exact_and_a_second_pass_finds_none() {
        let t = table();
        let version = t.lookup("m").unwrap().version.clone();
        // 1000 in × 1 + 500 out × 2 = 2000 µUSD now; billed 1500 and 2000.
        let rows = vec![row("a", 1000, 500, 1500), row("b", 1000, 500, 2000)];
        let p = plan(&rows, &HashMap::new(), &t, "now");
        assert_eq!(p.adjustments.len(), 1);
        let adj = &p.adjustments[0];
        assert_eq!(adj.trace_id, format!("rerate:{version}:0:a"));
        assert_eq!(
            (adj.cost_micros, adj.input_tokens, adj.output_tokens),
            (500, 0, 0)
        );
        assert_eq!(adj.adjusts.as_deref(), Some("a"));
        assert_eq!(adj.started_at, rows[0].started_at);
        assert_eq!(p.totals(), (2, 3500, 4000));
        // Once written, the earlier adjustment makes the difference 0.
        let again = HashMap::from([(
            "a".to_string(),
            Adjusted {
                micros: 500,
                count: 1,
            },
        )]);
        let p2 = plan(&rows, &again, &t, "now");
        assert!(p2.adjustments.is_empty());
        assert_eq!(p2.totals(), (2, 4000, 4000));
        // A price that went down: a negative adjustment, numbered after the earlier one.
        let dear = HashMap::from([(
            "a".to_string(),
            Adjusted {
                micros: 900,
                count: 1,
            },
        )]);
        let p3 = plan(&rows, &dear, &t, "now");
        assert_eq!(p3.adjustments[0].cost_micros, -400);
        assert_eq!(p3.adjustments[0].trace_id, format!("rerate:{version}:1:a"));
    }

    #[test]
    fn rows_without_a_version_or_a_price_and_adjustments_are_skipped() {
        let t = table();
        let mut unversioned = row("u", 10, 10, 1);
        unversioned.price_version = None;
        let mut unknown = row("x", 10, 10, 1);
        unknown.model = "nope".into();
        let mut adj = row("rerate:v:0:a", 0, 0, 5);
        adj.adjusts = Some("a".into());
        let mut released = row("r", 10, 10, 0);
        released.status = "released".into();
        let p = plan(
            &[unversioned, unknown, adj, released],
            &HashMap::new(),
            &t,
            "now",
        );
        assert_eq!((p.skipped_unversioned, p.skipped_unpriced), (1, 1));
        assert!(p.adjustments.is_empty() && p.models.is_empty());
    }
}
