//! `migrate probe`: what a client sees. Reads a service every interval (HTTP GET or TCP
//! connect), always stops by itself, and prints a ping-like summary with every outage.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::exit::Exit;
use crate::progress::say;
use crate::timing::{format_ts, now_us};

/// Options of `migrate probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// What to read: `http://HOST[:PORT][/PATH]` (GET; 2xx or 3xx is up) or
    /// `tcp://HOST:PORT` (a connect is up). With several targets a round is up when any
    /// of them answers (the service is up wherever it runs).
    #[arg(value_name = "TARGET", required = true)]
    pub targets: Vec<String>,

    /// Time between probes (e.g. 100ms, 20ms, 1s).
    #[arg(long, value_name = "TIME", default_value = "100ms", value_parser = parse_duration)]
    pub interval: Duration,

    /// Stop after this many probes.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,

    /// Stop after this long (e.g. 30s, 5m).
    #[arg(long, value_name = "TIME", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Also stop as soon as this file exists.
    #[arg(long, value_name = "PATH")]
    pub until_file: Option<PathBuf>,

    /// How long one probe may wait for an answer before it counts as lost.
    #[arg(long, value_name = "TIME", default_value = "1s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Wait for each round before the next goes out (one connection per target at a
    /// time: a client that never has two requests in flight). By default a round goes out
    /// every interval whatever the rounds before are doing, as independent clients do.
    #[arg(long)]
    pub sequential: bool,

    /// Summary format on stdout.
    #[arg(long, value_enum, default_value_t = ProbeFormat::Text)]
    pub format: ProbeFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProbeFormat {
    Text,
    Csv,
    Json,
}

/// Parses `250ms`, `1.5s`, `2m`, or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "ms"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 100ms, 2s or 5m"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("{s:?} must be more than zero"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// One thing to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Http {
        host: String,
        port: u16,
        path: String,
    },
    Tcp {
        host: String,
        port: u16,
    },
}

/// Parses a TARGET argument.
pub fn parse_target(t: &str) -> Result<Target, String> {
    let bad = || format!("target {t:?}: use http://HOST[:PORT][/PATH] or tcp://HOST:PORT");
    if let Some(rest) = t.strip_prefix("http://") {
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let (host, port) = split_host_port(authority, Some(80)).ok_or_else(bad)?;
        Ok(Target::Http { host, port, path })
    } else if let Some(rest) = t.strip_prefix("tcp://") {
        let (host, port) = split_host_port(rest.trim_end_matches('/'), None).ok_or_else(bad)?;
        Ok(Target::Tcp { host, port })
    } else if t.starts_with("https://") {
        Err(format!(
            "target {t:?}: https is not supported; probe the plain HTTP port or use tcp://HOST:443"
        ))
    } else {
        Err(bad())
    }
}

fn split_host_port(s: &str, default: Option<u16>) -> Option<(String, u16)> {
    if s.is_empty() {
        return None;
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => None,
        None => Some((s.to_string(), default?)),
    }
}

