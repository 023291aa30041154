//! Spend reports over the ledger of record: settled rows summed by calendar period (hour,
//! day, week, month in `[quota].timezone`) and by model, upstream, key, user or tenant. The
//! admin API's `GET /admin/spend`, the usage page's charts and `tollgate report` all answer
//! from [`report`], so they show the same numbers.
//!
//! ```text
//! SpendParams (query string or CLI flags, text)
//!   └► plan(): validate, resolve times, tile the period into calendar buckets
//!        └► SpendStore::spend(plan)   sqlite::SqliteSpend (embedded ledger, own read-only
//!             │                       connection)  |  pg::PgSpend (Postgres, own pool)
//!             └► to_json(): rows, totals, released_requests, truncated
//! ```
//!
//! Both backends run the SQL [`sql`] builds, so they cannot drift apart: settled rows only,
//! `since <= started_at < until`, exact-match filters, one group per (bucket, dimension
//! values). A row belongs to the calendar bucket containing its `started_at` — the rule by
//! which limits count it — with bucket bounds from [`crate::quota::window::calendar_bounds`]
//! (weeks start on Monday; DST days last 23 or 25 hours). The first and last buckets may be
//! cut by `since` and `until`: a bucket only ever counts rows inside the asked period.
//!
//! Released rows (upstream errors, nothing billed) are not in the rows or totals; their
//! number is `released_requests`. Reservations still open (requests in flight) are in
//! neither.
//!
//! Bounds, so a report can never become a denial of service: the period is at most
//! [`MAX_RANGE_DAYS`] long and at most [`MAX_BUCKETS`] time buckets; at most `limit` rows
//! ([`MAX_ROWS`]) are returned — when more groups exist the answer says `truncated` (the
//! totals still cover every matching row); each backend runs at most [`CONCURRENT_REPORTS`]
//! reports at once; filters are at most [`MAX_FILTER_LEN`] bytes.

pub mod export;
pub mod pg;
pub mod retention;
pub mod sqlite;

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Duration, NaiveDate, SecondsFormat, Utc};
use chrono_tz::Tz;
use serde_json::{Map, Value, json};

use crate::config::{Config, StorageMode};
use crate::quota::window::{CalendarUnit, calendar_bounds, local_day_start};

/// Longest period one report covers.
pub const MAX_RANGE_DAYS: i64 = 366;
/// Most time buckets in one report (an hourly report covers at most ~41 days).
pub const MAX_BUCKETS: usize = 1000;
/// Rows returned unless `limit` says otherwise.
pub const DEFAULT_ROWS: usize = 1000;
/// Largest `limit`.
pub const MAX_ROWS: usize = 10_000;
/// The period when `since` is not given: the 7 days before `until`.
pub const DEFAULT_DAYS: i64 = 7;
/// Longest filter value (a model name is at most 256 bytes on the request path too).
pub const MAX_FILTER_LEN: usize = 256;
/// Reports one backend runs at once; more wait their turn.
pub const CONCURRENT_REPORTS: usize = 2;
/// Most UTC hours a report sums from ledger rows beside the hourly rollups; a report that
/// would cut more hours than this (bucket bounds off the hour) reads every row instead.
pub const MAX_CUT_HOURS: usize = 24;

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SpendError {
    /// A parameter is invalid (HTTP 400); the message says which and why.
    #[error("{0}")]
    Invalid(String),
    /// The ledger did not answer (HTTP 503).
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
}

/// A dimension a report groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    Hour,
    Day,
    Week,
    Month,
    Model,
    Upstream,
    Key,
    User,
    Tenant,
}

impl Dim {
    pub const ALL: [Dim; 9] = [
        Dim::Hour,
        Dim::Day,
        Dim::Week,
        Dim::Month,
        Dim::Model,
        Dim::Upstream,
        Dim::Key,
        Dim::User,
        Dim::Tenant,
    ];

