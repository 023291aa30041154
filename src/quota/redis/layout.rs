//! Where a request's counters live in Redis, and the script arguments describing them.
//!
//! # Keys
//!
//! Every key is `tg:v1:{<tag>}:<kind>:<id>`. The `v1` matches the scripts' version: scripts of
//! a later layout use `v2` keys, so during a rolling upgrade old and new instances never read
//! each other's data (each seeds its own from the ledger).
//!
//! # Hash tag (Redis Cluster)
//!
//! A reserve touches every counter of the request — its key's, its user's, its tenant's and
//! its plan's — in one script, so all of them must hash to one slot. The tag is the request's
//! *widest subject*: `{t:<tenant>}` when one of its limits belongs to a tenant, else
//! `{u:<user>}`, else `{k:<key>}` ([`hash_tag`]). A user's counter is then stored under its
//! tenant's tag, and every request that touches it carries that same tag, provided:
//!
//! * **every key of a user belongs to the user's tenant.** A user whose keys sit in two tenants
//!   would have one copy of each user counter per tenant, each seeded from the whole ledger
//!   but then counting only its tenant's traffic: the user's limits could be overrun by up to
//!   one allowance per extra tenant.
//! * **the widest subject is visible in the limits.** Only the limits that apply to a request
//!   are passed; if a tenant has limits for some upstreams only (`usd:day@anthropic=…`), a
//!   request to another upstream carries no tenant limit and would pick the user's tag. Pass a
//!   [`SubjectRoots`] (the key directory) to [`super::RedisStore::with_subject_roots`] to
//!   resolve the tag from the principal instead; without it, give each tenant (and each user
//!   with a tenant) at least one unscoped limit, or use a single node, where tags don't matter.
//!
//! A tag change (a tenant limit added to a tenant that had none) only moves counters: the new
//! ones are seeded from the ledger; the old ones expire (calendar/rolling) or linger unused.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::quota::Subject;
use crate::quota::store::{Amounts, AppliedLimit};
use crate::quota::window::{Window, calendar_bounds};

/// Version of the key layout and the scripts using it.
pub const PREFIX: &str = "tg:v1:";

/// Resolves a subject to the widest subject above it: a key to its tenant (else its user,
/// else itself), a user to its tenant (else itself).
pub trait SubjectRoots: Send + Sync {
    fn root_of(&self, subject: &Subject) -> Subject;
}

fn rank(s: &Subject) -> u8 {
    match s {
        Subject::Key(_) => 0,
        Subject::User(_) => 1,
        Subject::Tenant(_) => 2,
    }
}

/// The widest subject among `limits`, if any.
pub fn widest_subject(limits: &[AppliedLimit]) -> Option<&Subject> {
    limits.iter().map(|l| &l.subject).max_by_key(|s| rank(s))
}

/// The hash tag (without braces) of a subject.
pub fn subject_tag(s: &Subject) -> String {
    match s {
        Subject::Key(k) => format!("k:{k}"),
        Subject::User(u) => format!("u:{u}"),
        Subject::Tenant(t) => format!("t:{t}"),
    }
}

/// The hash tag of a request with these limits (see the module docs), or `None` without
/// limits.
pub fn hash_tag(limits: &[AppliedLimit]) -> Option<String> {
    widest_subject(limits).map(subject_tag)
}

/// Identity of a counter: subject, metric, window and scope (the cap is not part of it, so
/// raising a cap keeps what was used).
pub fn counter_id(l: &AppliedLimit) -> String {
    let spec = &l.spec;
    match &spec.upstream {
        Some(up) => format!(
            "{}|{}:{}@{up}",
            l.subject.as_text(),
            spec.metric.as_str(),
            spec.window
        ),
        None => format!(
            "{}|{}:{}",
            l.subject.as_text(),
            spec.metric.as_str(),
            spec.window
        ),
    }
}

/// The keys and arguments of one request's counters.
#[derive(Debug, Clone)]
pub struct Plan {
    pub tag: String,
    /// Distinct counters, in first-seen order; each with the first limit naming it.
    pub counters: Vec<AppliedLimit>,
    /// For each limit of the request (same order): the index of its counter.
    pub limit_counter: Vec<usize>,
    pub limits: Vec<AppliedLimit>,
}

impl Plan {
    pub fn new(tag: String, limits: &[AppliedLimit]) -> Plan {
        let mut ids: Vec<String> = Vec::new();
        let mut counters = Vec::new();
        let mut limit_counter = Vec::with_capacity(limits.len());
        for l in limits {
            let id = counter_id(l);
            match ids.iter().position(|x| *x == id) {
                Some(i) => limit_counter.push(i),
                None => {
                    ids.push(id);
                    counters.push(l.clone());
                    limit_counter.push(counters.len() - 1);
                }
            }
        }
        Plan {
            tag,
            counters,
            limit_counter,
            limits: limits.to_vec(),
        }
    }

