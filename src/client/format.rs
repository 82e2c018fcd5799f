//! Terminal output the way Ollama's CLI prints it: aligned columns, sizes in SI units,
//! times relative to now.

use chrono::{DateTime, Utc};

/// `98 MB`, `1.3 GB`, `512 B`.
pub(crate) fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn span(secs: i64) -> String {
    let plural = |n: i64, what: &str| {
        if n == 1 {
            format!("1 {what}")
        } else {
            format!("{n} {what}s")
        }
    };
    match secs {
        s if s < 60 => "Less than a minute".to_owned(),
        s if s < 120 => "About a minute".to_owned(),
        s if s < 3600 => plural(s / 60, "minute"),
        s if s < 2 * 3600 => "About an hour".to_owned(),
        s if s < 86400 => plural(s / 3600, "hour"),
        s if s < 2 * 86400 => "About a day".to_owned(),
        s if s < 30 * 86400 => plural(s / 86400, "day"),
        s if s < 365 * 86400 => plural(s / (30 * 86400), "month"),
        s => plural(s / (365 * 86400), "year"),
    }
}

/// `2 minutes ago`, `4 minutes from now`, `Forever` (more than a century ahead).
pub(crate) fn relative(rfc3339: &str, now: DateTime<Utc>) -> String {
    let Ok(t) = DateTime::parse_from_rfc3339(rfc3339) else {
        return rfc3339.to_owned();
    };
    let delta = t
        .with_timezone(&Utc)
        .signed_duration_since(now)
        .num_seconds();
    if delta > 100 * 365 * 86400 {
        return "Forever".to_owned();
    }
    if delta > 0 {
        format!("{} from now", span(delta))
    } else {
        format!("{} ago", span(-delta))
    }
}

/// Left-aligned columns separated by at least three spaces.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                let pad = widths[i] + 3 - c.chars().count();
                out.push_str(c);
                out.push_str(&" ".repeat(pad));
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = vec![line(header.to_vec())];
    for row in rows {
        out.push(line(row.iter().map(String::as_str).collect()));
    }
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_si_units_like_ollama() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(98_000_000), "98.0 MB");
        assert_eq!(size(253_113_024), "253 MB");
        assert_eq!(size(1_300_000_000), "1.3 GB");
    }

    #[test]
    fn times_read_relative_to_now() {
        let now = DateTime::parse_from_rfc3339("2026-01-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(relative("2026-01-01T11:58:00Z", now), "2 minutes ago");
        assert_eq!(relative("2026-01-01T12:04:30Z", now), "4 minutes from now");
        assert_eq!(relative("2318-01-01T00:00:00Z", now), "Forever");
        assert_eq!(relative("2025-12-30T12:00:00Z", now), "2 days ago");
    }

    #[test]
    fn columns_line_up() {
        let t = table(
            &["NAME", "SIZE"],
            &[
                vec!["a:latest".into(), "1 MB".into()],
                vec!["bb".into(), "2 GB".into()],
            ],
        );
        assert_eq!(t, "NAME       SIZE\na:latest   1 MB\nbb         2 GB\n");
    }
}