    /// The name in `group_by` (and the field name of a non-time dimension in a row).
    pub fn as_str(self) -> &'static str {
        match self {
            Dim::Hour => "hour",
            Dim::Day => "day",
            Dim::Week => "week",
            Dim::Month => "month",
            Dim::Model => "model",
            Dim::Upstream => "upstream",
            Dim::Key => "key",
            Dim::User => "user",
            Dim::Tenant => "tenant",
        }
    }

    pub fn parse(s: &str) -> Option<Dim> {
        Dim::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// The calendar unit of a time dimension.
    pub fn unit(self) -> Option<CalendarUnit> {
        match self {
            Dim::Hour => Some(CalendarUnit::Hour),
            Dim::Day => Some(CalendarUnit::Day),
            Dim::Week => Some(CalendarUnit::Week),
            Dim::Month => Some(CalendarUnit::Month),
            _ => None,
        }
    }

    /// The ledger column of a non-time dimension.
    pub fn column(self) -> Option<&'static str> {
        match self {
            Dim::Model => Some("model"),
            Dim::Upstream => Some("upstream"),
            Dim::Key => Some("key_id"),
            Dim::User => Some("user_id"),
            Dim::Tenant => Some("tenant_id"),
            _ => None,
        }
    }
}

/// A report request as it arrives (query string or CLI flags): text, every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpendParams {
    /// RFC 3339 time, `YYYY-MM-DD` (local midnight in `[quota].timezone`) or `N[hdw]`
    /// (that long before now). Default: [`DEFAULT_DAYS`] before `until`.
    pub since: Option<String>,
    /// Same forms, exclusive. Default: now.
    pub until: Option<String>,
    /// One or two dimension names, comma-separated (`day,model`).
    pub group_by: Option<String>,
    pub key: Option<String>,
    pub user: Option<String>,
    pub tenant: Option<String>,
    pub model: Option<String>,
    pub upstream: Option<String>,
    /// Most rows returned, 1–[`MAX_ROWS`].
    pub limit: Option<String>,
}

impl SpendParams {
    /// The parameter names `GET /admin/spend` accepts.
    pub const NAMES: [&'static str; 9] = [
        "since", "until", "group_by", "key", "user", "tenant", "model", "upstream", "limit",
    ];

    /// Read the parameters from `get(name)` (a query string's first value of `name`).
    pub fn from_lookup<'a>(get: impl Fn(&str) -> Option<&'a str>) -> SpendParams {
        let v = |n: &str| get(n).map(str::to_string);
        SpendParams {
            since: v("since"),
            until: v("until"),
            group_by: v("group_by"),
            key: v("key"),
            user: v("user"),
            tenant: v("tenant"),
            model: v("model"),
            upstream: v("upstream"),
            limit: v("limit"),
        }
    }

    /// The parameters that are set, by name, in [`SpendParams::NAMES`] order.
    pub fn pairs(&self) -> Vec<(&'static str, &str)> {
        [
            ("since", &self.since),
            ("until", &self.until),
            ("group_by", &self.group_by),
            ("key", &self.key),
            ("user", &self.user),
            ("tenant", &self.tenant),
            ("model", &self.model),
            ("upstream", &self.upstream),
            ("limit", &self.limit),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.as_deref().map(|v| (name, v)))
        .collect()
    }
}

/// A validated report request.
#[derive(Debug, Clone)]
pub struct Plan {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub tz: Tz,
    pub group_by: Vec<Dim>,
    /// With a time dimension: the start of every bucket, then the end of the last one
    /// (`bounds[0] <= since < bounds[1]`, `bounds[n-1] < until <= bounds[n]`). Empty
    /// without one.
    pub bounds: Vec<DateTime<Utc>>,
    /// `(ledger column, value)` pairs every counted row must match.
    pub filters: Vec<(&'static str, String)>,
    pub limit: usize,
    /// Where the sums come from. `Some(hours)`: whole UTC hours inside the period from the
    /// hourly rollups, except these hours (each one contains `since`, `until` or a bucket
    /// bound that is not on a whole hour), which are summed from the ledger's rows.
    /// `None`: every row from the ledger (more than [`MAX_CUT_HOURS`] hours would need
    /// cutting — a time zone whose offset is not whole hours, grouped by hour or day).
    pub cut_hours: Option<Vec<DateTime<Utc>>>,
}

impl Plan {
    pub fn time_dim(&self) -> Option<Dim> {
        self.group_by.iter().copied().find(|d| d.unit().is_some())
    }

