//! Human units: byte sizes (`"4MiB"`, `"1 GB"`), rates in bytes per second (`"50MiB"`,
//! `"1MB/s"`) and durations (`"90s"`, `"7d"`), parsed and formatted.
//!
//! Two syntaxes live here, because both are in users' hands and each stays as it was:
//!
//! - the configuration's ([`ByteSize`], [`Rate`], [`HumanDuration`]): whole numbers; a bare
//!   `k`, `M`, `G` or `T` is a power of 1000; durations from milliseconds to days; in TOML an
//!   integer is bytes or seconds.
//! - the command line's of `pier bench` ([`command_line`]): fractions allowed; a bare letter is
//!   a power of 1024, as `dd` and `docker` read it; durations from microseconds to hours.
//!
//! Architecture invariant: this crate does no I/O and depends on no other crate of pier's; any
//! of them may depend on it.

pub mod command_line;
mod duration;
mod size;

pub use duration::HumanDuration;
pub use size::{ByteSize, Rate};

/// `s` cut where its number ends: the number is digits (and dots, where `fractions` are
/// allowed), the unit is what follows with the blanks around it trimmed.
fn split(s: &str, fractions: bool) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || (fractions && c == '.')))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(end);
    (number, unit.trim())
}

/// A unit as TOML writes it: an integer (made into the unit by `from_int`) or a string in the
/// unit's syntax.
fn int_or_text<'de, D, T>(d: D, from_int: impl FnOnce(u64) -> T) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    use serde::Deserialize;

    // The name is in the message of a value that is neither (`untagged enum Raw`).
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(from_int(n)),
        Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
    }
}
