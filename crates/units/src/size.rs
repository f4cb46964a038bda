//! Byte sizes and rates: a number, then an optional unit of bytes (`B`), a decimal prefix
//! (`KB`, `MB`, …), a binary one (`KiB`, `MiB`, …) or a bare prefix letter (`k`, `M`, …), the
//! unit's case ignored.

use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use crate::split;

/// A size in bytes, written in TOML as an integer or a string such as `"4MiB"` or `"1 GB"`: a
/// whole number, and a bare `k`, `M`, `G` or `T` is a power of 1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// A rate in bytes per second, written as an integer or a size such as `"50MiB"` (or
/// `"50MiB/s"`), up to gigabytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

/// How one syntax writes a size.
pub(crate) struct Syntax {
    /// Whether the number may have a fractional part (`1.5MiB`).
    fractions: bool,
    /// What a bare prefix letter (`k`, `M`) multiplies by: 1000 or 1024.
    bare: u64,
    /// The largest prefix allowed, counted from `k` as 1.
    largest: u32,
    /// What the message for a string without a number says it is not.
    not_a: &'static str,
}

const CONFIG: Syntax = Syntax {
    fractions: false,
    bare: 1000,
    largest: 4,
    not_a: "size such as 4MiB",
};

const RATE: Syntax = Syntax {
    fractions: false,
    bare: 1000,
    largest: 3,
    not_a: "rate such as 50MiB",
};

pub(crate) const COMMAND_LINE: Syntax = Syntax {
    fractions: true,
    bare: 1024,
    largest: 4,
    not_a: "size (e.g. 512, 64KiB, 200MiB, 1GB)",
};

impl Syntax {
    /// The bytes `s` (already trimmed) stands for. The number is read before the unit, so a
    /// string without one is "not a size" whatever follows.
    pub(crate) fn parse(&self, s: &str) -> Result<u64, String> {
        let (number, unit) = split(s, self.fractions);
        let not_a = || format!("{s:?} is not a {}", self.not_a);
        let unit = unit.to_ascii_lowercase();
        let unknown = || format!("unknown size unit {unit:?} in {s:?}");
        let too_large = || format!("{s:?} is too large");
        if self.fractions {
            let number: f64 = number.parse().map_err(|_| not_a())?;
            let bytes = number * self.multiplier(&unit).ok_or_else(unknown)? as f64;
            if !bytes.is_finite() || bytes > u64::MAX as f64 {
                return Err(too_large());
            }
            Ok(bytes.round() as u64)
        } else {
            let number: u64 = number.parse().map_err(|_| not_a())?;
            let multiplier = self.multiplier(&unit).ok_or_else(unknown)?;
            number.checked_mul(multiplier).ok_or_else(too_large)
        }
    }

