//! When a rule runs by itself: every `interval`, or at the times of a five-field cron
//! expression (minute, hour, day of month, month, day of week; UTC), with `*`, lists (`1,15`),
//! ranges (`1-5`) and steps (`*/10`, `0-30/5`). As in cron, when both day fields are
//! restricted a day matching either runs.

use std::time::Duration;

use pier_units::HumanDuration;

use crate::SyncError;

/// A rule's schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    Every(Duration),
    Cron(Box<Cron>),
}

impl Schedule {
    pub fn from_parts(
        rule: &str,
        interval: Option<HumanDuration>,
        cron: Option<&str>,
    ) -> Result<Option<Schedule>, SyncError> {
        match (interval, cron) {
            (Some(_), Some(_)) => Err(SyncError::Config(format!(
                "rule {rule}: give interval or cron, not both"
            ))),
            (Some(HumanDuration(d)), None) if d < Duration::from_secs(1) => Err(SyncError::Config(
                format!("rule {rule}: an interval under 1s"),
            )),
            (Some(HumanDuration(d)), None) => Ok(Some(Schedule::Every(d))),
            (None, Some(expr)) => Cron::parse(expr)
                .map(|c| Some(Schedule::Cron(Box::new(c))))
                .map_err(|e| SyncError::Config(format!("rule {rule}: cron {expr:?}: {e}"))),
            (None, None) => Ok(None),
        }
    }

    /// The next run after `after_ms` (unix milliseconds): an interval counts from the last
    /// run, cron from the next matching minute.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        match self {
            Schedule::Every(d) => Some(after_ms.saturating_add(d.as_millis() as u64)),
            Schedule::Cron(c) => c.next_after(after_ms),
        }
    }

    /// Whether the rule also runs once when pier starts (intervals do; cron keeps its times).
    pub fn runs_at_start(&self) -> bool {
        matches!(self, Schedule::Every(_))
    }
}

/// A parsed cron expression: the allowed values of each field as bit sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_restricted: bool,
    weekdays_restricted: bool,
}

impl Cron {
    pub fn parse(expr: &str) -> Result<Cron, String> {
        let fields: Vec<&str> = expr.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!("{} fields, not 5", fields.len()));
        }
        let weekdays = field(fields[4], 0, 7, "day of week")?;
        // Sunday is 0 or 7.
        let weekdays = if weekdays & (1 << 7) != 0 {
            (weekdays | 1) & !(1 << 7)
        } else {
            weekdays
        };
        Ok(Cron {
            minutes: field(fields[0], 0, 59, "minute")?,
            hours: field(fields[1], 0, 23, "hour")?,
            days: field(fields[2], 1, 31, "day of month")?,
            months: field(fields[3], 1, 12, "month")?,
            weekdays,
            days_restricted: fields[2] != "*",
            weekdays_restricted: fields[4] != "*",
        })
    }

    /// The first whole minute strictly after `after_ms` that matches, within eight years.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        let mut minute = after_ms / 60_000 + 1;
        let limit = minute + 8 * 366 * 24 * 60;
        while minute < limit {
            let days = minute / (24 * 60);
            let (_, month, day) = civil(days as i64);
            let weekday = (days + 4) % 7; // 1970-01-01 was a Thursday.
            let day_ok = match (self.days_restricted, self.weekdays_restricted) {
                (true, true) => bit(self.days, day) || bit(self.weekdays, weekday),
                _ => bit(self.days, day) && bit(self.weekdays, weekday),
            };
            if !bit(self.months, month) || !day_ok {
                minute = (days + 1) * 24 * 60;
                continue;
            }
            let hour = (minute / 60) % 24;
            if !bit(self.hours, hour) {
                minute = (minute / 60 + 1) * 60;
                continue;
            }
            if bit(self.minutes, minute % 60) {
                return Some(minute * 60_000);
            }
            minute += 1;
        }
        None
    }
}

fn bit(set: u64, n: u64) -> bool {
    n < 64 && set & (1 << n) != 0
}

/// One cron field as a bit set of the values in `min..=max` it allows.
fn field(text: &str, min: u64, max: u64, what: &str) -> Result<u64, String> {
    let mut set = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u64 = s
                    .parse()
                    .map_err(|_| format!("{what}: step {s:?} is not a number"))?;
                if step == 0 {
                    return Err(format!("{what}: a step of 0"));
                }
                (r, step)
            }
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (number(a, what)?, number(b, what)?)
        } else {
            let n = number(range, what)?;
            // `5/10` means from 5 to the end in steps of 10.
            (n, if step > 1 { max } else { n })
        };
        if lo < min || hi > max || lo > hi {
            return Err(format!("{what}: {range} is outside {min}-{max}"));
        }
        let mut v = lo;
        while v <= hi {
            set |= 1 << v;
            v += step;
        }
    }
    Ok(set)
}

fn number(s: &str, what: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| format!("{what}: {s:?} is not a number"))
}

/// The (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix milliseconds of a UTC time (days since the epoch worked out by hand).
    const MON_2024_01_01: u64 = 1_704_067_200_000;
    const MINUTE: u64 = 60_000;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;

    fn next(expr: &str, after: u64) -> u64 {
        Cron::parse(expr).unwrap().next_after(after).unwrap()
    }

    #[test]
    fn cron_finds_the_next_matching_minute() {
        let t = MON_2024_01_01;
        assert_eq!(civil(((t / DAY) as i64).to_owned()), (2024, 1, 1));
        assert_eq!(next("* * * * *", t), t + MINUTE);
        assert_eq!(next("*/15 * * * *", t + MINUTE), t + 15 * MINUTE);
        assert_eq!(next("30 3 * * *", t), t + 3 * HOUR + 30 * MINUTE);
        assert_eq!(
            next("30 3 * * *", t + 4 * HOUR),
            t + DAY + 3 * HOUR + 30 * MINUTE
        );
        // Saturday 2024-01-06, and Sunday as 0 or 7.
        assert_eq!(next("0 0 * * 6", t), t + 5 * DAY);
        assert_eq!(next("0 0 * * 7", t), t + 6 * DAY);
        assert_eq!(next("0 0 * * 0", t), t + 6 * DAY);
        // The first of next month; February 29th of the leap year.
        assert_eq!(next("0 0 1 * *", t), t + 31 * DAY);
        assert_eq!(next("0 12 29 2 *", t), t + 59 * DAY + 12 * HOUR);
        // Either day field may match when both are given: the 10th, or any Friday.
        assert_eq!(next("0 0 10 * 5", t), t + 4 * DAY);
        assert_eq!(next("0 0 1-3 * 1-5", t + DAY), t + 2 * DAY);
    }

    #[test]
    fn bad_cron_is_refused() {
        for bad in [
            "* * * *",
            "60 * * * *",
            "* 24 * * *",
            "*/0 * * * *",
            "a * * * *",
            "5-1 * * * *",
        ] {
            assert!(Cron::parse(bad).is_err(), "{bad}");
        }
        assert!(Cron::parse("0 0 31 2 *").unwrap().next_after(0).is_none());
    }

    #[test]
    fn schedules_from_rule_settings() {
        let every = Schedule::from_parts("r", Some(HumanDuration(Duration::from_secs(60))), None)
            .unwrap()
            .unwrap();
        assert_eq!(every.next_after(1_000), Some(61_000));
        assert!(every.runs_at_start());
        assert!(Schedule::from_parts(
            "r",
            Some(HumanDuration(Duration::from_secs(1))),
            Some("* * * * *")
        )
        .is_err());
        assert_eq!(Schedule::from_parts("r", None, None).unwrap(), None);
    }
}
