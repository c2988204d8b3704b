//! Wall-clock helpers of the agent shell: reading the clock, and parsing and
//! printing instants as users write them.
//!
//! Cores and the ledger take `now_ms` as an argument; only the shell calls
//! [`now_ms`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds in a day.
pub const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// Plain numbers refused as unix ms because they read as a year: no one
/// means an instant in the first ten seconds of 1970.
const YEARS_REFUSED_AS_MS: std::ops::RangeInclusive<i64> = 1970..=9999;

/// The wall clock, unix ms.
pub fn now_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// Parses an instant as users write it, relative to `now_ms`:
/// `now`, `now+2h` or `+2h` (a humantime duration after now), an RFC 3339
/// timestamp (`2026-11-24T10:00:00Z`), or unix milliseconds (but not a
/// number from 1970 to 9999, which is refused as a year written alone).
pub fn parse_instant(text: &str, now_ms: i64) -> Result<i64, String> {
    let text = text.trim();
    if text == "now" {
        return Ok(now_ms);
    }
    if let Some(offset) = text.strip_prefix("now+").or_else(|| text.strip_prefix('+')) {
        let offset = humantime::parse_duration(offset)
            .map_err(|e| format!("invalid duration {offset:?} in {text:?}: {e}"))?;
        let offset_ms =
            i64::try_from(offset.as_millis()).map_err(|_| format!("{text:?} is too far away"))?;
        return now_ms
            .checked_add(offset_ms)
            .ok_or_else(|| format!("{text:?} is too far away"));
    }
    if let Ok(ms) = text.parse::<i64>() {
        // A year read as unix ms would be an instant in January 1970.
        if YEARS_REFUSED_AS_MS.contains(&ms) {
            return Err(format!(
                "{text:?} looks like a year; write a date like {text}-11-24T10:00:00Z, or +2h"
            ));
        }
        return Ok(ms);
    }
    let at = humantime::parse_rfc3339_weak(text).map_err(|_| {
        format!("invalid time {text:?}: use `now`, `+2h`, an RFC 3339 time like 2026-11-24T10:00:00Z, or unix ms")
    })?;
    let since_epoch = at
        .duration_since(UNIX_EPOCH)
        .map_err(|_| format!("{text:?} is before 1970"))?;
    i64::try_from(since_epoch.as_millis()).map_err(|_| format!("{text:?} is too far away"))
}

/// Parses a duration such as `90s`, `2h`, `1day 2h`.
pub fn parse_duration_ms(text: &str) -> Result<i64, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid duration {text:?}: {e} (write e.g. 30s, 2h, 1day)"))?;
    i64::try_from(duration.as_millis()).map_err(|_| format!("duration {text:?} is too long"))
}

/// Formats unix ms as an RFC 3339 UTC timestamp with seconds.
pub fn format_instant(ms: i64) -> String {
    let Ok(ms) = u64::try_from(ms) else {
        return format!("{ms}ms");
    };
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_users_write() {
        let now = 1_700_000_000_000;
        assert_eq!(parse_instant("now", now), Ok(now));
        assert_eq!(parse_instant("+2h", now), Ok(now + 2 * 3_600_000));
        assert_eq!(parse_instant("now+90s", now), Ok(now + 90_000));
        assert_eq!(parse_instant("1234", now), Ok(1234));
        assert_eq!(parse_instant("2023-11-14T22:13:20Z", now), Ok(now));
        let err = parse_instant("tomorrow", now).unwrap_err();
        assert!(err.contains("RFC 3339"), "{err}");
        assert!(
            parse_instant("+soon", now)
                .unwrap_err()
                .contains("invalid duration")
        );
        assert_eq!(format_instant(now), "2023-11-14T22:13:20Z");
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert!(parse_duration_ms("two hours").is_err());
    }

    #[test]
    fn a_year_alone_is_refused_with_a_hint() {
        let now = 1_700_000_000_000;
        for year in ["1970", "2026", " 2026 ", "9999"] {
            let err = parse_instant(year, now).unwrap_err();
            assert!(err.contains("looks like a year"), "{year}: {err}");
            assert!(err.contains("-11-24T10:00:00Z, or +2h"), "{year}: {err}");
        }
        assert_eq!(
            parse_instant("2026", now).unwrap_err(),
            "\"2026\" looks like a year; write a date like 2026-11-24T10:00:00Z, or +2h"
        );
        // Numbers outside the years stay unix ms.
        assert_eq!(parse_instant("1969", now), Ok(1969));
        assert_eq!(parse_instant("10000", now), Ok(10_000));
        assert_eq!(parse_instant("1700000000000", now), Ok(now));
    }
}
