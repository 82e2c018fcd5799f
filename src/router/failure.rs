//! Why a request did not go to (or come back from) the cloud. Each reason is a label in
//! logs, metrics and the `x-backstop-failover` header.

use std::fmt;

/// Why the local model answered instead of a cloud upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailReason {
    /// Connection refused, DNS or TLS failure.
    Connect,
    /// HTTP 5xx (other than 529).
    ServerError(u16),
    /// HTTP 429.
    RateLimited,
    /// HTTP 529 (Anthropic's "overloaded").
    Overloaded,
    /// No response headers within `first_byte_timeout`.
    FirstByteTimeout,
    /// The exchange ran past `total_timeout` before anything reached the client.
    TotalTimeout,
    /// A 200 whose body is not the JSON or SSE the API promises, or an error event before
    /// the first token.
    Malformed,
    /// The connection broke before the first token reached the client.
    Broken,
    /// The upstream's circuit breaker is open: it was not tried at all.
    BreakerOpen,
    /// Contingency mode sends everything local.
    Contingency,
    /// The request asked for the local model (`x-backstop-route: local`).
    Requested,
}

impl FailReason {
    /// The label: `connect`, `http_503`, `rate_limited`, ...
    pub(crate) fn label(self) -> String {
        match self {
            FailReason::Connect => "connect".into(),
            FailReason::ServerError(code) => format!("http_{code}"),
            FailReason::RateLimited => "rate_limited".into(),
            FailReason::Overloaded => "overloaded".into(),
            FailReason::FirstByteTimeout => "first_byte_timeout".into(),
            FailReason::TotalTimeout => "total_timeout".into(),
            FailReason::Malformed => "malformed".into(),
            FailReason::Broken => "broken".into(),
            FailReason::BreakerOpen => "breaker_open".into(),
            FailReason::Contingency => "contingency".into(),
            FailReason::Requested => "requested".into(),
        }
    }

    /// Classifies an HTTP status: `None` for success and for the caller's own errors
    /// (4xx other than 429), which are returned as they are.
    pub(crate) fn of_status(status: u16) -> Option<FailReason> {
        match status {
            429 => Some(FailReason::RateLimited),
            529 => Some(FailReason::Overloaded),
            500..=599 => Some(FailReason::ServerError(status)),
            _ => None,
        }
    }
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_that_fail_over_and_those_that_are_the_callers_problem() {
        assert_eq!(
            FailReason::of_status(503),
            Some(FailReason::ServerError(503))
        );
        assert_eq!(FailReason::of_status(429), Some(FailReason::RateLimited));
        assert_eq!(FailReason::of_status(529), Some(FailReason::Overloaded));
        assert_eq!(FailReason::of_status(400), None);
        assert_eq!(FailReason::of_status(401), None);
        assert_eq!(FailReason::of_status(200), None);
        assert_eq!(FailReason::ServerError(502).label(), "http_502");
    }
}