    /// The non-time dimensions, in `group_by` order.
    pub fn other_dims(&self) -> Vec<Dim> {
        self.group_by
            .iter()
            .copied()
            .filter(|d| d.unit().is_none())
            .collect()
    }
}

fn invalid(m: impl Into<String>) -> SpendError {
    SpendError::Invalid(m.into())
}

/// A time parameter: RFC 3339, `YYYY-MM-DD` (the first instant of that local date in `tz`,
/// as a `day` window starts), or `N` followed by `h`, `d` or `w` (that long before `now`).
pub fn parse_time(
    name: &str,
    v: &str,
    now: DateTime<Utc>,
    tz: Tz,
) -> Result<DateTime<Utc>, SpendError> {
    let bad = || {
        invalid(format!(
            "`{name}` must be an RFC 3339 time (2026-03-01T00:00:00Z), a date (2026-03-01, \
             midnight in {}) or a relative length (36h, 7d, 2w), got `{}`",
            tz.name(),
            v.chars().take(64).collect::<String>()
        ))
    };
    let t = if let Some(t) = crate::time::from_text(v) {
        t
    } else if let Ok(date) = NaiveDate::parse_from_str(v, "%Y-%m-%d") {
        local_day_start(date, tz).ok_or_else(bad)?
    } else {
        let (digits, unit) = v.split_at(v.len().saturating_sub(1));
        let secs = match unit {
            "h" => 3_600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            _ => return Err(bad()),
        };
        if digits.is_empty() || digits.len() > 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: i64 = digits.parse().map_err(|_| bad())?;
        now.checked_sub_signed(Duration::seconds(n * secs))
            .ok_or_else(bad)?
    };
    // Ledger text sorts as time only for four-digit years.
    let year = chrono::Datelike::year(&t);
    if !(1970..=9998).contains(&year) {
        return Err(invalid(format!(
            "`{name}` must lie between the years 1970 and 9998"
        )));
    }
    Ok(t)
}

/// Validate `p` and resolve it against `now` in `tz`.
pub fn plan(p: &SpendParams, now: DateTime<Utc>, tz: Tz) -> Result<Plan, SpendError> {
    let until = match &p.until {
        Some(v) => parse_time("until", v, now, tz)?,
        None => now,
    };
    let since = match &p.since {
        Some(v) => parse_time("since", v, now, tz)?,
        None => until - Duration::days(DEFAULT_DAYS),
    };
    if since >= until {
        return Err(invalid(format!(
            "`since` ({}) must be before `until` ({})",
            crate::time::to_text(since),
            crate::time::to_text(until)
        )));
    }
    if until - since > Duration::days(MAX_RANGE_DAYS) {
        return Err(invalid(format!(
            "the period is longer than {MAX_RANGE_DAYS} days; narrow `since`/`until`"
        )));
    }
    let mut group_by = Vec::new();
    if let Some(g) = &p.group_by {
        for name in g.split(',').map(str::trim) {
            let d = Dim::parse(name).ok_or_else(|| {
                invalid(format!(
                    "unknown `group_by` dimension `{}`; expected one or two of: {}",
                    name.chars().take(32).collect::<String>(),
                    Dim::ALL.map(Dim::as_str).join(", ")
                ))
            })?;
            if group_by.contains(&d) {
                return Err(invalid(format!("`group_by` names `{name}` twice")));
            }
            group_by.push(d);
        }
    }
    if group_by.len() > 2 {
        return Err(invalid("`group_by` takes at most two dimensions"));
    }
    if group_by.iter().filter(|d| d.unit().is_some()).count() > 1 {
        return Err(invalid(
            "`group_by` takes at most one of hour, day, week, month",
        ));
    }
    let bounds = match group_by.iter().find_map(|d| d.unit()) {
        Some(unit) => buckets(unit, since, until, tz)?,
        None => Vec::new(),
    };
    let mut filters = Vec::new();
    for (name, column, value) in [
        ("key", "key_id", &p.key),
        ("user", "user_id", &p.user),
        ("tenant", "tenant_id", &p.tenant),
        ("model", "model", &p.model),
        ("upstream", "upstream", &p.upstream),
    ] {
        if let Some(v) = value {
            if v.len() > MAX_FILTER_LEN || v.chars().any(char::is_control) {
                return Err(invalid(format!(
                    "`{name}` must be at most {MAX_FILTER_LEN} bytes without control characters"
                )));
            }
            filters.push((column, v.clone()));
        }
    }
    let limit = match &p.limit {
        None => DEFAULT_ROWS,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_ROWS).contains(&n) => n,
            _ => {
                return Err(invalid(format!(
                    "`limit` must be an integer from 1 to {MAX_ROWS}, got `{}`",
                    v.chars().take(32).collect::<String>()
                )));
            }
        },
    };
    let cut_hours = cut_hours(since, until, &bounds);
    Ok(Plan {
        since,
        until,
        tz,
        group_by,
        bounds,
        filters,
        limit,
        cut_hours,
    })
}

pub use crate::time::hour_floor;