    /// The bytes one `unit` (lower case) is.
    fn multiplier(&self, unit: &str) -> Option<u64> {
        if unit.is_empty() || unit == "b" {
            return Some(1);
        }
        let power = ["k", "m", "g", "t"]
            .iter()
            .position(|p| unit.starts_with(p))? as u32
            + 1;
        let base = match &unit[1..] {
            "" => self.bare,
            "b" => 1000,
            "ib" => 1024,
            _ => return None,
        };
        (power <= self.largest).then(|| base.pow(power))
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CONFIG.parse(s.trim()).map(ByteSize)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::int_or_text(d, ByteSize)
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        // The messages name what is left once `/s` is taken off.
        let s = s.strip_suffix("/s").unwrap_or(s);
        RATE.parse(s).map(Rate)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::int_or_text(d, Rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::command_line::parse_size;

    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;
    const T: u64 = 1 << 40;
    const NO: Option<u64> = None;

    /// Each input as a `ByteSize`, as a `Rate` and as a size of `pier bench`'s flags reads it
    /// (`NO`: refused; the messages are in `messages_name_the_input`).
    #[test]
    fn sizes_in_each_syntax() {
        #[rustfmt::skip]
        let cases = [
            // input                  ByteSize                    Rate             command line
            ("17",                    Some(17),                   Some(17),        Some(17)),
            ("0",                     Some(0),                    Some(0),         Some(0)),
            ("512B",                  Some(512),                  Some(512),       Some(512)),
            ("512 b",                 Some(512),                  Some(512),       Some(512)),
            ("  4MiB  ",              Some(4 * M),                Some(4 * M),     Some(4 * M)),
            ("3MIB",                  Some(3 * M),                Some(3 * M),     Some(3 * M)),
            ("2kib",                  Some(2 * K),                Some(2 * K),     Some(2 * K)),
            ("200MiB",                Some(200 * M),              Some(200 * M),   Some(200 * M)),
            ("2 GiB",                 Some(2 * G),                Some(2 * G),     Some(2 * G)),
            ("1 GB",                  Some(1_000_000_000),        Some(1_000_000_000), Some(1_000_000_000)),
            ("4kB",                   Some(4_000),                Some(4_000),     Some(4_000)),
            ("4KB",                   Some(4_000),                Some(4_000),     Some(4_000)),
            ("3mb",                   Some(3_000_000),            Some(3_000_000), Some(3_000_000)),
            // A bare letter: a power of 1000 in the configuration, of 1024 on the command line.
            ("4k",                    Some(4_000),                Some(4_000),     Some(4 * K)),
            ("4K",                    Some(4_000),                Some(4_000),     Some(4 * K)),
            ("3M",                    Some(3_000_000),            Some(3_000_000), Some(3 * M)),
            ("2g",                    Some(2_000_000_000),        Some(2_000_000_000), Some(2 * G)),
            // Rates stop at G.
            ("2T",                    Some(2_000_000_000_000),    NO,              Some(2 * T)),
            ("2TB",                   Some(2_000_000_000_000),    NO,              Some(2_000_000_000_000)),
            ("2TiB",                  Some(2 * T),                NO,              Some(2 * T)),
            // Only a rate may end in `/s`.
            ("1MB/s",                 NO,                         Some(1_000_000), NO),
            ("1 MB/s",                NO,                         Some(1_000_000), NO),
            ("1MB /s",                NO,                         Some(1_000_000), NO),
            ("100/s",                 NO,                         Some(100),       NO),
            ("1MiB/s",                NO,                         Some(M),         NO),
            ("1MB/S",                 NO,                         NO,              NO),
            ("1MB/m",                 NO,                         NO,              NO),
            // Only the command line takes fractions, rounded to the nearest byte.
            ("1.5MiB",                NO,                         NO,              Some(3 << 19)),
            ("0.5k",                  NO,                         NO,              Some(512)),
            (".5k",                   NO,                         NO,              Some(512)),
            ("1.",                    NO,                         NO,              Some(1)),
            ("1.0001k",               NO,                         NO,              Some(1024)),
            ("0.5",                   NO,                         NO,              Some(1)),
            ("0.4",                   NO,                         NO,              Some(0)),
            // The largest number; one more is the same float on the command line.
            ("18446744073709551615",  Some(u64::MAX),             Some(u64::MAX),  Some(u64::MAX)),
            ("18446744073709551616",  NO,                         NO,              Some(u64::MAX)),
            ("99999999999999 TiB",    NO,                         NO,              NO),
            ("20000000TiB",           NO,                         NO,              NO),
            ("MiB",                   NO,                         NO,              NO),
            ("",                      NO,                         NO,              NO),
            ("-1",                    NO,                         NO,              NO),
            (".",                     NO,                         NO,              NO),
            ("1.2.3k",                NO,                         NO,              NO),
            ("4 parsecs",             NO,                         NO,              NO),
            ("1e3",                   NO,                         NO,              NO),
            ("1PiB",                  NO,                         NO,              NO),
            ("1Ki",                   NO,                         NO,              NO),
        ];
        for (s, size, rate, flag) in cases {
            assert_eq!(
                s.parse::<ByteSize>().ok(),
                size.map(ByteSize),
                "ByteSize {s:?}"
            );
            assert_eq!(s.parse::<Rate>().ok(), rate.map(Rate), "Rate {s:?}");
            assert_eq!(parse_size(s).ok(), flag, "command line {s:?}");
        }
    }

    #[test]
    fn messages_name_the_input() {
        let size = |s: &str| s.parse::<ByteSize>().unwrap_err();
        let rate = |s: &str| s.parse::<Rate>().unwrap_err();
        let flag = |s: &str| parse_size(s).unwrap_err();
        for (got, want) in [
            (size("MiB"), "\"MiB\" is not a size such as 4MiB"),
            (size(" -1 "), "\"-1\" is not a size such as 4MiB"),
            (
                size("18446744073709551616"),
                "\"18446744073709551616\" is not a size such as 4MiB",
            ),
            (
                size("4 parsecs"),
                "unknown size unit \"parsecs\" in \"4 parsecs\"",
            ),
            (size("1.5MiB"), "unknown size unit \".5mib\" in \"1.5MiB\""),
            (size("1MiB/s"), "unknown size unit \"mib/s\" in \"1MiB/s\""),
            (
                size("99999999999999 TiB"),
                "\"99999999999999 TiB\" is too large",
            ),
            // A rate's messages name what is left once `/s` is taken off.
            (rate("fast/s"), "\"fast\" is not a rate such as 50MiB"),
            (rate("1TiB/s"), "unknown size unit \"tib\" in \"1TiB\""),
            (rate("1T"), "unknown size unit \"t\" in \"1T\""),
            (rate("1MB/S"), "unknown size unit \"mb/s\" in \"1MB/S\""),
            (rate("99999999999 GiB"), "\"99999999999 GiB\" is too large"),
            (
                flag("MiB"),
                "\"MiB\" is not a size (e.g. 512, 64KiB, 200MiB, 1GB)",
            ),
            (
                flag("1.2.3k"),
                "\"1.2.3k\" is not a size (e.g. 512, 64KiB, 200MiB, 1GB)",
            ),
            (
                flag("3 parsecs"),
                "unknown size unit \"parsecs\" in \"3 parsecs\"",
            ),
            (flag("1e3"), "unknown size unit \"e3\" in \"1e3\""),
            (flag("20000000TiB"), "\"20000000TiB\" is too large"),
        ] {
            assert_eq!(got, want);
        }
    }

    #[derive(Debug, Deserialize)]
    struct Table {
        size: Option<ByteSize>,
        rate: Option<Rate>,
    }

    fn table(text: &str) -> Result<Table, String> {
        toml::from_str(text).map_err(|e| e.message().to_string())
    }

    #[test]
    fn toml_takes_integers_and_strings() {
        let t = table("size = 4096\nrate = 100").unwrap();
        assert_eq!((t.size, t.rate), (Some(ByteSize(4096)), Some(Rate(100))));
        let t = table("size = \"4MiB\"\nrate = \"1MB/s\"").unwrap();
        assert_eq!(
            (t.size, t.rate),
            (Some(ByteSize(4 * M)), Some(Rate(1_000_000)))
        );
        assert_eq!(
            table("size = \"lots\"").unwrap_err(),
            "\"lots\" is not a size such as 4MiB"
        );
        assert_eq!(
            table("rate = \"1TB\"").unwrap_err(),
            "unknown size unit \"tb\" in \"1TB\""
        );
        for bad in ["size = -1", "size = 1.5", "rate = true"] {
            assert_eq!(
                table(bad).unwrap_err(),
                "data did not match any variant of untagged enum Raw",
                "{bad}"
            );
        }
    }
}
