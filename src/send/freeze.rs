//! The freeze: every container is checkpointed at once, each archive streaming to the
//! target while podman writes it; once every dump is over, the data folders are
//! post-synced (only what changed since the pre-sync). DOWN is taken here.

use std::time::Duration;

use anyhow::{Context, anyhow};

use crate::engine::freezer::FrozenCgroup;
use crate::engine::podman::{self, CriuRefusal, Podman};
use crate::protocol::{ContainerEntry, Manifest};
use crate::signals::Signals;
use crate::sync::rsync;
use crate::timing::{Record, Stopwatch, now_us};
use crate::transport::ssh::{RemoteStream, Ssh, SshError, remote_join};

use super::finish::Froze;
use super::prepare::{Channels, open_upload};
use super::{Item, Run, SHIP_TIMEOUT, compression_of, human_bytes, max_opt};

/// Freezes, checkpoints, ships and post-syncs; says what came of it.
pub(super) async fn freeze(
    run: &Run<'_>,
    channels: Channels<'_>,
    signals: &mut Signals,
    rec: &mut Record,
) -> Froze {
    let down = now_us();
    rec.down_us = Some(down);
    run.ui.info("DOWN: checkpointing");
    run.ui.phase("checkpointing and streaming the archives");
    let since_down = Stopwatch::start();
    let Channels {
        streams,
        armed,
        presync_bytes,
    } = channels;
    let (frozen, post, dump_at) = checkpoint_all(run, streams, armed, signals, since_down).await;
    let clock = Rebased::new(down, since_down, &frozen, run);
    rec.down_us = Some(clock.down_us);
    rec.dump_s = dump_at.map(|s| clock.rebase(s));
    let mut tally = Tally::default();
    for (it, f) in run.items.iter().zip(frozen) {
        tally.add(run, it, f, &clock, rec);
    }
    match post {
        Ok(Some((bytes, postsync_s))) => {
            rec.postsync_s = Some(postsync_s);
            tally.postsync_bytes = bytes;
        }
        Ok(None) => {}
        Err(e) => {
            tally.first_error.get_or_insert(e);
        }
    }
    if tally.first_error.is_none() && signals.fired() {
        tally.first_error = Some(anyhow!("interrupted while frozen"));
    }
    if let Some(error) = tally.first_error {
        return Froze::Failed {
            checkpointed: tally.checkpointed,
            error,
        };
    }
    tally.report(run, rec, presync_bytes);
    let manifest = Manifest {
        run_id: run.plan.run_id.clone(),
        containers: tally.entries,
        data: run
            .plan
            .target
            .data
            .iter()
            .map(|d| d.display().to_string())
            .collect(),
        down_us: clock.down_us,
        clock_offset_us: run.offset_us,
        pod: run.pod.clone().map(Box::new),
    };
    Froze::Shipped {
        manifest,
        checkpointed: tally.checkpointed,
    }
}

