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

    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;
    const T: u64 = 1 << 40;

    fn check<T: FromStr<Err = String> + PartialEq + Clone + std::fmt::Debug>(
        cases: &[(&str, Result<T, &str>)],
    ) {
        for (s, want) in cases {
            let want = want.clone().map_err(|e| e.to_string());
            assert_eq!(s.parse::<T>(), want, "{s:?}");
        }
    }

    #[test]
    fn sizes() {
        check::<ByteSize>(&[
            ("4MiB", Ok(ByteSize(4 * M))),
            ("1 GB", Ok(ByteSize(1_000_000_000))),
            ("17", Ok(ByteSize(17))),
            ("2kib", Ok(ByteSize(2 * K))),
            ("512B", Ok(ByteSize(512))),
            ("512 b", Ok(ByteSize(512))),
            ("0", Ok(ByteSize(0))),
            ("  4MiB  ", Ok(ByteSize(4 * M))),
            ("18446744073709551615", Ok(ByteSize(u64::MAX))),
            // A bare letter, and a letter with B, are powers of 1000.
            ("4k", Ok(ByteSize(4_000))),
            ("4K", Ok(ByteSize(4_000))),
            ("4kB", Ok(ByteSize(4_000))),
            ("4KB", Ok(ByteSize(4_000))),
            ("3M", Ok(ByteSize(3_000_000))),
            ("3mb", Ok(ByteSize(3_000_000))),
            ("2g", Ok(ByteSize(2_000_000_000))),
            ("2T", Ok(ByteSize(2_000_000_000_000))),
            ("2TB", Ok(ByteSize(2_000_000_000_000))),
            ("3MIB", Ok(ByteSize(3 * M))),
            ("2GiB", Ok(ByteSize(2 * G))),
            ("2TiB", Ok(ByteSize(2 * T))),
            (
                "4 parsecs",
                Err("unknown size unit \"parsecs\" in \"4 parsecs\""),
            ),
            ("MiB", Err("\"MiB\" is not a size such as 4MiB")),
            ("", Err("\"\" is not a size such as 4MiB")),
            ("-1", Err("\"-1\" is not a size such as 4MiB")),
            (
                "99999999999999 TiB",
                Err("\"99999999999999 TiB\" is too large"),
            ),
            (
                "18446744073709551616",
                Err("\"18446744073709551616\" is not a size such as 4MiB"),
            ),
            // Whole numbers only, and no prefix above T.
            ("1.5MiB", Err("unknown size unit \".5mib\" in \"1.5MiB\"")),
            ("1PiB", Err("unknown size unit \"pib\" in \"1PiB\"")),
            ("1Ki", Err("unknown size unit \"ki\" in \"1Ki\"")),
            ("1MiB/s", Err("unknown size unit \"mib/s\" in \"1MiB/s\"")),
        ]);
    }

    #[test]
    fn rates() {
        check::<Rate>(&[
            ("50MiB", Ok(Rate(50 * M))),
            ("1MB/s", Ok(Rate(1_000_000))),
            ("1 MB/s", Ok(Rate(1_000_000))),
            ("1MB /s", Ok(Rate(1_000_000))),
            (" 1MB/s ", Ok(Rate(1_000_000))),
            ("100", Ok(Rate(100))),
            ("100/s", Ok(Rate(100))),
            ("100b", Ok(Rate(100))),
            ("8k", Ok(Rate(8_000))),
            ("8KiB", Ok(Rate(8 * K))),
            ("2G", Ok(Rate(2_000_000_000))),
            ("2gib/s", Ok(Rate(2 * G))),
            // Up to gigabytes, whole numbers, and the message names what is left of `/s`.
            ("1T", Err("unknown size unit \"t\" in \"1T\"")),
            ("1TB", Err("unknown size unit \"tb\" in \"1TB\"")),
            ("1TiB/s", Err("unknown size unit \"tib\" in \"1TiB\"")),
            ("1.5MB", Err("unknown size unit \".5mb\" in \"1.5MB\"")),
            ("fast/s", Err("\"fast\" is not a rate such as 50MiB")),
            ("1MB/m", Err("unknown size unit \"mb/m\" in \"1MB/m\"")),
            ("1MB/S", Err("unknown size unit \"mb/s\" in \"1MB/S\"")),
            ("99999999999 GiB", Err("\"99999999999 GiB\" is too large")),
        ]);
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
