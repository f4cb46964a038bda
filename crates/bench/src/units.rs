//! Human units on the command line and in the table: sizes (`200MiB`, `4k`), durations (`30s`,
//! `250ms`), and their formatting.

use std::time::Duration;

/// Parse a size: a number with an optional unit. `k`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB` are
/// powers of 1024 (as `dd` and `docker` read them); `KB`, `MB`, `GB`, `TB` are powers of 1000.
/// `B` or no unit means bytes. Fractions are allowed (`1.5MiB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512, 64KiB, 200MiB, 1GB)"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    let bytes = number * multiplier as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(bytes.round() as u64)
}

/// Parse a duration: a number with a unit among `us`, `ms`, `s`, `m`, `h` (`1.5s`, `250ms`).
/// A bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 30s, 2m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "us" | "µs" => number / 1e6,
        "ms" => number / 1e3,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{s:?} is out of range"))
}

/// `START:STEP:MAX` of `--ramp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RampSpec {
    pub start: usize,
    pub step: usize,
    pub max: usize,
}

pub fn parse_ramp(s: &str) -> Result<RampSpec, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("{s:?} is not START:STEP:MAX (e.g. 1:4:64)");
    let [start, step, max] = parts[..] else {
        return Err(bad());
    };
    let n = |p: &str| p.trim().parse::<usize>().map_err(|_| bad());
    let spec = RampSpec {
        start: n(start)?,
        step: n(step)?,
        max: n(max)?,
    };
    if spec.start == 0 || spec.step == 0 || spec.max < spec.start {
        return Err(format!(
            "{s:?}: START and STEP must be at least 1 and MAX at least START"
        ));
    }
    Ok(spec)
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

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("200MiB"), Ok(200 << 20));
        assert_eq!(parse_size("1.5MiB"), Ok(3 << 19));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("50us"), Ok(Duration::from_micros(50)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 fortnights").is_err());
    }

    #[test]
    fn ramps() {
        assert_eq!(
            parse_ramp("1:4:64"),
            Ok(RampSpec {
                start: 1,
                step: 4,
                max: 64
            })
        );
        assert!(parse_ramp("0:1:4").is_err());
        assert!(parse_ramp("8:1:4").is_err());
        assert!(parse_ramp("1:4").is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(format_ms(0.25), "250µs");
        assert_eq!(format_ms(4.5), "4.50ms");
        assert_eq!(format_ms(1234.0), "1.23s");
        assert_eq!(format_bytes(999), "999 B");
        assert_eq!(format_bytes(1_500_000), "1.5 MB");
    }
}