/// Checkpoints and ships every container at once; the post-sync starts once every dump
/// is over (the containers' processes are gone, their data folders stay as they are) and
/// runs while podman still exports. Returns each container's result, the post-sync's
/// (bytes and seconds; `None` when a checkpoint failed), and when the last dump ended.
async fn checkpoint_all(
    run: &Run<'_>,
    streams: Vec<RemoteStream<'_>>,
    armed: Vec<rsync::Armed>,
    signals: &mut Signals,
    since_down: Stopwatch,
) -> (Vec<Frozen>, anyhow::Result<Option<(u64, f64)>>, Option<f64>) {
    let mut done_rx = Vec::new();
    let item_work: Vec<_> = run
        .items
        .iter()
        .zip(streams)
        .map(|(it, stream)| {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            done_rx.push(rx);
            async move {
                match &it.lazy {
                    Some(l) => freeze_lazy(run, it, l, stream, tx, since_down).await,
                    None => {
                        freeze_and_stream(
                            &Podman,
                            &run.ssh,
                            &run.remote_dir,
                            it,
                            stream,
                            tx,
                            since_down,
                        )
                        .await
                    }
                }
            }
        })
        .collect();
    let dump_at = std::cell::Cell::new(None);
    let postsync = async {
        for rx in done_rx {
            if rx.await.is_err() {
                // A checkpoint failed: this migration rolls back, nothing to sync.
                return Ok(None);
            }
        }
        dump_at.set(Some(since_down.secs()));
        run.ui.phase("shipping archives and changed data");
        let started = Stopwatch::start();
        let sync = async {
            let runs = armed
                .into_iter()
                .zip(&run.plan.target.data)
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
    (frozen, post, dump_at.get())
}

/// DOWN is when the service stopped. Where podman was watched start the runtime's
/// checkpoint (and the container frozen right then), that is the last look before it
/// started, for the earliest container: podman's start-up ran while the service still
/// answered. A container not watched may have stopped any time after podman started.
struct Rebased {
    down_us: i64,
    shift_s: f64,
    since_down: Stopwatch,
}

impl Rebased {
    fn new(down: i64, since_down: Stopwatch, frozen: &[Frozen], run: &Run<'_>) -> Rebased {
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
        let shift_s = shift_us as f64 / 1e6;
        if shift_us > 0 {
            run.ui.info(&format!(
                "DOWN at the first freeze, {shift_s:.3}s after podman started (the service ran meanwhile)"
            ));
        }
        Rebased {
            down_us: down + shift_us,
            shift_s,
            since_down: since_down.later_by(Duration::from_micros(shift_us as u64)),
        }
    }

    /// Seconds after the old DOWN, as seconds after the true one.
    fn rebase(&self, secs: f64) -> f64 {
        (secs - self.shift_s).max(0.0)
    }
}

/// What the freeze of all containers came to.
#[derive(Default)]
struct Tally {
    checkpointed: Vec<Item>,
    entries: Vec<ContainerEntry>,
    wire_bytes: u64,
    postsync_bytes: u64,
    /// When podman's exit was the last thing before "OK" could be said.
    podman_exited_s: f64,
    first_error: Option<anyhow::Error>,
}

impl Tally {
    fn add(&mut self, run: &Run<'_>, it: &Item, f: Frozen, clock: &Rebased, rec: &mut Record) {
        let ui = run.ui;
        if f.attempts > 1 {
            ui.warn(&format!(
                "{}: a client was connecting at the freeze; checkpoint attempt {}",
                it.info.name, f.attempts
            ));
        }
        rec.checkpoint_s = max_opt(rec.checkpoint_s, Some(clock.rebase(f.checkpoint_s)));
        rec.transfer_s = max_opt(rec.transfer_s, Some(clock.rebase(f.shipped_s)));
        self.wire_bytes += f.wire_bytes;
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
        let st = match f.checkpoint {
            Ok(st) => st,
            Err(e) => {
                let e = checkpoint_failure(it, e, &f.shipped);
                self.first_error.get_or_insert(e);
                return;
            }
        };
        let since_down = &clock.since_down;
        ui.info(&format!(
            "checkpointed {}: {froze}dump over {:.3}s after DOWN, archive complete at {:.3}s, podman done at {:.3}s",
            it.info.name,
            st.first_byte.map(|t| since_down.at(t)).unwrap_or_default(),
            since_down.at(st.complete),
            since_down.at(st.exited),
        ));
        self.podman_exited_s = self.podman_exited_s.max(since_down.at(st.exited));
        rec.podman_checkpoint_s = max_opt(rec.podman_checkpoint_s, st.stats.podman_s);
        rec.criu_frozen_s = max_opt(rec.criu_frozen_s, st.stats.criu_s);
        self.checkpointed.push(it.clone());
        match f.shipped {
            Ok((size, digest)) => self.entries.push(ContainerEntry {
                name: it.info.name.clone(),
                archive: it.archive_name.clone(),
                size,
                digest,
                image_id: it.info.image_id.clone(),
                file_locks: it.opts.file_locks,
                tcp_established: it.opts.tcp_established,
                tcp_close: it.opts.tcp_close,
                after: it.after.clone(),
                addresses: it.addresses.clone(),
                lazy: it
                    .lazy
                    .as_ref()
                    .map(|l| crate::protocol::LazyEntry { session: l.session }),
            }),
            Err(e) => {
                self.first_error.get_or_insert(
                    anyhow!(e).context(format!("shipping the archive of {}", it.info.name)),
                );
            }
        }
    }

    /// The figures of a freeze that went through, on stderr and in the record.
    fn report(&self, run: &Run<'_>, rec: &mut Record, presync_bytes: u64) {
        // "OK" waits for every podman's exit status (an archive is complete only when
        // podman says so); how much of the downtime that wait was:
        let ready_s = rec
            .transfer_s
            .unwrap_or_default()
            .max(rec.dump_s.unwrap_or_default() + rec.postsync_s.unwrap_or_default());
        let waited_s = (self.podman_exited_s - ready_s).max(0.0);
        run.ui.info(&format!(
            "every podman exited successfully {:.3}s after DOWN; waiting for them held OK back {waited_s:.3}s",
            self.podman_exited_s
        ));
        let archives: u64 = self.entries.iter().map(|e| e.size).sum();
        run.ui.info(&format!(
            "shipped {} of archives ({} on the wire), complete {:.3}s after DOWN; post-sync sent {} in {:.3}s",
            human_bytes(archives),
            human_bytes(self.wire_bytes),
            rec.transfer_s.unwrap_or_default(),
            human_bytes(self.postsync_bytes),
            rec.postsync_s.unwrap_or_default()
        ));
        let sync_bytes = presync_bytes + self.postsync_bytes;
        rec.archive_bytes = Some(archives);
        rec.sync_bytes = Some(sync_bytes);
        rec.bytes_sent = Some(self.wire_bytes + sync_bytes);
        rec.frozen_bytes = Some(self.wire_bytes + self.postsync_bytes);
    }
}

/// When the checkpoint failed only in handing its stream on, the upload broke first (a
/// full disk there, say) and is the cause; when podman or CRIU failed, the upload broke
/// because of that.
fn checkpoint_failure(
    it: &Item,
    e: anyhow::Error,
    shipped: &Result<(u64, String), SshError>,
) -> anyhow::Error {
    let stream_only = matches!(
        e.downcast_ref::<podman::PodmanError>(),
        Some(podman::PodmanError::Stream { .. })
    );
    match shipped {
        Err(ship) if stream_only => anyhow!("{ship}").context(format!(
            "shipping the archive of {} failed (so did its checkpoint's stream: {e:#})",
            it.info.name
        )),
        _ => e.context(format!("checkpoint of {} failed", it.info.name)),
    }
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
    stream: RemoteStream<'_>,
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
        let checkpoint = checkpoint_once(podman, it, sink, &mut dumped, &mut froze, since_down);
        let shipping = async {
            let r = s.feed(r, SHIP_TIMEOUT).await;
            (r, since_down.secs())
        };
        let ((checkpoint, checkpoint_s), (shipped, shipped_s)) = tokio::join!(checkpoint, shipping);
        // A client caught half-way through connecting makes CRIU refuse the dump; the
        // container keeps running, and a moment later the handshake is over.
        if let Err(e) = &checkpoint
            && attempt < CHECKPOINT_ATTEMPTS
            && e.criu_refusal() == Some(CriuRefusal::InFlight)
            && still_running(podman, it).await
        {
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
        return Frozen {
            checkpoint: checkpoint.map_err(with_advice),
            checkpoint_s,
            shipped,
            shipped_s,
            wire_bytes,
            attempts: attempt,
            froze,
        };
    }
}

/// A lazy container: its dump up to the page server, then the archive of all but its
/// memory, built here and streamed to the target; the relay of its pages starts as soon
/// as the page server listens.
async fn freeze_lazy(
    run: &Run<'_>,
    it: &Item,
    l: &super::lazy::LazyItem,
    stream: RemoteStream<'_>,
    dumped: tokio::sync::oneshot::Sender<()>,
    since_down: Stopwatch,
) -> Frozen {
    let failed = |e: anyhow::Error| Frozen {
        checkpoint: Err(e.context(format!("lazy checkpoint of {}", it.info.name))),
        checkpoint_s: since_down.secs(),
        shipped: Ok((0, String::new())),
        shipped_s: since_down.secs(),
        wire_bytes: 0,
        attempts: 1,
        froze: None,
    };
    let archive = match l.dump(it.opts).await {
        Ok((_, a)) => a,
        Err(e) => {
            // A dump that reached its page server holds the tasks: give them back.
            if let Err(r) = l.resume(it.info.pid, run.ui).await {
                return failed(e.context(format!("and giving it back failed: {r}")));
            }
            return failed(e);
        }
    };
    let first_byte = std::time::Instant::now();
    let _ = dumped.send(());
    let Some(program) = it.sink.clone() else {
        let _ = l.resume(it.info.pid, run.ui).await;
        return failed(anyhow!("the target has no migrate to relay the pages"));
    };
    l.start_relay(
        run.plan.target.dest.clone(),
        program,
        remote_join(
            &run.remote_dir,
            &crate::protocol::relay_socket_name(&it.info.name),
        ),
        run.ui.clone(),
    );
    let size = archive.len() as u64;
    let digest = crate::digest::of_bytes(&archive);
    let (w, r) = tokio::io::duplex(4 << 20);
    let mut sink: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if it.stream_zstd {
        Box::new(crate::wire::FramedZstd::new(w))
    } else {
        Box::new(w)
    };
    let write = async {
        use tokio::io::AsyncWriteExt;
        sink.write_all(&archive).await?;
        sink.shutdown().await
    };
    let shipping = async {
        let r = stream.feed(r, SHIP_TIMEOUT).await;
        (r, since_down.secs())
    };
    let (written, (shipped, shipped_s)) = tokio::join!(write, shipping);
    let complete = std::time::Instant::now();
    let wire_bytes = shipped.as_ref().copied().unwrap_or(0);
    if let Err(e) = written {
        let _ = l.resume(it.info.pid, run.ui).await;
        return failed(anyhow!(e).context("streaming the lazy archive"));
    }
    Frozen {
        checkpoint: Ok(podman::Streamed {
            size,
            digest: digest.clone(),
            first_byte: Some(first_byte),
            complete,
            exited: complete,
            stats: podman::Stats::default(),
            runtime_start: None,
        }),
        checkpoint_s: since_down.at(complete),
        shipped: shipped.map(|_| (size, digest)),
        shipped_s,
        wire_bytes,
        attempts: 1,
        froze: None,
    }
}

/// One checkpoint attempt. Returns podman's result and the seconds from DOWN until the
/// archive was complete here (podman exits a little later).
async fn checkpoint_once(
    podman: &Podman,
    it: &Item,
    sink: Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
    dumped: &mut Option<tokio::sync::oneshot::Sender<()>>,
    froze: &mut Option<Result<Duration, String>>,
    since_down: Stopwatch,
) -> (Result<podman::Streamed, podman::PodmanError>, f64) {
    // Frozen once podman starts the runtime's checkpoint; thawed again below if the
    // checkpoint fails with the container still there.
    let frozen = it.freezer.clone().map(FrozenCgroup::new);
    let export = podman::Export {
        fifo: &it.fifo,
        opts: it.opts,
        compress: compression_of(&it.archive_name),
        freezer: it.freezer.as_ref(),
    };
    let r = podman
        .checkpoint_streaming(&it.info.name, export, sink, dumped)
        .await;
    // After a dump CRIU has killed the processes; a container that is still there after a
    // failure runs on (or is frozen again for the next attempt).
    match (&r, frozen) {
        (Ok(_), Some(f)) => f.keep(),
        (_, f) => drop(f),
    }
    if let Ok(st) = &r {
        *froze = st.runtime_start.as_ref().map(|s| match &s.froze {
            Ok(t) => Ok(*t),
            Err(e) => Err(e.to_string()),
        });
    }
    let secs = match &r {
        Ok(st) => since_down.at(st.complete),
        Err(_) => since_down.secs(),
    };
    (r, secs)
}

async fn still_running(podman: &Podman, it: &Item) -> bool {
    podman
        .inspect(std::slice::from_ref(&it.info.name))
        .await
        .is_ok_and(|v| v.first().is_some_and(|c| c.running))
}

/// A failed checkpoint, with what to do when CRIU said why.
fn with_advice(e: podman::PodmanError) -> anyhow::Error {
    let hint = match e.criu_refusal() {
        Some(CriuRefusal::Established) => {
            "it had established TCP connections and --tcp refuse: use --tcp close (the default: they are restored closed and their clients reconnect) or --tcp established (carried over)"
        }
        Some(CriuRefusal::Stuck) => {
            "one of its processes was stuck in the kernel (state D, e.g. waiting for the disk) and could not be frozen: try again when the host is less busy"
        }
        Some(CriuRefusal::InFlight) => {
            "clients kept connecting during the freeze and --tcp refuse: use --tcp close (the default) or --tcp established, which leave connections still in their handshake out of the dump (CRIU's skip-in-flight), or drain the clients first (a pre-freeze hook that takes the host out of the balancer)"
        }
        None => return anyhow!(e),
    };
    anyhow!(e).context(hint)
}

/// Checkpoint attempts when CRIU meets a half-open TCP connection.
const CHECKPOINT_ATTEMPTS: u32 = 3;
