//! Durations as the configuration writes them: whole numbers of `ms`, `s`, `m`, `h` or `d`.

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::split;

/// A duration written as seconds (`90`) or with a unit (`"500ms"`, `"90s"`, `"10m"`, `"6h"`,
/// `"7d"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (number, unit) = split(s, false);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{s:?} is not a duration such as 90s, 10m or 6h"))?;
        let ms: u64 = match unit {
            "ms" => 1,
            "" | "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
        };
        n.checked_mul(ms)
            .map(|ms| HumanDuration(Duration::from_millis(ms)))
            .ok_or_else(|| format!("{s:?} is too long"))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::int_or_text(d, |n| HumanDuration(Duration::from_secs(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(cases: &[(&str, Result<u64, &str>)]) {
        for (s, want) in cases {
            let want = want
                .map(|ms| HumanDuration(Duration::from_millis(ms)))
                .map_err(|e| e.to_string());
            assert_eq!(s.parse::<HumanDuration>(), want, "{s:?}");
        }
    }

    #[test]
    fn durations() {
        check(&[
            ("90", Ok(90_000)),
            ("500ms", Ok(500)),
            ("10m", Ok(600_000)),
            ("2h", Ok(7_200_000)),
            ("90s", Ok(90_000)),
            ("7d", Ok(7 * 86_400_000)),
            ("0s", Ok(0)),
            ("0", Ok(0)),
            (" 5 m ", Ok(300_000)),
            ("18446744073709551615ms", Ok(u64::MAX)),
            (
                "10 fortnights",
                Err("unknown duration unit \"fortnights\" in \"10 fortnights\""),
            ),
            // Units are case-sensitive and whole numbers only; nothing below milliseconds.
            ("10M", Err("unknown duration unit \"M\" in \"10M\"")),
            ("1H", Err("unknown duration unit \"H\" in \"1H\"")),
            ("1.5h", Err("unknown duration unit \".5h\" in \"1.5h\"")),
            ("50us", Err("unknown duration unit \"us\" in \"50us\"")),
            ("2min", Err("unknown duration unit \"min\" in \"2min\"")),
            (
                "soon",
                Err("\"soon\" is not a duration such as 90s, 10m or 6h"),
            ),
            ("", Err("\"\" is not a duration such as 90s, 10m or 6h")),
            (
                "-1s",
                Err("\"-1s\" is not a duration such as 90s, 10m or 6h"),
            ),
            (
                "18446744073709551615s",
                Err("\"18446744073709551615s\" is too long"),
            ),
        ]);
    }

    #[derive(Debug, Deserialize)]
    struct Table {
        every: Option<HumanDuration>,
    }

    #[test]
    fn toml_takes_seconds_and_strings() {
        let every = |text: &str| {
            toml::from_str::<Table>(text)
                .map(|t| t.every.map(|d| d.0))
                .map_err(|e| e.message().to_string())
        };
        assert_eq!(every("every = 90"), Ok(Some(Duration::from_secs(90))));
        assert_eq!(
            every("every = \"24h\""),
            Ok(Some(Duration::from_secs(86_400)))
        );
        assert_eq!(every(""), Ok(None));
        assert_eq!(
            every("every = \"1w\""),
            Err("unknown duration unit \"w\" in \"1w\"".to_string())
        );
        assert_eq!(
            every("every = 1.5"),
            Err("data did not match any variant of untagged enum Raw".to_string())
        );
    }
}
