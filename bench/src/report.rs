//! Output files: runs.csv (one row per run), summary.csv, summary.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::stats::{Stats, ratio, stats};

/// One run of one method (migrate, thesis or floor on the thesis pair; memory: migrate
/// moving the `hog` container, whose size in MiB stands in the `rows` column).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunRow {
    pub method: String,
    pub profile: String,
    /// Rows in app.users; for method memory, the MiB the hog holds.
    pub rows: u64,
    pub run: u32,
    pub direction: String,
    pub source: String,
    pub target: String,
    /// ok | failed | rolled_back | refused | state_lost | not_serving | source_leftover |
    /// wrong_memory (memory series: migrate's record names another mode than asked) | error
    pub outcome: String,
    pub start_ts: String,
    pub down_ts: String,
    pub up_ts: String,
    /// The tool's downtime (migrate: its record; thesis: UP - DOWN; floor: wall time).
    pub downtime_s: Option<f64>,
    /// migrate: its record; thesis: sender total + receiver total; floor: empty.
    pub migration_time_s: Option<f64>,
    pub source_total_s: Option<f64>,
    pub target_total_s: Option<f64>,
    pub presync_s: Option<f64>,
    pub checkpoint_s: Option<f64>,
    pub transfer_s: Option<f64>,
    pub postsync_s: Option<f64>,
    pub restore_s: Option<f64>,
    /// migrate only: DOWN until every dump was over (the processes gone).
    pub dump_s: Option<f64>,
    /// migrate only: "OK" sent until the target's answer (verify + restore + messages).
    pub control_s: Option<f64>,
    pub verify_s: Option<f64>,
    pub podman_checkpoint_s: Option<f64>,
    pub criu_frozen_s: Option<f64>,
    pub criu_restore_s: Option<f64>,
    pub archive_bytes: Option<f64>,
    /// migrate only: bytes sent while the service was down (archives, post-sync).
    pub frozen_bytes: Option<f64>,
    /// migrate only: bytes rsync sent (pre-sync and post-sync).
    pub sync_bytes: Option<f64>,
    /// migrate only: how it moved the memory, from its record: "copy" or "lazy" (empty in
    /// sets from before the column).
    pub memory: String,
    /// Lazy memory: UP until the last page was on the target; bytes before and after UP;
    /// pages fetched on demand and pushed.
    pub postcopy_s: Option<f64>,
    pub bytes_before_up: Option<f64>,
    pub bytes_after_up: Option<f64>,
    pub demand_pages: Option<f64>,
    pub pushed_pages: Option<f64>,
    /// Data series: bytes in the source's data folder when it was moved.
    pub data_bytes: Option<f64>,
    pub bytes_sent: Option<f64>,
    /// Longest outage the client probe saw.
    pub client_outage_s: Option<f64>,
    pub probe_exceeds_reported: bool,
    /// client_outage_s - downtime_s.
    pub probe_minus_reported_s: Option<f64>,
    pub probe_outages: Option<u64>,
    pub probe_sent: Option<u64>,
    pub probe_received: Option<u64>,
    pub probe_lost: Option<u64>,
    pub probe_loss_pct: Option<f64>,
    pub probe_rtt_min_ms: Option<f64>,
    pub probe_rtt_avg_ms: Option<f64>,
    pub probe_rtt_max_ms: Option<f64>,
    pub probe_rtt_mdev_ms: Option<f64>,
    pub probe_tool: String,
    pub rows_after: Option<u64>,
    pub counter_before: Option<u64>,
    pub counter_after: Option<u64>,
    pub exit_code: Option<i32>,
    pub wall_s: f64,
    pub error: String,
    pub log_prefix: String,
}

impl RunRow {
    pub fn valid(&self) -> bool {
        self.outcome == "ok"
    }

    /// The tool failed: its error, and "failed" unless a more precise outcome is set.
    pub fn failed(&mut self, e: &anyhow::Error) {
        if self.outcome.is_empty() {
            self.outcome = "failed".into();
        }
        self.error = format!("{e:#}");
    }
}

/// Key of a summary cell: (profile, rows, method).
pub type Cell = (String, u64, String);

