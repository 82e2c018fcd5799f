//! Rate limits on the `governor` crate's GCRA limiters: requests per minute per key and per
//! client IP, and tokens (prompt plus completion) per minute per key. Each is a bucket of a
//! minute's allowance that refills continuously.
//!
//! Tokens are only known once an answer is complete, so a request is let in while its key
//! still has any tokens left, and its actual tokens are charged afterwards; an answer that
//! overshoots empties the bucket, and the key waits for it to refill.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

fn per_minute(n: u32) -> Option<Quota> {
    NonZeroU32::new(n).map(Quota::per_minute)
}

fn wait<C: Clock<Instant = governor::clock::QuantaInstant>>(
    not_until: &governor::NotUntil<governor::clock::QuantaInstant>,
    clock: &C,
) -> Duration {
    not_until.wait_time_from(clock.now())
}

/// One key's limits.
#[derive(Debug)]
pub(crate) struct KeyLimits {
    rpm: Option<DefaultDirectRateLimiter>,
    tpm: Option<DefaultDirectRateLimiter>,
}

impl KeyLimits {
    pub(crate) fn new(rpm: Option<u32>, tpm: Option<u32>) -> Self {
        KeyLimits {
            rpm: rpm.and_then(per_minute).map(RateLimiter::direct),
            tpm: tpm.and_then(per_minute).map(RateLimiter::direct),
        }
    }

    /// Lets a request in, or says how long to wait.
    pub(crate) fn admit(&self) -> Result<(), Duration> {
        let clock = DefaultClock::default();
        if let Some(l) = &self.tpm {
            // One token now; the rest when the answer is complete.
            l.check().map_err(|n| wait(&n, &clock))?;
        }
        if let Some(l) = &self.rpm {
            l.check().map_err(|n| wait(&n, &clock))?;
        }
        Ok(())
    }

    /// Charges an answer's tokens (one was taken at admission), as far as the bucket holds.
    pub(crate) fn charge(&self, tokens: u32) {
        let Some(l) = &self.tpm else { return };
        let mut left = tokens.saturating_sub(1);
        let mut step = left;
        // Take as much as the bucket holds, up to what is owed: a step the bucket cannot
        // give is halved, so an overshoot leaves it empty rather than untouched.
        while left > 0 {
            let Some(n) = NonZeroU32::new(step.min(left)) else {
                break;
            };
            match l.check_n(n) {
                Ok(Ok(())) => left -= n.get(),
                Ok(Err(_)) | Err(_) => step /= 2,
            }
        }
    }
}

/// Requests per minute per client IP.
#[derive(Debug)]
pub(crate) struct IpLimits {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl IpLimits {
    pub(crate) fn new(rpm: Option<u32>) -> Self {
        IpLimits {
            limiter: rpm.and_then(per_minute).map(RateLimiter::keyed),
        }
    }

    /// Lets a request from `ip` in, or says how long to wait.
    pub(crate) fn admit(&self, ip: IpAddr) -> Result<(), Duration> {
        match &self.limiter {
            Some(l) => l
                .check_key(&ip)
                .map_err(|n| wait(&n, &DefaultClock::default())),
            None => Ok(()),
        }
    }

    /// Forgets clients whose buckets are full again (bounded memory under many IPs).
    pub(crate) fn prune(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// `Retry-After` in whole seconds, at least 1.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_requests_per_minute_then_waits() {
        let l = KeyLimits::new(Some(3), None);
        for _ in 0..3 {
            assert!(l.admit().is_ok());
        }
        let wait = l.admit().unwrap_err();
        assert!(
            wait > Duration::from_secs(10) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
    }

    #[test]
    fn tokens_are_charged_after_the_answer_and_an_overshoot_empties_the_bucket() {
        let l = KeyLimits::new(None, Some(100));
        assert!(l.admit().is_ok());
        l.charge(60);
        assert!(l.admit().is_ok(), "40 tokens were left");
        l.charge(500);
        assert!(l.admit().is_err(), "the overshoot emptied the bucket");
    }

    #[test]
    fn each_client_ip_has_its_own_bucket() {
        let l = IpLimits::new(Some(1));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(l.admit(a).is_ok());
        assert!(l.admit(a).is_err());
        assert!(l.admit(b).is_ok());
        assert!(IpLimits::new(None).admit(a).is_ok());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
