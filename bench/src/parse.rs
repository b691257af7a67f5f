//! Parsing what the tools print: the thesis scripts' KEY=VALUE lines, migrate's CSV
//! record, the probe's JSON.

use std::collections::HashMap;

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::report::RunRow;

/// KEY=VALUE lines (other lines ignored; the last value of a key wins).
pub fn parse_kv(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once('=')?;
            let k = k.trim();
            (!k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .then(|| (k.to_string(), v.trim().to_string()))
        })
        .collect()
}

pub fn parse_ts(s: &str) -> Result<DateTime<Utc>> {
    Ok(DateTime::parse_from_rfc3339(s)
        .with_context(|| format!("bad timestamp '{s}'"))?
        .with_timezone(&Utc))
}

/// Seconds from `a` to `b`.
pub fn secs_between(a: &DateTime<Utc>, b: &DateTime<Utc>) -> f64 {
    (*b - *a).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

/// The timings of one thesis-method run, computed the thesis way.
#[derive(Debug, Clone, PartialEq)]
pub struct ThesisTimes {
    pub start_ts: String,
    pub down_ts: String,
    pub up_ts: String,
    /// UP_TIMESTAMP (target clock) - DOWN_TIMESTAMP (source clock).
    pub downtime_s: f64,
    /// Sending script's total + receiving script's total.
    pub migration_time_s: f64,
    pub source_total_s: f64,
    pub target_total_s: f64,
    pub presync_s: Option<f64>,
    pub checkpoint_s: Option<f64>,
    pub transfer_s: Option<f64>,
    pub restore_s: Option<f64>,
}

fn num(kv: &HashMap<String, String>, key: &str) -> Result<f64> {
    let v = kv.get(key).ok_or_else(|| anyhow!("{key} missing"))?;
    v.parse()
        .with_context(|| format!("{key}={v} is not a number"))
}

/// Timings from the sender's and receiver's output (both must say RESULT=ok).
pub fn thesis_times(send_out: &str, recv_out: &str) -> Result<ThesisTimes> {
    let s = parse_kv(send_out);
    let r = parse_kv(recv_out);
    for (who, kv) in [("sender", &s), ("receiver", &r)] {
        if kv.get("RESULT").map(String::as_str) != Some("ok") {
            bail!("{who} did not report RESULT=ok");
        }
    }
    let down = s
        .get("DOWN_TIMESTAMP")
        .ok_or_else(|| anyhow!("DOWN_TIMESTAMP missing"))?;
    let up = r
        .get("UP_TIMESTAMP")
        .ok_or_else(|| anyhow!("UP_TIMESTAMP missing"))?;
    let downtime_s = secs_between(&parse_ts(down)?, &parse_ts(up)?);
    let source_total_s = num(&s, "TOTAL_S")?;
    let target_total_s = num(&r, "TOTAL_S")?;
    Ok(ThesisTimes {
        start_ts: s.get("START_TIMESTAMP").cloned().unwrap_or_default(),
        down_ts: down.clone(),
        up_ts: up.clone(),
        downtime_s,
        migration_time_s: source_total_s + target_total_s,
        source_total_s,
        target_total_s,
        presync_s: num(&s, "PRE_DUMP_TRANSFER_S").ok(),
        checkpoint_s: num(&s, "DUMP_S").ok(),
        transfer_s: num(&s, "POST_DUMP_TRANSFER_S").ok(),
        restore_s: num(&r, "RESTORE_S").ok(),
    })
}

/// migrate's CSV record (header + one row), by column name.
pub fn parse_record(text: &str) -> Result<HashMap<String, String>> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    let headers = rdr
        .headers()
        .context("no CSV header in migrate's output")?
        .clone();
    let row = rdr
        .records()
        .next()
        .ok_or_else(|| anyhow!("no CSV row in migrate's output"))?
        .context("bad CSV row")?;
    Ok(headers
        .iter()
        .zip(row.iter())
        .map(|(h, v)| (h.to_string(), v.to_string()))
        .collect())
}

/// Sets one field of a run from the record's text in one column.
type Setter = fn(&mut RunRow, &str);

