//! Timestamps, phase clocks and the one-line record each side prints per migration.

use std::io::Write;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use clap::Args;
use serde::Serialize;

/// Microseconds since the Unix epoch on this host's clock.
pub fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

/// RFC 3339, UTC, microseconds: `2026-11-25T07:34:35.123456Z`.
pub fn format_ts(us: i64) -> String {
    Utc.timestamp_micros(us)
        .single()
        .map(|t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Micros, true))
        .unwrap_or_default()
}

/// Seconds between two µs timestamps.
pub fn secs_between(from_us: i64, to_us: i64) -> f64 {
    (to_us - from_us) as f64 / 1e6
}

/// A running phase clock.
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch(Instant);

impl Stopwatch {
    pub fn start() -> Self {
        Stopwatch(Instant::now())
    }
    pub fn secs(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
    /// The same watch started `by` later.
    pub fn later_by(&self, by: Duration) -> Stopwatch {
        Stopwatch(self.0 + by)
    }
    /// Seconds from the start to `t` (0 when `t` is earlier).
    pub fn at(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.0).as_secs_f64()
    }
}

/// Output format of records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Csv,
    Json,
}

/// How a migration ended, as the record says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    RolledBack,
    Refused,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::RolledBack => "rolled_back",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// One migration as seen by one side. Times are µs on the sender's clock unless named
/// otherwise; durations are seconds.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub run_id: String,
    pub label: String,
    pub source: String,
    pub target: String,
    pub containers: Vec<String>,
    pub start_us: Option<i64>,
    pub down_us: Option<i64>,
    pub up_us: Option<i64>,
    pub presync_s: Option<f64>,
    pub checkpoint_s: Option<f64>,
    pub transfer_s: Option<f64>,
    pub postsync_s: Option<f64>,
    pub restore_s: Option<f64>,
    pub source_total_s: Option<f64>,
    pub target_total_s: Option<f64>,
    pub bytes_sent: Option<u64>,
    pub clock_offset_us: Option<i64>,
    pub outcome: Option<Outcome>,
    // Columns after the agreed ones.
    /// Sender's own view: from "OK" sent to outcome received.
    pub control_s: Option<f64>,
    pub verify_s: Option<f64>,
    pub clock_delay_us: Option<i64>,
    pub archive_bytes: Option<u64>,
    pub sync_bytes: Option<u64>,
    /// Longest `podman container checkpoint` of one container (podman's own figure).
    pub podman_checkpoint_s: Option<f64>,
    /// Longest time CRIU kept one container's processes frozen while dumping.
    pub criu_frozen_s: Option<f64>,
    /// Longest time CRIU spent restoring one container on the target.
    pub criu_restore_s: Option<f64>,
    /// From DOWN until every container's dump was over (its processes gone).
    pub dump_s: Option<f64>,
    /// Bytes sent while the service was down: archives on the wire and the post-sync.
    pub frozen_bytes: Option<u64>,
    /// How the memory moved: "copy" (in the archives) or "lazy" (post-copy).
    pub memory: &'static str,
    /// Lazy: from UP until the last page was on the target (the post-copy window).
    pub postcopy_s: Option<f64>,
    /// Bytes sent before UP (pre-sync, archives, post-sync) and after it (pages).
    pub bytes_before_up: Option<u64>,
    pub bytes_after_up: Option<u64>,
    /// Lazy: pages the target's tasks faulted on and fetched one by one, and pages
    /// pushed in the background.
    pub demand_pages: Option<u64>,
    pub pushed_pages: Option<u64>,
    pub role: &'static str,
    pub error: String,
}

enum Field {
    Text(String),
    Secs(Option<f64>),
    Count(Option<u64>),
}

impl Record {
    /// downtime = UP − DOWN, both on the sender's clock.
    pub fn downtime_s(&self) -> Option<f64> {
        Some(secs_between(self.down_us?, self.up_us?))
    }

    /// migration time = UP − start of pre-sync, both on the sender's clock.
    pub fn migration_time_s(&self) -> Option<f64> {
        Some(secs_between(self.start_us?, self.up_us?))
    }

    fn fields(&self) -> Vec<(&'static str, Field)> {
        use Field::*;
        let ts = |v: Option<i64>| Text(v.map(format_ts).unwrap_or_default());
        vec![
            ("run_id", Text(self.run_id.clone())),
            ("label", Text(self.label.clone())),
            ("source", Text(self.source.clone())),
            ("target", Text(self.target.clone())),
            ("containers", Text(self.containers.join(" "))),
            ("start_ts", ts(self.start_us)),
            ("down_ts", ts(self.down_us)),
            ("up_ts", ts(self.up_us)),
            ("presync_s", Secs(self.presync_s)),
            ("checkpoint_s", Secs(self.checkpoint_s)),
            ("transfer_s", Secs(self.transfer_s)),
            ("postsync_s", Secs(self.postsync_s)),
            ("restore_s", Secs(self.restore_s)),
            ("downtime_s", Secs(self.downtime_s())),
            ("migration_time_s", Secs(self.migration_time_s())),
            ("source_total_s", Secs(self.source_total_s)),
            ("target_total_s", Secs(self.target_total_s)),
            ("bytes_sent", Count(self.bytes_sent)),
            (
                "clock_offset_s",
                Secs(self.clock_offset_us.map(|u| u as f64 / 1e6)),
            ),
            (
                "outcome",
                Text(self.outcome.map(Outcome::as_str).unwrap_or("").into()),
            ),
            ("control_s", Secs(self.control_s)),
            ("verify_s", Secs(self.verify_s)),
            (
                "clock_delay_s",
                Secs(self.clock_delay_us.map(|u| u as f64 / 1e6)),
            ),
            ("archive_bytes", Count(self.archive_bytes)),
            ("sync_bytes", Count(self.sync_bytes)),
            ("podman_checkpoint_s", Secs(self.podman_checkpoint_s)),
            ("criu_frozen_s", Secs(self.criu_frozen_s)),
            ("criu_restore_s", Secs(self.criu_restore_s)),
            ("dump_s", Secs(self.dump_s)),
            ("frozen_bytes", Count(self.frozen_bytes)),
            ("memory", Text(self.memory.into())),
            ("postcopy_s", Secs(self.postcopy_s)),
            ("bytes_before_up", Count(self.bytes_before_up)),
            ("bytes_after_up", Count(self.bytes_after_up)),
            ("demand_pages", Count(self.demand_pages)),
            ("pushed_pages", Count(self.pushed_pages)),
            ("role", Text(self.role.into())),
            ("error", Text(self.error.clone())),
        ]
    }

