//! `send --dry-run`: every check of a real send, the link measured, the data folders
//! previewed; the plan and a rough downtime estimate as one record on stdout (CSV or
//! JSON, as `--format` says), the plan in words on stderr. Touches nothing.

use std::sync::Arc;

use serde::Serialize;

use crate::engine::podman::{self, Compression};
use crate::exit::Exit;
use crate::plan::SendPlan;
use crate::preflight::{self, Want};
use crate::progress::{Ui, say};
use crate::sync::rsync;
use crate::timing::Format;
use crate::transport::ssh::Ssh;

use super::abort;
use super::prepare::{choose_compression, measure_link};

/// The plan of a migration that would start now.
#[derive(Debug, Serialize)]
pub struct DryRun {
    pub run_id: String,
    pub source: String,
    pub target: String,
    /// Checks that ran (`migrate check` lists them); none refused.
    pub findings: usize,
    pub containers: Vec<PlannedContainer>,
    /// Images the target lacks, shipped first (`podman save | podman load`).
    pub images_to_ship: Vec<String>,
    pub data: Vec<PlannedData>,
    pub compression: &'static str,
    pub link_bytes_per_s: f64,
    /// What the archives would weigh, from resident memory.
    pub archive_bytes: u64,
    pub estimate: Estimate,
}

#[derive(Debug, Serialize)]
pub struct PlannedContainer {
    pub name: String,
    pub resident_bytes: u64,
    pub file_locks: bool,
}

#[derive(Debug, Serialize)]
pub struct PlannedData {
    pub path: String,
    /// What the pre-sync would send while the service runs; `None` when rsync could not
    /// preview it (the reason is on stderr).
    pub files: Option<u64>,
    pub bytes: Option<u64>,
}

/// A rough model from resident memory and the measured link, not a measurement.
#[derive(Debug, Serialize)]
pub struct Estimate {
    pub checkpoint_s: f64,
    pub transfer_s: f64,
    pub restore_s: f64,
    pub downtime_s: f64,
}

/// Runs the dry run; returns the exit status (0 it would start, 2 it would be refused).
pub async fn dry_run(plan: &SendPlan, ui: &Arc<Ui>) -> u8 {
    let want = Want::new(&plan.target, &plan.run_id, &plan.label, false);
    let mut report = preflight::run(&want, ui).await;
    if let Some(f) = report.first_failure() {
        ui.finish();
        say!("migrate send: error: {}", f.one_line());
        if let Some(ssh) = report.ssh.take() {
            ssh.close().await;
        }
        return Exit::Refused.code();
    }
    let ssh = report.ssh.take().expect("no failure means SSH works");
    let planned = survey(plan, ui, &report, &ssh).await;
    ui.finish();
    for line in describe(plan, &planned) {
        say!("{line}");
    }
    let mut stdout = std::io::stdout().lock();
    // The plan is the result: a reader gone is not worth a panic, nor a different exit.
    let _ = write(&planned, &mut stdout, plan.format, plan.no_header);
    if let Some(mut w) = report.receiver.take() {
        abort(&mut w.control, "dry run", false).await;
    }
    ssh.close().await;
    Exit::Ok.code()
}

/// Measures what the plan needs: the link, the containers' memory, the data to pre-sync.
async fn survey(plan: &SendPlan, ui: &Ui, report: &preflight::Report, ssh: &Ssh) -> DryRun {
    let rate = measure_link(ssh).await.unwrap_or(0.0);
    let compression = choose_compression(plan, ui, || async { Ok(rate) }).await;
    let containers: Vec<PlannedContainer> = report
        .infos
        .iter()
        .map(|c| PlannedContainer {
            name: c.name.clone(),
            resident_bytes: podman::resident_bytes(c.pid),
            file_locks: podman::holds_file_locks(c.pid).unwrap_or(true),
        })
        .collect();
    let mut data = Vec::new();
    for d in &plan.target.data {
        let preview = rsync::preview(d, ssh).await;
        if let Err(e) = &preview {
            ui.warn(&format!("pre-sync {}: cannot preview ({e})", d.display()));
        }
        let preview = preview.ok();
        data.push(PlannedData {
            path: d.display().to_string(),
            files: preview.as_ref().map(|s| s.files_transferred),
            bytes: preview.as_ref().map(|s| s.transferred_file_size),
        });
    }
    let resident: Vec<u64> = containers.iter().map(|c| c.resident_bytes).collect();
    let total: u64 = resident.iter().sum();
    let archive_bytes = match compression {
        Compression::None => total,
        _ => total / 10,
    };
    let (checkpoint_s, transfer_s, restore_s) = estimate_downtime(&resident, archive_bytes, rate);
    DryRun {
        run_id: plan.run_id.clone(),
        source: crate::host::hostname(),
        target: plan.target.dest.ssh_target(),
        findings: report.findings.len(),
        containers,
        images_to_ship: report
            .missing_images
            .iter()
            .map(|(_, i)| i.clone())
            .collect(),
        data,
        compression: compression.as_str(),
        link_bytes_per_s: rate,
        archive_bytes,
        estimate: Estimate {
            checkpoint_s,
            transfer_s,
            restore_s,
            downtime_s: checkpoint_s + transfer_s + restore_s,
        },
    }
}

