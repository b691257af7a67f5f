//! `migrate send`: one migration as a chain of phases, each in its own module:
//!
//! 1. [`prepare`]: the checks (`preflight`), the clock, images, compression, the pre-sync
//!    of the data folders and the channels the freeze uses. A failure is a refusal.
//! 2. [`freeze`]: DOWN; every container checkpointed at once, its archive streaming to
//!    the target, then the post-sync.
//! 3. [`finish`]: "OK", the target's answer (or what SSH finds there), then commit, or
//!    [`rollback`]. It acts through the [`seams`], so its ordering is unit-tested.
//!
//! [`dry_run`] runs the first phase's checks and prints the plan. The rule everywhere: the
//! service ends up running on exactly one host.

mod dry_run;
mod finish;
mod freeze;
mod lazy;
mod prepare;
mod rollback;
pub mod seams;
#[cfg(test)]
mod tests_matrix;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;

use crate::engine::freezer::Freezer;
use crate::engine::podman::{Compression, ContainerInfo, CriuOptions, Podman};
use crate::exit::Exit;
use crate::hooks::{self, When};
use crate::journal::Phase;
use crate::plan::SendPlan;
use crate::preflight::Control;
use crate::progress::Ui;
use crate::protocol::ToReceiver;
use crate::signals::Signals;
use crate::timing::{Outcome, Record, Stopwatch, now_us};
use crate::transport::ssh::Ssh;

pub use dry_run::{DryRun, dry_run, estimate_downtime};
pub use prepare::link_rate;

use finish::{End, Froze};
use prepare::Prepared;
use seams::{LiveTarget, SystemClock};

/// A failed send: how it ended and why.
#[derive(Debug)]
pub struct SendFailure {
    pub exit: Exit,
    pub error: anyhow::Error,
}

fn refuse(error: impl Into<anyhow::Error>) -> SendFailure {
    SendFailure {
        exit: Exit::Refused,
        error: error.into(),
    }
}

const CONTROL_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
const REMOTE_TIMEOUT: Duration = Duration::from_secs(120);
const SHIP_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long the target may take to write the pre-synced data to disk before the freeze
/// goes ahead without it.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(300);
const CLOCK_ROUNDS: usize = 8;
/// Bytes sent to measure the link rate when `--compress auto` must choose.
const PROBE_BYTES: usize = 8 << 20;
/// Above this rate, compressing costs more time than it saves.
const FAST_LINK_BYTES_PER_S: f64 = 1e9;

/// One container as it will be moved.
#[derive(Debug, Clone)]
struct Item {
    info: ContainerInfo,
    opts: CriuOptions,
    archive_name: String,
    local_archive: PathBuf,
    /// The FIFO podman exports into while the archive streams out.
    fifo: PathBuf,
    /// The archive is zstd-compressed on the wire and decompressed on the target.
    stream_zstd: bool,
    /// The receiver's binary, whose `sink` writes the archive on the target.
    sink: Option<String>,
    /// The sink leaves CRIU's zero pages out of the archive it writes.
    drop_zero_pages: bool,
    /// Containers of this migration to restore before this one.
    after: Vec<String>,
    /// Its addresses that move with it (the receiver guards and announces them).
    addresses: Vec<crate::protocol::AddressEntry>,
    /// The container's cgroup freezer: `send` freezes it when podman starts the runtime's
    /// checkpoint, before CRIU would.
    freezer: Option<Freezer>,
    /// Its memory moves lazily (post-copy): the page server and relay of it.
    lazy: Option<Arc<lazy::LazyItem>>,
}

/// Runs one migration and returns its record; `Err` tells how it failed.
pub async fn run(
    plan: &SendPlan,
    ui: &Arc<Ui>,
    signals: &mut Signals,
) -> (Record, Result<(), SendFailure>) {
    let total = Stopwatch::start();
    let mut rec = Record {
        run_id: plan.run_id.clone(),
        label: plan.label.clone(),
        source: crate::host::hostname(),
        target: plan.target.dest.host.clone(),
        containers: plan.target.containers.clone(),
        role: "sender",
        ..Default::default()
    };
    let mut guard = crate::watchdog::Guard::new(plan);
    let result = migrate(plan, ui, signals, &mut rec, &mut guard).await;
    // A run that ended undecided (exit 3) keeps its journal for `migrate recover`.
    guard.end(matches!(&result, Err(f) if f.exit == Exit::Failed));
    rec.source_total_s = Some(total.secs());
    rec.outcome = Some(match &result {
        Ok(()) => Outcome::Ok,
        Err(f) => f.exit.outcome(),
    });
    if let Err(f) = &result {
        rec.error = format!("{:#}", f.error);
    }
    (rec, result)
}

