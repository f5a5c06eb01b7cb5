//! Tunables of the key lifecycle: the `[rotation]` and `[unlock]` sections of the pool's TOML
//! configuration (`docs/key-lifecycle.md` lists them with their defaults and reasons).
//!
//! Durations are written as a number with a unit: `30s`, `10m`, `24h`, `7d` (a bare number is
//! seconds). Rates are MB/s (10^6 bytes), `0` meaning unlimited. Every parse error names the key
//! and says what is expected; unknown keys in these two sections are refused by name (a typo must
//! not silently leave a default in place).

#![forbid(unsafe_code)]

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::KmsError;

/// `[rotation]`: epochs, background re-encryption, retention of archived master versions.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RotationPolicy {
    /// Length of an epoch: new writes move to a new epoch this often.
    pub period: Duration,
    /// Blocks written in an epoch that started longer ago than this are re-encrypted.
    pub max_age: Duration,
    /// Re-encryption budget in bytes per second (0 = unlimited).
    pub rate_bytes: u64,
    /// Accesses of one stripe within `hot_window` that make it "hot" (re-keyed first).
    pub hot_threshold: u64,
    /// Window over which stripe accesses are counted.
    pub hot_window: Duration,
    /// How long an archived master version is kept (wrapped) before it is destroyed.
    pub retention: Duration,
}

/// Default epoch length: a day, as Vault's `auto_rotate_period` examples; an epoch bounds how
/// much data one derived key protects over time.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(24 * 3600);
/// Default maximum age: 30 days. Rewriting every block every epoch would cost a whole volume
/// of writes a day; a month keeps re-encryption to ~3% of the disk bandwidth per day.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default re-encryption rate: 20 MB/s, a few percent of one disk's sequential bandwidth, so
/// client I/O keeps priority.
pub const DEFAULT_RATE_BYTES: u64 = 20_000_000;
/// Default hot threshold: 1000 accesses of one stripe within the window.
pub const DEFAULT_HOT_THRESHOLD: u64 = 1000;
/// Default hot window: 10 minutes.
pub const DEFAULT_HOT_WINDOW: Duration = Duration::from_secs(600);
/// Default retention of an archived master version: 30 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default unlock timeout: partial progress older than 10 minutes is discarded.
pub const DEFAULT_UNLOCK_TIMEOUT: Duration = Duration::from_secs(600);

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            period: DEFAULT_PERIOD,
            max_age: DEFAULT_MAX_AGE,
            rate_bytes: DEFAULT_RATE_BYTES,
            hot_threshold: DEFAULT_HOT_THRESHOLD,
            hot_window: DEFAULT_HOT_WINDOW,
            retention: DEFAULT_RETENTION,
        }
    }
}

/// `[unlock]`: how shares are collected and when unsealing is allowed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UnlockPolicy {
    /// Partial progress of an unlock session is discarded this long after its first share.
    pub timeout: Duration,
    /// Hours of the day (UTC) when unsealing is allowed: `[from, to)`; `to < from` wraps midnight.
    pub allowed_hours: Option<(u8, u8)>,
    /// Unsealing is refused after this instant (Unix seconds, UTC).
    pub not_after: Option<u64>,
}

impl Default for UnlockPolicy {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_UNLOCK_TIMEOUT,
            allowed_hours: None,
            not_after: None,
        }
    }
}

/// Why unsealing is refused by policy (an access window), not by the shares.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyRefusal {
    #[error(
        "unsealing is allowed only between {from:02}:00 and {to:02}:00 UTC (unlock.allowed_hours); it is now {hour:02}:{minute:02} UTC"
    )]
    OutsideHours {
        from: u8,
        to: u8,
        hour: u8,
        minute: u8,
    },
    #[error(
        "unsealing is not allowed after {limit} (unlock.not_after); it is now {now}: change the pool configuration to extend it"
    )]
    Expired { limit: String, now: String },
}

impl UnlockPolicy {
    /// Whether unsealing is allowed at `now` (Unix seconds).
    pub fn check(&self, now: u64) -> Result<(), PolicyRefusal> {
        if let Some(limit) = self.not_after
            && now > limit
        {
            return Err(PolicyRefusal::Expired {
                limit: format_utc(limit),
                now: format_utc(now),
            });
        }
        if let Some((from, to)) = self.allowed_hours {
            let day_secs = now % 86_400;
            let hour = (day_secs / 3600) as u8;
            let minute = ((day_secs % 3600) / 60) as u8;
            let inside = if from <= to {
                (from..to).contains(&hour)
            } else {
                hour >= from || hour < to
            };
            if !inside {
                return Err(PolicyRefusal::OutsideHours {
                    from,
                    to,
                    hour,
                    minute,
                });
            }
        }
        Ok(())
    }
}