#[derive(Debug, Clone, Default, Serialize)]
pub struct SummaryRow {
    pub method: String,
    pub profile: String,
    pub rows: u64,
    pub n_runs: usize,
    pub n_valid: usize,
    pub downtime_mean_s: Option<f64>,
    pub downtime_std_s: Option<f64>,
    pub downtime_min_s: Option<f64>,
    pub downtime_max_s: Option<f64>,
    pub migration_mean_s: Option<f64>,
    pub migration_std_s: Option<f64>,
    pub migration_min_s: Option<f64>,
    pub migration_max_s: Option<f64>,
    pub outage_mean_s: Option<f64>,
    pub outage_std_s: Option<f64>,
    pub outage_min_s: Option<f64>,
    pub outage_max_s: Option<f64>,
    pub n_probe_exceeds: usize,
    /// Where the downtime went (means; migrate and memory rows).
    pub dump_mean_s: Option<f64>,
    pub checkpoint_mean_s: Option<f64>,
    pub transfer_mean_s: Option<f64>,
    pub postsync_mean_s: Option<f64>,
    pub control_mean_s: Option<f64>,
    pub verify_mean_s: Option<f64>,
    pub restore_mean_s: Option<f64>,
    pub criu_frozen_mean_s: Option<f64>,
    pub criu_restore_mean_s: Option<f64>,
    pub archive_mean_bytes: Option<f64>,
    pub frozen_mean_bytes: Option<f64>,
    pub presync_mean_s: Option<f64>,
    pub sync_mean_bytes: Option<f64>,
    pub data_mean_bytes: Option<f64>,
    /// Lazy rows: the post-copy window (mean, sample sd, min, max), bytes after UP, pages
    /// on demand and pushed (means).
    pub postcopy_mean_s: Option<f64>,
    pub postcopy_std_s: Option<f64>,
    pub postcopy_min_s: Option<f64>,
    pub postcopy_max_s: Option<f64>,
    pub after_up_mean_bytes: Option<f64>,
    pub demand_mean_pages: Option<f64>,
    pub pushed_mean_pages: Option<f64>,
    /// migrate rows only: mean(migrate) / mean(thesis) in the same profile and rows.
    pub downtime_ratio_migrate_thesis: Option<f64>,
    pub migration_ratio_migrate_thesis: Option<f64>,
    pub outage_ratio_migrate_thesis: Option<f64>,
}

fn parts(s: Option<Stats>) -> [Option<f64>; 4] {
    match s {
        Some(s) => [Some(s.mean), Some(s.std), Some(s.min), Some(s.max)],
        None => [None; 4],
    }
}

