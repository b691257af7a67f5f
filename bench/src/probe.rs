//! Fallback client probe with the contract of `migrate probe` (used only when the migrate
//! binary has no `probe` subcommand yet): rounds every INTERVAL against every TARGET
//! (http://HOST:PORT/PATH: GET, 2xx/3xx = up; tcp://HOST:PORT: connect = up); a round is
//! up when ANY target answers. Prints one JSON summary.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Args;
use serde_json::json;

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// http://HOST:PORT/PATH or tcp://HOST:PORT
    #[arg(required = true)]
    targets: Vec<String>,
    #[arg(long, default_value = "20ms")]
    interval: String,
    #[arg(long)]
    count: Option<u64>,
    #[arg(long)]
    duration: Option<String>,
    #[arg(long)]
    until_file: Option<PathBuf>,
    #[arg(long, default_value = "json")]
    format: String,
}

pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.parse().with_context(|| format!("bad duration '{s}'"))?;
    if !(v.is_finite() && v >= 0.0) {
        bail!("bad duration '{s}'");
    }
    Ok(Duration::from_secs_f64(v * mul))
}

enum Target {
    Http {
        addr: String,
        host: String,
        path: String,
    },
    Tcp {
        addr: String,
    },
}

fn parse_target(t: &str) -> Result<Target> {
    if let Some(rest) = t.strip_prefix("http://") {
        let (hp, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr = if hp.contains(':') {
            hp.to_string()
        } else {
            format!("{hp}:80")
        };
        Ok(Target::Http {
            addr,
            host: hp.to_string(),
            path: path.to_string(),
        })
    } else if let Some(rest) = t.strip_prefix("tcp://") {
        Ok(Target::Tcp {
            addr: rest.trim_end_matches('/').to_string(),
        })
    } else {
        bail!("target must start with http:// or tcp://: {t}")
    }
}

fn try_target(t: &Target, timeout: Duration) -> bool {
    let addr = match t {
        Target::Http { addr, .. } | Target::Tcp { addr } => addr,
    };
    let Some(sa) = addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return false;
    };
    let Ok(mut s) = TcpStream::connect_timeout(&sa, timeout) else {
        return false;
    };
    let Target::Http { host, path, .. } = t else {
        return true;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while got.len() < 12 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&got);
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok());
    matches!(code, Some(200..=399))
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub fn run(a: ProbeArgs) -> Result<()> {
    let interval = parse_duration(&a.interval)?.max(Duration::from_millis(1));
    let duration = a.duration.as_deref().map(parse_duration).transpose()?;
    if a.count.is_none() && duration.is_none() {
        bail!("give --count N or --duration D");
    }
    let targets: Vec<Target> = a
        .targets
        .iter()
        .map(|t| parse_target(t))
        .collect::<Result<_>>()?;
    let timeout = Duration::from_millis(500);
    let start = Instant::now();
    let (mut sent, mut received) = (0u64, 0u64);
    let mut rtts: Vec<f64> = Vec::new();
    let mut outages: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    let mut down_since: Option<DateTime<Utc>> = None;
    loop {
        if a.count.is_some_and(|c| sent >= c) || duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        if a.until_file.as_ref().is_some_and(|p| p.exists()) {
            break;
        }
        let round_at = start + interval * sent as u32;
        if let Some(wait) = round_at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t_wall = Utc::now();
        let t0 = Instant::now();
        let up = std::thread::scope(|s| {
            let hs: Vec<_> = targets
                .iter()
                .map(|t| s.spawn(move || try_target(t, timeout)))
                .collect();
            hs.into_iter().any(|h| h.join().unwrap_or(false))
        });
        sent += 1;
        if up {
            received += 1;
            rtts.push(t0.elapsed().as_secs_f64() * 1000.0);
            if let Some(s) = down_since.take() {
                outages.push((s, t_wall));
            }
        } else if down_since.is_none() {
            down_since = Some(t_wall);
        }
    }
    if let Some(s) = down_since.take() {
        outages.push((s, Utc::now()));
    }
    let len = |(s, e): &(DateTime<Utc>, DateTime<Utc>)| {
        (*e - *s).num_microseconds().unwrap_or(0) as f64 / 1e6
    };
    let st = crate::stats::stats(&rtts);
    let mdev = if rtts.is_empty() {
        None
    } else {
        let m = st.map(|s| s.mean).unwrap_or(0.0);
        Some(rtts.iter().map(|r| (r - m).abs()).sum::<f64>() / rtts.len() as f64)
    };
    let lost = sent - received;
    let summary = json!({
        "sent": sent, "received": received, "lost": lost,
        "loss_pct": if sent > 0 { lost as f64 * 100.0 / sent as f64 } else { 0.0 },
        "rtt_min_ms": st.map(|s| s.min), "rtt_avg_ms": st.map(|s| s.mean),
        "rtt_max_ms": st.map(|s| s.max), "rtt_mdev_ms": mdev,
        "longest_outage_s": outages.iter().map(len).fold(0.0, f64::max),
        "outages": outages.iter().map(|o| json!({"start": ts(o.0), "end": ts(o.1), "length_s": len(o)})).collect::<Vec<_>>(),
    });
    if a.format == "json" {
        println!("{summary}");
    } else {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20ms").unwrap(), Duration::from_millis(20));
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