    fn key(&self, kind: &str, rest: &str) -> String {
        format!("{PREFIX}{{{}}}:{kind}:{rest}", self.tag)
    }

    pub fn hold_key(&self, trace: &str) -> String {
        self.key("h", trace)
    }

    pub fn done_key(&self, trace: &str) -> String {
        self.key("d", trace)
    }

    pub fn seq_key(&self) -> String {
        format!("{PREFIX}{{{}}}:seq", self.tag)
    }

    pub fn data_key(&self, i: usize) -> String {
        self.counters
            .get(i)
            .map(|l| self.key("c", &counter_id(l)))
            .unwrap_or_default()
    }

    /// The common KEYS of reserve/settle/release/usage/touch: hold, done, seq, then data,
    /// res, exp per counter.
    pub fn keys(&self, trace: &str) -> Vec<String> {
        let mut keys = Vec::with_capacity(3 + 3 * self.counters.len());
        keys.push(self.hold_key(trace));
        keys.push(self.done_key(trace));
        keys.push(self.seq_key());
        for l in &self.counters {
            let id = counter_id(l);
            keys.push(self.key("c", &id));
            keys.push(self.key("r", &id));
            keys.push(self.key("x", &id));
        }
        keys
    }

    /// The 4 per-counter ARGV fields (kind, a, b, amount) with calendar windows taken at `now`.
    pub fn counter_args(&self, now: DateTime<Utc>, tz: Tz, amounts: Amounts) -> Vec<String> {
        let mut out = Vec::with_capacity(4 * self.counters.len());
        for l in &self.counters {
            let (kind, a, b) = window_args(l.spec.window, now, tz);
            out.push(kind.to_string());
            out.push(a.to_string());
            out.push(b.to_string());
            out.push(amounts.for_spec(&l.spec).to_string());
        }
        out
    }
}

/// `(kind, a, b)` of a window as the scripts take it.
pub fn window_args(window: Window, now: DateTime<Utc>, tz: Tz) -> (&'static str, i64, i64) {
    match window {
        Window::Calendar(unit) => {
            let (start, end) = calendar_bounds(unit, now, tz);
            ("c", start.timestamp(), end.timestamp())
        }
        Window::Rolling(r) => ("r", r.bucket_secs(), 0),
        Window::Total => ("t", 0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn lim(subject: Subject, spec: &str) -> AppliedLimit {
        AppliedLimit {
            subject,
            spec: crate::quota::limit::LimitSpec::from_str(spec).unwrap(),
            plan: None,
        }
    }

    #[test]
    fn tag_is_the_widest_subject() {
        let k = lim(Subject::Key("k1".into()), "requests:minute=5");
        let u = lim(Subject::User("u1".into()), "usd:day=5");
        let t = lim(Subject::Tenant("acme".into()), "tokens:month=100");
        assert_eq!(hash_tag(std::slice::from_ref(&k)).as_deref(), Some("k:k1"));
        assert_eq!(hash_tag(&[k.clone(), u.clone()]).as_deref(), Some("u:u1"));
        assert_eq!(hash_tag(&[t, k, u]).as_deref(), Some("t:acme"));
        assert_eq!(hash_tag(&[]), None);
    }

    #[test]
    fn limits_sharing_a_counter_share_its_keys() {
        let k = Subject::Key("k1".into());
        let a = lim(k.clone(), "requests:minute=5");
        let mut b = lim(k.clone(), "requests:minute=9");
        b.plan = Some("gold".into());
        let c = lim(k, "requests:minute@openai=9");
        let plan = Plan::new("k:k1".into(), &[a, b, c]);
        assert_eq!(plan.counters.len(), 2);
        assert_eq!(plan.limit_counter, vec![0, 0, 1]);
        let keys = plan.keys("tr");
        assert_eq!(keys.len(), 3 + 6);
        assert_eq!(keys[0], "tg:v1:{k:k1}:h:tr");
        assert_eq!(keys[3], "tg:v1:{k:k1}:c:key:k1|requests:minute");
        assert_eq!(keys[6], "tg:v1:{k:k1}:c:key:k1|requests:minute@openai");
        // Every key carries the same hash tag.
        assert!(keys.iter().all(|k| k.starts_with("tg:v1:{k:k1}:")));
    }
}