/// Summary per (method, profile, rows); only valid runs enter the statistics.
pub fn summarize(runs: &[RunRow]) -> Vec<SummaryRow> {
    let mut cells: BTreeMap<Cell, Vec<&RunRow>> = BTreeMap::new();
    for r in runs {
        cells
            .entry((r.profile.clone(), r.rows, r.method.clone()))
            .or_default()
            .push(r);
    }
    let mut out: Vec<SummaryRow> = cells
        .iter()
        .map(|((profile, rows, method), rs)| {
            let valid: Vec<&&RunRow> = rs.iter().filter(|r| r.valid()).collect();
            let col = |f: fn(&RunRow) -> Option<f64>| {
                stats(&valid.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
            };
            let [dm, ds, dmin, dmax] = parts(col(|r| r.downtime_s));
            let [mm, ms, mmin, mmax] = parts(col(|r| r.migration_time_s));
            let [om, os, omin, omax] = parts(col(|r| r.client_outage_s));
            let [wm, ws, wmin, wmax] = parts(col(|r| r.postcopy_s));
            let mean = |f: fn(&RunRow) -> Option<f64>| col(f).map(|s| s.mean);
            SummaryRow {
                method: method.clone(),
                profile: profile.clone(),
                rows: *rows,
                n_runs: rs.len(),
                n_valid: valid.len(),
                downtime_mean_s: dm,
                downtime_std_s: ds,
                downtime_min_s: dmin,
                downtime_max_s: dmax,
                migration_mean_s: mm,
                migration_std_s: ms,
                migration_min_s: mmin,
                migration_max_s: mmax,
                outage_mean_s: om,
                outage_std_s: os,
                outage_min_s: omin,
                outage_max_s: omax,
                n_probe_exceeds: valid.iter().filter(|r| r.probe_exceeds_reported).count(),
                dump_mean_s: mean(|r| r.dump_s),
                checkpoint_mean_s: mean(|r| r.checkpoint_s),
                transfer_mean_s: mean(|r| r.transfer_s),
                postsync_mean_s: mean(|r| r.postsync_s),
                control_mean_s: mean(|r| r.control_s),
                verify_mean_s: mean(|r| r.verify_s),
                restore_mean_s: mean(|r| r.restore_s),
                criu_frozen_mean_s: mean(|r| r.criu_frozen_s),
                criu_restore_mean_s: mean(|r| r.criu_restore_s),
                archive_mean_bytes: mean(|r| r.archive_bytes),
                frozen_mean_bytes: mean(|r| r.frozen_bytes),
                presync_mean_s: mean(|r| r.presync_s),
                sync_mean_bytes: mean(|r| r.sync_bytes),
                data_mean_bytes: mean(|r| r.data_bytes),
                postcopy_mean_s: wm,
                postcopy_std_s: ws,
                postcopy_min_s: wmin,
                postcopy_max_s: wmax,
                after_up_mean_bytes: mean(|r| r.bytes_after_up),
                demand_mean_pages: mean(|r| r.demand_pages),
                pushed_mean_pages: mean(|r| r.pushed_pages),
                downtime_ratio_migrate_thesis: None,
                migration_ratio_migrate_thesis: None,
                outage_ratio_migrate_thesis: None,
            }
        })
        .collect();
    fill_ratios(&mut out);
    out
}

/// For each migrate row: its means divided by the thesis means of the same cell.
pub fn fill_ratios(rows: &mut [SummaryRow]) {
    let thesis: BTreeMap<(String, u64), SummaryRow> = rows
        .iter()
        .filter(|r| r.method == "thesis")
        .map(|r| ((r.profile.clone(), r.rows), r.clone()))
        .collect();
    for r in rows.iter_mut().filter(|r| r.method == "migrate") {
        if let Some(t) = thesis.get(&(r.profile.clone(), r.rows)) {
            r.downtime_ratio_migrate_thesis = ratio(r.downtime_mean_s, t.downtime_mean_s);
            r.migration_ratio_migrate_thesis = ratio(r.migration_mean_s, t.migration_mean_s);
            r.outage_ratio_migrate_thesis = ratio(r.outage_mean_s, t.outage_mean_s);
        }
    }
}

/// The runs of a result set, read back from its runs.csv.
pub fn read_runs(path: &Path) -> Result<Vec<RunRow>> {
    let mut r =
        csv::Reader::from_path(path).with_context(|| format!("opening {}", path.display()))?;
    r.deserialize()
        .enumerate()
        .map(|(i, row)| row.with_context(|| format!("{}: run {}", path.display(), i + 1)))
        .collect()
}

/// The SSH rates (bytes/s per profile) a summary.md states, as [`memory_table`] writes
/// them (whole MiB/s).
pub fn links_from_summary(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|l| {
            let (profile, rest) = l.strip_prefix("- ")?.split_once(": SSH carries ")?;
            let mib: f64 = rest.strip_suffix(" MiB/s")?.parse().ok()?;
            Some((profile.to_string(), mib * 1048576.0))
        })
        .collect()
}

pub fn write_summary_csv(path: &Path, rows: &[SummaryRow]) -> Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    for r in rows {
        w.serialize(r)?;
    }
    w.flush()?;
    Ok(())
}

fn f(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "–".into())
}

fn pm(mean: Option<f64>, std: Option<f64>) -> String {
    match (mean, std) {
        (Some(m), Some(s)) => format!("{m:.3} ± {s:.3}"),
        _ => "–".into(),
    }
}

/// The bound on a rate-limited profile: 1.5 × (bytes sent while down ÷ link rate
/// + the same-host floor of the same rows).
pub fn bound_s(frozen_bytes: f64, rate_bytes_per_s: f64, floor_s: f64) -> f64 {
    1.5 * (frozen_bytes / rate_bytes_per_s + floor_s)
}

/// Markdown table of migrate's downtime against [`bound_s`] on the profiles that have a
/// link rate (`rates`: profile → bytes/s).
pub fn bound_table(rows: &[SummaryRow], rates: &[(&str, f64)]) -> String {
    let mut s = String::new();
    for r in rows.iter().filter(|r| r.method == "migrate") {
        let Some(&(_, rate)) = rates.iter().find(|(p, _)| *p == r.profile) else {
            continue;
        };
        let floor = rows
            .iter()
            .find(|f| f.method == "floor" && f.rows == r.rows)
            .and_then(|f| f.downtime_mean_s);
        let (Some(down), Some(bytes), Some(floor)) =
            (r.downtime_mean_s, r.frozen_mean_bytes, floor)
        else {
            continue;
        };
        let bound = bound_s(bytes, rate, floor);
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.2} | {:.1} | {:.3} | {:.3} | {} |",
            r.profile,
            r.rows,
            down,
            bytes / 1048576.0,
            rate * 8.0 / 1e6,
            floor,
            bound,
            if down <= bound { "yes" } else { "**no**" }
        );
    }
    if s.is_empty() {
        return s;
    }
    format!(
        "\n## Downtime against the link on rate-limited profiles\n\n\
         bound = 1.5 × (bytes sent while down ÷ link rate + same-host floor of the same rows).\n\n\
         | profile | rows | downtime | MiB sent while down | link Mbit/s | floor | bound | within |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n{s}"
    )
}

