//! The receiver's answer, left behind: `result.json` in the run folder for a sender that
//! lost the control connection, and the record on stdout.

use std::path::Path;
use std::sync::atomic::Ordering;

use super::Ctx;
use super::lazy::Window;
use crate::progress::Ui;
use crate::protocol::{Manifest, TargetOutcome};
use crate::rundir::{self, RESULT_FILE};
use crate::timing::{Outcome, Record, now_us};

/// Who sent a migration, as its hello said.
pub(super) struct Origin<'a> {
    pub run_id: &'a str,
    pub label: &'a str,
    pub source: &'a str,
}

/// Writes `result.json` and tidies the run folder: the archives go once restored; after a
/// failure they stay for the sender's rollback (it removes the run folder when done), and
/// only the secret goes.
pub(super) fn leave_result(dir: &Path, outcome: &TargetOutcome, ui: &Ui) {
    let written = rundir::write_result(dir, outcome);
    if outcome.restored {
        rundir::remove_archives(dir);
    } else {
        rundir::remove_secret(dir);
    }
    // A full disk: removing the archives may have made room for it.
    if let Err(e) = written.or_else(|_| rundir::write_result(dir, outcome)) {
        ui.warn(&format!(
            "cannot write {}: {e}",
            dir.join(RESULT_FILE).display()
        ));
    }
}

/// The receiver's record of one migration, its times on the sender's clock.
fn record(
    ctx: &Ctx,
    from: &Origin,
    m: &Manifest,
    o: &TargetOutcome,
    window: Option<&Window>,
) -> Record {
    // Receiver times are moved onto the sender's clock with the sender's offset estimate.
    let to_sender = |us: i64| us - m.clock_offset_us;
    let lazy = m.containers.iter().any(|c| c.lazy.is_some());
    let window_failed = window.and_then(|w| w.error.clone());
    Record {
        memory: if lazy { "lazy" } else { "copy" },
        postcopy_s: match (window.and_then(|w| w.end_us), o.up_us) {
            (Some(end), Some(up)) => Some(crate::timing::secs_between(up, end)),
            _ => None,
        },
        bytes_after_up: window.map(|w| w.bytes),
        run_id: from.run_id.into(),
        label: from.label.into(),
        source: from.source.into(),
        target: ctx.hostname.clone(),
        containers: m.containers.iter().map(|c| c.name.clone()).collect(),
        down_us: Some(m.down_us),
        up_us: o.up_us.map(to_sender),
        restore_s: Some(o.restore_s),
        criu_restore_s: o.criu_restore_s,
        verify_s: Some(o.verify_s),
        target_total_s: Some(crate::timing::secs_between(
            o.ready_us,
            o.up_us.unwrap_or_else(now_us),
        )),
        clock_offset_us: Some(m.clock_offset_us),
        archive_bytes: Some(m.containers.iter().map(|c| c.size).sum()),
        outcome: Some(if o.restored && window_failed.is_none() {
            Outcome::Ok
        } else {
            Outcome::Failed
        }),
        role: "receiver",
        error: o.error.clone().or(window_failed).unwrap_or_default(),
        ..Default::default()
    }
}

/// Prints the record on stdout (the CSV header once per process).
pub(super) fn print_record(
    ctx: &Ctx,
    from: &Origin<'_>,
    m: &Manifest,
    o: &TargetOutcome,
    window: Option<&Window>,
) {
    let rec = record(ctx, from, m, o, window);
    let no_header = ctx.header_done.swap(true, Ordering::SeqCst);
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = rec.write(&mut stdout, ctx.format, no_header) {
        ctx.ui.warn(&format!("cannot write the record: {e}"));
    }
}
