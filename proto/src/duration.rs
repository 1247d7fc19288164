//! Human durations in policy documents: `250ms`, `2s`, `1m`, `1h`, or a sum such as `1m30s`.

use std::time::Duration;

/// Parses `250ms`, `2s`, `1m30s`, `1h`. Units: `ms`, `s`, `m`, `h`. No unit is an error,
/// so `timeout: 2` (seconds? milliseconds?) is refused rather than guessed.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "`{text}` is not a duration (expected e.g. 250ms, 2s, 1m)"
            ));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{text}`: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "" => return Err(format!("`{text}` needs a unit (ms, s, m or h)")),
            other => {
                return Err(format!(
                    "`{text}`: unknown unit `{other}` (use ms, s, m or h)"
                ));
            }
        };
        rest = &rest[unit_len..];
        let part = unit
            .checked_mul(u32::try_from(value).map_err(|_| format!("`{text}`: too large"))?)
            .ok_or_else(|| format!("`{text}`: too large"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("`{text}`: too large"))?;
    }
    Ok(total)
}

/// The shortest text that [`parse`] reads back as `d` (millisecond precision).
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0ms".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Serde adapter: a `Duration` written as text.
pub mod serde_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Serde adapter: an optional `Duration` written as text (absent when `None`).
pub mod serde_text_option {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => super::parse(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn refuses_what_it_would_have_to_guess() {
        assert!(parse("2").unwrap_err().contains("needs a unit"));
        assert!(parse("2d").unwrap_err().contains("unknown unit"));
        assert!(parse("").is_err());
        assert!(parse("s").is_err());
        assert!(parse("99999999999999999999s").is_err());
    }

    #[test]
    fn format_round_trips() {
        for text in ["0ms", "250ms", "2s", "90s", "1m", "1h", "1500ms"] {
            let d = parse(text).unwrap();
            assert_eq!(parse(&format(d)), Ok(d), "{text}");
        }
        assert_eq!(format(Duration::from_secs(120)), "2m");
    }
}