/// Parses a duration: `30s`, `10m`, `24h`, `7d`, `2w`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 30s, 10m, 24h, 7d)"))?;
    let mult = match unit.trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        u => return Err(format!("{s:?}: unknown unit {u:?} (use s, m, h, d or w)")),
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// Parses `unlock.allowed_hours`: `"HH-HH"`, hours 0–24, start ≠ end.
pub fn parse_hours(s: &str) -> Result<(u8, u8), String> {
    let bad = || format!("{s:?} is not an hour range (example: \"08-18\", hours 0 to 24, UTC)");
    let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
    let a: u8 = a.trim().parse().map_err(|_| bad())?;
    let b: u8 = b.trim().parse().map_err(|_| bad())?;
    if a > 24 || b > 24 || a % 24 == b % 24 {
        return Err(bad());
    }
    Ok((a % 24, b % 24))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_utc(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    let s = unix % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        s / 3600,
        (s % 3600) / 60,
        s % 60
    )
}

/// Parses `unlock.not_after`: `YYYY-MM-DD` (allowed through the end of that day, UTC) or
/// `YYYY-MM-DDTHH:MM:SSZ`. Returns the last allowed instant in Unix seconds.
pub fn parse_not_after(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a date (examples: 2027-06-30, 2027-06-30T18:00:00Z; UTC)");
    let t = s.trim();
    let (date, time) = match t.split_once('T') {
        Some((d, tm)) => (d, Some(tm.strip_suffix('Z').ok_or_else(bad)?)),
        None => (t, None),
    };
    let mut parts = date.split('-');
    let (Some(y), Some(m), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let y: i64 = y.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    let d: u32 = d.parse().map_err(|_| bad())?;
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let days = days_from_civil(y, m, d);
    if civil_from_days(days) != (y, m, d) {
        return Err(bad());
    }
    let secs = match time {
        None => 86_399,
        Some(tm) => {
            let f: Vec<&str> = tm.split(':').collect();
            if f.len() != 3 {
                return Err(bad());
            }
            let n = |x: &str, max: u64| x.parse::<u64>().ok().filter(|v| *v <= max).ok_or_else(bad);
            n(f[0], 23)? * 3600 + n(f[1], 59)? * 60 + n(f[2], 59)?
        }
    };
    Ok(days as u64 * 86_400 + secs)
}

/// The raw `[rotation]` table as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRotation {
    period: Option<String>,
    max_age: Option<String>,
    rate: Option<f64>,
    hot_threshold: Option<u64>,
    hot_window: Option<String>,
    retention: Option<String>,
}

/// The raw `[unlock]` table as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUnlock {
    timeout: Option<String>,
    allowed_hours: Option<String>,
    not_after: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawSections {
    #[serde(default)]
    rotation: Option<toml::Value>,
    #[serde(default)]
    unlock: Option<toml::Value>,
}

fn invalid(key: &str, msg: impl std::fmt::Display) -> KmsError {
    KmsError::Config(format!("{key}: {msg}"))
}

fn duration_of(key: &str, v: Option<String>, default: Duration) -> Result<Duration, KmsError> {
    match v {
        None => Ok(default),
        Some(s) => {
            let d = parse_duration(&s).map_err(|e| invalid(key, e))?;
            if d.is_zero() {
                return Err(invalid(key, "must be longer than 0s"));
            }
            Ok(d)
        }
    }
}

impl RotationPolicy {
    /// Checks the values together: an epoch shorter than a second or a window of zero make no
    /// sense; `max_age` shorter than `period` is allowed (it only means "as soon as the epoch
    /// changes").
    fn from_raw(r: RawRotation) -> Result<Self, KmsError> {
        let d = Self::default();
        let rate = r.rate.unwrap_or(d.rate_bytes as f64 / 1e6);
        if !rate.is_finite() || rate < 0.0 {
            return Err(invalid(
                "rotation.rate",
                "must be a number of MB/s, 0 or more (0 = unlimited)",
            ));
        }
        Ok(Self {
            period: duration_of("rotation.period", r.period, d.period)?,
            max_age: duration_of("rotation.max_age", r.max_age, d.max_age)?,
            rate_bytes: (rate * 1e6) as u64,
            hot_threshold: match r.hot_threshold {
                Some(0) => return Err(invalid("rotation.hot_threshold", "must be at least 1")),
                Some(n) => n,
                None => d.hot_threshold,
            },
            hot_window: duration_of("rotation.hot_window", r.hot_window, d.hot_window)?,
            retention: duration_of("rotation.retention", r.retention, d.retention)?,
        })
    }
}

