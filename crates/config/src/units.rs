//! Human-readable durations (`10s`, `72h`, `1m30s`) and sizes (`256Mi`, `1Mi`, `4096`).
//!
//! Both are written as strings in the config file so that a reader never has to guess the unit, and
//! both print back in the shortest exact form so that `check` and the operator's rendered ConfigMaps
//! look like something a person wrote.

#[cfg(feature = "schema")]
use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

#[cfg(feature = "schema")]
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest duration taken: 100 years. Times are unix milliseconds in an `i64`; far longer values
/// would overflow when added to one (a `maxAge` that wraps negative kills every delivery at once).
pub const MAX_DURATION_MS: u64 = 100 * 365 * 86_400_000;

/// A duration written as one or more `<integer><unit>` parts, units `ms`, `s`, `m`, `h`, `d`, at most
/// [`MAX_DURATION_MS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Duration(std::time::Duration::from_secs(secs))
    }
    pub const fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }
    pub const fn get(self) -> std::time::Duration {
        self.0
    }
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl FromStr for Duration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{text}` is not a duration; write it like 500ms, 10s, 5m, 72h or 1m30s");
        let mut rest = text.trim();
        if rest.is_empty() {
            return Err(bad());
        }
        let mut total_ms: u128 = 0;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
            if digits == 0 {
                return Err(bad());
            }
            let number: u128 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            let per_unit_ms: u128 = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(bad()),
            };
            rest = &rest[unit_len..];
            total_ms = number.checked_mul(per_unit_ms).and_then(|ms| total_ms.checked_add(ms)).ok_or_else(bad)?;
        }
        match u64::try_from(total_ms) {
            Ok(ms) if ms <= MAX_DURATION_MS => Ok(Duration::from_millis(ms)),
            _ => Err(format!("`{text}` is longer than 100 years, the longest duration storerelay takes")),
        }
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000)] {
            if ms % size == 0 {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "schema")]
impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^([0-9]+(ms|s|m|h|d))+$",
            "description": "A duration such as 500ms, 10s, 5m, 72h or 1m30s."
        })
    }
}

/// A size in bytes: a plain integer, or with a binary (`Ki`, `Mi`, `Gi`, `Ti`) or decimal (`k`, `M`,
/// `G`, `T`) suffix, as Kubernetes quantities are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn mebibytes(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{text}` is not a size; write it like 4096, 512Ki, 1Mi, 256Mi or 1Gi");
        let trimmed = text.trim();
        let digits = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
        if digits == 0 {
            return Err(bad());
        }
        let number: u64 = trimmed[..digits].parse().map_err(|_| bad())?;
        let multiplier: u64 = match &trimmed[digits..] {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            "k" | "K" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            _ => return Err(bad()),
        };
        number.checked_mul(multiplier).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("Ti", 1u64 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
            if n != 0 && n % size == 0 {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // YAML users write `maxBodyBytes: 4096` as often as `maxBodyBytes: 4Ki`.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(feature = "schema")]
impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": "^[0-9]+(Ki|Mi|Gi|Ti|k|K|M|G|T)?$"}
            ],
            "description": "A size in bytes, such as 4096, 512Ki, 1Mi or 256Mi."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print_back() {
        for (text, ms, printed) in [
            ("10s", 10_000, "10s"),
            ("72h", 259_200_000, "72h"),
            ("168h", 604_800_000, "168h"),
            ("10m", 600_000, "10m"),
            ("1m30s", 90_000, "90s"),
            ("500ms", 500, "500ms"),
            ("1d", 86_400_000, "24h"),
            ("0s", 0, "0s"),
        ] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.0.as_millis(), ms, "{text}");
            assert_eq!(d.to_string(), printed, "{text}");
        }
    }

    #[test]
    fn bad_durations_are_refused_with_the_text() {
        for text in ["", "10", "s", "10 s", "10sec", "-1s", "1.5s", "99999999999999999999999h"] {
            let err = text.parse::<Duration>().unwrap_err();
            assert!(err.contains(&format!("`{text}`")), "{err}");
        }
    }

    #[test]
    fn sizes_parse_and_print_back() {
        for (text, bytes, printed) in [
            ("256Mi", 256 << 20, "256Mi"),
            ("1Mi", 1 << 20, "1Mi"),
            ("4096", 4096, "4Ki"),
            ("1000", 1000, "1000"),
            ("1M", 1_000_000, "1000000"),
            ("2Gi", 2 << 30, "2Gi"),
        ] {
            let s: ByteSize = text.parse().unwrap();
            assert_eq!(s.0, bytes, "{text}");
            assert_eq!(s.to_string(), printed, "{text}");
        }
        for text in ["", "Mi", "1MB", "1.5Mi", "99999999999Ti"] {
            assert!(text.parse::<ByteSize>().is_err(), "{text}");
        }
    }

    #[test]
    fn sizes_accept_yaml_integers() {
        let s: ByteSize = serde_yaml::from_str("4096").unwrap();
        assert_eq!(s, ByteSize(4096));
        let s: ByteSize = serde_yaml::from_str("\"1Ki\"").unwrap();
        assert_eq!(s, ByteSize(1024));
    }
}