/// Every column of migrate's record the bench copies into its runs, with where it goes.
/// The names are looked up in the header migrate printed; [`apply_record`] fails on a
/// name that header lacks, so a renamed column cannot leave a bench column empty.
const RECORD_COLUMNS: [(&str, Setter); 28] = {
    fn num(v: &str) -> Option<f64> {
        v.trim().parse().ok()
    }
    [
        ("start_ts", |r, v| r.start_ts = v.into()),
        ("down_ts", |r, v| r.down_ts = v.into()),
        ("up_ts", |r, v| r.up_ts = v.into()),
        ("downtime_s", |r, v| r.downtime_s = num(v)),
        ("migration_time_s", |r, v| r.migration_time_s = num(v)),
        ("source_total_s", |r, v| r.source_total_s = num(v)),
        ("target_total_s", |r, v| r.target_total_s = num(v)),
        ("presync_s", |r, v| r.presync_s = num(v)),
        ("checkpoint_s", |r, v| r.checkpoint_s = num(v)),
        ("transfer_s", |r, v| r.transfer_s = num(v)),
        ("postsync_s", |r, v| r.postsync_s = num(v)),
        ("restore_s", |r, v| r.restore_s = num(v)),
        ("bytes_sent", |r, v| r.bytes_sent = num(v)),
        ("dump_s", |r, v| r.dump_s = num(v)),
        ("control_s", |r, v| r.control_s = num(v)),
        ("verify_s", |r, v| r.verify_s = num(v)),
        ("podman_checkpoint_s", |r, v| r.podman_checkpoint_s = num(v)),
        ("criu_frozen_s", |r, v| r.criu_frozen_s = num(v)),
        ("criu_restore_s", |r, v| r.criu_restore_s = num(v)),
        ("archive_bytes", |r, v| r.archive_bytes = num(v)),
        ("frozen_bytes", |r, v| r.frozen_bytes = num(v)),
        ("sync_bytes", |r, v| r.sync_bytes = num(v)),
        ("memory", |r, v| r.memory = v.trim().into()),
        ("postcopy_s", |r, v| r.postcopy_s = num(v)),
        ("bytes_before_up", |r, v| r.bytes_before_up = num(v)),
        ("bytes_after_up", |r, v| r.bytes_after_up = num(v)),
        ("demand_pages", |r, v| r.demand_pages = num(v)),
        ("pushed_pages", |r, v| r.pushed_pages = num(v)),
    ]
};

/// Copies migrate's record (from [`parse_record`]) into the run; an error naming every
/// column the bench reads that the record's header does not have.
pub fn apply_record(rec: &HashMap<String, String>, row: &mut RunRow) -> Result<()> {
    let missing: Vec<&str> = RECORD_COLUMNS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !rec.contains_key(*name))
        .collect();
    if !missing.is_empty() {
        bail!(
            "migrate's record has no column {} (the bench reads it by that name)",
            missing.join(", ")
        );
    }
    for (name, set) in RECORD_COLUMNS {
        set(row, &rec[name]);
    }
    Ok(())
}

/// The probe's JSON summary (`migrate probe --format json`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ProbeSummary {
    pub sent: Option<u64>,
    pub received: Option<u64>,
    pub lost: Option<u64>,
    pub loss_pct: Option<f64>,
    pub rtt_min_ms: Option<f64>,
    pub rtt_avg_ms: Option<f64>,
    pub rtt_max_ms: Option<f64>,
    pub rtt_mdev_ms: Option<f64>,
    pub longest_outage_s: Option<f64>,
    #[serde(default)]
    pub outages: Vec<Outage>,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct Outage {
    pub start: String,
    pub end: String,
    pub length_s: f64,
}