pub fn summary_markdown(
    rows: &[SummaryRow],
    runs: &[RunRow],
    header: &str,
    links: &BTreeMap<String, f64>,
) -> String {
    let mut s = String::new();
    s.push_str(header);
    s.push_str("\n## Results (seconds; mean ± sample std dev over valid runs)\n\n");
    s.push_str("| profile | rows | method | valid/runs | downtime | min–max | migration time | client outage (probe) | outage max | probe > reported | migrate/thesis downtime | migrate/thesis migration |\n");
    s.push_str(
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {}/{} | {} | {}–{} | {} | {} | {} | {} | {} | {} |",
            r.profile,
            r.rows,
            r.method,
            r.n_valid,
            r.n_runs,
            pm(r.downtime_mean_s, r.downtime_std_s),
            f(r.downtime_min_s),
            f(r.downtime_max_s),
            pm(r.migration_mean_s, r.migration_std_s),
            pm(r.outage_mean_s, r.outage_std_s),
            f(r.outage_max_s),
            r.n_probe_exceeds,
            f(r.downtime_ratio_migrate_thesis),
            f(r.migration_ratio_migrate_thesis),
        );
    }
    let phased: Vec<&SummaryRow> = rows
        .iter()
        .filter(|r| {
            ["migrate", "migrate-copy", "memory", "lazy", "data"].contains(&r.method.as_str())
                && r.dump_mean_s.is_some()
        })
        .collect();
    if !phased.is_empty() {
        s.push_str(
            "\n## Where migrate's downtime goes (means over valid runs, seconds)\n\n\
             Counted from DOWN: `dump` until every container's CRIU dump was over (processes gone), \
             `archives` until podman's archives were complete, `shipped` until they were on the target; \
             `post-sync` is the rsync of the data folders, started at `dump`. From \"OK\": `control` \
             until the target's answer, of which `verify` (size and BLAKE3 digest of the archives) and \
             `restore` (podman restore of all containers, in parallel). `CRIU frozen` and `CRIU restore` \
             are CRIU's own figures inside podman's. For methods memory and lazy the rows column is the MiB held; for method data, the MiB of extra files in the data folder.\n\n",
        );
        s.push_str("| profile | rows / MiB | method | downtime | dump | archives | shipped | post-sync | control | verify | restore | CRIU frozen | CRIU restore | archive MiB |\n");
        s.push_str("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for r in phased {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.profile,
                r.rows,
                r.method,
                f(r.downtime_mean_s),
                f(r.dump_mean_s),
                f(r.checkpoint_mean_s),
                f(r.transfer_mean_s),
                f(r.postsync_mean_s),
                f(r.control_mean_s),
                f(r.verify_mean_s),
                f(r.restore_mean_s),
                f(r.criu_frozen_mean_s),
                f(r.criu_restore_mean_s),
                r.archive_mean_bytes
                    .map(|b| format!("{:.1}", b / 1048576.0))
                    .unwrap_or_else(|| "–".into()),
            );
        }
    }
    s.push_str(&memory_table(rows, links));
    s.push_str(&lazy_table(rows, links));
    s.push_str(&data_table(rows));
    s.push_str(&bound_table(
        rows,
        &[("cloud", 1750e6 / 8.0), ("wan", 45e6 / 8.0)],
    ));
    let bad: Vec<&RunRow> = runs.iter().filter(|r| !r.valid()).collect();
    s.push_str("\n## Runs excluded from the statistics\n\n");
    if bad.is_empty() {
        s.push_str("None: every run kept its state and passed the checks.\n");
    } else {
        for r in bad {
            let _ = writeln!(
                s,
                "- {} {} rows={} run {} ({}): **{}** {}",
                r.method, r.profile, r.rows, r.run, r.direction, r.outcome, r.error
            );
        }
    }
    let exceed: Vec<&RunRow> = runs.iter().filter(|r| r.probe_exceeds_reported).collect();
    s.push_str("\n## Runs where the client saw a longer outage than the reported downtime\n\n");
    if exceed.is_empty() {
        s.push_str("None.\n");
    } else {
        s.push_str("| method | profile | rows | run | direction | outcome | reported downtime | client outage | difference |\n| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: |\n");
        for r in exceed {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.method,
                r.profile,
                r.rows,
                r.run,
                r.direction,
                r.outcome,
                f(r.downtime_s),
                f(r.client_outage_s),
                f(r.probe_minus_reported_s)
            );
        }
    }
    s
}