/// The hours a report must sum from ledger rows: those containing `since`, `until` or a
/// bucket bound strictly inside (not at) their start. `None` when there are more than
/// [`MAX_CUT_HOURS`].
fn cut_hours(
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    bounds: &[DateTime<Utc>],
) -> Option<Vec<DateTime<Utc>>> {
    let interior = bounds.iter().copied().filter(|b| since < *b && *b < until);
    let mut hours: Vec<DateTime<Utc>> = [since, until]
        .into_iter()
        .chain(interior)
        .filter(|t| hour_floor(*t) != *t)
        .map(hour_floor)
        .collect();
    hours.sort();
    hours.dedup();
    (hours.len() <= MAX_CUT_HOURS).then_some(hours)
}

/// The calendar buckets of `unit` covering `[since, until)`: every start, then the last end.
fn buckets(
    unit: CalendarUnit,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    tz: Tz,
) -> Result<Vec<DateTime<Utc>>, SpendError> {
    let (start, mut end) = calendar_bounds(unit, since, tz);
    let mut out = vec![start, end];
    while end < until {
        if out.len() > MAX_BUCKETS {
            return Err(invalid(format!(
                "more than {MAX_BUCKETS} {} buckets; narrow `since`/`until` or group by a longer period",
                unit.as_str()
            )));
        }
        end = calendar_bounds(unit, end, tz).1;
        out.push(end);
    }
    Ok(out)
}

/// What a group of settled rows adds up to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sums {
    pub requests: i64,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_micros: i64,
    /// Rows whose usage was estimated (`usage_source = 'estimated'`).
    pub estimated: i64,
}

impl Sums {
    /// Field names, in the order of [`Sums::values`] and of the SQL in [`sql`].
    pub const FIELDS: [&'static str; 8] = [
        "requests",
        "input_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "output_tokens",
        "reasoning_tokens",
        "cost_micros",
        "estimated",
    ];

    pub fn values(&self) -> [i64; 8] {
        [
            self.requests,
            self.input_tokens,
            self.cached_input_tokens,
            self.cache_write_tokens,
            self.output_tokens,
            self.reasoning_tokens,
            self.cost_micros,
            self.estimated,
        ]
    }

    pub fn from_values(v: [i64; 8]) -> Sums {
        let [
            requests,
            input_tokens,
            cached_input_tokens,
            cache_write_tokens,
            output_tokens,
            reasoning_tokens,
            cost_micros,
            estimated,
        ] = v;
        Sums {
            requests,
            input_tokens,
            cached_input_tokens,
            cache_write_tokens,
            output_tokens,
            reasoning_tokens,
            cost_micros,
            estimated,
        }
    }

    fn write(&self, m: &mut Map<String, Value>) {
        for (name, v) in Sums::FIELDS.iter().zip(self.values()) {
            m.insert((*name).into(), v.into());
            if *name == "cost_micros" {
                m.insert("cost_usd".into(), crate::money::format_usd(v).into());
            }
        }
    }
}

/// One group of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendRow {
    /// Index of the time bucket (into [`Plan::bounds`]) when grouped by time.
    pub bucket: Option<usize>,
    /// Values of [`Plan::other_dims`], in order (`None`: a row with no user or tenant).
    pub dims: Vec<Option<String>>,
    pub sums: Sums,
}

/// What a backend found for a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpendData {
    /// At most `limit` groups: by bucket, then cost (highest first), then dimension values.
    pub rows: Vec<SpendRow>,
    /// Every settled row matched, truncated or not.
    pub totals: Sums,
    /// Released rows matched (nothing billed).
    pub released: i64,
    /// More groups matched than `limit`.
    pub truncated: bool,
}

/// A ledger of record that can sum itself.
#[async_trait::async_trait]
pub trait SpendStore: Send + Sync {
    async fn spend(&self, plan: &Plan) -> Result<SpendData, SpendError>;
}

/// The report backend of `config`: the embedded ledger at `journal_path`, or Postgres in
/// shared mode. Connects lazily.
pub fn open(config: &Config, journal_path: &Path) -> Arc<dyn SpendStore> {
    match config.storage.mode {
        StorageMode::Embedded => Arc::new(sqlite::SqliteSpend::new(journal_path)),
        StorageMode::Shared => match pg::PgSpend::new(&config.postgres_url()) {
            Ok(s) => Arc::new(s),
            Err(e) => Arc::new(Unavailable(e.to_string())),
        },
    }
}

/// A backend that could not be built (answers every report with its reason).
struct Unavailable(String);