impl UnlockPolicy {
    fn from_raw(r: RawUnlock) -> Result<Self, KmsError> {
        Ok(Self {
            timeout: duration_of("unlock.timeout", r.timeout, DEFAULT_UNLOCK_TIMEOUT)?,
            allowed_hours: r
                .allowed_hours
                .map(|s| parse_hours(&s).map_err(|e| invalid("unlock.allowed_hours", e)))
                .transpose()?,
            not_after: r
                .not_after
                .map(|s| parse_not_after(&s).map_err(|e| invalid("unlock.not_after", e)))
                .transpose()?,
        })
    }
}

/// Both sections of a configuration file.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct KeyPolicy {
    pub rotation: RotationPolicy,
    pub unlock: UnlockPolicy,
}

impl KeyPolicy {
    /// Reads `[rotation]` and `[unlock]` from TOML text (other sections are left to their own
    /// readers). Missing keys take their defaults; unknown keys and bad values are errors that
    /// name the key.
    pub fn from_toml(text: &str) -> Result<Self, KmsError> {
        let raw: RawSections = toml::from_str(text).map_err(|e| KmsError::Config(e.to_string()))?;
        let rotation: RawRotation = match raw.rotation {
            Some(v) => v
                .try_into()
                .map_err(|e| invalid("[rotation]", e.to_string().trim().to_string()))?,
            None => RawRotation::default(),
        };
        let unlock: RawUnlock = match raw.unlock {
            Some(v) => v
                .try_into()
                .map_err(|e| invalid("[unlock]", e.to_string().trim().to_string()))?,
            None => RawUnlock::default(),
        };
        Ok(Self {
            rotation: RotationPolicy::from_raw(rotation)?,
            unlock: UnlockPolicy::from_raw(unlock)?,
        })
    }

    /// Reads a configuration file (see [`KeyPolicy::from_toml`]); errors name the file.
    pub fn load(path: &std::path::Path) -> Result<Self, KmsError> {
        let text = std::fs::read_to_string(path).map_err(|source| KmsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| KmsError::Config(format!("{}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn dates_round_trip_and_bad_dates_are_refused() {
        assert_eq!(parse_not_after("1970-01-01"), Ok(86_399));
        assert_eq!(parse_not_after("2000-03-01T00:00:00Z"), Ok(951_868_800));
        assert_eq!(format_utc(951_868_800), "2000-03-01 00:00:00 UTC");
        assert!(parse_not_after("2023-02-29").is_err());
        assert!(parse_not_after("2024-02-29").is_ok());
        assert!(parse_not_after("2024-13-01").is_err());
        assert!(parse_not_after("tomorrow").is_err());
    }

    #[test]
    fn hour_windows_include_start_exclude_end_and_wrap_midnight() {
        let p = UnlockPolicy {
            allowed_hours: Some(parse_hours("08-18").unwrap()),
            ..Default::default()
        };
        let at = |h: u64, m: u64| 86_400 * 100 + h * 3600 + m * 60;
        assert!(p.check(at(8, 0)).is_ok());
        assert!(p.check(at(17, 59)).is_ok());
        let e = p.check(at(18, 0)).unwrap_err();
        assert!(e.to_string().contains("08:00 and 18:00"), "{e}");
        assert!(p.check(at(7, 59)).is_err());
        let night = UnlockPolicy {
            allowed_hours: Some(parse_hours("22-06").unwrap()),
            ..Default::default()
        };
        assert!(night.check(at(23, 0)).is_ok());
        assert!(night.check(at(5, 0)).is_ok());
        assert!(night.check(at(12, 0)).is_err());
        assert!(parse_hours("08-08").is_err());
        assert!(parse_hours("8").is_err());
    }

    #[test]
    fn config_sections_parse_and_unknown_keys_are_named() {
        let p = KeyPolicy::from_toml(
            "[rotation]\nperiod = \"2s\"\nrate = 5\nhot_threshold = 3\n[unlock]\nallowed_hours = \"08-18\"\n[other]\nx = 1\n",
        )
        .unwrap();
        assert_eq!(p.rotation.period, Duration::from_secs(2));
        assert_eq!(p.rotation.rate_bytes, 5_000_000);
        assert_eq!(p.rotation.hot_threshold, 3);
        assert_eq!(p.unlock.allowed_hours, Some((8, 18)));
        let e = KeyPolicy::from_toml("[rotation]\nperod = \"2s\"\n").unwrap_err();
        assert!(e.to_string().contains("perod"), "{e}");
        let e = KeyPolicy::from_toml("[rotation]\nperiod = \"2 days\"\n").unwrap_err();
        assert!(e.to_string().contains("rotation.period"), "{e}");
    }
}
