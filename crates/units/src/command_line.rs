//! Sizes and durations as `pier bench`'s flags take them and its table prints them. Unlike the
//! configuration's, a number may have a fraction (`1.5MiB`, `0.5s`) and a bare prefix letter
//! (`4k`) is a power of 1024, as `dd` and `docker` read it.

use std::time::Duration;

use crate::size::COMMAND_LINE;
use crate::split;

/// Parse a size: a number with an optional unit. `k`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB` are
/// powers of 1024 (as `dd` and `docker` read them); `KB`, `MB`, `GB`, `TB` are powers of 1000.
/// `B` or no unit means bytes. Fractions are allowed (`1.5MiB`), rounded to a whole byte.
pub fn parse_size(s: &str) -> Result<u64, String> {
    COMMAND_LINE.parse(s.trim())
}

/// Parse a duration: a number with a unit among `us` (or `µs`), `ms`, `s`, `m` (or `min`) and
/// `h` (`1.5s`, `250ms`). A bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = split(s, true);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 30s, 2m)"))?;
    let seconds = match unit {
        "" | "s" => number,
        "us" | "µs" => number / 1e6,
        "ms" => number / 1e3,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{s:?} is out of range"))
}

/// Bytes in decimal units, to match the MB/s column.
pub fn format_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e12 {
        format!("{:.2} TB", b / 1e12)
    } else if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

/// A latency given in milliseconds, with a unit that keeps three significant digits readable.
pub fn format_ms(ms: f64) -> String {
    if ms >= 10_000.0 {
        format!("{:.1}s", ms / 1e3)
    } else if ms >= 1_000.0 {
        format!("{:.2}s", ms / 1e3)
    } else if ms >= 10.0 {
        format!("{ms:.1}ms")
    } else if ms >= 1.0 {
        format!("{ms:.2}ms")
    } else {
        format!("{:.0}µs", ms * 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: PartialEq + Clone + std::fmt::Debug>(
        parse: fn(&str) -> Result<T, String>,
        cases: &[(&str, Result<T, &str>)],
    ) {
        for (s, want) in cases {
            let want = want.clone().map_err(|e| e.to_string());
            assert_eq!(parse(s), want, "{s:?}");
        }
    }

    #[test]
    fn durations() {
        let ms = |n: u64| Ok(Duration::from_millis(n));
        check(
            parse_duration,
            &[
                ("30s", Ok(Duration::from_secs(30))),
                ("250ms", ms(250)),
                ("2m", Ok(Duration::from_secs(120))),
                ("1.5", ms(1500)),
                ("50us", Ok(Duration::from_micros(50))),
                ("50µs", Ok(Duration::from_micros(50))),
                ("2min", Ok(Duration::from_secs(120))),
                ("1.5h", Ok(Duration::from_secs(5400))),
                ("0.5ms", Ok(Duration::from_micros(500))),
                (" 10 s ", Ok(Duration::from_secs(10))),
                ("0", Ok(Duration::ZERO)),
                (
                    "soon",
                    Err("\"soon\" is not a duration (e.g. 500ms, 30s, 2m)"),
                ),
                (
                    "-1s",
                    Err("\"-1s\" is not a duration (e.g. 500ms, 30s, 2m)"),
                ),
                (
                    "5 fortnights",
                    Err("unknown duration unit \"fortnights\" in \"5 fortnights\""),
                ),
                // Case-sensitive, and no days.
                ("2M", Err("unknown duration unit \"M\" in \"2M\"")),
                ("1d", Err("unknown duration unit \"d\" in \"1d\"")),
                (
                    "100000000000000000000h",
                    Err("\"100000000000000000000h\" is out of range"),
                ),
            ],
        );
    }

    #[test]
    fn formats() {
        for (ms, text) in [
            (0.25, "250µs"),
            (4.5, "4.50ms"),
            (12.34, "12.3ms"),
            (1234.0, "1.23s"),
            (12_345.0, "12.3s"),
        ] {
            assert_eq!(format_ms(ms), text, "{ms}");
        }
        for (bytes, text) in [
            (999, "999 B"),
            (1_000, "1.0 kB"),
            (1_500_000, "1.5 MB"),
            (2_500_000_000, "2.50 GB"),
            (1_000_000_000_000, "1.00 TB"),
        ] {
            assert_eq!(format_bytes(bytes), text, "{bytes}");
        }
    }
}