/// The plan in words, step by step.
fn describe(plan: &SendPlan, p: &DryRun) -> Vec<String> {
    let mib = |b: u64| b as f64 / 1048576.0;
    let names: Vec<&str> = p.containers.iter().map(|c| c.name.as_str()).collect();
    let mut lines = vec![
        format!(
            "plan: move {} from {} to {} (run id would be {})",
            names.join(", "),
            p.source,
            p.target,
            p.run_id
        ),
        format!(
            "  1. preflight: every check passed ({} findings; `migrate check` lists them)",
            p.findings
        ),
    ];
    for image in &p.images_to_ship {
        lines.push(format!(
            "     image {image} will be shipped first (podman save | podman load)"
        ));
    }
    for d in &p.data {
        lines.push(match (d.files, d.bytes) {
            (Some(f), Some(b)) => format!(
                "  2. pre-sync {} while the containers run: {f} files, {:.1} MiB to send now",
                d.path,
                mib(b)
            ),
            _ => format!("  2. pre-sync {}: cannot preview", d.path),
        });
    }
    if p.data.is_empty() {
        lines.push("  2. no --data folders: nothing to pre-sync".into());
    } else {
        lines.push(
            "     then the target writes the pre-synced data to disk (sync -f), before the freeze"
                .into(),
        );
    }
    let each: Vec<String> = p
        .containers
        .iter()
        .map(|c| {
            let locks = if c.file_locks { ", --file-locks" } else { "" };
            format!(
                "{} ({:.0} MiB resident{locks})",
                c.name,
                mib(c.resident_bytes)
            )
        })
        .collect();
    lines.push(format!(
        "  3. DOWN: checkpoint in parallel, compression {}: {}",
        p.compression,
        each.join(", ")
    ));
    lines.push(format!(
        "  4. ship ~{:.0} MiB of archives over SSH (link measured at ~{:.0} Mbit/s), then post-sync what changed in the data folders",
        mib(p.archive_bytes),
        p.link_bytes_per_s * 8.0 / 1e6
    ));
    lines.push(format!(
        "  5. \"OK\" to the receiver; it verifies the archives and restores {} in this order",
        plan.target.containers.join(", ")
    ));
    lines.push(
        "  6. once the target confirms UP: remove the containers here (data folders stay)".into(),
    );
    let e = &p.estimate;
    lines.push(format!(
        "estimated downtime ~{:.2}s (checkpoint {:.2}s + transfer {:.2}s + restore {:.2}s); a rough model from resident memory and the measured link, not a measurement",
        e.downtime_s, e.checkpoint_s, e.transfer_s, e.restore_s
    ));
    lines
}

/// The plan as one record: JSON as it is; CSV flat, one row.
pub fn write(
    p: &DryRun,
    out: &mut dyn std::io::Write,
    format: Format,
    no_header: bool,
) -> anyhow::Result<()> {
    match format {
        Format::Json => {
            serde_json::to_writer(&mut *out, p)?;
            out.write_all(b"\n")?;
        }
        Format::Csv => {
            let names: Vec<&str> = p.containers.iter().map(|c| c.name.as_str()).collect();
            let fields: [(&str, String); 11] = [
                ("run_id", p.run_id.clone()),
                ("source", p.source.clone()),
                ("target", p.target.clone()),
                ("containers", names.join(" ")),
                ("compression", p.compression.into()),
                ("link_bytes_per_s", format!("{:.0}", p.link_bytes_per_s)),
                ("archive_bytes", p.archive_bytes.to_string()),
                (
                    "est_checkpoint_s",
                    format!("{:.3}", p.estimate.checkpoint_s),
                ),
                ("est_transfer_s", format!("{:.3}", p.estimate.transfer_s)),
                ("est_restore_s", format!("{:.3}", p.estimate.restore_s)),
                ("est_downtime_s", format!("{:.3}", p.estimate.downtime_s)),
            ];
            let mut w = csv::Writer::from_writer(out);
            if !no_header {
                w.write_record(fields.iter().map(|(n, _)| *n))?;
            }
            w.write_record(fields.iter().map(|(_, v)| v))?;
            w.flush()?;
        }
    }
    Ok(())
}

/// A rough model of the frozen time: parallel dumps, one transfer, sequential restores.
/// CRIU moves memory at a few hundred MB/s here; podman adds a fixed cost per container.
pub fn estimate_downtime(
    resident: &[u64],
    archive_bytes: u64,
    link_bytes_per_s: f64,
) -> (f64, f64, f64) {
    const PER_CONTAINER_S: f64 = 0.35;
    const CRIU_BYTES_PER_S: f64 = 400e6;
    let checkpoint = resident
        .iter()
        .map(|b| PER_CONTAINER_S + *b as f64 / CRIU_BYTES_PER_S)
        .fold(0.0, f64::max);
    let transfer = if link_bytes_per_s > 0.0 {
        archive_bytes as f64 / link_bytes_per_s
    } else {
        0.0
    };
    let restore = resident
        .iter()
        .map(|b| PER_CONTAINER_S + *b as f64 / CRIU_BYTES_PER_S)
        .sum();
    (checkpoint, transfer, restore)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downtime_model_grows_with_memory_and_link() {
        let (c, t, r) = estimate_downtime(&[100 << 20, 1 << 20], 101 << 20, 100e6);
        assert!(c > 0.35 && c < 1.0, "{c}");
        assert!((t - (101u64 << 20) as f64 / 100e6).abs() < 1e-9);
        assert!(r > c, "restores are sequential: {r} vs {c}");
        let (_, slow, _) = estimate_downtime(&[100 << 20], 100 << 20, 5e6);
        assert!(slow > 20.0);
    }
}
