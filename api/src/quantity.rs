//! Byte sizes written as Kubernetes quantities (`4Gi`, `500M`, `1048576`), and durations written
//! as Go durations (`30s`, `1h30m`), which is what CRD users write and CEL's `quantity()` and
//! `duration()` check.

use std::time::Duration;

/// Parses a quantity of bytes: a non-negative integer or decimal with an optional binary
/// (`Ki`…`Ei`) or decimal (`k`, `M`…`E`) suffix. Fractions of a byte are refused.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let mult: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        other => {
            return Err(format!(
                "{s:?} has an unknown suffix {other:?}: use Ki, Mi, Gi, Ti (or k, M, G, T)"
            ));
        }
    };
    if num.is_empty() || num.matches('.').count() > 1 || num == "." {
        return Err(format!("{s:?} is not a quantity like 4Gi or 500M"));
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse()
            .map_err(|_| format!("{s:?} is not a quantity like 4Gi or 500M"))?
    };
    let mut total = int
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if !frac.is_empty() {
        let digits = frac.len() as u32;
        let f: u128 = frac
            .parse()
            .map_err(|_| format!("{s:?} is not a quantity like 4Gi or 500M"))?;
        let scale = 10u128.pow(digits);
        let part = f * mult;
        if !part.is_multiple_of(scale) {
            return Err(format!("{s:?} is not a whole number of bytes"));
        }
        total += part / scale;
    }
    u64::try_from(total).map_err(|_| format!("{s:?} is too large"))
}

/// Parses a Go-style duration (`300ms`, `30s`, `5m`, `1h30m`, `2h`); a bare `0` is zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let bad = || format!("{s:?} is not a duration like 30s, 5m or 1h30m");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let n_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, tail) = rest.split_at(n_end);
        let u_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(u_end);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let secs = match unit {
            "ns" => n / 1e9,
            "us" | "µs" => n / 1e6,
            "ms" => n / 1e3,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => return Err(bad()),
        };
        total += Duration::from_secs_f64(secs);
        rest = next;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_like_kubernetes() {
        assert_eq!(parse_bytes("4Mi"), Ok(4 << 20));
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("500M"), Ok(500_000_000));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("2k"), Ok(2000));
        for bad in ["", "Gi", "4GB", "-1Gi", "1.2.3Mi", "0.5", "1e3", "4 Gi"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse_bytes("100000Ei").is_err());
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "5", "5 m", "m", "1d", "soon"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }
}
