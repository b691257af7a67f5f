//! The source side: preflight, pre-sync, freeze, ship, post-sync, "OK", then commit or
//! roll back. The rule everywhere: the service ends up running on exactly one host.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};

use crate::cli::CompressChoice;
use crate::engine::freezer::{Freezer, FrozenCgroup};
use crate::engine::podman::{self, Compression, ContainerInfo, CriuOptions, Podman};
use crate::exit::Exit;
use crate::hooks::{self, When};
use crate::journal::Phase;
use crate::plan::SendPlan;
use crate::preflight::{self, Control, Want, Welcome};
use crate::progress::{Ui, say};
use crate::protocol::{
    ClockSample, ContainerEntry, Manifest, ToReceiver, ToSender, estimate_offset,
};
use crate::rundir::PID_FILE;
use crate::settle::{self, Settled};
use crate::signals::Signals;
use crate::sync::rsync;
use crate::timing::{Outcome, Record, Stopwatch, now_us};
use crate::transport::ssh::{Ssh, remote_join};

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
/// How long the target may take to restore once "OK" is sent.
pub(crate) const RESTORE_TIMEOUT: Duration = Duration::from_secs(900);
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
    /// The container's cgroup freezer: `send` freezes it when podman starts the runtime's
    /// checkpoint, before CRIU would.
    freezer: Option<Freezer>,
}