#[async_trait::async_trait]
impl SpendStore for Unavailable {
    async fn spend(&self, _: &Plan) -> Result<SpendData, SpendError> {
        Err(SpendError::Unavailable(self.0.clone()))
    }
}

/// A time as the report shows it: RFC 3339 in the report's time zone.
fn local_text(t: DateTime<Utc>, tz: Tz) -> String {
    t.with_timezone(&tz)
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The report's JSON (the body of `GET /admin/spend`).
pub fn to_json(plan: &Plan, data: &SpendData) -> Value {
    let others = plan.other_dims();
    let rows: Vec<Value> = data
        .rows
        .iter()
        .map(|r| {
            let mut m = Map::new();
            if let Some(i) = r.bucket
                && let (Some(s), Some(e)) = (plan.bounds.get(i), plan.bounds.get(i + 1))
            {
                m.insert("period_start".into(), local_text(*s, plan.tz).into());
                m.insert("period_end".into(), local_text(*e, plan.tz).into());
            }
            for (d, v) in others.iter().zip(&r.dims) {
                m.insert(d.as_str().into(), v.clone().into());
            }
            r.sums.write(&mut m);
            Value::Object(m)
        })
        .collect();
    let mut totals = Map::new();
    data.totals.write(&mut totals);
    // Every bucket of the period, empty ones included, so a chart can draw its zeros.
    let periods: Vec<Value> = plan
        .bounds
        .windows(2)
        .map(|w| json!({"start": local_text(w[0], plan.tz), "end": local_text(w[1], plan.tz)}))
        .collect();
    let mut v = json!({
        "since": crate::time::to_text(plan.since),
        "until": crate::time::to_text(plan.until),
        "timezone": plan.tz.name(),
        "group_by": plan.group_by.iter().map(|d| d.as_str()).collect::<Vec<_>>(),
        "rows": rows,
        "totals": totals,
        "released_requests": data.released,
        "truncated": data.truncated,
    });
    if plan.time_dim().is_some() {
        v["periods"] = periods.into();
    }
    v
}

/// Validate `params`, ask `store`, and answer the report's JSON.
pub async fn report(
    store: &dyn SpendStore,
    params: &SpendParams,
    now: DateTime<Utc>,
    tz: Tz,
) -> Result<Value, SpendError> {
    let plan = plan(params, now, tz)?;
    let data = store.spend(&plan).await?;
    Ok(to_json(&plan, &data))
}

/// The SQL both backends run, in their dialect.
pub mod sql {
    use super::Plan;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Dialect {
        Sqlite,
        Postgres,
    }

    /// The summed columns of the source ([`source`]), in [`super::Sums::FIELDS`] order.
    const SUMMED: [&str; 8] = [
        "requests",
        "input_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "output_tokens",
        "reasoning_tokens",
        "cost_micros",
        "estimated",
    ];

    /// The dimension columns every source row carries.
    const DIMS: &str = "key_id, user_id, tenant_id, upstream, model, status";

    impl Dialect {
        fn param(self, i: usize) -> String {
            match self {
                Dialect::Sqlite => format!("?{i}"),
                Dialect::Postgres => format!("${i}"),
            }
        }

        /// A time parameter (bound as ledger text) compared with `started_at`.
        fn time_param(self, i: usize) -> String {
            match self {
                Dialect::Sqlite => format!("?{i}"),
                Dialect::Postgres => format!("(${i}::text)::timestamptz"),
            }
        }

        /// A time literal (our own ledger text, never user input) compared with `started_at`.
        fn time_literal(self, text: &str) -> String {
            match self {
                Dialect::Sqlite => format!("'{text}'"),
                Dialect::Postgres => format!("TIMESTAMPTZ '{text}'"),
            }
        }

        fn sum(self, expr: &str) -> String {
            match self {
                Dialect::Sqlite => format!("COALESCE(SUM({expr}), 0)"),
                Dialect::Postgres => format!("COALESCE(SUM({expr}), 0)::bigint"),
            }
        }

        /// Text ordering by bytes in both (Postgres would otherwise use the database's
        /// collation, and a truncated report would keep other rows than SQLite's).
        fn ordered(self, column: &str) -> String {
            match self {
                Dialect::Sqlite => format!("{column} ASC NULLS FIRST"),
                Dialect::Postgres => format!("{column} COLLATE \"C\" ASC NULLS FIRST"),
            }
        }
    }

    /// The bucket index of `started_at`: a binary search over the bucket starts written as
    /// nested `CASE`s (depth log2(buckets), at most 10), the same in both dialects.
    fn bucket_expr(d: Dialect, starts: &[String], lo: usize, hi: usize) -> String {
        if hi - lo <= 1 {
            return lo.to_string();
        }
        let mid = lo + (hi - lo) / 2;
        format!(
            "CASE WHEN started_at < {} THEN {} ELSE {} END",
            d.time_literal(&starts[mid]),
            bucket_expr(d, starts, lo, mid),
            bucket_expr(d, starts, mid, hi)
        )
    }

    /// The rows a report sums, as a subquery of `started_at, key_id, user_id, tenant_id,
    /// upstream, model, status` and the [`SUMMED`] columns, inside `since <= started_at <
    /// until`, settled and released: whole hours from `spend_hourly` (a rollup row's
    /// `started_at` is its hour) and the plan's cut hours from the ledger's own rows (see
    /// [`Plan::cut_hours`]); or, without cut hours, every ledger row. Binds `since` and
    /// `until` as parameters 1 and 2.
    fn source(d: Dialect, plan: &Plan) -> String {
        let ledger = |lo: String, hi: String| {
            format!(
                "SELECT started_at, {DIMS}, CASE WHEN adjusts IS NULL THEN 1 ELSE 0 END AS requests, input_tokens, cached_input_tokens, \
                 cache_write_tokens, output_tokens, reasoning_tokens, cost_micros, \
                 CASE WHEN usage_source = 'estimated' THEN 1 ELSE 0 END AS estimated \
                 FROM billing_transactions WHERE status IN ('settled', 'released') \
                 AND started_at >= {lo} AND started_at < {hi}"
            )
        };
        let Some(cut) = &plan.cut_hours else {
            return format!("({}) AS src", ledger(d.time_param(1), d.time_param(2)));
        };
        let text = |t| d.time_literal(&crate::time::to_text(t));
        let first = super::hour_floor(plan.since);
        let first = if first < plan.since {
            first + chrono::Duration::hours(1)
        } else {
            first
        };
        // The narrow rollup when no key, user or tenant is asked for.
        let subjects = ["key_id", "user_id", "tenant_id"];
        let by_subject = plan
            .other_dims()
            .iter()
            .filter_map(|d| d.column())
            .chain(plan.filters.iter().map(|(c, _)| *c))
            .any(|c| subjects.contains(&c));
        let (table, who) = if by_subject {
            (
                "spend_hourly",
                "key_id, NULLIF(user_id, '') AS user_id, NULLIF(tenant_id, '') AS tenant_id",
            )
        } else {
            (
                "spend_hourly_model",
                "NULL AS key_id, NULL AS user_id, NULL AS tenant_id",
            )
        };
        // The whole hours inside the period (its bounds, parameters 1 and 2, are implied;
        // the query names them so both branches bind the same parameters).
        let mut rollup = format!(
            "SELECT hour AS started_at, {who}, upstream, model, status, {} \
             FROM {table} WHERE hour >= {} AND hour < {} AND hour >= {} AND hour < {} \
             AND requests <> 0",
            SUMMED.join(", "),
            text(first),
            text(super::hour_floor(plan.until)),
            d.time_param(1),
            d.time_param(2),
        );
        if cut.is_empty() {
            return format!("({rollup}) AS src");
        }
        let list: Vec<String> = cut.iter().map(|h| text(*h)).collect();
        rollup.push_str(&format!(" AND hour NOT IN ({})", list.join(", ")));
        // One index range per cut hour, clipped to the period.
        let rows: Vec<String> = cut
            .iter()
            .map(|h| {
                let lo = (*h).max(plan.since);
                let hi = (*h + chrono::Duration::hours(1)).min(plan.until);
                ledger(text(lo), text(hi))
            })
            .collect();
        let rows = rows.join(" UNION ALL ");
        format!("({rollup} UNION ALL {rows}) AS src")
    }

    /// The filter conditions on the source, and the parameters of the query (all text):
    /// `since`, `until`, then each filter value.
    fn conditions(d: Dialect, plan: &Plan) -> (String, Vec<String>) {
        let mut params = vec![
            crate::time::to_text(plan.since),
            crate::time::to_text(plan.until),
        ];
        let mut sql = String::new();
        for (column, value) in &plan.filters {
            params.push(value.clone());
            sql.push_str(&format!(" AND {column} = {}", d.param(params.len())));
        }
        (sql, params)
    }

    /// The grouped query: `[bucket,] dims…, sums…` per group, ordered by bucket, cost
    /// (highest first), then dimension values; at most `plan.limit + 1` rows (one more
    /// than asked tells that the answer is truncated).
    pub fn groups(d: Dialect, plan: &Plan) -> (String, Vec<String>) {
        let (cond, params) = conditions(d, plan);
        let mut select = Vec::new();
        let mut group = Vec::new();
        let mut order = Vec::new();
        if !plan.bounds.is_empty() {
            let starts: Vec<String> = plan.bounds[..plan.bounds.len() - 1]
                .iter()
                .map(|t| crate::time::to_text(*t))
                .collect();
            let expr = bucket_expr(d, &starts, 0, starts.len());
            select.push(match d {
                Dialect::Sqlite => format!("{expr} AS bucket"),
                Dialect::Postgres => format!("({expr})::bigint AS bucket"),
            });
            group.push("bucket".to_string());
            order.push("bucket ASC".to_string());
        }
        for dim in plan.other_dims() {
            if let Some(c) = dim.column() {
                select.push(c.to_string());
                group.push(c.to_string());
            }
        }
        select.extend(SUMMED.iter().map(|e| d.sum(e)));
        order.push(format!("{} DESC", d.sum("cost_micros")));
        for dim in plan.other_dims() {
            if let Some(c) = dim.column() {
                order.push(d.ordered(c));
            }
        }
        let mut sql = format!(
            "SELECT {} FROM {} WHERE status = 'settled'{cond}",
            select.join(", "),
            source(d, plan)
        );
        if !group.is_empty() {
            sql.push_str(&format!(
                " GROUP BY {} ORDER BY {}",
                group.join(", "),
                order.join(", ")
            ));
        }
        sql.push_str(&format!(" LIMIT {}", plan.limit + 1));
        (sql, params)
    }

    /// The totals query: the settled sums, then the number of released rows.
    pub fn totals(d: Dialect, plan: &Plan) -> (String, Vec<String>) {
        let (cond, params) = conditions(d, plan);
        let mut select: Vec<String> = SUMMED
            .iter()
            .map(|e| d.sum(&format!("CASE WHEN status = 'settled' THEN {e} ELSE 0 END")))
            .collect();
        select.push(d.sum("CASE WHEN status = 'released' THEN requests ELSE 0 END"));
        (
            format!(
                "SELECT {} FROM {} WHERE true{cond}",
                select.join(", "),
                source(d, plan)
            ),
            params,
        )
    }

    /// Collect one grouped row: `get(i)` reads column `i` as an integer, `text(i)` as
    /// optional text.
    pub fn row<E>(
        plan: &Plan,
        get: impl Fn(usize) -> Result<i64, E>,
        text: impl Fn(usize) -> Result<Option<String>, E>,
    ) -> Result<super::SpendRow, E> {
        let mut i = 0;
        let bucket = if plan.bounds.is_empty() {
            None
        } else {
            i += 1;
            Some(usize::try_from(get(0)?).unwrap_or(usize::MAX))
        };
        let mut dims = Vec::new();
        for _ in plan.other_dims() {
            dims.push(text(i)?);
            i += 1;
        }
        let mut v = [0i64; 8];
        for (k, slot) in v.iter_mut().enumerate() {
            *slot = get(i + k)?;
        }
        Ok(super::SpendRow {
            bucket,
            dims,
            sums: super::Sums::from_values(v),
        })
    }

    /// Turn up to `limit + 1` fetched groups and the totals row into [`super::SpendData`].
    pub fn finish(
        plan: &Plan,
        mut rows: Vec<super::SpendRow>,
        totals: [i64; 9],
    ) -> super::SpendData {
        // Without a GROUP BY the query answers one row even when nothing matched.
        rows.retain(|r| r.sums.requests > 0);
        let truncated = rows.len() > plan.limit;
        rows.truncate(plan.limit);
        let [a, b, c, d, e, f, g, h, released] = totals;
        super::SpendData {
            rows,
            totals: super::Sums::from_values([a, b, c, d, e, f, g, h]),
            released,
            truncated,
        }
    }
}

/// Columns of a report's rows in CSV and table form: the period, the dimensions, then the
/// sums.
fn columns(v: &Value) -> Vec<String> {
    let group_by: Vec<&str> = v["group_by"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut cols = Vec::new();
    if group_by
        .iter()
        .any(|g| Dim::parse(g).is_some_and(|d| d.unit().is_some()))
    {
        cols.push("period_start".to_string());
        cols.push("period_end".to_string());
    }
    for g in &group_by {
        if Dim::parse(g).is_some_and(|d| d.unit().is_none()) {
            cols.push((*g).to_string());
        }
    }
    for f in Sums::FIELDS {
        cols.push(f.to_string());
        if f == "cost_micros" {
            cols.push("cost_usd".to_string());
        }
    }
    cols
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The report's rows as CSV (RFC 4180, header line, `\r\n`), one line per row of the JSON.
/// A text value that a spreadsheet would run as a formula (starting with `=`, `+`, `-`,
/// `@`, tab or carriage return — model names come from clients) is prefixed with `'`.
pub fn csv(v: &Value) -> String {
    let cols = columns(v);
    let quote = |s: &str| {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let mut out = cols.join(",");
    out.push_str("\r\n");
    for row in v["rows"].as_array().into_iter().flatten() {
        let line: Vec<String> = cols
            .iter()
            .map(|c| {
                let mut s = cell(&row[c.as_str()]);
                if row[c.as_str()].is_string() && s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
                    s.insert(0, '\'');
                }
                quote(&s)
            })
            .collect();
        out.push_str(&line.join(","));
        out.push_str("\r\n");
    }
    out
}

/// The report as an aligned text table with a totals row, for people.
pub fn table(v: &Value) -> String {
    let group_by: Vec<Dim> = v["group_by"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|g| g.as_str().and_then(Dim::parse))
                .collect()
        })
        .unwrap_or_default();
    let time = group_by.iter().copied().find(|d| d.unit().is_some());
    let others: Vec<Dim> = group_by
        .iter()
        .copied()
        .filter(|d| d.unit().is_none())
        .collect();
    let mut head: Vec<String> = Vec::new();
    if let Some(t) = time {
        head.push(t.as_str().to_string());
    }
    head.extend(others.iter().map(|d| d.as_str().to_string()));
    let text_cols = head.len();
    head.extend(
        [
            "requests",
            "input",
            "cached",
            "cache_write",
            "output",
            "reasoning",
            "cost_usd",
            "estimated",
        ]
        .map(String::from),
    );
    let nums = |m: &Value| -> Vec<String> {
        let n = |f: &str| m[f].as_i64().unwrap_or(0).to_string();
        vec![
            n("requests"),
            n("input_tokens"),
            n("cached_input_tokens"),
            n("cache_write_tokens"),
            n("output_tokens"),
            n("reasoning_tokens"),
            cell(&m["cost_usd"]),
            n("estimated"),
        ]
    };
    let mut lines: Vec<Vec<String>> = Vec::new();
    for row in v["rows"].as_array().into_iter().flatten() {
        let mut line = Vec::new();
        if let Some(t) = time {
            let start = row["period_start"].as_str().unwrap_or("");
            // Hours show their local clock time; longer periods their first date.
            let shown = if t == Dim::Hour {
                start.get(..16).map(|s| s.replace('T', " "))
            } else {
                start.get(..10).map(str::to_string)
            };
            line.push(shown.unwrap_or_else(|| start.to_string()));
        }
        for d in &others {
            line.push(row[d.as_str()].as_str().unwrap_or("-").to_string());
        }
        line.extend(nums(row));
        lines.push(line);
    }
    let mut total = vec![String::new(); text_cols];
    if let Some(first) = total.first_mut() {
        *first = "total".into();
    }
    total.extend(nums(&v["totals"]));
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for line in lines.iter().chain(std::iter::once(&total)) {
        for (w, c) in widths.iter_mut().zip(line) {
            *w = (*w).max(c.chars().count());
        }
    }
    let render = |line: &[String]| -> String {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i < text_cols {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        cells.join("  ").trim_end().to_string()
    };
    let mut out = Vec::new();
    out.push(format!(
        "spend {} .. {} ({}), settled requests only",
        v["since"].as_str().unwrap_or(""),
        v["until"].as_str().unwrap_or(""),
        v["timezone"].as_str().unwrap_or("")
    ));
    out.push(render(&head));
    let rule: usize = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
    out.push("-".repeat(rule));
    for line in &lines {
        out.push(render(line));
    }
    if !lines.is_empty() {
        out.push("-".repeat(rule));
    }
    out.push(render(&total));
    let released = v["released_requests"].as_i64().unwrap_or(0);
    if released > 0 {
        out.push(format!(
            "released (upstream refused, not billed): {released} requests"
        ));
    }
    if v["truncated"] == true {
        out.push(format!(
            "truncated: only the first {} groups are shown (totals cover all); raise --limit or narrow the report",
            lines.len()
        ));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests;