/// The phases of one migration, in order. Each returns what the next needs; a failure
/// before the freeze is a refusal, after it `finish` decides.
async fn migrate(
    plan: &SendPlan,
    ui: &Arc<Ui>,
    signals: &mut Signals,
    rec: &mut Record,
    guard: &mut crate::watchdog::Guard,
) -> Result<(), SendFailure> {
    let prepared = tokio::select! {
        p = prepare::preflight(plan, ui, rec) => p?,
        _ = signals.changed() => return Err(refuse(anyhow!(INTERRUPTED_BEFORE_FREEZE))),
    };
    let run = Run::new(plan, ui, prepared, rec);
    if let Err(stop) = run.start_watchdog(guard).await {
        return Err(run.refuse(stop).await);
    }
    rec.start_us = Some(now_us());
    let channels = match prepare::presync_and_channels(&run, signals, rec).await {
        Ok(c) => c,
        Err(stop) => return Err(run.refuse(stop).await),
    };
    if let Err(stop) = run.pre_freeze(signals, guard).await {
        drop(channels);
        return Err(run.refuse(stop).await);
    }
    let froze = freeze::freeze(&run, channels, signals, rec).await;
    run.finish(froze, guard, signals, rec).await
}

const INTERRUPTED_BEFORE_FREEZE: &str = "interrupted before the freeze; nothing was frozen";

/// Why a migration stops before the freeze: what the receiver is told, and the error.
struct Stop {
    why: &'static str,
    error: anyhow::Error,
}

impl Stop {
    fn new(why: &'static str, error: anyhow::Error) -> Stop {
        Stop { why, error }
    }

    fn interrupted(why: &'static str) -> Stop {
        Stop::new(why, anyhow!(INTERRUPTED_BEFORE_FREEZE))
    }
}

/// One migration under way: the connections to the target and the containers.
struct Run<'a> {
    plan: &'a SendPlan,
    ui: &'a Arc<Ui>,
    ssh: Ssh,
    control: Control,
    items: Vec<Item>,
    local_dir: PathBuf,
    remote_dir: String,
    offset_us: i64,
    hook_env: Vec<(String, String)>,
    /// rsync compresses only where the archives are compressed too: on slow links.
    compress_sync: bool,
    /// The pod the containers move as.
    pod: Option<crate::protocol::PodSpec>,
}