/// The data series: downtime against the size of the data folders (what was pre-synced
/// must not be sent again while the service is down).
fn data_table(rows: &[SummaryRow]) -> String {
    let cells: Vec<&SummaryRow> = rows.iter().filter(|r| r.method == "data").collect();
    if cells.is_empty() {
        return String::new();
    }
    let mib = |b: Option<f64>| {
        b.map(|b| format!("{:.1}", b / 1048576.0))
            .unwrap_or_else(|| "–".into())
    };
    let f = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "–".into());
    let mut s = String::from(
        "\n## Downtime against the size of the data folders (method data)\n\n\
         The thesis pair with 10000 rows and N MiB more of random files in its data folder \
         (`/srv/app/bulk`, 16 MiB files), moved by `migrate send --data /srv/app` to a cold \
         target; valid only when every extra file arrived with its size. `pre-sync` runs \
         before DOWN and carries the data folder; `post-sync` and `sent while down` are what \
         the freeze had to wait for.\n\n\
         | profile | extra MiB | data folder MiB | valid/runs | pre-sync | rsync MiB sent | downtime | post-sync | sent while down MiB | migration time |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in cells {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {}/{} | {} | {} | {} | {} | {} | {} |",
            r.profile,
            r.rows,
            mib(r.data_mean_bytes),
            r.n_valid,
            r.n_runs,
            f(r.presync_mean_s),
            mib(r.sync_mean_bytes),
            f(r.downtime_mean_s),
            f(r.postsync_mean_s),
            mib(r.frozen_mean_bytes),
            f(r.migration_mean_s),
        );
    }
    s
}

/// Copy and lazy side by side per MiB held, and issue 16's three checks on the lazy
/// series, each with its figures: downtime at 1 GiB ≤ 1.25 × downtime at 64 MiB, downtime
/// at 2 GiB ≤ 1.5 s, and every post-copy window ≤ 1.5 × (memory ÷ SSH rate) + 0.5 s.
pub fn lazy_table(rows: &[SummaryRow], links: &BTreeMap<String, f64>) -> String {
    let lazy: Vec<&SummaryRow> = rows.iter().filter(|r| r.method == "lazy").collect();
    if lazy.is_empty() {
        return String::new();
    }
    let f = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "–".into());
    let spread = |r: Option<&SummaryRow>| match r {
        Some(r) => format!(
            "{} ± {} ({}–{}), {}/{}",
            f(r.downtime_mean_s),
            f(r.downtime_std_s),
            f(r.downtime_min_s),
            f(r.downtime_max_s),
            r.n_valid,
            r.n_runs
        ),
        None => "–".into(),
    };
    let mut s = String::from(
        "\n## Copy and lazy memory side by side (methods memory and lazy)\n\n\
         `copy`: the memory inside the archive (`send --memory copy`); `lazy`: post-copy \
         (`send --memory lazy`), the memory follows after UP. Downtime as mean ± sd (min–max), \
         valid/runs. `window` = UP until the last page was on the target (mean ± sd, min–max); \
         `link needs` = MiB held ÷ what SSH alone carries; `bound` = 1.5 × link needs + 0.5 s.\n\n\
         | profile | MiB held | downtime copy | downtime lazy | window | window min–max | link needs | bound | MiB after UP | pages on demand | pages pushed |\n\
         | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let mut checks = Vec::new();
    for r in &lazy {
        let copy = rows
            .iter()
            .find(|c| c.method == "memory" && c.profile == r.profile && c.rows == r.rows);
        let needs = links
            .get(&r.profile)
            .map(|rate| r.rows as f64 * 1048576.0 / rate);
        let bound = needs.map(|n| 1.5 * n + 0.5);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {}–{} | {} | {} | {} | {} | {} |",
            r.profile,
            r.rows,
            spread(copy),
            spread(Some(r)),
            pm(r.postcopy_mean_s, r.postcopy_std_s),
            f(r.postcopy_min_s),
            f(r.postcopy_max_s),
            f(needs),
            f(bound),
            r.after_up_mean_bytes
                .map(|b| format!("{:.1}", b / 1048576.0))
                .unwrap_or_else(|| "–".into()),
            r.demand_mean_pages
                .map(|p| format!("{p:.0}"))
                .unwrap_or_else(|| "–".into()),
            r.pushed_mean_pages
                .map(|p| format!("{p:.0}"))
                .unwrap_or_else(|| "–".into()),
        );
        checks.push(match (r.postcopy_max_s, bound) {
            (Some(w), Some(b)) => verdict(
                w <= b,
                format!(
                    "{} {} MiB: longest post-copy window {w:.3} s ≤ 1.5 × {:.3} s + 0.5 s = {b:.3} s",
                    r.profile,
                    r.rows,
                    needs.unwrap_or_default()
                ),
            ),
            (None, _) => not_measured(format!(
                "{} {} MiB: post-copy window ≤ 1.5 × link needs + 0.5 s: no valid lazy run \
                 with a window ({}/{} valid)",
                r.profile, r.rows, r.n_valid, r.n_runs
            )),
            (Some(_), None) => not_measured(format!(
                "{} {} MiB: post-copy window ≤ 1.5 × link needs + 0.5 s: the link of {} \
                 was not measured",
                r.profile, r.rows, r.profile
            )),
        });
    }
    for p in lazy
        .iter()
        .map(|r| r.profile.clone())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let cell = |mb: u64| lazy.iter().find(|r| r.profile == p && r.rows == mb);
        let at = |mb: u64| cell(mb).and_then(|r| r.downtime_mean_s);
        // Why a size has no figure: not in the series, or no valid run.
        let missing = |mb: u64| match cell(mb) {
            None => format!("no lazy run with {mb} MiB (add it to --memory)"),
            Some(r) => format!(
                "no valid lazy run with {mb} MiB ({}/{})",
                r.n_valid, r.n_runs
            ),
        };
        checks.push(match (at(64), at(1024)) {
            (Some(small), Some(big)) => verdict(
                big <= 1.25 * small,
                format!(
                    "{p}: lazy downtime at 1 GiB {big:.3} s ≤ 1.25 × at 64 MiB {small:.3} s = {:.3} s",
                    1.25 * small
                ),
            ),
            (small, _) => not_measured(format!(
                "{p}: lazy downtime at 1 GiB ≤ 1.25 × at 64 MiB: {}",
                missing(if small.is_none() { 64 } else { 1024 })
            )),
        });
        checks.push(match at(2048) {
            Some(d) => verdict(
                d <= 1.5,
                format!("{p}: lazy downtime at 2 GiB {d:.3} s ≤ 1.5 s"),
            ),
            None => not_measured(format!(
                "{p}: lazy downtime at 2 GiB ≤ 1.5 s: {}",
                missing(2048)
            )),
        });
    }
    if !checks.is_empty() {
        s.push_str("\nChecks (issue 16):\n\n");
        for c in checks {
            let _ = writeln!(s, "- {c}");
        }
    }
    s
}

