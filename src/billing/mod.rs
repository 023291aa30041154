//! Billing: what a request costs.
//!
//! | module | owns |
//! |---|---|
//! | [`price`] | one model's price entry: rates, fees, multipliers, long-context rates; its TOML reader and version digest |
//! | [`table`] | the shipped table plus config overrides, lookup by model id, the `as_of` date |
//! | [`cost`] | the exact cost of a usage report and the worst-case hold of a request |

pub mod cost;
pub mod price;
pub mod table;
