//! Go-style durations (`90s`, `1h30m`, `720h`, `1.5h`), as the CRDs and kubectl users write them.

use std::time::Duration;

/// Parses a Go-style duration with units ms, s, m and h.
pub fn parse(text: &str) -> Result<Duration, String> {
    if text.is_empty() {
        return Err("an empty duration".to_owned());
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_len);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a duration such as 90s, 15m or 1h30m"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let seconds = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("{text:?} has unit {unit:?}; use ms, s, m or h")),
        };
        total += value * seconds;
        rest = tail;
    }
    if !total.is_finite() || total > 10.0 * 365.0 * 86400.0 {
        return Err(format!("{text:?} is longer than ten years"));
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        for (text, seconds) in [
            ("90s", 90.0),
            ("1h30m", 5400.0),
            ("720h", 2_592_000.0),
            ("1.5h", 5400.0),
            ("250ms", 0.25),
        ] {
            assert_eq!(parse(text).unwrap().as_secs_f64(), seconds, "{text}");
        }
        for bad in ["", "1", "h", "1d", "1h-", "1..5h", "99999999999h"] {
            assert!(parse(bad).is_err(), "{bad} should not parse");
        }
    }
}