fn verdict(ok: bool, text: String) -> String {
    format!("{}: {text}", if ok { "PASS" } else { "FAIL" })
}

/// A check whose figures the set does not have (the size was not in the series, none of
/// its runs was valid, or the link was not measured): said so, never passed.
fn not_measured(text: String) -> String {
    format!("NOT MEASURED: {text}")
}

/// The memory series against what the link requires: the archive ÷ the rate SSH alone
/// carries between the two hosts (measured by the bench in the same profile).
fn memory_table(rows: &[SummaryRow], links: &BTreeMap<String, f64>) -> String {
    let cells: Vec<&SummaryRow> = rows.iter().filter(|r| r.method == "memory").collect();
    if cells.is_empty() {
        return String::new();
    }
    let f = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "–".into());
    let mut s = String::from(
        "\n## Downtime against memory (method memory)\n\n\
         `link needs` = the archive ÷ what SSH alone carries from A to B in that profile \
         (random bytes into `cat >/dev/null` with the cipher migrate prefers, start-up \
         subtracted, measured by the bench before the series): the time the bytes need on \
         this link with nothing else running. `over the link` = downtime − link needs. \
         `CRIU alone` = CRIU's own time with the processes frozen at the dump plus its own \
         restore time (podman's statistics): what any checkpoint-and-restore of the whole \
         memory costs on these hosts before a byte is packed, moved or unpacked; where it \
         exceeds `link needs`, no pre-copy migration can keep to the link.\n\n",
    );
    for (p, rate) in links {
        let _ = writeln!(s, "- {p}: SSH carries {:.0} MiB/s\n", rate / 1048576.0);
    }
    s.push_str(
        "| profile | MiB held | archive MiB | downtime | link needs | over the link | CRIU alone | archives complete | restore |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in cells {
        let needs = match (r.archive_mean_bytes, links.get(&r.profile)) {
            (Some(b), Some(rate)) => Some(b / rate),
            _ => None,
        };
        let over = match (r.downtime_mean_s, needs) {
            (Some(d), Some(n)) => Some(d - n),
            _ => None,
        };
        let criu = r
            .criu_frozen_mean_s
            .zip(r.criu_restore_mean_s)
            .map(|(a, b)| a + b);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.profile,
            r.rows,
            r.archive_mean_bytes
                .map(|b| format!("{:.1}", b / 1048576.0))
                .unwrap_or_else(|| "–".into()),
            f(r.downtime_mean_s),
            f(needs),
            f(over),
            f(criu),
            f(r.checkpoint_mean_s),
            f(r.restore_mean_s),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(method: &str, outcome: &str, down: f64, mig: f64) -> RunRow {
        RunRow {
            method: method.into(),
            profile: "lan".into(),
            rows: 1000,
            outcome: outcome.into(),
            downtime_s: Some(down),
            migration_time_s: Some(mig),
            ..Default::default()
        }
    }

    #[test]
    fn invalid_runs_are_excluded_and_ratios_filled() {
        let runs = vec![
            run("migrate", "ok", 1.0, 4.0),
            run("migrate", "ok", 3.0, 6.0),
            run("migrate", "state_lost", 100.0, 100.0),
            run("thesis", "ok", 4.0, 10.0),
            run("thesis", "failed", 0.1, 0.1),
        ];
        let s = summarize(&runs);
        let m = s.iter().find(|r| r.method == "migrate").unwrap();
        assert_eq!((m.n_runs, m.n_valid), (3, 2));
        assert_eq!(m.downtime_mean_s, Some(2.0));
        assert_eq!(m.downtime_max_s, Some(3.0));
        assert_eq!(m.downtime_ratio_migrate_thesis, Some(0.5));
        assert_eq!(m.migration_ratio_migrate_thesis, Some(0.5));
        let t = s.iter().find(|r| r.method == "thesis").unwrap();
        assert_eq!((t.n_runs, t.n_valid), (2, 1));
        assert_eq!(t.downtime_ratio_migrate_thesis, None);
    }

    #[test]
    fn bound_compares_downtime_with_bytes_over_rate_plus_floor() {
        // 5.625 MB/s (45 Mbit/s): 11.25 MB take 2 s; floor 1 s: bound 1.5 × 3 = 4.5 s.
        assert!((bound_s(11.25e6, 5.625e6, 1.0) - 4.5).abs() < 1e-9);
        let mut m = run("migrate", "ok", 4.0, 5.0);
        m.profile = "wan".into();
        m.frozen_bytes = Some(11.25e6);
        let mut slow = m.clone();
        slow.rows = 2000;
        slow.downtime_s = Some(5.0);
        let mut f = run("floor", "ok", 1.0, 0.0);
        f.profile = "local".into();
        let mut f2 = f.clone();
        f2.rows = 2000;
        let rows = summarize(&[m, slow, f, f2]);
        let t = bound_table(&rows, &[("wan", 5.625e6)]);
        assert!(t.contains("| wan | 1000 | 4.000 |"), "{t}");
        assert!(t.contains("| 4.500 | yes |"), "{t}");
        assert!(t.contains("| wan | 2000 | 5.000 |"), "{t}");
        assert!(t.contains("**no**"), "{t}");
        // No rate-limited profile, no table.
        assert!(bound_table(&rows, &[("cloud", 1e8)]).is_empty());
    }

    #[test]
    fn memory_table_sets_criu_alone_beside_what_the_link_needs() {
        // 1 GiB at 256 MiB/s: the link needs 4 s; CRIU alone 0.9 + 3.9 = 4.8 s.
        let mut m = run("memory", "ok", 12.0, 12.5);
        m.rows = 1024;
        m.archive_bytes = Some(1024.0 * 1048576.0);
        m.criu_frozen_s = Some(0.9);
        m.criu_restore_s = Some(3.9);
        let rows = summarize(&[m]);
        let links = BTreeMap::from([("lan".to_string(), 256.0 * 1048576.0)]);
        let t = memory_table(&rows, &links);
        assert!(
            t.contains("| lan | 1024 | 1024.0 | 12.000 | 4.000 | 8.000 | 4.800 |"),
            "{t}"
        );
        assert!(t.contains("SSH carries 256 MiB/s"), "{t}");
        assert_eq!(links_from_summary(&t), links);
    }

    #[test]
    fn runs_csv_reads_back_what_was_written() {
        let mut a = run("migrate", "ok", 1.25, 4.0);
        a.probe_exceeds_reported = true;
        a.error = "a, \"quoted\" error".into();
        let b = run("floor", "failed", 2.0, 0.0);
        let path = std::env::temp_dir().join(format!("bench-runs-{}.csv", std::process::id()));
        let mut w = csv::Writer::from_path(&path).unwrap();
        for r in [&a, &b] {
            w.serialize(r).unwrap();
        }
        w.flush().unwrap();
        let back = read_runs(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].downtime_s, Some(1.25));
        assert!(back[0].probe_exceeds_reported);
        assert_eq!(back[0].error, a.error);
        assert_eq!(
            (back[1].method.as_str(), back[1].outcome.as_str()),
            ("floor", "failed")
        );
        assert_eq!(back[1].client_outage_s, None);
    }

    #[test]
    fn lazy_table_states_each_check_with_its_figures() {
        let cell = |method: &str, mb: u64, down: f64, window: Option<f64>| SummaryRow {
            method: method.into(),
            profile: "lan".into(),
            rows: mb,
            n_runs: 3,
            n_valid: 3,
            downtime_mean_s: Some(down),
            postcopy_max_s: window,
            postcopy_mean_s: window,
            ..Default::default()
        };
        let rows = vec![
            cell("memory", 64, 0.9, None),
            cell("lazy", 64, 1.0, Some(1.0)),
            cell("lazy", 1024, 1.3, Some(20.0)),
            cell("lazy", 2048, 1.4, Some(30.0)),
        ];
        let links: BTreeMap<String, f64> = [("lan".to_string(), 100.0 * 1048576.0)].into();
        let t = lazy_table(&rows, &links);
        // 1.3 > 1.25 × 1.0: fails; 1.4 ≤ 1.5: passes.
        assert!(
            t.contains(
                "FAIL: lan: lazy downtime at 1 GiB 1.300 s ≤ 1.25 × at 64 MiB 1.000 s = 1.250 s"
            ),
            "{t}"
        );
        assert!(
            t.contains("PASS: lan: lazy downtime at 2 GiB 1.400 s ≤ 1.5 s"),
            "{t}"
        );
        // 1024 MiB at 100 MiB/s: 10.24 s, bound 15.86 s; 20 s fails. 64 MiB: bound 1.46 s.
        assert!(
            t.contains("FAIL: lan 1024 MiB: longest post-copy window 20.000 s"),
            "{t}"
        );
        assert!(
            t.contains("PASS: lan 64 MiB: longest post-copy window 1.000 s"),
            "{t}"
        );
        assert!(lazy_table(&rows[..1], &links).is_empty());
        // Every check is there: none of them is NOT MEASURED here.
        assert_eq!(
            t.matches("PASS: ").count() + t.matches("FAIL: ").count(),
            5,
            "{t}"
        );
        assert!(!t.contains("NOT MEASURED"), "{t}");
    }

    #[test]
    fn lazy_table_says_which_checks_it_could_not_make() {
        let lazy = |mb: u64, outcome: &str, down: f64, window: f64| RunRow {
            method: "lazy".into(),
            profile: "lan".into(),
            rows: mb,
            outcome: outcome.into(),
            downtime_s: Some(down),
            postcopy_s: Some(window),
            ..Default::default()
        };
        // 64 and 256 MiB only; 256's one run failed; windows 0.2 and 0.4 s at 64 MiB.
        let runs = vec![
            lazy(64, "ok", 0.8, 0.2),
            lazy(64, "ok", 1.0, 0.4),
            lazy(256, "failed", 0.9, 1.0),
        ];
        let rows = summarize(&runs);
        let l = rows.iter().find(|r| r.rows == 64).unwrap();
        assert_eq!((l.postcopy_min_s, l.postcopy_max_s), (Some(0.2), Some(0.4)));
        assert!((l.postcopy_mean_s.unwrap() - 0.3).abs() < 1e-12);
        assert!((l.postcopy_std_s.unwrap() - 0.02f64.sqrt()).abs() < 1e-12);
        let t = lazy_table(&rows, &BTreeMap::new());
        for line in [
            "NOT MEASURED: lan 64 MiB: post-copy window ≤ 1.5 × link needs + 0.5 s: the link of lan was not measured",
            "NOT MEASURED: lan 256 MiB: post-copy window ≤ 1.5 × link needs + 0.5 s: no valid lazy run with a window (0/1 valid)",
            "NOT MEASURED: lan: lazy downtime at 1 GiB ≤ 1.25 × at 64 MiB: no lazy run with 1024 MiB (add it to --memory)",
            "NOT MEASURED: lan: lazy downtime at 2 GiB ≤ 1.5 s: no lazy run with 2048 MiB (add it to --memory)",
        ] {
            assert!(t.contains(line), "{line}\n{t}");
        }
        assert!(t.contains("| 0.300 ± 0.141 | 0.200–0.400 |"), "{t}");
        assert!(!t.contains("PASS") && !t.contains("FAIL"), "{t}");
    }
}