impl<'a> Run<'a> {
    fn new(plan: &'a SendPlan, ui: &'a Arc<Ui>, p: Prepared, rec: &mut Record) -> Run<'a> {
        rec.clock_offset_us = Some(p.offset_us);
        let compress_sync = p
            .items
            .iter()
            .any(|it| it.stream_zstd || compression_of(&it.archive_name) != Compression::None);
        Run {
            plan,
            ui,
            ssh: p.ssh,
            control: p.control,
            items: p.items,
            local_dir: p.local_dir,
            remote_dir: p.remote_dir,
            offset_us: p.offset_us,
            hook_env: hook_env(plan, rec),
            compress_sync,
            pod: p.pod,
        }
    }

    /// Refused before the freeze: the receiver forgets the run; nothing was touched.
    async fn refuse(self, stop: Stop) -> SendFailure {
        let plan = self.plan;
        let mut target = LiveTarget::new(
            plan,
            self.control,
            &self.ssh,
            &self.remote_dir,
            &self.hook_env,
        );
        let failure = finish::refuse(&mut target, stop.why, stop.error).await;
        self.ssh.close().await;
        failure
    }

    /// The journal and the watchdog that repairs the run if this process dies.
    async fn start_watchdog(&self, guard: &mut crate::watchdog::Guard) -> Result<(), Stop> {
        let entries = self.items.iter().map(journal_entry).collect();
        let started = guard
            .start(
                self.plan,
                entries,
                self.pod.as_ref().map(|p| p.name.as_str()),
                &self.local_dir,
                &self.remote_dir,
            )
            .await;
        match started {
            Ok(said) => {
                self.ui.info(&said);
                Ok(())
            }
            Err(e) => Err(Stop::new(
                "cannot start the watchdog",
                e.context("nothing was frozen"),
            )),
        }
    }

    /// The pre-freeze hooks, a last look for signals, and the journal's word that the
    /// checkpoints begin.
    async fn pre_freeze(
        &self,
        signals: &mut Signals,
        guard: &mut crate::watchdog::Guard,
    ) -> Result<(), Stop> {
        let plan = self.plan;
        self.ui.phase("pre-freeze hooks");
        let env = &self.hook_env;
        let run = hooks::run_all(
            &plan.hooks,
            When::PreFreeze,
            env,
            Some(&self.ssh),
            plan.hook_timeout,
        );
        let pre = tokio::select! {
            r = run => r.map_err(anyhow::Error::from),
            _ = signals.changed() => Err(anyhow!("interrupted")),
        };
        if let Err(e) = pre {
            let e = e.context("stopped before the freeze; nothing was frozen");
            return Err(Stop::new("pre-freeze hook failed", e));
        }
        if signals.fired() {
            return Err(Stop::interrupted("interrupted before the freeze"));
        }
        guard.phase(Phase::Checkpointing).map_err(|e| {
            Stop::new(
                "cannot write the run journal",
                e.context("nothing was frozen"),
            )
        })
    }

    /// "OK" and what follows, through the live seams.
    async fn finish(
        self,
        froze: Froze,
        guard: &mut crate::watchdog::Guard,
        signals: &mut Signals,
        rec: &mut Record,
    ) -> Result<(), SendFailure> {
        let plan = self.plan;
        let mut target = LiveTarget::new(
            plan,
            self.control,
            &self.ssh,
            &self.remote_dir,
            &self.hook_env,
        );
        let mut end = End {
            engine: &Podman,
            target: &mut target,
            clock: &SystemClock,
            ui: self.ui,
            items: &self.items,
            local_dir: &self.local_dir,
            offset_us: self.offset_us,
            post_up_hooks: plan.hooks.iter().any(|h| h.when == When::PostUp),
            pod: self.pod.as_ref().map(|p| p.name.as_str()),
        };
        let result = finish::conclude(&mut end, froze, guard, signals, rec).await;
        if result.is_ok() {
            self.ssh.close().await;
            self.ui.finish();
        }
        result
    }
}

/// 1536 → "1.5 KiB".
fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// The larger of two optional values.
fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Tells the receiver to forget this migration (best effort).
async fn abort(control: &mut Control, reason: &str, frozen: bool) {
    let _ = control
        .send(&ToReceiver::Abort {
            reason: reason.into(),
            frozen,
        })
        .await;
}

fn compression_of(archive: &str) -> Compression {
    if archive.ends_with(".tar.zst") {
        Compression::Zstd
    } else if archive.ends_with(".tar.gz") {
        Compression::Gzip
    } else {
        Compression::None
    }
}

fn stranded(e: anyhow::Error) -> SendFailure {
    SendFailure {
        exit: Exit::Failed,
        error: e.context(
            "cannot tell whether the target runs the containers; podman keeps their checkpoints here — check the target, and if the containers do not run there, bring them back here with `podman container restore --keep NAME`",
        ),
    }
}

/// The migration's facts for hooks.
fn hook_env(plan: &SendPlan, rec: &Record) -> Vec<(String, String)> {
    vec![
        ("MIGRATE_RUN_ID".into(), plan.run_id.clone()),
        ("MIGRATE_SOURCE".into(), rec.source.clone()),
        ("MIGRATE_TARGET".into(), plan.target.dest.host.clone()),
        (
            "MIGRATE_CONTAINERS".into(),
            plan.target.containers.join(" "),
        ),
    ]
}

/// What the run journal keeps of one container.
fn journal_entry(it: &Item) -> crate::journal::Entry {
    crate::journal::Entry {
        name: it.info.name.clone(),
        freezer: it.freezer.clone(),
        fifo: it.fifo.clone(),
        file_locks: it.opts.file_locks,
        tcp_established: it.opts.tcp_established,
        tcp_close: it.opts.tcp_close,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_for_humans() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(80 << 20), "80.0 MiB");
    }

    #[test]
    fn a_rolled_back_send_says_so_in_its_record() {
        assert_eq!(Exit::RolledBack.outcome().as_str(), "rolled_back");
    }
}