/// Everything `migrate` learned and set up before the freeze.
struct Prepared {
    ssh: Ssh,
    control: Control,
    items: Vec<Item>,
    local_dir: PathBuf,
    remote_dir: String,
    offset_us: i64,
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

async fn migrate(
    plan: &SendPlan,
    ui: &Arc<Ui>,
    signals: &mut Signals,
    rec: &mut Record,
    guard: &mut crate::watchdog::Guard,
) -> Result<(), SendFailure> {
    let prepared = tokio::select! {
        p = preflight(plan, ui, rec) => p?,
        _ = signals.changed() => return Err(refuse(anyhow!("interrupted before the freeze; nothing was frozen"))),
    };
    let Prepared {
        ssh,
        mut control,
        items,
        local_dir,
        remote_dir,
        offset_us,
    } = prepared;
    rec.clock_offset_us = Some(offset_us);
    // The journal and the watchdog that repairs the run if this process dies.
    let entries = items.iter().map(journal_entry).collect();
    match guard.start(plan, entries, &local_dir, &remote_dir).await {
        Ok(said) => ui.info(&said),
        Err(e) => {
            abort(&mut control, "cannot start the watchdog", false).await;
            ssh.close().await;
            return Err(refuse(e.context("nothing was frozen")));
        }
    }
    // rsync compresses only where the archives are compressed too: on slow links.
    let compress_sync = items
        .iter()
        .any(|it| it.stream_zstd || compression_of(&it.archive_name) != Compression::None);

    // Pre-sync while the service runs; meanwhile the upload channels and the post-syncs
    // start (see `open_sessions`).
    rec.start_us = Some(now_us());
    let presync = Stopwatch::start();
    let presync_run = async {
        let mut bytes = 0u64;
        for dir in &plan.target.data {
            ui.phase(&format!("pre-sync {}", dir.display()));
            let r = tokio::select! {
                r = rsync::sync(dir, &ssh, compress_sync) => r,
                _ = signals.changed() => return Err(("interrupted during pre-sync", anyhow!("interrupted before the freeze; nothing was frozen"))),
            };
            match r {
                Ok(s) => {
                    ui.info(&format!(
                        "pre-sync {}: {} files, sent {} in {:.3}s",
                        dir.display(),
                        s.files_transferred,
                        human_bytes(s.bytes_sent),
                        presync.secs()
                    ));
                    bytes += s.bytes_sent;
                }
                Err(e) => {
                    return Err((
                        "pre-sync failed",
                        anyhow!(e).context(format!(
                            "pre-sync of {} failed; nothing was frozen",
                            dir.display()
                        )),
                    ));
                }
            }
        }
        if !plan.target.data.is_empty() {
            // What the pre-sync wrote sits in the target's page cache; written back during
            // the freeze it competes with the restore (1 GiB of data folders: ~0.4 s more
            // downtime here). Written now, it costs migration time only.
            ui.phase("flushing the pre-synced data on the target");
            let flush = Stopwatch::start();
            let mut args = vec!["-f".to_string()];
            args.extend(plan.target.data.iter().map(|d| d.display().to_string()));
            let r = tokio::select! {
                r = ssh.run("sync", &args, FLUSH_TIMEOUT) => r,
                _ = signals.changed() => return Err(("interrupted during pre-sync", anyhow!("interrupted before the freeze; nothing was frozen"))),
            };
            match r {
                Ok(_) => ui.info(&format!(
                    "the target wrote the pre-synced data to disk in {:.3}s",
                    flush.secs()
                )),
                Err(e) => ui.warn(&format!(
                    "the target could not write the pre-synced data to disk ({e}); going on"
                )),
            }
        }
        Ok(bytes)
    };
    let (presynced, sessions) = tokio::join!(
        presync_run,
        open_sessions(plan, &ssh, &items, &remote_dir, compress_sync)
    );
    let mut sync_bytes = match presynced {
        Ok(b) => b,
        Err((why, e)) => {
            drop(sessions);
            abort(&mut control, why, false).await;
            ssh.close().await;
            return Err(refuse(e));
        }
    };
    rec.presync_s = Some(presync.secs());
    let (streams, armed) = match sessions {
        Ok(s) => s,
        Err((why, e)) => {
            abort(&mut control, why, false).await;
            return Err(refuse(e.context("nothing was frozen")));
        }
    };
    let hook_env = hook_env(plan, rec);
    ui.phase("pre-freeze hooks");
    let pre = tokio::select! {
        r = hooks::run_all(&plan.hooks, When::PreFreeze, &hook_env, Some(&ssh), plan.hook_timeout) => r.map_err(anyhow::Error::from),
        _ = signals.changed() => Err(anyhow!("interrupted")),
    };
    if let Err(e) = pre {
        abort(&mut control, "pre-freeze hook failed", false).await;
        ssh.close().await;
        return Err(refuse(
            e.context("stopped before the freeze; nothing was frozen"),
        ));
    }
    if signals.fired() {
        abort(&mut control, "interrupted before the freeze", false).await;
        ssh.close().await;
        return Err(refuse(anyhow!(
            "interrupted before the freeze; nothing was frozen"
        )));
    }

    if let Err(e) = guard.phase(Phase::Checkpointing) {
        abort(&mut control, "cannot write the run journal", false).await;
        ssh.close().await;
        return Err(refuse(e.context("nothing was frozen")));
    }
    let podman = Podman;
    let rb = Rollback {
        podman: &podman,
        items: &items,
        ui,
        ssh: &ssh,
        dest: &plan.target.dest,
        remote_dir: &remote_dir,
        hooks: &plan.hooks,
        env: &hook_env,
        hook_timeout: plan.hook_timeout,
    };

    // DOWN: every container is checkpointed at once; each archive streams to the target
    // while podman writes it. Once all containers are stopped, the data folders are
    // post-synced (only what changed since the pre-sync).
    let down = now_us();
    rec.down_us = Some(down);
    ui.info("DOWN: checkpointing");
    ui.phase("checkpointing and streaming the archives");
    let since_down = Stopwatch::start();
    let mut done_rx = Vec::new();
    let item_work: Vec<_> = items
        .iter()
        .zip(streams)
        .map(|(it, stream)| {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            done_rx.push(rx);
            freeze_and_stream(&podman, &ssh, &remote_dir, it, stream, tx, since_down)
        })
        .collect();
    let dump_at = std::cell::Cell::new(None);
    let postsync = async {
        // Once every dump is over the containers' processes are gone and their data
        // folders stay as they are: the post-sync runs while podman still exports.
        for rx in done_rx {
            if rx.await.is_err() {
                // A checkpoint failed: this migration rolls back, nothing to sync.
                return Ok(None);
            }
        }
        dump_at.set(Some(since_down.secs()));
        ui.phase("shipping archives and changed data");
        let started = Stopwatch::start();
        let sync = async {
            let runs = armed
                .into_iter()
                .zip(&plan.target.data)
                .map(|(a, dir)| async move {
                    a.fire()
                        .await
                        .with_context(|| format!("post-sync of {}", dir.display()))
                });
            let mut bytes = 0;
            for r in futures::future::join_all(runs).await {
                bytes += r?.bytes_sent;
            }
            anyhow::Ok(Some((bytes, started.secs())))
        };
        tokio::select! {
            r = sync => r,
            _ = signals.changed() => Err(anyhow!("interrupted while frozen")),
        }
    };
    let (frozen, post) = tokio::join!(futures::future::join_all(item_work), postsync);
    // DOWN is when the service stopped. Where podman was watched start the runtime's
    // checkpoint (and the container frozen right then), that is the last look before it
    // started, for the earliest container: podman's start-up ran while the service still
    // answered. A container not watched may have stopped any time after podman started.
    let starts: Option<Vec<i64>> = frozen
        .iter()
        .map(|f| match &f.checkpoint {
            Ok(st) => st.runtime_start.as_ref().map(|r| r.before_us),
            Err(_) => None,
        })
        .collect();
    let shift_us = starts
        .and_then(|v| v.into_iter().min())
        .map_or(0, |first| (first - down).max(0));
    let down = down + shift_us;
    rec.down_us = Some(down);
    let shift_s = shift_us as f64 / 1e6;
    let since_down = since_down.later_by(Duration::from_micros(shift_us as u64));
    if shift_us > 0 {
        ui.info(&format!(
            "DOWN at the first freeze, {shift_s:.3}s after podman started (the service ran meanwhile)"
        ));
    }
    let rebase = |secs: f64| (secs - shift_s).max(0.0);
    rec.dump_s = dump_at.get().map(rebase);
    let mut checkpointed = Vec::new();
    // When podman's exit was the last thing before "OK" could be said: what waiting for
    // its verdict cost (the archives on the target and the post-sync done before it).
    let mut podman_exited_s = 0.0f64;
    let mut entries = Vec::new();
    let mut wire_bytes = 0u64;
    let mut postsync_bytes = 0u64;
    let mut first_error: Option<anyhow::Error> = None;
    for (it, f) in items.iter().zip(frozen) {
        if f.attempts > 1 {
            ui.warn(&format!(
                "{}: a client was connecting at the freeze; checkpoint attempt {}",
                it.info.name, f.attempts
            ));
        }
        rec.checkpoint_s = max_opt(rec.checkpoint_s, Some(rebase(f.checkpoint_s)));
        rec.transfer_s = max_opt(rec.transfer_s, Some(rebase(f.shipped_s)));
        wire_bytes += f.wire_bytes;
        let froze = match &f.froze {
            Some(Ok(t)) => format!("frozen in {:.1}ms, ", t.as_secs_f64() * 1e3),
            Some(Err(e)) => {
                ui.warn(&format!(
                    "{}: could not freeze it before CRIU ({e}); CRIU froze it",
                    it.info.name
                ));
                String::new()
            }
            None => String::new(),
        };
        match f.checkpoint {
            Ok(st) => {
                ui.info(&format!(
                    "checkpointed {}: {froze}dump over {:.3}s after DOWN, archive complete at {:.3}s, podman done at {:.3}s",
                    it.info.name,
                    st.first_byte.map(|t| since_down.at(t)).unwrap_or_default(),
                    since_down.at(st.complete),
                    since_down.at(st.exited),
                ));
                podman_exited_s = podman_exited_s.max(since_down.at(st.exited));
                rec.podman_checkpoint_s = max_opt(rec.podman_checkpoint_s, st.stats.podman_s);
                rec.criu_frozen_s = max_opt(rec.criu_frozen_s, st.stats.criu_s);
                checkpointed.push(it.clone());
            }
            Err(e) => {
                // When the checkpoint failed only in handing its stream on, the upload
                // broke first (a full disk there, say) and is the cause; when podman or
                // CRIU failed, the upload broke because of that.
                let stream_only = matches!(
                    e.downcast_ref::<podman::PodmanError>(),
                    Some(podman::PodmanError::Stream { .. })
                );
                let e = match &f.shipped {
                    Err(ship) if stream_only => anyhow!("{ship}").context(format!(
                        "shipping the archive of {} failed (so did its checkpoint's stream: {e:#})",
                        it.info.name
                    )),
                    _ => e.context(format!("checkpoint of {} failed", it.info.name)),
                };
                first_error.get_or_insert(e);
                continue;
            }
        }
        match f.shipped {
            Ok((size, digest)) => entries.push(ContainerEntry {
                name: it.info.name.clone(),
                archive: it.archive_name.clone(),
                size,
                digest,
                image_id: it.info.image_id.clone(),
                file_locks: it.opts.file_locks,
                tcp_established: it.opts.tcp_established,
                tcp_close: it.opts.tcp_close,
                after: it.after.clone(),
            }),
            Err(e) => {
                first_error.get_or_insert(
                    anyhow!(e).context(format!("shipping the archive of {}", it.info.name)),
                );
            }
        }
    }
    match post {
        Ok(Some((bytes, postsync_s))) => {
            rec.postsync_s = Some(postsync_s);
            postsync_bytes = bytes;
            sync_bytes += bytes;
        }
        Ok(None) => {}
        Err(e) => {
            first_error.get_or_insert(e);
        }
    }
    if first_error.is_none() && signals.fired() {
        first_error = Some(anyhow!("interrupted while frozen"));
    }
    // Before "OK" leaves: from here a watchdog must ask the target, never restore blindly.
    if first_error.is_none()
        && let Err(e) = guard.phase(Phase::OkSent)
    {
        first_error = Some(e);
    }
    if let Some(e) = first_error {
        ui.phase("rolling back: waiting for podman to end its checkpoints");
        abort(&mut control, "failed while frozen", true).await;
        return Err(rb.run(&checkpointed, e).await);
    }
    // "OK" waits for every podman's exit status (an archive is complete only when podman
    // says so); how much of the downtime that wait was:
    let ready_s = rec
        .transfer_s
        .unwrap_or_default()
        .max(rec.dump_s.unwrap_or_default() + rec.postsync_s.unwrap_or_default());
    let waited_s = (podman_exited_s - ready_s).max(0.0);
    ui.info(&format!(
        "every podman exited successfully {podman_exited_s:.3}s after DOWN; waiting for them held OK back {waited_s:.3}s"
    ));
    let archives: u64 = entries.iter().map(|e| e.size).sum();
    ui.info(&format!(
        "shipped {} of archives ({} on the wire), complete {:.3}s after DOWN; post-sync sent {} in {:.3}s",
        human_bytes(archives),
        human_bytes(wire_bytes),
        rec.transfer_s.unwrap_or_default(),
        human_bytes(postsync_bytes),
        rec.postsync_s.unwrap_or_default()
    ));
    let archive_bytes: u64 = entries.iter().map(|e| e.size).sum();
    rec.archive_bytes = Some(archive_bytes);
    rec.sync_bytes = Some(sync_bytes);
    rec.bytes_sent = Some(wire_bytes + sync_bytes);
    rec.frozen_bytes = Some(wire_bytes + postsync_bytes);

    // "OK": from here on the target decides; a signal no longer aborts.
    let manifest = Manifest {
        run_id: plan.run_id.clone(),
        containers: entries,
        data: plan
            .target
            .data
            .iter()
            .map(|d| d.display().to_string())
            .collect(),
        down_us: down,
        clock_offset_us: offset_us,
    };
    // Dependencies first: the order to restore by hand, should it come to that.
    let restore_order: Vec<String> = manifest.containers.iter().map(|c| c.name.clone()).collect();
    let control_sw = Stopwatch::start();
    let restore_deadline = tokio::time::Instant::now() + RESTORE_TIMEOUT;
    let sent = control.send(&ToReceiver::Ready { manifest }).await;
    // Said once the frame is on its way (a test kills the sender at this line).
    if sent.is_ok() {
        ui.phase("OK sent; target restoring");
    }
    let answer = async {
        sent?;
        loop {
            let msg: ToSender = control.recv().await?;
            if let ToSender::Outcome(o) = msg {
                return Ok::<_, anyhow::Error>(o);
            }
        }
    };
    let mut answer = std::pin::pin!(tokio::time::timeout(RESTORE_TIMEOUT, answer));
    let answer = loop {
        tokio::select! {
            a = &mut answer => break a,
            // Later signals are answered by `Signals` itself, with the phase in progress.
            _ = signals.changed() => if signals.count() == 1 {
                ui.warn("signal ignored: the target is restoring; stopping now could lose the service");
            },
        }
    };
    rec.control_s = Some(control_sw.secs());
    let settled = match answer {
        Ok(Ok(o)) if !o.restored && !o.left_on_target.is_empty() => {
            // The receiver could not remove what it had restored: once more over SSH,
            // then look. Nothing is restored here while any of it may be there.
            let names: Vec<String> = o.left_on_target.iter().map(|l| l.name.clone()).collect();
            ui.warn(&format!(
                "the target could not remove {} after its failed restore; trying over SSH",
                names.join(", ")
            ));
            match settle::clean(&ssh, &names, ui).await {
                Ok(()) => Settled::Clean(o),
                Err(nc) => Settled::NotClean(nc, o.error),
            }
        }
        Ok(Ok(o)) => Settled::Restored(o),
        Ok(Err(e)) => {
            ui.warn(&format!(
                "control connection lost after OK ({e:#}); asking the target over SSH"
            ));
            settle::over_ssh(&ssh, &remote_dir, &restore_order, restore_deadline, ui)
                .await
                .map_err(|e| stranded(anyhow!(e).context("asking the target over SSH")))?
        }
        Err(_) => {
            ui.warn("no answer from the target in time; asking it over SSH");
            settle::over_ssh(&ssh, &remote_dir, &restore_order, restore_deadline, ui)
                .await
                .map_err(|e| stranded(anyhow!(e).context("asking the target over SSH")))?
        }
    };
    let outcome = match settled {
        Settled::Restored(o) | Settled::Clean(o) => o,
        Settled::NotClean(nc, why) => {
            let restore_here: Vec<String> = restore_order
                .iter()
                .filter_map(|n| checkpointed.iter().find(|it| &it.info.name == n))
                .map(|it| {
                    crate::exec::display_command(
                        "podman",
                        &podman::restore_in_place_args(&it.info.name, it.opts),
                    )
                })
                .collect();
            let report = settle::not_clean_report(
                &nc,
                ssh.label(),
                &crate::host::hostname(),
                &restore_order,
                &restore_here,
                &remote_dir,
            );
            let why = why.unwrap_or_else(|| "the target did not restore".into());
            // One message that ends with what to do.
            return Err(SendFailure {
                exit: Exit::Failed,
                error: anyhow!("migration failed ({why}); {report}"),
            });
        }
    };
    if outcome.restored
        && let Err(e) = guard.phase(Phase::Committing)
    {
        ui.warn(&format!("{e:#}"));
    }
    rec.restore_s = Some(outcome.restore_s);
    rec.criu_restore_s = outcome.criu_restore_s;
    rec.verify_s = Some(outcome.verify_s);
    if !outcome.restored {
        let why = outcome
            .error
            .unwrap_or_else(|| "the target did not restore".into());
        if let Err(e) = guard.phase(Phase::RollingBack) {
            ui.warn(&format!("{e:#}"));
        }
        return Err(rb.run(&checkpointed, anyhow!(why)).await);
    }
    let up_target = outcome.up_us.unwrap_or_else(|| now_us() + offset_us);
    rec.up_us = Some(up_target - offset_us);
    rec.target_total_s = Some(crate::timing::secs_between(outcome.ready_us, up_target));
    ui.info(&format!(
        "UP on {}: downtime {:.3}s",
        plan.target.dest.host,
        rec.downtime_s().unwrap_or_default()
    ));

    // Traffic first: the switch hooks run the moment the target confirmed UP.
    if plan.hooks.iter().any(|h| h.when == When::PostUp) {
        ui.phase("post-up hooks");
        if let Err(e) = hooks::run_all(
            &plan.hooks,
            When::PostUp,
            &hook_env,
            Some(&ssh),
            plan.hook_timeout,
        )
        .await
        {
            ui.warn(&format!("{e}; the migration itself succeeded"));
            rec.error = e.to_string();
        }
    }
    // Commit: the target runs the service; retire it here.
    for it in &items {
        if let Err(e) = podman.remove(&it.info.name).await {
            ui.warn(&format!(
                "{} runs on the target now, but removing it here failed: {e}",
                it.info.name
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&local_dir);
    let _ = ssh
        .run(
            "rm",
            &["-f".into(), remote_join(&remote_dir, PID_FILE)],
            REMOTE_TIMEOUT,
        )
        .await;
    ssh.close().await;
    ui.finish();
    Ok(())
}

/// What freezing one container produced.
struct Frozen {
    checkpoint: anyhow::Result<podman::Streamed>,
    /// Seconds from DOWN until the archive was complete (podman exited a little later).
    checkpoint_s: f64,
    shipped: Result<(u64, String), crate::transport::ssh::SshError>,
    /// Seconds from DOWN until the archive was complete on the target.
    shipped_s: f64,
    /// Bytes that went over the wire (compressed when the stream is).
    wire_bytes: u64,
    attempts: u32,
    /// How long the kernel took to freeze the container (last attempt), or why `send`
    /// could not freeze it (CRIU then did).
    froze: Option<Result<Duration, String>>,
}

/// Checkpoints one container into its FIFO while the archive streams to the target;
/// retries a dump refused over a half-open TCP connection. `dumped` fires once the
/// container's dump is over for good; it is dropped unfired when the checkpoint failed.
async fn freeze_and_stream(
    podman: &Podman,
    ssh: &Ssh,
    remote_dir: &str,
    it: &Item,
    stream: crate::transport::ssh::RemoteStream<'_>,
    dumped: tokio::sync::oneshot::Sender<()>,
    since_down: Stopwatch,
) -> Frozen {
    let remote = remote_join(remote_dir, &it.archive_name);
    let mut stream = Some(stream);
    let mut dumped = Some(dumped);
    let mut attempt = 1;
    let mut froze = None;
    loop {
        let s = match stream.take() {
            Some(s) => s,
            None => match open_upload(ssh, &remote, it).await {
                Ok(s) => s,
                Err(e) => {
                    return Frozen {
                        checkpoint: Err(anyhow!(e).context("reopening the upload for a retry")),
                        checkpoint_s: since_down.secs(),
                        shipped: Ok((0, String::new())),
                        shipped_s: since_down.secs(),
                        wire_bytes: 0,
                        attempts: attempt,
                        froze,
                    };
                }
            },
        };
        let (w, r) = tokio::io::duplex(4 << 20);
        let sink: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if it.stream_zstd {
            // One zstd frame per chunk: compressed when it compresses, raw when not.
            Box::new(crate::wire::FramedZstd::new(w))
        } else {
            Box::new(w)
        };
        let checkpoint = async {
            // Frozen once podman starts the runtime's checkpoint; thawed again below if the
            // checkpoint fails with the container still there.
            let frozen = it.freezer.clone().map(FrozenCgroup::new);
            let r = podman
                .checkpoint_streaming(
                    &it.info.name,
                    podman::Export {
                        fifo: &it.fifo,
                        opts: it.opts,
                        compress: compression_of(&it.archive_name),
                        freezer: it.freezer.as_ref(),
                    },
                    sink,
                    &mut dumped,
                )
                .await;
            // After a dump CRIU has killed the processes; a container that is still
            // there after a failure runs on (or is frozen again for the next attempt).
            match (&r, frozen) {
                (Ok(_), Some(f)) => f.keep(),
                (_, f) => drop(f),
            }
            if let Ok(st) = &r {
                froze = st.runtime_start.as_ref().map(|s| match &s.froze {
                    Ok(t) => Ok(*t),
                    Err(e) => Err(e.to_string()),
                });
            }
            // Until the archive was complete here (podman exits a little later).
            let secs = match &r {
                Ok(st) => since_down.at(st.complete),
                Err(_) => since_down.secs(),
            };
            // A client caught half-way through connecting makes CRIU refuse the dump; the
            // container keeps running, and a moment later the handshake is over.
            let retry = match &r {
                Err(e)
                    if attempt < CHECKPOINT_ATTEMPTS
                        && trouble(&e.to_string()) == Some(Trouble::InFlight) =>
                {
                    podman
                        .inspect(std::slice::from_ref(&it.info.name))
                        .await
                        .is_ok_and(|v| v.first().is_some_and(|c| c.running))
                }
                _ => false,
            };
            (r, secs, retry)
        };
        let shipping = async {
            let r = s.feed(r, SHIP_TIMEOUT).await;
            (r, since_down.secs())
        };
        let ((checkpoint, checkpoint_s, retry), (shipped, shipped_s)) =
            tokio::join!(checkpoint, shipping);
        if retry {
            attempt += 1;
            continue;
        }
        // The manifest describes the archive as it lands on the target: what podman wrote.
        let wire_bytes = shipped.as_ref().copied().unwrap_or(0);
        let shipped = match (&checkpoint, shipped) {
            (Ok(st), Ok(_)) => Ok((st.size, st.digest.clone())),
            (_, Err(e)) => Err(e),
            (Err(_), Ok(n)) => Ok((n, String::new())),
        };
        let checkpoint = checkpoint.map_err(|e| {
            let hint = match trouble(&e.to_string()) {
                Some(Trouble::Established) => {
                    "; it had established TCP connections and --tcp refuse: use --tcp close (the default: they are restored closed and their clients reconnect) or --tcp established (carried over)"
                }
                Some(Trouble::Stuck) => {
                    "; one of its processes was stuck in the kernel (state D, e.g. waiting for the disk) and could not be frozen: try again when the host is less busy"
                }
                Some(Trouble::InFlight) => {
                    "; clients kept connecting during the freeze and --tcp refuse: use --tcp close (the default) or --tcp established, which leave connections still in their handshake out of the dump (CRIU's skip-in-flight), or drain the clients first (a pre-freeze hook that takes the host out of the balancer)"
                }
                None => "",
            };
            let e = anyhow!(e);
            if hint.is_empty() { e } else { e.context(hint.trim_start_matches("; ").to_string()) }
        });
        return Frozen {
            checkpoint,
            checkpoint_s,
            shipped,
            shipped_s,
            wire_bytes,
            attempts: attempt,
            froze,
        };
    }
}

/// The upload channel of every archive and the post-sync of every data folder (held
/// before its file list), with the FIFOs podman exports into. Returns once every remote
/// side runs: the remote login shells' start-up (whatever the user's rc files do) is
/// paid while the service still runs, not inside the freeze.
#[allow(clippy::type_complexity)]
async fn open_sessions<'a>(
    plan: &SendPlan,
    ssh: &'a Ssh,
    items: &[Item],
    remote_dir: &str,
    compress_sync: bool,
) -> Result<
    (
        Vec<crate::transport::ssh::RemoteStream<'a>>,
        Vec<rsync::Armed>,
    ),
    (&'static str, anyhow::Error),
> {
    let mut armed = Vec::new();
    for dir in &plan.target.data {
        let a = rsync::arm(dir, ssh, compress_sync)
            .with_context(|| format!("starting the post-sync of {}", dir.display()))
            .map_err(|e| ("cannot start the post-sync", e))?;
        armed.push(a);
    }
    let streams_err = |e| ("cannot prepare the archive streams", e);
    for it in items {
        let fifo = it.fifo.display().to_string();
        crate::exec::run("mkfifo", &["-m".into(), "600".into(), fifo], REMOTE_TIMEOUT)
            .await
            .map_err(|e| streams_err(anyhow!(e)))?;
    }
    let streams = futures::future::try_join_all(items.iter().map(|it| {
        let path = remote_join(remote_dir, &it.archive_name);
        async move {
            open_upload(ssh, &path, it)
                .await
                .map_err(|e| streams_err(anyhow!(e)))
        }
    }));
    let ready = futures::future::try_join_all(armed.iter_mut().zip(&plan.target.data).map(
        |(a, dir)| async move {
            a.ready(REMOTE_TIMEOUT)
                .await
                .with_context(|| format!("starting the post-sync of {}", dir.display()))
                .map_err(|e| ("cannot start the post-sync", e))
        },
    ));
    let (streams, _) = tokio::try_join!(streams, ready)?;
    Ok((streams, armed))
}

/// Opens the upload of one archive: through the receiver's `migrate sink` when it runs
/// there (it decodes zstd and leaves the archive's digest for the receiver), else through `zstd -d`
/// or `cat`.
async fn open_upload<'a>(
    ssh: &'a Ssh,
    path: &str,
    it: &Item,
) -> Result<crate::transport::ssh::RemoteStream<'a>, crate::transport::ssh::SshError> {
    match &it.sink {
        Some(exe) => {
            let call = crate::sink::SinkArgs::upload(path, it.stream_zstd, it.drop_zero_pages);
            ssh.open_stream(&call.shell_command(exe)).await
        }
        None if it.stream_zstd => ssh.open_upload_via(path, "zstd -d -q -c").await,
        None => ssh.open_upload(path).await,
    }
}

/// Checkpoint attempts when CRIU meets a half-open TCP connection.
const CHECKPOINT_ATTEMPTS: u32 = 3;

/// Why CRIU refused a dump, from its own words (not from the command line, which names
/// the options given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trouble {
    /// An established connection and no --tcp-established.
    Established,
    /// A connection still in its handshake (CRIU's `--skip-in-flight`, which podman 4.3
    /// does not offer).
    InFlight,
    /// A process CRIU could not seize (uninterruptible sleep through its timeout).
    Stuck,
}

fn trouble(text: &str) -> Option<Trouble> {
    if text.contains("In-flight connection") {
        Some(Trouble::InFlight)
    } else if text.contains("Connected TCP socket") {
        Some(Trouble::Established)
    } else if text.contains("Unseizable non-zombie") {
        Some(Trouble::Stuck)
    } else {
        None
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

/// Everything before the freeze. Any failure here is a refusal: nothing was touched.
async fn preflight(
    plan: &SendPlan,
    ui: &Arc<Ui>,
    rec: &mut Record,
) -> Result<Prepared, SendFailure> {
    let want = Want::new(&plan.target, &plan.run_id, &plan.label, true);
    let report = preflight::run(&want, ui).await;
    if let Some(f) = report.first_failure() {
        let e = anyhow!(f.one_line());
        let preflight::Report {
            ssh,
            receiver,
            remote_dir,
            ..
        } = report;
        if let Some(mut w) = receiver {
            abort(&mut w.control, "refused in preflight", false).await;
        }
        if let Some(ssh) = ssh {
            // The run folder (and the secret in it) goes with the refusal.
            if let Some(dir) = remote_dir {
                let _ = ssh.run("rm", &["-rf".into(), dir], REMOTE_TIMEOUT).await;
            }
            ssh.close().await;
        }
        return Err(refuse(e));
    }
    let preflight::Report {
        infos,
        target_zstd,
        target_sink,
        target_zero_pages,
        ssh,
        receiver,
        missing_images,
        remote_dir,
        ..
    } = report;
    let ssh = ssh.expect("no failure means SSH works");
    let Welcome { mut control, .. } = receiver.expect("no failure means a receiver answered");
    let remote_dir = remote_dir.expect("no failure means the run folder exists");
    let fail = async |control: &mut Control, ssh: Ssh, e: anyhow::Error| {
        abort(control, "refused in preflight", false).await;
        let _ = ssh
            .run("rm", &["-rf".into(), remote_dir.clone()], REMOTE_TIMEOUT)
            .await;
        ssh.close().await;
        Err(refuse(e))
    };

    // The receiver expects its first authenticated frame at once: the clock offset is
    // measured before anything slow (shipping images).
    let (offset_us, delay_us) = match clock_offset(&mut control).await {
        Ok(x) => x,
        Err(e) => return fail(&mut control, ssh, e).await,
    };
    rec.clock_delay_us = Some(delay_us);
    ui.info(&format!(
        "clock offset target−source {:+.6}s (round trip {:.6}s)",
        offset_us as f64 / 1e6,
        delay_us as f64 / 1e6
    ));
    for (id, image) in &missing_images {
        ui.info(&format!(
            "shipping image {image} to the target (podman save | podman load)"
        ));
        if let Err(e) = ship_image(&ssh, id, image).await {
            return fail(&mut control, ssh, e).await;
        }
    }

    let compression = match plan.compress {
        CompressChoice::None => Compression::None,
        CompressChoice::Zstd => Compression::Zstd,
        CompressChoice::Gzip => Compression::Gzip,
        CompressChoice::Auto => {
            let rate = measure_link(&ssh).await.unwrap_or(0.0);
            let c = if rate >= FAST_LINK_BYTES_PER_S {
                Compression::None
            } else {
                Compression::Zstd
            };
            ui.info(&format!(
                "link rate ~{:.0} Mbit/s: compression {}",
                rate * 8.0 / 1e6,
                c.as_str()
            ));
            c
        }
    };

    let local_dir = crate::rundir::run_dir(&plan.workdir, &plan.run_id);
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&local_dir)
    {
        let e = anyhow!(e).context(format!(
            "cannot create {}: pass a writable --workdir",
            local_dir.display()
        ));
        return fail(&mut control, ssh, e).await;
    }
    let order = restore_order(&infos, plan.sequential_restore);
    let items = infos
        .into_iter()
        .zip(order)
        .map(|(info, after)| {
            let locks = podman::holds_file_locks(info.pid).unwrap_or(true);
            // zstd travels as a stream the target decompresses as it arrives (podman
            // exports plain tar, restores plain tar: both faster); without the `zstd`
            // command there, podman compresses itself.
            let stream_zstd =
                compression == Compression::Zstd && (target_zstd || target_sink.is_some());
            let podman_compression = if stream_zstd {
                Compression::None
            } else {
                compression
            };
            let archive_name = format!("{}.{}", info.name, podman_compression.extension());
            Item {
                stream_zstd,
                sink: target_sink.clone(),
                drop_zero_pages: !plan.keep_zero_pages && target_zero_pages,
                opts: plan.target.tcp.criu(locks),
                local_archive: local_dir.join(&archive_name),
                fifo: local_dir.join(format!("{}.fifo", info.name)),
                archive_name,
                // Without a usable freezer CRIU freezes the container itself, as before.
                freezer: Freezer::of_pid(info.pid).ok(),
                info,
                after,
            }
        })
        .collect();
    Ok(Prepared {
        ssh,
        control,
        items,
        local_dir,
        remote_dir,
        offset_us,
    })
}

/// `send --dry-run`: runs every check, measures the link, prints the plan with a rough
/// downtime estimate on stdout, and touches nothing. Exit 0 when the migration would
/// start, 2 when it would be refused.
pub async fn dry_run(plan: &SendPlan, ui: &Arc<Ui>) -> u8 {
    let want = Want::new(&plan.target, &plan.run_id, &plan.label, false);
    let mut report = preflight::run(&want, ui).await;
    ui.finish();
    if let Some(f) = report.first_failure() {
        say!("migrate send: error: {}", f.one_line());
        if let Some(ssh) = report.ssh.take() {
            ssh.close().await;
        }
        return Exit::Refused as u8;
    }
    let ssh = report.ssh.take().expect("no failure means SSH works");
    let rate = measure_link(&ssh).await.unwrap_or(0.0);
    let compression = match plan.compress {
        CompressChoice::None => Compression::None,
        CompressChoice::Zstd => Compression::Zstd,
        CompressChoice::Gzip => Compression::Gzip,
        CompressChoice::Auto if rate >= FAST_LINK_BYTES_PER_S => Compression::None,
        CompressChoice::Auto => Compression::Zstd,
    };
    let mut lines = vec![format!(
        "plan: move {} from {} to {} (run id would be {})",
        plan.target.containers.join(", "),
        crate::host::hostname(),
        plan.target.dest.ssh_target(),
        plan.run_id
    )];
    lines.push(format!(
        "  1. preflight: every check passed ({} findings; `migrate check` lists them)",
        report.findings.len()
    ));
    for (_, image) in &report.missing_images {
        lines.push(format!(
            "     image {image} will be shipped first (podman save | podman load)"
        ));
    }
    for d in &plan.target.data {
        match rsync::preview(d, &ssh).await {
            Ok(s) => {
                lines.push(format!(
                    "  2. pre-sync {} while the containers run: {} files, {:.1} MiB to send now",
                    d.display(),
                    s.files_transferred,
                    s.transferred_file_size as f64 / 1048576.0
                ));
            }
            Err(e) => lines.push(format!(
                "  2. pre-sync {}: cannot preview ({e})",
                d.display()
            )),
        }
    }
    if plan.target.data.is_empty() {
        lines.push("  2. no --data folders: nothing to pre-sync".into());
    } else {
        lines.push(
            "     then the target writes the pre-synced data to disk (sync -f), before the freeze"
                .into(),
        );
    }
    let rss: Vec<(String, u64, bool)> = report
        .infos
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                podman::resident_bytes(c.pid),
                podman::holds_file_locks(c.pid).unwrap_or(true),
            )
        })
        .collect();
    lines.push(format!(
        "  3. DOWN: checkpoint in parallel, compression {}: {}",
        compression.as_str(),
        rss.iter()
            .map(|(n, b, locks)| format!(
                "{n} ({:.0} MiB resident{})",
                *b as f64 / 1048576.0,
                if *locks { ", --file-locks" } else { "" }
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let total: u64 = rss.iter().map(|(_, b, _)| b).sum();
    let archive = match compression {
        Compression::None => total,
        _ => total / 10,
    };
    lines.push(format!(
        "  4. ship ~{:.0} MiB of archives over SSH (link measured at ~{:.0} Mbit/s), then post-sync what changed in the data folders",
        archive as f64 / 1048576.0,
        rate * 8.0 / 1e6
    ));
    lines.push(format!(
        "  5. \"OK\" to the receiver; it verifies the archives and restores {} in this order",
        plan.target.containers.join(", ")
    ));
    lines.push(
        "  6. once the target confirms UP: remove the containers here (data folders stay)".into(),
    );
    let est = estimate_downtime(
        &rss.iter().map(|(_, b, _)| *b).collect::<Vec<_>>(),
        archive,
        rate,
    );
    lines.push(format!(
        "estimated downtime ~{:.2}s (checkpoint {:.2}s + transfer {:.2}s + restore {:.2}s); a rough model from resident memory and the measured link, not a measurement",
        est.0 + est.1 + est.2,
        est.0,
        est.1,
        est.2
    ));
    // The plan is the result: a reader gone is not worth a panic, nor a different exit.
    let _ = std::io::Write::write_all(
        &mut std::io::stdout(),
        format!("{}\n", lines.join("\n")).as_bytes(),
    );
    if let Some(mut w) = report.receiver.take() {
        abort(&mut w.control, "dry run", false).await;
    }
    ssh.close().await;
    0
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

/// For each container, the migrated containers it must be restored after: those whose
/// namespaces it joins (by name or ID prefix), or simply the one before it with
/// `--sequential-restore`. Everything else is restored in parallel.
fn restore_order(infos: &[ContainerInfo], sequential: bool) -> Vec<Vec<String>> {
    infos
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut after: Vec<String> = c
                .joins
                .iter()
                .filter_map(|r| {
                    infos
                        .iter()
                        .find(|o| {
                            o.name != c.name
                                && (o.name == *r || (r.len() >= 12 && o.id.starts_with(r.as_str())))
                        })
                        .map(|o| o.name.clone())
                })
                .collect();
            if sequential && i > 0 {
                after.push(infos[i - 1].name.clone());
            }
            after.sort();
            after.dedup();
            after
        })
        .collect()
}

/// NTP-style offset estimate over the authenticated control connection.
async fn clock_offset(control: &mut Control) -> anyhow::Result<(i64, i64)> {
    let mut samples = Vec::new();
    for _ in 0..CLOCK_ROUNDS {
        let t0 = now_us();
        let reply = async {
            control.send(&ToReceiver::TimeProbe { t0 }).await?;
            control.recv::<ToSender>().await
        };
        match tokio::time::timeout(CONTROL_REPLY_TIMEOUT, reply).await {
            Ok(Ok(ToSender::TimeReply { t0: e, t1, t2 })) if e == t0 => samples.push(ClockSample {
                t0,
                t1,
                t2,
                t3: now_us(),
            }),
            Ok(Ok(ToSender::Refused { reason })) => anyhow::bail!("the receiver refused: {reason}"),
            other => anyhow::bail!(
                "the receiver did not accept our authenticated messages ({other:?}); is the receiver reached over SSH the same one that listens on the control port?"
            ),
        }
    }
    Ok(estimate_offset(&samples).expect("at least one sample"))
}

/// Copies an image the target lacks: `podman save | ssh podman load`, then checks the ID.
async fn ship_image(ssh: &Ssh, id: &str, image: &str) -> anyhow::Result<()> {
    ssh.pipe_from_local(
        "podman",
        &[
            "save".into(),
            "--format".into(),
            "docker-archive".into(),
            image.into(),
        ],
        "podman load",
        SHIP_TIMEOUT,
    )
    .await
    .with_context(|| format!("shipping image {image} to the target"))?;
    ssh.run(
        "podman",
        &["image".into(), "exists".into(), id.into()],
        REMOTE_TIMEOUT,
    )
    .await
    .with_context(|| format!("image {image} was loaded on the target but not with ID {id}"))?;
    Ok(())
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

/// Sends a few MB to the target's /dev/null and returns bytes per second.
async fn measure_link(ssh: &Ssh) -> anyhow::Result<f64> {
    // Random bytes (ssh may compress). The remote command is started before the clock
    // runs; what is left of fixed cost (end of stream, exit status) cancels out in the
    // difference between a small and a large upload.
    let mut data = vec![0u8; PROBE_BYTES];
    crate::secret::fill_random(&mut data);
    let small = PROBE_BYTES / 16;
    let time = async |n: usize| -> anyhow::Result<f64> {
        let stream = ssh.open_stream("cat > /dev/null").await?;
        let sw = Stopwatch::start();
        stream.feed(&data[..n], REMOTE_TIMEOUT).await?;
        Ok(sw.secs())
    };
    let t_small = time(small).await?;
    if t_small > 1.0 {
        // A slow link: the small probe alone tells enough.
        return Ok(small as f64 / t_small);
    }
    let t_big = time(PROBE_BYTES).await?;
    Ok(link_rate(small, t_small, PROBE_BYTES, t_big))
}
pub fn link_rate(small: usize, t_small: f64, big: usize, t_big: f64) -> f64 {
    let dt = t_big - t_small;
    if dt <= t_big / 4.0 {
        // The two differ by noise more than by size: the large upload alone is a
        // lower bound.
        return big as f64 / t_big.max(1e-6);
    }
    (big - small) as f64 / dt
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

/// What bringing the containers back on this host needs.
struct Rollback<'a> {
    podman: &'a Podman,
    items: &'a [Item],
    ui: &'a Arc<Ui>,
    ssh: &'a Ssh,
    dest: &'a crate::transport::ssh::Destination,
    remote_dir: &'a str,
    hooks: &'a [hooks::Hook],
    env: &'a [(String, String)],
    hook_timeout: Duration,
}

impl Rollback<'_> {
    /// Brings the checkpointed containers back on this host. Returns the failure to
    /// report: rolled back when every container runs again here, failed otherwise.
    async fn run(&self, checkpointed: &[Item], cause: anyhow::Error) -> SendFailure {
        let Rollback {
            podman,
            items,
            ui,
            ssh,
            dest,
            remote_dir,
            hooks: hook_list,
            env,
            hook_timeout,
        } = self;
        ui.warn(&format!("{cause:#}; rolling back on this host"));
        let mut problems = Vec::new();
        for it in checkpointed {
            let name = &it.info.name;
            ui.phase(&format!("rolling back: restoring {name} on this host"));
            let in_place = podman.restore_in_place(name, it.opts).await;
            let Err(in_place) = in_place else {
                ui.info(&format!("{name} restored here from its kept checkpoint"));
                continue;
            };
            ui.warn(&format!(
                "{name}: restoring it from its kept checkpoint failed: {in_place}; fetching its archive back from the target"
            ));
            // Failing that: the archive back from the target (complete there once it was
            // shipped), imported here.
            ui.phase(&format!(
                "rolling back: fetching {name}'s archive back from the target to restore it here"
            ));
            let remote = remote_join(remote_dir, &it.archive_name);
            let way = WayBack {
                name,
                opts: it.opts,
                local: &it.local_archive,
                dest,
                remote: &remote,
            };
            let again = async {
                ssh.download(&remote, &it.local_archive, SHIP_TIMEOUT)
                    .await
                    .map_err(|e| {
                        (
                            Stuck::Fetching,
                            anyhow!(e).context("fetching the archive back from the target"),
                        )
                    })?;
                podman
                    .remove(name)
                    .await
                    .map_err(|e| (Stuck::Removing, anyhow!(e)))?;
                podman
                    .restore_import(&it.local_archive, it.opts)
                    .await
                    .map_err(|e| (Stuck::Importing, anyhow!(e)))?;
                Ok::<_, (Stuck, anyhow::Error)>(())
            };
            match again.await {
                Ok(()) => ui.info(&format!(
                    "{name} restored here from its archive, fetched back from the target"
                )),
                Err((stuck, e)) => {
                    problems.push(format!("{name}: {e:#} ({})", rollback_advice(stuck, &way)))
                }
            }
        }
        // A container whose checkpoint failed normally runs on: podman or CRIU refused
        // before the dump (CRIU resumes what it froze; `send`'s own freeze was undone),
        // and it is the very same container and processes. podman can also fail after
        // CRIU's dump has stopped it (podman 4.3 refuses to export a container with
        // dependencies only then, the container Exited 137): then the checkpoint podman
        // kept brings it back, as the same container.
        for it in items.iter() {
            if checkpointed.iter().any(|c| c.info.name == it.info.name) {
                continue;
            }
            let name = &it.info.name;
            if let Some(f) = &it.freezer {
                // Thawed already when its checkpoint failed; a cgroup that is gone is
                // nothing to thaw.
                let _ = f.thaw();
            }
            match podman.inspect(std::slice::from_ref(name)).await {
                Ok(v) if v.first().is_some_and(|c| c.running) => continue,
                Ok(_) => {}
                Err(e) => {
                    problems.push(format!("{name}: cannot tell whether it runs: {e}"));
                    continue;
                }
            }
            match podman.restore_in_place(name, it.opts).await {
                Ok(()) => ui.info(&format!(
                    "{name}: its checkpoint failed after CRIU's dump had stopped it; restored here from the checkpoint podman kept"
                )),
                Err(e) => problems.push(format!(
                    "{name}: stopped by a checkpoint that failed, and restoring it from the checkpoint podman kept failed: {e} (once the cause is fixed: `{}`; failing that `podman start {}` starts it afresh, its memory state lost)",
                    crate::exec::display_command("podman", &podman::restore_in_place_args(name, it.opts)),
                    crate::exec::shell_quote(name)
                )),
            }
        }
        // Whatever was restored, every container must run now. One whose dump was over
        // when its archive's stream broke (a full disk on the target) is gone: its kept
        // checkpoint brings it back.
        ui.phase("rolling back: checking that every container runs here");
        for it in items.iter() {
            let name = &it.info.name;
            let running = || async {
                podman
                    .inspect(std::slice::from_ref(name))
                    .await
                    .map(|v| v.first().is_some_and(|c| c.running))
                    .unwrap_or(false)
            };
            if running().await || problems.iter().any(|p| p.starts_with(&format!("{name}:"))) {
                continue;
            }
            if !checkpointed.iter().any(|c| &c.info.name == name)
                && podman.restore_in_place(name, it.opts).await.is_ok()
                && running().await
            {
                ui.info(&format!(
                    "{name} restored here from its kept checkpoint (its dump was over when its checkpoint failed)"
                ));
                continue;
            }
            problems.push(format!("{name}: not running after the rollback"));
        }
        if problems.is_empty() {
            // The archives on the target are not needed any more (they hold process
            // memory); after a failed rollback they stay, as a way back.
            ui.phase("rolled back: removing the archives on the target, rollback hooks");
            let _ = ssh
                .run(
                    "rm",
                    &["-rf".into(), remote_dir.to_string()],
                    REMOTE_TIMEOUT,
                )
                .await;
            if let Err(e) =
                hooks::run_all(hook_list, When::Rollback, env, Some(ssh), *hook_timeout).await
            {
                ui.warn(&e.to_string());
            }
            for it in checkpointed {
                let _ = std::fs::remove_file(&it.local_archive);
            }
            SendFailure {
                exit: Exit::RolledBack,
                error: cause.context("migration failed; the containers run on this host again"),
            }
        } else {
            SendFailure {
            exit: Exit::Failed,
            error: cause.context(format!(
                "migration failed AND the rollback failed ({}); the archives are kept on the target in {remote_dir}",
                problems.join("; ")
            )),
        }
        }
    }
}

/// The step at which bringing a container back from its archive failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stuck {
    /// The archive could not be fetched back: the container and podman's kept checkpoint
    /// are still here, the archive is on the target.
    Fetching,
    /// The archive was fetched back, but the container could not be removed to import it.
    Removing,
    /// The container was removed here, and importing the fetched archive failed.
    Importing,
}

/// Where a container's way back is, for [`rollback_advice`].
struct WayBack<'a> {
    name: &'a str,
    opts: CriuOptions,
    /// Where the archive fetched back from the target is (or would be) here.
    local: &'a std::path::Path,
    dest: &'a crate::transport::ssh::Destination,
    /// The archive on the target.
    remote: &'a str,
}