/// Probes `target` once; returns the round-trip time when it is up.
async fn probe_once(target: &Target, timeout: Duration) -> Option<Duration> {
    let start = std::time::Instant::now();
    let work = async {
        match target {
            Target::Tcp { host, port } => {
                TcpStream::connect((host.as_str(), *port)).await.ok()?;
                Some(())
            }
            Target::Http { host, port, path } => {
                let mut s = TcpStream::connect((host.as_str(), *port)).await.ok()?;
                let req = format!(
                    "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: migrate-probe\r\nConnection: close\r\n\r\n"
                );
                s.write_all(req.as_bytes()).await.ok()?;
                let mut buf = [0u8; 64];
                let mut got = 0;
                while got < 12 {
                    let n = s.read(&mut buf[got..]).await.ok()?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                http_status_up(&buf[..got]).then_some(())
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .ok()
        .flatten()
        .map(|()| start.elapsed())
}

/// One round: up at the first target that answers (its round-trip time), down when none
/// does within `timeout`.
async fn probe_round(targets: &[Target], timeout: Duration) -> Option<Duration> {
    let mut pending: futures::stream::FuturesUnordered<_> =
        targets.iter().map(|t| probe_once(t, timeout)).collect();
    while let Some(answer) = futures::StreamExt::next(&mut pending).await {
        if answer.is_some() {
            return answer;
        }
    }
    None
}

/// True for an HTTP status line with a 2xx or 3xx code.
pub fn http_status_up(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    let mut parts = text.split_whitespace();
    matches!(parts.next(), Some(v) if v.starts_with("HTTP/"))
        && parts
            .next()
            .and_then(|c| c.parse::<u16>().ok())
            .is_some_and(|c| (200..400).contains(&c))
}

/// One probe round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Round {
    pub at_us: i64,
    pub rtt_us: Option<i64>,
}

/// A time the service did not answer: from the first lost probe to the first answered
/// one after it (or the last probe, if it never came back).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outage {
    pub start: String,
    pub end: String,
    pub length_s: f64,
    pub ongoing: bool,
}

/// The ping-like summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub targets: Vec<String>,
    pub start: String,
    pub end: String,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub loss_pct: f64,
    pub rtt_min_ms: Option<f64>,
    pub rtt_avg_ms: Option<f64>,
    pub rtt_max_ms: Option<f64>,
    pub rtt_mdev_ms: Option<f64>,
    pub longest_outage_s: f64,
    pub outages: Vec<Outage>,
}

impl Summary {
    pub fn from_rounds(targets: &[String], rounds: &[Round]) -> Summary {
        let sent = rounds.len() as u64;
        let rtts: Vec<f64> = rounds
            .iter()
            .filter_map(|r| r.rtt_us)
            .map(|u| u as f64 / 1000.0)
            .collect();
        let received = rtts.len() as u64;
        let n = rtts.len() as f64;
        let (min, avg, max, mdev) = if rtts.is_empty() {
            (None, None, None, None)
        } else {
            let avg = rtts.iter().sum::<f64>() / n;
            let sq = rtts.iter().map(|x| x * x).sum::<f64>() / n;
            (
                rtts.iter().copied().reduce(f64::min),
                Some(avg),
                rtts.iter().copied().reduce(f64::max),
                Some((sq - avg * avg).max(0.0).sqrt()),
            )
        };
        let mut outages = Vec::new();
        let mut down_since: Option<i64> = None;
        for r in rounds {
            match (r.rtt_us.is_some(), down_since) {
                (false, None) => down_since = Some(r.at_us),
                (true, Some(s)) => {
                    outages.push(outage(s, r.at_us, false));
                    down_since = None;
                }
                _ => {}
            }
        }
        if let (Some(s), Some(last)) = (down_since, rounds.last()) {
            outages.push(outage(s, last.at_us, true));
        }
        let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
        Summary {
            targets: targets.to_vec(),
            start: rounds
                .first()
                .map(|r| format_ts(r.at_us))
                .unwrap_or_default(),
            end: rounds
                .last()
                .map(|r| format_ts(r.at_us))
                .unwrap_or_default(),
            sent,
            received,
            lost: sent - received,
            loss_pct: if sent == 0 {
                0.0
            } else {
                round3(100.0 * (sent - received) as f64 / sent as f64)
            },
            rtt_min_ms: min.map(round3),
            rtt_avg_ms: avg.map(round3),
            rtt_max_ms: max.map(round3),
            rtt_mdev_ms: mdev.map(round3),
            longest_outage_s: outages.iter().map(|o| o.length_s).fold(0.0, f64::max),
            outages,
        }
    }

    pub fn text(&self) -> String {
        let ms = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
        let mut s = format!(
            "--- {} probe statistics ---\n{} probes sent, {} received, {}% lost, time {}\nrtt min/avg/max/mdev = {}/{}/{}/{} ms\n",
            self.targets.join(" "),
            self.sent,
            self.received,
            self.loss_pct,
            self.start,
            ms(self.rtt_min_ms),
            ms(self.rtt_avg_ms),
            ms(self.rtt_max_ms),
            ms(self.rtt_mdev_ms),
        );
        if self.outages.is_empty() {
            s.push_str("no outage\n");
        }
        for o in &self.outages {
            s.push_str(&format!(
                "outage {} → {}: {:.3}s{}\n",
                o.start,
                o.end,
                o.length_s,
                if o.ongoing {
                    " (still down at the end)"
                } else {
                    ""
                }
            ));
        }
        s.push_str(&format!("longest outage {:.3}s\n", self.longest_outage_s));
        s
    }
}

fn outage(start: i64, end: i64, ongoing: bool) -> Outage {
    Outage {
        start: format_ts(start),
        end: format_ts(end),
        length_s: (end - start) as f64 / 1e6,
        ongoing,
    }
}

/// Sends a round every `interval` until `done_sending(rounds sent)` says so or
/// `interrupted` completes; returns every round in the order they went out.
async fn probe_rounds(
    targets: Vec<Target>,
    interval: Duration,
    timeout: Duration,
    sequential: bool,
    done_sending: impl Fn(u64) -> bool,
    interrupted: impl std::future::Future<Output = ()>,
) -> Vec<Round> {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Like ping, a probe goes out every interval whether or not the ones before have
    // answered: a target that swallows connections (a frozen listener, an address whose
    // container is gone) must not hold back the rounds that would see the service back.
    // Rounds in flight are bounded: each gives up after `timeout` (≤ 10 intervals).
    let targets = std::sync::Arc::new(targets);
    tokio::pin!(interrupted);
    let mut in_flight = tokio::task::JoinSet::new();
    let mut done: std::collections::BTreeMap<u64, Round> = std::collections::BTreeMap::new();
    let mut rounds: Vec<Round> = Vec::new();
    let mut was_up = true;
    let mut sent = 0u64;
    // Rounds are reported in the order they went out, as soon as all before them are in.
    let mut report = |done: &mut std::collections::BTreeMap<u64, Round>,
                      rounds: &mut Vec<Round>| {
        while let Some(r) = done.remove(&(rounds.len() as u64)) {
            let up = r.rtt_us.is_some();
            if up != was_up {
                say!(
                    "{} {}",
                    format_ts(r.at_us),
                    if up { "up again" } else { "down" }
                );
                was_up = up;
            }
            rounds.push(r);
        }
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(Ok((seq, r))) = in_flight.join_next() => {
                done.insert(seq, r);
                report(&mut done, &mut rounds);
                continue;
            }
            _ = &mut interrupted => break,
        }
        if done_sending(sent) {
            break;
        }
        let seq = sent;
        sent += 1;
        if sequential {
            let at_us = now_us();
            let rtt = probe_round(&targets, timeout).await;
            done.insert(
                seq,
                Round {
                    at_us,
                    rtt_us: rtt.map(|d| d.as_micros() as i64),
                },
            );
            report(&mut done, &mut rounds);
            continue;
        }
        let targets = targets.clone();
        in_flight.spawn(async move {
            let at_us = now_us();
            let rtt = probe_round(&targets, timeout).await;
            (
                seq,
                Round {
                    at_us,
                    rtt_us: rtt.map(|d| d.as_micros() as i64),
                },
            )
        });
    }
    // The rounds still out end within `timeout`.
    while let Some(r) = in_flight.join_next().await {
        if let Ok((seq, r)) = r {
            done.insert(seq, r);
        }
    }
    report(&mut done, &mut rounds);
    // Only a round whose task died would leave a gap; keep the rest in order anyway.
    rounds.extend(done.into_values());
    rounds
}

