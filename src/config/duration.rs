//! Durations as Ollama (and Go) write them: `5m`, `1h30m`, `2.5s`, `300ms`, `-1m`; and
//! Ollama's `keep_alive`, which may also be a number of seconds and is "forever" when
//! negative.
//!
//! Hand-rolled (about 40 lines) because the crates that parse human durations (`humantime`)
//! reject Go's fractions (`1.5h`) and negative values, both of which `keep_alive` uses.

use std::time::Duration;

/// How long a loaded model stays resident after its last request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Never unloaded for being idle.
    Forever,
    /// Unloaded after this much idle time; zero unloads as soon as it is idle.
    For(Duration),
}

impl KeepAlive {
    /// Ollama's default: five minutes.
    pub const DEFAULT: KeepAlive = KeepAlive::For(Duration::from_secs(300));

    /// Parses a duration string (`5m`, `-1`, `0`, `3600`): bare numbers are seconds, any
    /// negative value means forever.
    pub fn parse(text: &str) -> Result<KeepAlive, String> {
        let t = text.trim();
        if let Ok(secs) = t.parse::<f64>() {
            return KeepAlive::from_seconds(secs);
        }
        let (negative, d) = parse_go_duration(t)?;
        Ok(if negative && d > Duration::ZERO {
            KeepAlive::Forever
        } else {
            KeepAlive::For(d)
        })
    }

    /// A number of seconds; negative means forever.
    pub fn from_seconds(secs: f64) -> Result<KeepAlive, String> {
        if !secs.is_finite() {
            return Err(format!("`{secs}` is not a number of seconds"));
        }
        if secs < 0.0 {
            return Ok(KeepAlive::Forever);
        }
        Duration::try_from_secs_f64(secs)
            .map(KeepAlive::For)
            .map_err(|_| format!("{secs} seconds is too long"))
    }
}

/// Parses a Go duration (`1h30m`, `2.5s`, `-1m`, `0`) into its sign and magnitude.
pub fn parse_go_duration(text: &str) -> Result<(bool, Duration), String> {
    let bad = || format!("`{text}` is not a duration (examples: 30s, 5m, 1h30m, 250ms)");
    let (negative, mut rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if rest == "0" {
        return Ok((negative, Duration::ZERO));
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_end..];
        total += value * scale;
    }
    Duration::try_from_secs_f64(total)
        .map(|d| (negative, d))
        .map_err(|_| bad())
}

/// Parses a positive duration for a timeout setting (`2s`, `500ms`).
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    match parse_go_duration(text.trim())? {
        (false, d) if d > Duration::ZERO => Ok(d),
        _ => Err(format!(
            "`{text}` must be a positive duration such as 2s or 500ms"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_accepts_what_ollama_accepts() {
        let s = |x| KeepAlive::For(Duration::from_secs(x));
        assert_eq!(KeepAlive::parse("5m").unwrap(), s(300));
        assert_eq!(KeepAlive::parse("1h30m").unwrap(), s(5400));
        assert_eq!(KeepAlive::parse("90").unwrap(), s(90));
        assert_eq!(KeepAlive::parse("0").unwrap(), s(0));
        assert_eq!(KeepAlive::parse("0s").unwrap(), s(0));
        assert_eq!(KeepAlive::parse("-1").unwrap(), KeepAlive::Forever);
        assert_eq!(KeepAlive::parse("-1m").unwrap(), KeepAlive::Forever);
        assert_eq!(
            KeepAlive::parse("1.5h").unwrap(),
            KeepAlive::For(Duration::from_secs(5400))
        );
        assert_eq!(
            KeepAlive::parse("250ms").unwrap(),
            KeepAlive::For(Duration::from_millis(250))
        );
    }

    #[test]
    fn nonsense_durations_are_refused() {
        for bad in ["", "m", "5 minutes", "5x", "1h-3m", "abc", "NaN"] {
            assert!(KeepAlive::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn timeouts_must_be_positive() {
        assert_eq!(parse_timeout("2s").unwrap(), Duration::from_secs(2));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("-1s").is_err());
    }
}
