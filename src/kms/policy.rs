//! Tunables of the key lifecycle, as the key code uses them: built from the `[rotation]` and
//! `[unlock]` sections of the server configuration ([`crate::config`], which parses and checks
//! the file), with the access-window check that refuses unsealing outside `unlock.allowed_hours`
//! and after `unlock.not_after`.

#![forbid(unsafe_code)]

use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, Date, Hours};

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

/// The defaults are the configuration's (`crate::config`): one place for every default.
impl Default for RotationPolicy {
    fn default() -> Self {
        KeyPolicy::from_config(&Config::default()).rotation
    }
}

/// `[unlock]`: how shares are collected and when unsealing is allowed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UnlockPolicy {
    /// Partial progress of an unlock session is discarded this long after its first share.
    pub timeout: Duration,
    /// Hours of the day (UTC) when unsealing is allowed: `[from, to)`; `to < from` wraps midnight.
    #[serde(skip)]
    pub allowed_hours: Option<Hours>,
    /// Unsealing is refused after this instant (Unix seconds, UTC).
    pub not_after: Option<u64>,
}

impl Default for UnlockPolicy {
    fn default() -> Self {
        KeyPolicy::from_config(&Config::default()).unlock
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
        if let Some(h) = self.allowed_hours {
            let day_secs = now % 86_400;
            let hour = (day_secs / 3600) as u8;
            let minute = ((day_secs % 3600) / 60) as u8;
            if !h.contains(hour) {
                return Err(PolicyRefusal::OutsideHours {
                    from: h.from,
                    to: h.to,
                    hour,
                    minute,
                });
            }
        }
        Ok(())
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_utc(unix: u64) -> String {
    let s = unix % 86_400;
    format!(
        "{} {:02}:{:02}:{:02} UTC",
        Date {
            days: (unix / 86_400) as i64
        },
        s / 3600,
        (s % 3600) / 60,
        s % 60
    )
}

/// Both sections, as the key code uses them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KeyPolicy {
    pub rotation: RotationPolicy,
    pub unlock: UnlockPolicy,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self::from_config(&Config::default())
    }
}

impl KeyPolicy {
    /// The key policy of a server configuration.
    pub fn from_config(c: &Config) -> Self {
        let r = &c.rotation;
        let u = &c.unlock;
        Self {
            rotation: RotationPolicy {
                period: r.period.0,
                max_age: r.max_age.0,
                rate_bytes: (r.rate * 1e6) as u64,
                hot_threshold: r.hot_threshold,
                hot_window: r.hot_window.0,
                retention: r.retention.0,
            },
            unlock: UnlockPolicy {
                timeout: u.timeout.0,
                allowed_hours: (u.allowed_hours != Hours::ALWAYS).then_some(u.allowed_hours),
                // The configuration names the last allowed day; its end is the first refused second.
                not_after: u.not_after.map(|d| d.end_unix() - 1),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hour_windows_include_start_exclude_end_and_wrap_midnight() {
        let p = UnlockPolicy {
            allowed_hours: Some(Hours::parse("08-18").unwrap()),
            ..Default::default()
        };
        let at = |h: u64, m: u64| 86_400 * 100 + h * 3600 + m * 60;
        assert!(p.check(at(8, 0)).is_ok());
        assert!(p.check(at(17, 59)).is_ok());
        let e = p.check(at(18, 0)).unwrap_err();
        assert!(e.to_string().contains("08:00 and 18:00"), "{e}");
        assert!(p.check(at(7, 59)).is_err());
        let night = UnlockPolicy {
            allowed_hours: Some(Hours::parse("22-06").unwrap()),
            ..Default::default()
        };
        assert!(night.check(at(23, 0)).is_ok());
        assert!(night.check(at(5, 0)).is_ok());
        assert!(night.check(at(12, 0)).is_err());
    }

    #[test]
    fn config_sections_become_the_key_policy() {
        let c = Config::parse(
            "[rotation]\nperiod = \"2s\"\nmax_age = \"4s\"\nrate = 5\nhot_threshold = 3\n[unlock]\nallowed_hours = \"08-18\"\nnot_after = \"2000-03-01\"\n",
            "t",
        )
        .unwrap();
        let p = KeyPolicy::from_config(&c);
        assert_eq!(p.rotation.period, Duration::from_secs(2));
        assert_eq!(p.rotation.rate_bytes, 5_000_000);
        assert_eq!(p.rotation.hot_threshold, 3);
        assert_eq!(p.unlock.allowed_hours, Some(Hours { from: 8, to: 18 }));
        // The whole last day is allowed, the next second is not.
        let day = UnlockPolicy {
            allowed_hours: None,
            ..p.unlock.clone()
        };
        assert!(day.check(951_868_800 + 86_399).is_ok());
        let e = day.check(951_868_800 + 86_400).unwrap_err().to_string();
        assert!(e.contains("2000-03-01 23:59:59 UTC"), "{e}");
        assert_eq!(
            KeyPolicy::from_config(&Config::default())
                .unlock
                .allowed_hours,
            None
        );
    }
}