/// Runs the probe; returns its exit status (`Ok` when it ran, `Refused` on bad arguments,
/// `Failed` when the summary cannot be written).
pub async fn run(args: ProbeArgs) -> u8 {
    if args.count.is_none() && args.duration.is_none() {
        say!(
            "migrate probe: error: give --count N or --duration TIME, so the probe stops by itself"
        );
        return Exit::Refused.code();
    }
    let mut targets = Vec::new();
    for t in &args.targets {
        match parse_target(t) {
            Ok(x) => targets.push(x),
            Err(e) => {
                say!("migrate probe: error: {e}");
                return Exit::Refused.code();
            }
        }
    }
    let mut signals = match crate::signals::Signals::new() {
        Ok(s) => s,
        Err(e) => {
            say!("migrate probe: error: {e}");
            return Exit::Refused.code();
        }
    };
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let timeout = args
        .timeout
        .min(args.interval.max(Duration::from_millis(1)) * 10);
    let until_file = args.until_file.clone();
    let count = args.count;
    let rounds = probe_rounds(
        targets,
        args.interval,
        timeout,
        args.sequential,
        move |sent| {
            deadline.is_some_and(|d| tokio::time::Instant::now() >= d)
                || count.is_some_and(|c| sent >= c)
                || until_file.as_ref().is_some_and(|p| p.exists())
        },
        signals.changed(),
    )
    .await;
    let summary = Summary::from_rounds(&args.targets, &rounds);
    let mut out = std::io::stdout().lock();
    let res = match args.format {
        ProbeFormat::Text => std::io::Write::write_all(&mut out, summary.text().as_bytes()),
        ProbeFormat::Json => serde_json::to_writer(&mut out, &summary)
            .map_err(std::io::Error::other)
            .and_then(|()| std::io::Write::write_all(&mut out, b"\n")),
        ProbeFormat::Csv => write_csv(&mut out, &summary),
    };
    if let Err(e) = res {
        say!("migrate probe: cannot write the summary: {e}");
        return Exit::Failed.code();
    }
    Exit::Ok.code()
}

