//! Operations: health and metrics.

pub mod check;
pub(crate) mod health;
pub(crate) mod metrics;
