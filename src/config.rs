//! The server's configuration file (TOML, `--config FILE`): every tunable of the server, key
//! rotation, unlocking, scrubbing and rebuilding, with defaults that need no file at all.
//!
//! Parsing is strict: an unknown section or key is an error that names it and lists the keys
//! that exist (a typo must not silently fall back to a default), and values are checked for
//! range and form. `shardvol config check FILE` runs exactly this and prints the result.
//! docs/configuration.md lists every key.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// A configuration problem, with the file and the key or line it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
}

/// A duration written as a number with a unit: `30s`, `10m`, `24h`, `7d`, `2w` (or `0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Span(pub Duration);

impl Span {
    pub const fn secs(s: u64) -> Self {
        Span(Duration::from_secs(s))
    }
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t == "0" {
            return Ok(Span(Duration::ZERO));
        }
        let split = t
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{s:?} has no unit (use s, m, h, d or w, e.g. \"24h\")"))?;
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration (examples: 30s, 10m, 24h, 7d)"))?;
        let mult = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            u => return Err(format!("{s:?}: unknown unit {u:?} (use s, m, h, d or w)")),
        };
        n.checked_mul(mult)
            .map(|v| Span(Duration::from_secs(v)))
            .ok_or_else(|| format!("{s:?} is too long"))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        for (unit, len) in [("w", 7 * 86_400), ("d", 86_400), ("h", 3600), ("m", 60)] {
            if s >= len && s.is_multiple_of(len) {
                return write!(f, "{}{unit}", s / len);
            }
        }
        if s == 0 {
            write!(f, "0")
        } else {
            write!(f, "{s}s")
        }
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Span::parse(&s).map_err(de::Error::custom)
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Hours of the day (UTC) in which unsealing is allowed: `"08-18"` is 08:00 to 17:59,
/// `"22-06"` wraps around midnight, `"00-24"` is always.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hours {
    pub from: u8,
    pub to: u8,
}

impl Hours {
    pub const ALWAYS: Hours = Hours { from: 0, to: 24 };
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an hour range (use \"HH-HH\" in UTC, e.g. \"08-18\")");
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let from: u8 = a.trim().parse().map_err(|_| bad())?;
        let to: u8 = b.trim().parse().map_err(|_| bad())?;
        if from > 23 || to > 24 || from == to {
            return Err(bad());
        }
        Ok(Hours { from, to })
    }
    /// Whether `hour` (0–23, UTC) is inside the range.
    pub fn contains(&self, hour: u8) -> bool {
        if self.from < self.to {
            (self.from..self.to).contains(&hour)
        } else {
            hour >= self.from || hour < self.to
        }
    }
}

impl fmt::Display for Hours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}-{:02}", self.from, self.to)
    }
}

impl<'de> Deserialize<'de> for Hours {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Hours::parse(&s).map_err(de::Error::custom)
    }
}

impl Serialize for Hours {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A calendar date `YYYY-MM-DD` (UTC), kept as days since 1970-01-01.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    pub days: i64,
}

impl Date {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a date (use YYYY-MM-DD)");
        let mut it = s.trim().splitn(3, '-');
        let (y, m, d) = (
            it.next()
                .and_then(|v| v.parse::<i64>().ok())
                .ok_or_else(bad)?,
            it.next()
                .and_then(|v| v.parse::<u32>().ok())
                .ok_or_else(bad)?,
            it.next()
                .and_then(|v| v.parse::<u32>().ok())
                .ok_or_else(bad)?,
        );
        let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let month_days = [
            31,
            if leap { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) {
            return Err(bad());
        }
        if d == 0 || d > month_days[(m - 1) as usize] {
            return Err(bad());
        }
        Ok(Date {
            days: days_from_civil(y, m, d),
        })
    }
    /// Unix time of the end of this day (the first second of the next day).
    pub fn end_unix(&self) -> u64 {
        ((self.days + 1) * 86_400) as u64
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Inverse of days_from_civil.
        let z = self.days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

impl<'de> Deserialize<'de> for Date {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Date::parse(&s).map_err(de::Error::custom)
    }
}

impl Serialize for Date {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// `[server]`: where and how the NBD server listens.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// TCP addresses (`--listen` adds to them).
    pub listen: Vec<String>,
    /// Unix socket path for NBD clients.
    pub socket: Option<String>,
    /// Export every volume read-only.
    pub read_only: bool,
}

/// `[rotation]`: epochs, background re-encryption and key retention.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RotationSection {
    /// Length of an epoch: new writes use a new epoch's keys after each period.
    pub period: Span,
    /// Blocks sealed in an epoch older than this are re-encrypted in the background.
    pub max_age: Span,
    /// Re-encryption rate limit, MB/s (1 MB = 10^6 bytes).
    pub rate: f64,
    /// Accesses to one stripe within `hot_window` that make it rotate early (0: off).
    pub hot_threshold: u64,
    pub hot_window: Span,
    /// How long an archived master key version is kept before it may be destroyed.
    pub retention: Span,
}

impl Default for RotationSection {
    fn default() -> Self {
        Self {
            period: Span::secs(86_400),
            max_age: Span::secs(30 * 86_400),
            rate: 50.0,
            hot_threshold: 100_000,
            hot_window: Span::secs(3600),
            retention: Span::secs(90 * 86_400),
        }
    }
}

/// `[unlock]`: multi-party unsealing of a server started without shares.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UnlockSection {
    /// Shares given so far are discarded when the threshold is not met within this time.
    pub timeout: Span,
    /// UTC hours in which unsealing is allowed.
    pub allowed_hours: Hours,
    /// Last day (UTC) on which unsealing is allowed.
    pub not_after: Option<Date>,
}