/// What the operator can run to bring a container back by hand after a failed rollback:
/// only commands that can still work at the point where it failed.
fn rollback_advice(stuck: Stuck, w: &WayBack<'_>) -> String {
    use crate::exec::{display_command, shell_quote};
    let in_place = display_command("podman", &podman::restore_in_place_args(w.name, w.opts));
    let import_args: Vec<String> = podman::restore_import_args(w.local, w.opts)
        .into_iter()
        .filter(|a| a != "--print-stats")
        .collect();
    let import = display_command("podman", &import_args);
    let remove = format!("podman rm --force {}", shell_quote(w.name));
    let mut ssh = vec!["ssh".to_string()];
    if let Some(p) = w.dest.port {
        ssh.extend(["-p".to_string(), p.to_string()]);
    }
    if let Some(i) = &w.dest.identity {
        ssh.extend(["-i".to_string(), i.display().to_string()]);
    }
    ssh.extend([w.dest.ssh_target(), "cat".into(), w.remote.to_string()]);
    let fetch = format!(
        "{} > {}",
        display_command(&ssh[0], &ssh[1..]),
        shell_quote(&w.local.display().to_string())
    );
    let on_target = format!("{}:{}", w.dest.ssh_target(), w.remote);
    match stuck {
        Stuck::Fetching => format!(
            "podman still keeps its checkpoint here: `{in_place}` once the cause is fixed; failing that, its archive is kept on the target ({on_target}): `{fetch} && {remove} && {import}`"
        ),
        Stuck::Removing => format!(
            "its archive was fetched back to {}: `{remove} && {import}`, or from the checkpoint podman keeps here: `{in_place}`",
            w.local.display()
        ),
        Stuck::Importing => format!(
            "{} was removed here to import its archive, so its kept checkpoint is gone with it; the archive fetched back is {}: `{import}` once the cause is fixed (a copy stays on the target: {on_target})",
            w.name,
            w.local.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn way<'a>(
        local: &'a std::path::Path,
        dest: &'a crate::transport::ssh::Destination,
    ) -> WayBack<'a> {
        WayBack {
            name: "db",
            opts: CriuOptions {
                file_locks: true,
                ..CriuOptions::default()
            },
            local,
            dest,
            remote: "/var/lib/migrate/runs/r1/db.tar",
        }
    }

    #[test]
    fn rollback_advice_names_what_still_works() {
        let dest = crate::transport::ssh::Destination {
            user: Some("root".into()),
            host: "10.77.0.12".into(),
            port: Some(2222),
            identity: None,
        };
        let local = std::path::Path::new("/var/lib/migrate/runs/r1/db.tar");
        let w = way(local, &dest);
        // Removed here, import failed: the kept checkpoint went with the container.
        let a = rollback_advice(Stuck::Importing, &w);
        assert!(!a.contains("restore --keep"), "{a}");
        assert!(
            a.contains(
                "`podman container restore --import /var/lib/migrate/runs/r1/db.tar --file-locks`"
            ),
            "{a}"
        );
        assert!(
            a.contains("root@10.77.0.12:/var/lib/migrate/runs/r1/db.tar"),
            "{a}"
        );
        // Not fetched: the container and its checkpoint are still here, the archive is
        // on the target, fetched by the very command shown.
        let a = rollback_advice(Stuck::Fetching, &w);
        assert!(
            a.contains("`podman container restore --keep --file-locks db`"),
            "{a}"
        );
        assert!(
            a.contains("ssh -p 2222 root@10.77.0.12 cat /var/lib/migrate/runs/r1/db.tar > /var/lib/migrate/runs/r1/db.tar && podman rm --force db && podman container restore --import"),
            "{a}"
        );
        // Fetched, not removed: both ways work.
        let a = rollback_advice(Stuck::Removing, &w);
        assert!(a.contains("podman rm --force db && podman container restore --import /var/lib/migrate/runs/r1/db.tar --file-locks"), "{a}");
        assert!(a.contains("restore --keep --file-locks db"), "{a}");
        // Names that need quoting are quoted.
        let odd = std::path::Path::new("/tmp/my runs/db.tar");
        let a = rollback_advice(Stuck::Importing, &way(odd, &dest));
        assert!(a.contains("--import '/tmp/my runs/db.tar'"), "{a}");
    }

    #[test]
    fn criu_refusals_are_read_from_criu_not_from_the_command_line() {
        // The command line names --tcp-established; CRIU's log says why it failed.
        let cmd = "`podman container checkpoint --export /x/web.fifo --tcp-established web` exited with status 125: CRIU log dump.log: ";
        assert_eq!(
            trouble(&format!(
                "{cmd}(10.002103) Error (compel/src/lib/infect.c:262): Unseizable non-zombie 7403 found, state D, err -1/4"
            )),
            Some(Trouble::Stuck)
        );
        assert_eq!(
            trouble(&format!(
                "{cmd}(00.1) Error (criu/sk-inet.c:200): Connected TCP socket, consider using --tcp-established option."
            )),
            Some(Trouble::Established)
        );
        assert_eq!(
            trouble(&format!(
                "{cmd}(00.1) Error (criu/sk-inet.c:185): In-flight connection (l) for 1a2b"
            )),
            Some(Trouble::InFlight)
        );
        assert_eq!(trouble(&format!("{cmd}(00.1) Error: something else")), None);
    }

    #[test]
    fn downtime_model_grows_with_memory_and_link() {
        let (c, t, r) = estimate_downtime(&[100 << 20, 1 << 20], 101 << 20, 100e6);
        assert!(c > 0.35 && c < 1.0, "{c}");
        assert!((t - (101u64 << 20) as f64 / 100e6).abs() < 1e-9);
        assert!(r > c, "restores are sequential: {r} vs {c}");
        let (_, slow, _) = estimate_downtime(&[100 << 20], 100 << 20, 5e6);
        assert!(slow > 20.0);
    }

    #[test]
    fn link_rate_cancels_fixed_costs() {
        // 50 ms to start a command, then 100 MB/s.
        let t = |n: usize| 0.05 + n as f64 / 100e6;
        let r = link_rate(1 << 20, t(1 << 20), 16 << 20, t(16 << 20));
        assert!((r - 100e6).abs() < 1.0, "{r}");
        // Noise larger than the difference (the small upload took longer): the large
        // upload alone bounds the rate, it does not become infinite.
        let r = link_rate(1 << 20, 0.03, 8 << 20, 0.02);
        assert!((r - (8 << 20) as f64 / 0.02).abs() < 1.0, "{r}");
    }

    fn info(name: &str, id: &str, joins: &[&str]) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            name: name.into(),
            image_id: "i".into(),
            image_name: String::new(),
            status: "running".into(),
            running: true,
            pid: 1,
            mounts: vec![],
            joins: joins.iter().map(|s| s.to_string()).collect(),
            shares: vec![],
            dependencies: vec![],
            pod: String::new(),
        }
    }

    #[test]
    fn restore_order_follows_joined_namespaces() {
        let infos = [
            info("db", "aaaaaaaaaaaaaaaa", &[]),
            info("web", "bbbbbbbbbbbbbbbb", &[]),
            info("sidecar", "cccccccccccccccc", &["aaaaaaaaaaaaaaaa"]),
        ];
        assert_eq!(
            restore_order(&infos, false),
            vec![vec![], vec![], vec!["db".to_string()]]
        );
        assert_eq!(
            restore_order(&infos, true),
            vec![
                vec![],
                vec!["db".to_string()],
                vec!["db".to_string(), "web".to_string()]
            ]
        );
    }

    #[test]
    fn bytes_for_humans() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(80 << 20), "80.0 MiB");
    }

    #[test]
    fn exit_codes_match_the_contract() {
        assert_eq!(Exit::Ok as u8, 0);
        assert_eq!(Exit::RolledBack as u8, 1);
        assert_eq!(Exit::Refused as u8, 2);
        assert_eq!(Exit::Failed as u8, 3);
        assert_eq!(Exit::RolledBack.outcome().as_str(), "rolled_back");
    }
}
