//! pier's configuration: one documented struct, read from TOML, with defaults for every field
//! and command-line flags applied on top. docs/config.md describes each key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the main listener: registry API, health, readiness and metrics.
    pub listen: SocketAddr,
    /// Where blobs, upload buffers and the metadata database live.
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    /// A tracing filter such as `info` or `pier=debug,info`.
    pub log_level: String,
    /// How long in-flight requests may run after SIGTERM before pier exits anyway.
    #[serde(with = "seconds")]
    pub shutdown_grace: Duration,
    pub registry: RegistryConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Largest manifest accepted on push.
    pub max_manifest_size: ByteSize,
    /// Largest blob accepted on push; unlimited when absent.
    pub max_blob_size: Option<ByteSize>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            data_dir: PathBuf::from("./pier-data"),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            shutdown_grace: Duration::from_secs(30),
            registry: RegistryConfig::default(),
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            max_manifest_size: ByteSize(4 * 1024 * 1024),
            max_blob_size: None,
        }
    }
}

impl Config {
    /// Read a TOML file. Unknown keys are errors, so a typo never silently does nothing.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Config> {
        Ok(toml::from_str(text)?)
    }
}

/// A size in bytes, written in TOML as an integer or a string such as `"4MiB"` or `"1 GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size such as 4MiB"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            other => return Err(format!("unknown size unit {other:?} in {s:?}")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (s, n) in [
            ("4MiB", 4 << 20),
            ("1 GB", 1_000_000_000),
            ("17", 17),
            ("2kib", 2048),
        ] {
            assert_eq!(s.parse::<ByteSize>(), Ok(ByteSize(n)), "{s}");
        }
        assert!("4 parsecs".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
        assert!("99999999999999 TiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn example_file_parses_and_unknown_keys_fail() {
        let example = include_str!("../../../docs/pier.example.toml");
        let c = Config::parse(example).expect("example parses");
        assert_eq!(c.registry.max_manifest_size, ByteSize(4 << 20));
        let err = Config::parse("listn = \"0.0.0.0:1\"").expect_err("unknown key");
        assert!(format!("{err:#}").contains("listn"), "{err:#}");
        let err = Config::parse("[registry]\nmax_manifest_size = \"lots\"").expect_err("bad size");
        assert!(format!("{err:#}").contains("lots"), "{err:#}");
    }
}
