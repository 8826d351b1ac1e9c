//! Byte counts as people write them, for budgets on the command line and in plans.

use crate::error::{Error, Result};

/// Parse a byte count: a number with an optional unit. `K`, `M`, `G`, `T` and `KiB` .. `TiB` are
/// powers of 1024; `KB`, `MB`, `GB`, `TB` powers of 1000; `B` or nothing is bytes. Case is
/// ignored, spaces around the number and the unit too, and fractions are allowed (`1.5G`).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let bad = || Error::Invalid(format!("`{s}` is not a byte count (examples: 24GB, 20G, 512MiB, 1000000)"));
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num.parse().map_err(|_| bad())?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => return Err(bad()),
    };
    let v = x * mult;
    if !v.is_finite() || v >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(v.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("24GB").unwrap(), 24_000_000_000);
        assert_eq!(parse_size("128GiB").unwrap(), 128 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5gb").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size(" 2 KiB ").unwrap(), 2048);
        for bad in ["", "GB", "12XB", "1..2GB", "-1GB", "1e3", "nan", "99999999999999999999T"] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains("not a byte count"), "{bad}: {e}");
        }
    }
}
