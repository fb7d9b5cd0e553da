//! Parsers for the scalar value syntaxes the file uses: durations and addresses.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Parses `250ms`, `2s`, `5m`, `1h`. A unit is required: a bare `5` is the
/// classic source of "was that seconds or milliseconds?" outages.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit; write it like 500ms, 2s, 1m or 1h"))?;
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; write it like 500ms, 2s, 1m or 1h"))?;
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit {unit:?}; use ms, s, m or h"
            ))
        }
    };
    value
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses a rate: `100/s`, `1000/m`, `50/h` (requests per period).
pub fn parse_rate(text: &str) -> Result<(u32, Duration), String> {
    let bad = || format!("{text:?} is not a rate; write it like 100/s, 1000/m or 50/h");
    let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    if count == 0 {
        return Err(format!("{text:?}: the rate must be at least 1"));
    }
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    // governor counts in nanoseconds: one request per nanosecond at most.
    if per.as_nanos() / u128::from(count) == 0 {
        return Err(format!("{text:?} is more than one request per nanosecond"));
    }
    Ok((count, per))
}

/// Parses a size: `512B`, `32KiB`, `10MiB`, `1GiB`. A unit is required, as
/// for durations.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit; write it like 512B, 32KiB or 10MiB"))?;
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size; write it like 512B, 32KiB or 10MiB"))?;
    let multiplier: u64 = match unit {
        "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit {unit:?}; use B, KiB, MiB or GiB"
            ))
        }
    };
    value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses a percentage: `50%`, a whole number from 0 to 100 with its sign.
pub fn parse_percent(text: &str) -> Result<u32, String> {
    let bad = || format!("{text:?} is not a percentage; write it like 50%");
    let number = text.trim().strip_suffix('%').ok_or_else(bad)?.trim_end();
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match number.parse::<u32>() {
        Ok(percent) if percent <= 100 => Ok(percent),
        _ => Err(format!("{text:?} is more than 100%")),
    }
}

/// Parses a listener address: a literal `ip:port`. Listeners bind to what
/// is written; a name here would make the bound address depend on DNS.
pub fn parse_listen_address(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an address like 0.0.0.0:8080 or [::]:8080"))
}

/// Resolves a target `host:port`. A literal address is used as written; a
/// host name is resolved now, at load time, so no request ever waits on DNS.
/// Every address the name resolves to becomes a target.
pub fn resolve_target(text: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?} has no port; write it as host:port"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("{text:?} is not host:port"));
    }
    let mut addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?}: {e}"))?
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("{text:?} resolved to no address"));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_known_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }

    #[test]
    fn sizes_need_a_known_unit() {
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("32KiB"), Ok(32 * 1024));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert!(parse_size("10").is_err());
        assert!(parse_size("10kb").is_err());
        assert!(parse_size("99999999999999999GiB").is_err());
    }

    #[test]
    fn percentages_need_the_sign_and_stay_within_a_hundred() {
        assert_eq!(parse_percent("50%"), Ok(50));
        assert_eq!(parse_percent(" 100% "), Ok(100));
        assert_eq!(parse_percent("0%"), Ok(0));
        assert!(parse_percent("50").is_err());
        assert!(parse_percent("0.5").is_err());
        assert!(parse_percent("12.5%").is_err());
        assert!(parse_percent("-5%").is_err());
        assert!(parse_percent("%").is_err());
        assert!(parse_percent("101%").is_err());
        assert!(parse_percent("99999999999999999999%").is_err());
    }

    #[test]
    fn targets_resolve_literals_and_names() {
        assert_eq!(
            resolve_target("127.0.0.1:80").unwrap(),
            vec!["127.0.0.1:80".parse().unwrap()]
        );
        assert!(resolve_target("localhost:80")
            .unwrap()
            .iter()
            .all(|a| a.ip().is_loopback()));
        assert!(resolve_target("127.0.0.1").is_err());
        assert!(resolve_target("host:notaport").is_err());
    }
}