impl Default for UnlockSection {
    fn default() -> Self {
        Self {
            timeout: Span::secs(600),
            allowed_hours: Hours::ALWAYS,
            not_after: None,
        }
    }
}

/// `[scrub]`: scheduled scrubbing.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScrubSection {
    /// Time between scheduled scrubs of every volume ("0": no scheduled scrub).
    pub interval: Span,
    /// Rate limit, MB/s.
    pub rate: f64,
    /// Repair what a scheduled scrub finds.
    pub repair: bool,
}

impl Default for ScrubSection {
    fn default() -> Self {
        Self {
            interval: Span::secs(7 * 86_400),
            rate: 100.0,
            repair: true,
        }
    }
}

/// `[rebuild]`: disk replacement and rebalancing.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RebuildSection {
    /// Rate limit, MB/s.
    pub rate: f64,
}

impl Default for RebuildSection {
    fn default() -> Self {
        Self { rate: 200.0 }
    }
}

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerSection,
    pub rotation: RotationSection,
    pub unlock: UnlockSection,
    pub scrub: ScrubSection,
    pub rebuild: RebuildSection,
}

impl Config {
    /// Parses and checks a configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: origin.to_string(),
            msg: e.to_string().trim_end().to_string(),
        })?;
        c.check().map_err(|msg| ConfigError::Invalid {
            path: origin.to_string(),
            msg,
        })?;
        Ok(c)
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Range checks the types cannot express.
    fn check(&self) -> Result<(), String> {
        let rate = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{name} = {v}: must be a positive number of MB/s"))
            }
        };
        let r = &self.rotation;
        if r.period.0 < Duration::from_secs(1) {
            return Err(format!(
                "rotation.period = \"{}\": must be at least 1s",
                r.period
            ));
        }
        if r.max_age < r.period {
            return Err(format!(
                "rotation.max_age = \"{}\" is shorter than rotation.period = \"{}\": every block would always be due",
                r.max_age, r.period
            ));
        }
        rate("rotation.rate", r.rate)?;
        if r.hot_threshold > 0 && r.hot_window.0.is_zero() {
            return Err(
                "rotation.hot_window must be longer than 0 when rotation.hot_threshold is set"
                    .into(),
            );
        }
        if self.unlock.timeout.0 < Duration::from_secs(1) {
            return Err("unlock.timeout must be at least 1s".into());
        }
        rate("scrub.rate", self.scrub.rate)?;
        rate("rebuild.rate", self.rebuild.rate)?;
        Ok(())
    }

    /// The configuration as TOML (every key, defaults included).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("", "t").unwrap(), Config::default());
    }

    #[test]
    fn every_key_parses_and_prints_back() {
        let text = r#"
[server]
listen = ["127.0.0.1:10809", "[::1]:10809"]
socket = "/run/shardvol/nbd.sock"
read_only = true
[rotation]
period = "10s"
max_age = "1m"
rate = 5.5
hot_threshold = 100
hot_window = "30s"
retention = "2w"
[unlock]
timeout = "5m"
allowed_hours = "22-06"
not_after = "2027-02-28"
[scrub]
interval = "0"
rate = 10
repair = false
[rebuild]
rate = 20
"#;
        let c = Config::parse(text, "t").unwrap();
        assert_eq!(c.rotation.period, Span::secs(10));
        assert_eq!(c.rotation.retention, Span::secs(14 * 86_400));
        assert_eq!(c.unlock.allowed_hours, Hours { from: 22, to: 6 });
        assert_eq!(c.unlock.not_after.unwrap().to_string(), "2027-02-28");
        assert!(c.server.read_only);
        assert_eq!(Config::parse(&c.to_toml(), "again").unwrap(), c);
    }

    #[test]
    fn unknown_keys_and_sections_are_named() {
        let e = Config::parse("[rotation]\nperoid = \"1h\"\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f.toml") && e.contains("peroid") && e.contains("period"),
            "{e}"
        );
        let e = Config::parse("[rotate]\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rotate") && e.contains("rotation"), "{e}");
    }

    #[test]
    fn bad_values_are_explained() {
        for (text, want) in [
            ("[rotation]\nperiod = \"1x\"", "unknown unit"),
            ("[rotation]\nperiod = \"10\"", "no unit"),
            ("[rotation]\nrate = -1", "positive"),
            (
                "[rotation]\nperiod = \"2h\"\nmax_age = \"1h\"",
                "shorter than",
            ),
            ("[unlock]\nallowed_hours = \"8 to 18\"", "hour range"),
            ("[unlock]\nallowed_hours = \"25-02\"", "hour range"),
            ("[unlock]\nnot_after = \"2027-02-30\"", "not a date"),
            ("[scrub]\nrate = 0", "positive"),
            ("[rotation]\nrate = \"fast\"", "invalid type"),
        ] {
            let e = Config::parse(text, "t").unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn hour_ranges_and_dates() {
        let day = Hours::parse("08-18").unwrap();
        assert!(day.contains(8) && day.contains(17) && !day.contains(18) && !day.contains(7));
        let night = Hours::parse("22-06").unwrap();
        assert!(night.contains(23) && night.contains(0) && night.contains(5) && !night.contains(6));
        assert!((0..24).all(|h| Hours::ALWAYS.contains(h)));
        assert_eq!(Date::parse("1970-01-01").unwrap().days, 0);
        assert_eq!(Date::parse("2000-03-01").unwrap().days, 11_017);
        assert_eq!(Date::parse("2024-02-29").unwrap().to_string(), "2024-02-29");
        assert!(Date::parse("2023-02-29").is_err());
        assert_eq!(Date::parse("1970-01-01").unwrap().end_unix(), 86_400);
    }
}