/// The JSON object in the probe's stdout (the last line that parses).
pub fn parse_probe(text: &str) -> Result<ProbeSummary> {
    if let Ok(p) = serde_json::from_str(text.trim()) {
        return Ok(p);
    }
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok())
        .ok_or_else(|| anyhow!("no JSON summary in the probe's output"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEND: &str = "START_TIMESTAMP=2026-11-25T07:54:23.404889Z\nPRE_DUMP_TRANSFER_S=1.282190\n\
        DOWN_TIMESTAMP=2026-11-25T07:54:24.692786Z\nDUMP_S=1.295936\nPOST_DUMP_TRANSFER_S=0.755103\n\
        MIGRATE_S=0.008377\nCLEANUP_S=0.298778\nEND_TIMESTAMP=2026-11-25T07:54:27.056374Z\n\
        TOTAL_S=3.651290\nRESULT=ok\n";
    const RECV: &str = "READY=2026-11-25T07:54:22.073321Z\nOK_TIMESTAMP=2026-11-25T07:54:26.755918Z\n\
        UP_TIMESTAMP=2026-11-25T07:54:27.810740Z\nRESTORE_S=1.056808\nWAIT_S=4.697160\n\
        TOTAL_S=1.104865\nRESULT=ok\n";

    #[test]
    fn thesis_downtime_and_migration_time() {
        let t = thesis_times(SEND, RECV).unwrap();
        assert!((t.downtime_s - 3.117954).abs() < 1e-9, "{}", t.downtime_s);
        assert!((t.migration_time_s - (3.651290 + 1.104865)).abs() < 1e-9);
        assert_eq!(t.source_total_s, 3.651290);
        assert_eq!(t.target_total_s, 1.104865);
        assert_eq!(t.checkpoint_s, Some(1.295936));
        assert_eq!(t.restore_s, Some(1.056808));
        assert_eq!(t.down_ts, "2026-11-25T07:54:24.692786Z");
    }

    #[test]
    fn thesis_failure_is_an_error() {
        let failed = SEND.replace("RESULT=ok", "RESULT=failed");
        assert!(thesis_times(&failed, RECV).is_err());
        assert!(thesis_times(SEND, "READY=x\nRESULT=failed\n").is_err());
        let no_up = RECV.replace("UP_TIMESTAMP", "XUP");
        assert!(thesis_times(SEND, &no_up).is_err());
    }

    #[test]
    fn kv_ignores_noise() {
        let kv = parse_kv("hello world\nA_B=1\n lower=2\nX=a=b\n");
        assert_eq!(kv.get("A_B").unwrap(), "1");
        assert!(!kv.contains_key("lower"));
        assert_eq!(kv.get("X").unwrap(), "a=b");
    }

    #[test]
    fn record_by_header_name() {
        let text = "run_id,downtime_s,outcome,new_col\nr1,2.743785,ok,x\n";
        let rec = parse_record(text).unwrap();
        assert_eq!(rec.get("downtime_s").unwrap(), "2.743785");
        assert_eq!(rec.get("outcome").unwrap(), "ok");
        assert!(!rec.contains_key("missing"));
        assert!(parse_record("run_id,outcome\n").is_err());
    }

    #[test]
    fn record_columns_are_copied_by_name_and_a_missing_one_is_an_error() {
        // The header and an empty record as migrate itself prints them.
        let mut buf = Vec::new();
        migrate::timing::Record::default()
            .write(&mut buf, migrate::timing::Format::Csv, false)
            .unwrap();
        let printed = String::from_utf8(buf).unwrap();
        let mut row = RunRow::default();
        apply_record(&parse_record(&printed).unwrap(), &mut row).unwrap();
        assert_eq!(row.downtime_s, None);

        let mut rec = parse_record(&printed).unwrap();
        rec.insert("down_ts".into(), "2026-11-25T07:34:35.123456Z".into());
        rec.insert("downtime_s".into(), " 1.5".into());
        rec.insert("frozen_bytes".into(), "1024".into());
        apply_record(&rec, &mut row).unwrap();
        assert_eq!(row.down_ts, "2026-11-25T07:34:35.123456Z");
        assert_eq!(
            (row.downtime_s, row.frozen_bytes),
            (Some(1.5), Some(1024.0))
        );

        // A lazy move's columns.
        for (k, v) in [
            ("memory", "lazy"),
            ("postcopy_s", "13.912345"),
            ("bytes_before_up", "284672"),
            ("bytes_after_up", "1077350400"),
            ("demand_pages", "9"),
            ("pushed_pages", "262863"),
        ] {
            rec.insert(k.into(), v.into());
        }
        apply_record(&rec, &mut row).unwrap();
        assert_eq!(row.memory, "lazy");
        assert_eq!(row.postcopy_s, Some(13.912345));
        assert_eq!(
            (row.bytes_before_up, row.bytes_after_up),
            (Some(284672.0), Some(1077350400.0))
        );
        assert_eq!(
            (row.demand_pages, row.pushed_pages),
            (Some(9.0), Some(262863.0))
        );

        rec.remove("criu_frozen_s");
        rec.remove("sync_bytes");
        let e = apply_record(&rec, &mut row).unwrap_err().to_string();
        assert!(e.contains("no column criu_frozen_s, sync_bytes"), "{e}");
    }

    #[test]
    fn probe_json() {
        let p = parse_probe(
            "noise\n{\"sent\":100,\"received\":90,\"lost\":10,\"loss_pct\":10.0,\"rtt_min_ms\":0.2,\
             \"rtt_avg_ms\":0.5,\"rtt_max_ms\":3.0,\"rtt_mdev_ms\":0.1,\"longest_outage_s\":0.2,\
             \"outages\":[{\"start\":\"2026-11-25T07:54:24Z\",\"end\":\"2026-11-25T07:54:24.2Z\",\"length_s\":0.2}]}\n",
        )
        .unwrap();
        assert_eq!(p.lost, Some(10));
        assert_eq!(p.longest_outage_s, Some(0.2));
        assert_eq!(p.outages.len(), 1);
        assert!(parse_probe("nothing").is_err());
    }
}
