//! `tollgate reconcile`: compare live counters with the ledger and, with `--fix`, rewrite
//! the counters from the ledger. Same code in both modes; the ledger view is the journal's
//! [`crate::journal::Journal::ledger_loader`] (embedded: the SQLite ledger; shared: the
//! Postgres ledger plus this instance's unshipped journal rows).
//!
//! Every limit that applies to a known key (its own, its user's, its tenant's and its
//! plan's) is checked once per counter, key by key ([`limit_groups`]). A settle that lands between the two reads shows
//! up as a transient difference of that one request; run it again to confirm.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::engine::Engine;
use crate::quota::store::{AppliedLimit, QuotaError};
use crate::quota::window::Counter;

/// One counter that disagrees with the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub limit: AppliedLimit,
    pub counter: i64,
    pub ledger: i64,
}

impl Difference {
    fn amount(&self, v: i64) -> Value {
        if self.limit.spec.metric.is_money() {
            Value::String(crate::money::format_usd(v))
        } else {
            Value::from(v)
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "subject": self.limit.subject.as_text(),
            "spec": self.limit.spec.to_string(),
            "counter": self.amount(self.counter),
            "ledger": self.amount(self.ledger),
        })
    }
}

/// What a reconcile found (and whether it rewrote the counters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub differences: Vec<Difference>,
    pub checked: usize,
    pub fixed: bool,
}

impl Report {
    /// SPEC §2: `{"differences": [{"subject", "spec", "counter", "ledger"}]}`.
    pub fn to_json(&self) -> Value {
        json!({
            "differences": self.differences.iter().map(Difference::to_json).collect::<Vec<_>>(),
            "checked": self.checked,
            "fixed": self.fixed,
        })
    }
}

/// Every counter that applies to a known key, once each, grouped by key: the counters of
/// one group are those one request of that key touches, so a shared store finds them
/// together (in Redis, under the hash tag of that key's widest subject). One call over
/// every key's limits at once would look for all of them under one tag.
pub fn limit_groups(engine: &Engine) -> Vec<Vec<AppliedLimit>> {
    let dir = engine.authenticator().directory();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (p, _) in dir.principals() {
        let group: Vec<AppliedLimit> = engine
            .applicable_limits(p, None)
            .into_iter()
            .filter(|l| seen.insert(l.counter_key()))
            .collect();
        if !group.is_empty() {
            out.push(group);
        }
    }
    out
}

/// Every counter that applies to a known key, once each.
pub fn all_limits(engine: &Engine) -> Vec<AppliedLimit> {
    limit_groups(engine).into_iter().flatten().collect()
}

/// Compare the engine's counters with the ledger; with `fix`, rewrite the differing
/// counters from the ledger (holds of requests in flight are kept).
pub async fn reconcile(engine: &Engine, fix: bool) -> Result<Report, QuotaError> {
    let loader = engine.journal().reconcile_loader();
    let tz = engine.config().quota.timezone;
    let now = chrono::Utc::now();
    let mut report = Report::default();
    let mut to_fix: Vec<Vec<AppliedLimit>> = Vec::new();
    for group in limit_groups(engine) {
        let states = engine.store().usage(&group).await?;
        report.checked += states.len();
        let mut differing = Vec::new();
        for st in states {
            let mut fresh = Counter::new(st.limit.spec.window, tz);
            loader.load(&st.limit, &mut fresh, now).await?;
            let ledger = fresh.used(now);
            if ledger != st.used {
                differing.push(st.limit.clone());
                report.differences.push(Difference {
                    limit: st.limit,
                    counter: st.used,
                    ledger,
                });
            }
        }
        if !differing.is_empty() {
            to_fix.push(differing);
        }
    }
    // Drift is what an operator must hear about, whether or not this run fixes it.
    engine
        .metrics()
        .set_reconcile_differences(report.differences.len());
    if fix && !to_fix.is_empty() {
        for targets in &to_fix {
            engine.store().rebuild(targets).await?;
        }
        report.fixed = true;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn differences_render_money_as_decimals() {
        let d = Difference {
            limit: AppliedLimit {
                subject: crate::keys::Subject::Key("k_1".into()),
                spec: crate::quota::LimitSpec::from_str("usd:day=5").unwrap(),
                plan: None,
            },
            counter: 1_500_000,
            ledger: 2_000_000,
        };
        assert_eq!(
            d.to_json(),
            json!({"subject": "key:k_1", "spec": "usd:day=5", "counter": "1.500000", "ledger": "2.000000"})
        );
        let r = Report {
            differences: vec![d],
            checked: 3,
            fixed: false,
        };
        assert_eq!(r.to_json()["differences"].as_array().unwrap().len(), 1);
    }
}
