//! Billing: what a request costs.

pub mod price;