fn write_csv(out: &mut dyn std::io::Write, s: &Summary) -> std::io::Result<()> {
    let mut w = csv::Writer::from_writer(out);
    let opt = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    w.write_record([
        "targets",
        "start",
        "end",
        "sent",
        "received",
        "lost",
        "loss_pct",
        "rtt_min_ms",
        "rtt_avg_ms",
        "rtt_max_ms",
        "rtt_mdev_ms",
        "outages",
        "longest_outage_s",
    ])?;
    w.write_record([
        s.targets.join(" "),
        s.start.clone(),
        s.end.clone(),
        s.sent.to_string(),
        s.received.to_string(),
        s.lost.to_string(),
        s.loss_pct.to_string(),
        opt(s.rtt_min_ms),
        opt(s.rtt_avg_ms),
        opt(s.rtt_max_ms),
        opt(s.rtt_mdev_ms),
        s.outages.len().to_string(),
        format!("{:.6}", s.longest_outage_s),
    ])?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("20").unwrap(), Duration::from_millis(20));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3y").is_err());
    }

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("http://10.0.0.1:8080/cgi-bin/counter").unwrap(),
            Target::Http {
                host: "10.0.0.1".into(),
                port: 8080,
                path: "/cgi-bin/counter".into()
            }
        );
        assert_eq!(
            parse_target("http://lb").unwrap(),
            Target::Http {
                host: "lb".into(),
                port: 80,
                path: "/".into()
            }
        );
        assert_eq!(
            parse_target("tcp://db:3306").unwrap(),
            Target::Tcp {
                host: "db".into(),
                port: 3306
            }
        );
        assert!(parse_target("tcp://db").is_err());
        assert!(parse_target("ftp://x").is_err());
        assert!(parse_target("https://x").unwrap_err().contains("https"));
    }

    #[test]
    fn status_lines() {
        assert!(http_status_up(b"HTTP/1.0 200 OK\r\n"));
        assert!(http_status_up(b"HTTP/1.1 302 Found\r\n"));
        assert!(!http_status_up(b"HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(!http_status_up(b"SSH-2.0-OpenSSH"));
        assert!(!http_status_up(b""));
    }

    /// A listener that takes connections and never answers (like a frozen service).
    async fn swallower() -> (u16, tokio::task::JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let h = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((c, _)) = l.accept().await {
                held.push(c);
            }
        });
        (port, h)
    }

    /// An HTTP server answering 200 to everything.
    async fn answerer() -> (u16, tokio::task::JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let h = tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 512];
                    let _ = c.read(&mut buf).await;
                    let _ = c.write_all(b"HTTP/1.0 200 OK\r\n\r\nok").await;
                });
            }
        });
        (port, h)
    }

    fn http(port: u16) -> Target {
        Target::Http {
            host: "127.0.0.1".into(),
            port,
            path: "/".into(),
        }
    }

    #[tokio::test]
    async fn a_round_is_up_at_the_first_answer() {
        let (hung, h1) = swallower().await;
        let (up, h2) = answerer().await;
        let start = std::time::Instant::now();
        let rtt = probe_round(&[http(hung), http(up)], Duration::from_secs(5)).await;
        assert!(rtt.is_some());
        // Waiting for the hung target would take the whole 5 s timeout.
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        assert!(
            probe_round(&[http(hung)], Duration::from_millis(50))
                .await
                .is_none()
        );
        h1.abort();
        h2.abort();
    }

    #[tokio::test]
    async fn rounds_go_out_every_interval_while_earlier_ones_hang() {
        let (hung, h) = swallower().await;
        let rounds = probe_rounds(
            vec![http(hung)],
            Duration::from_millis(20),
            Duration::from_millis(200),
            false,
            |sent| sent >= 10,
            std::future::pending(),
        )
        .await;
        h.abort();
        assert_eq!(rounds.len(), 10);
        assert!(rounds.iter().all(|r| r.rtt_us.is_none()));
        assert!(rounds.windows(2).all(|w| w[0].at_us <= w[1].at_us));
        // One after the other they would span 9 timeouts (1.8 s); sent every 20 ms, 0.18 s.
        let span = rounds[9].at_us - rounds[0].at_us;
        assert!(span < 1_000_000, "rounds spread over {span} µs");
    }

    #[tokio::test]
    async fn sequential_rounds_wait_for_each_other() {
        let (hung, h) = swallower().await;
        let rounds = probe_rounds(
            vec![http(hung)],
            Duration::from_millis(20),
            Duration::from_millis(100),
            true,
            |sent| sent >= 3,
            std::future::pending(),
        )
        .await;
        h.abort();
        assert_eq!(rounds.len(), 3);
        // Each waited for its 100 ms timeout before the next went out.
        let span = rounds[2].at_us - rounds[0].at_us;
        assert!(span >= 190_000, "rounds spread over {span} µs");
    }

    #[test]
    fn summary_counts_outages_like_a_client() {
        let ms = |t: i64| t * 1000;
        let rounds = [
            Round {
                at_us: ms(0),
                rtt_us: Some(1000),
            },
            Round {
                at_us: ms(100),
                rtt_us: Some(3000),
            },
            Round {
                at_us: ms(200),
                rtt_us: None,
            },
            Round {
                at_us: ms(300),
                rtt_us: None,
            },
            Round {
                at_us: ms(400),
                rtt_us: Some(2000),
            },
            Round {
                at_us: ms(500),
                rtt_us: None,
            },
        ];
        let s = Summary::from_rounds(&["t".into()], &rounds);
        assert_eq!((s.sent, s.received, s.lost), (6, 3, 3));
        assert_eq!(s.loss_pct, 50.0);
        assert_eq!(s.rtt_min_ms, Some(1.0));
        assert_eq!(s.rtt_max_ms, Some(3.0));
        assert_eq!(s.rtt_avg_ms, Some(2.0));
        assert_eq!(s.rtt_mdev_ms, Some(0.816));
        assert_eq!(s.outages.len(), 2);
        assert_eq!(s.outages[0].length_s, 0.2);
        assert!(!s.outages[0].ongoing);
        assert!(s.outages[1].ongoing);
        assert_eq!(s.longest_outage_s, 0.2);
        let empty = Summary::from_rounds(&[], &[]);
        assert_eq!(empty.sent, 0);
        assert_eq!(empty.rtt_avg_ms, None);
    }

    #[tokio::test]
    async fn probes_a_real_listener() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhi").await;
            }
        });
        let http = parse_target(&format!("http://127.0.0.1:{port}/")).unwrap();
        assert!(probe_once(&http, Duration::from_secs(2)).await.is_some());
        let tcp = parse_target(&format!("tcp://127.0.0.1:{port}")).unwrap();
        assert!(probe_once(&tcp, Duration::from_secs(2)).await.is_some());
        // A closed port is down.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cport = closed.local_addr().unwrap().port();
        drop(closed);
        let down = parse_target(&format!("tcp://127.0.0.1:{cport}")).unwrap();
        assert!(probe_once(&down, Duration::from_secs(2)).await.is_none());
    }
}
