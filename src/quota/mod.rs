//! Quotas (SPEC §3): limit specs and their time windows (pure arithmetic, in `limit` and
//! `window`), the two-phase [`store::QuotaStore`] contract, and its backends: `memory`
//! (in-process; embedded mode and the local fallback) and `redis` (atomic Lua scripts; shared
//! mode). Every backend builds on [`Counter`] and the window bounds computed here, so they
//! agree on what a limit means.

pub mod counter;
pub mod fallback;
pub mod fleet;
pub mod limit;
pub mod memory;
pub mod redis;
pub mod shared;
pub mod store;
pub mod subject;
pub mod window;

pub use counter::Counter;
pub use limit::{LimitParseError, LimitSpec, Metric};
pub use subject::Subject;
pub use window::{
    CalendarUnit, RollingUnit, RollingWindow, Window, WindowParseError, calendar_bounds, ceil_secs,
};

/// `quota.on_unavailable`: what an instance does while the shared counter store (Redis)
/// is unreachable (see [`fallback`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    Local,
    Open,
    Closed,
}