    /// The CSV header names, in order.
    #[cfg(test)]
    pub fn header() -> Vec<&'static str> {
        Record::default()
            .fields()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    /// Writes the record to `out` in `format`; CSV with a header line unless `no_header`.
    pub fn write(
        &self,
        out: &mut dyn Write,
        format: Format,
        no_header: bool,
    ) -> std::io::Result<()> {
        let fields = self.fields();
        match format {
            Format::Csv => {
                let mut w = csv::Writer::from_writer(out);
                if !no_header {
                    w.write_record(fields.iter().map(|(n, _)| *n))?;
                }
                w.write_record(fields.iter().map(|(_, v)| match v {
                    Field::Text(s) => s.clone(),
                    Field::Secs(s) => s.map(|x| format!("{x:.6}")).unwrap_or_default(),
                    Field::Count(c) => c.map(|x| x.to_string()).unwrap_or_default(),
                }))?;
                w.flush()
            }
            Format::Json => {
                let mut map = serde_json::Map::new();
                for (name, v) in fields {
                    let value = match v {
                        Field::Text(s) => serde_json::Value::String(s),
                        Field::Secs(s) => s
                            .and_then(|x| serde_json::Number::from_f64((x * 1e6).round() / 1e6))
                            .map(serde_json::Value::Number)
                            .unwrap_or(serde_json::Value::Null),
                        Field::Count(c) => c.map(Into::into).unwrap_or(serde_json::Value::Null),
                    };
                    map.insert(name.to_string(), value);
                }
                serde_json::to_writer(&mut *out, &map)?;
                out.write_all(b"\n")?;
                out.flush()
            }
        }
    }
}

/// How records are printed on stdout (`send` and `receive`).
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Record format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Csv)]
    pub format: Format,

    /// Leave out the CSV header line (for appending to a file).
    #[arg(long)]
    pub no_header: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            run_id: "r1".into(),
            label: "a,b \"q\"".into(),
            containers: vec!["db".into(), "web".into()],
            start_us: Some(1_000_000),
            down_us: Some(3_000_000),
            up_us: Some(3_500_001),
            outcome: Some(Outcome::Ok),
            bytes_sent: Some(42),
            role: "sender",
            ..Default::default()
        }
    }

    #[test]
    fn header_starts_with_the_agreed_columns() {
        let agreed = "run_id,label,source,target,containers,start_ts,down_ts,up_ts,presync_s,\
checkpoint_s,transfer_s,postsync_s,restore_s,downtime_s,migration_time_s,source_total_s,\
target_total_s,bytes_sent,clock_offset_s,outcome";
        let header = Record::header().join(",");
        assert!(header.starts_with(agreed), "{header}");
    }

    #[test]
    fn csv_quotes_and_formats() {
        let mut buf = Vec::new();
        record().write(&mut buf, Format::Csv, false).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let mut rdr = csv::Reader::from_reader(text.as_bytes());
        let row = rdr.records().next().unwrap().unwrap();
        let headers = rdr.headers().unwrap().clone();
        let get = |n: &str| {
            row.get(headers.iter().position(|h| h == n).unwrap())
                .unwrap()
                .to_string()
        };
        assert_eq!(get("label"), "a,b \"q\"");
        assert_eq!(get("downtime_s"), "0.500001");
        assert_eq!(get("migration_time_s"), "2.500001");
        assert_eq!(get("down_ts"), "1970-01-01T00:00:03.000000Z");
        assert_eq!(get("presync_s"), "");
        assert_eq!(get("outcome"), "ok");
        let mut buf = Vec::new();
        record().write(&mut buf, Format::Csv, true).unwrap();
        assert_eq!(String::from_utf8(buf).unwrap().lines().count(), 1);
    }

    #[test]
    fn json_is_one_object_per_line() {
        let mut buf = Vec::new();
        record().write(&mut buf, Format::Json, false).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["downtime_s"], serde_json::json!(0.500001));
        assert_eq!(v["presync_s"], serde_json::Value::Null);
        assert_eq!(v["bytes_sent"], serde_json::json!(42));
    }

    #[test]
    fn timestamps_are_utc_with_micros() {
        assert_eq!(
            format_ts(1_764_056_075_123_456),
            "2025-11-25T07:34:35.123456Z"
        );
    }
}
