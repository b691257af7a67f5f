//! Before the freeze: the checks (see `preflight`), the clock, the images, the choice of
//! compression, the pre-sync of the data folders, and the channels the freeze will use.
//! Any failure here is a refusal: nothing was frozen.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, anyhow};

use crate::engine::freezer::Freezer;
use crate::engine::podman::{self, Compression, ContainerInfo};
use crate::engine::stack::Level;
use crate::plan::CompressChoice;
use crate::plan::SendPlan;
use crate::preflight::{self, Control, Want, Welcome};
use crate::progress::Ui;
use crate::protocol::{ClockSample, ToReceiver, ToSender, estimate_offset};
use crate::signals::Signals;
use crate::sync::rsync;
use crate::timing::{Record, Stopwatch, now_us};
use crate::transport::ssh::{RemoteStream, Ssh, remote_join};

use super::{
    CLOCK_ROUNDS, CONTROL_REPLY_TIMEOUT, FAST_LINK_BYTES_PER_S, FLUSH_TIMEOUT, Item, PROBE_BYTES,
    REMOTE_TIMEOUT, Run, SHIP_TIMEOUT, SendFailure, Stop, abort, human_bytes, refuse,
};

/// Everything `migrate` learned and set up before the freeze.
pub(super) struct Prepared {
    pub ssh: Ssh,
    pub control: Control,
    pub items: Vec<Item>,
    pub local_dir: PathBuf,
    pub remote_dir: String,
    pub offset_us: i64,
    /// The pod the containers move as: re-created on the target, removed here at commit.
    pub pod: Option<crate::protocol::PodSpec>,
}
/// Everything before the freeze. Any failure here is a refusal: nothing was touched.
pub(super) async fn preflight(
    plan: &SendPlan,
    ui: &Arc<Ui>,
    rec: &mut Record,
) -> Result<Prepared, SendFailure> {
    let want = Want::new(&plan.target, &plan.run_id, &plan.label, true);
    let report = preflight::run(&want, ui).await;
    if let Some(f) = report.first_failure() {
        let e = anyhow!(f.one_line());
        return Err(refuse_report(report, e).await);
    }
    // What goes ahead despite a risk (an override, a connection that cannot be kept) is
    // said before the freeze, as `check` would.
    for f in report.findings.iter().filter(|f| f.level == Level::Warn) {
        ui.warn(&f.one_line());
    }
    let lazy = match super::lazy::choose(plan, &report, ui) {
        Ok(l) => l,
        Err(e) => return Err(refuse_report(report, e).await),
    };
    rec.memory = if lazy { "lazy" } else { "copy" };
    let preflight::Report {
        infos,
        target_zstd,
        target_sink,
        target_zero_pages,
        ssh,
        receiver,
        missing_images,
        remote_dir,
        pod,
        moving,
        ..
    } = report;
    if let Some((spec, _)) = &pod {
        ui.info(&format!(
            "pod {} moves whole: re-created on the target, its members restored into it",
            spec.name
        ));
    }
    let ssh = ssh.expect("no failure means SSH works");
    let Welcome { mut control, .. } = receiver.expect("no failure means a receiver answered");
    let remote_dir = remote_dir.expect("no failure means the run folder exists");
    let ready = async {
        let offset_us = greet(&mut control, &ssh, &missing_images, ui, rec).await?;
        let compression = choose_compression(plan, ui, || measure_link(&ssh)).await;
        let local_dir = crate::rundir::run_dir(&plan.workdir, &plan.run_id);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&local_dir)
            .with_context(|| {
                format!(
                    "cannot create {}: pass a writable --workdir",
                    local_dir.display()
                )
            })?;
        let target = TargetKit {
            zstd: target_zstd,
            sink: target_sink,
            zero_pages: target_zero_pages,
            moving,
        };
        let items = items(plan, infos, compression, &target, &local_dir, lazy)?;
        for it in &items {
            if let Some(l) = &it.lazy {
                l.prepare(&it.info.name, it.opts).await?;
            }
        }
        anyhow::Ok((offset_us, local_dir, items))
    };
    match ready.await {
        Ok((offset_us, local_dir, items)) => Ok(Prepared {
            ssh,
            control,
            items,
            local_dir,
            remote_dir,
            offset_us,
            pod: pod.map(|(spec, _)| spec),
        }),
        Err(e) => {
            abort(&mut control, "refused in preflight", false).await;
            let _ = ssh
                .run("rm", &["-rf".into(), remote_dir], REMOTE_TIMEOUT)
                .await;
            ssh.close().await;
            Err(refuse(e))
        }
    }
}

/// A refusal found by the checks: the receiver forgets the run, and the run folder (with
/// the secret in it) goes.
async fn refuse_report(report: preflight::Report, e: anyhow::Error) -> SendFailure {
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
        if let Some(dir) = remote_dir {
            let _ = ssh.run("rm", &["-rf".into(), dir], REMOTE_TIMEOUT).await;
        }
        ssh.close().await;
    }
    refuse(e)
}

/// The first authenticated exchange: the clock offset, measured at once (the receiver
/// expects a frame soon), then the images the target lacks.
async fn greet(
    control: &mut Control,
    ssh: &Ssh,
    missing_images: &[(String, String)],
    ui: &Ui,
    rec: &mut Record,
) -> anyhow::Result<i64> {
    let (offset_us, delay_us) = clock_offset(control).await?;
    rec.clock_delay_us = Some(delay_us);
    ui.info(&format!(
        "clock offset target−source {:+.6}s (round trip {:.6}s)",
        offset_us as f64 / 1e6,
        delay_us as f64 / 1e6
    ));
    for (id, image) in missing_images {
        ui.info(&format!(
            "shipping image {image} to the target (podman save | podman load)"
        ));
        ship_image(ssh, id, image).await?;
    }
    Ok(offset_us)
}

/// The archives' compression: as asked, or with `auto` from the measured link (compressing
/// costs more time than it saves above [`FAST_LINK_BYTES_PER_S`]).
pub(super) async fn choose_compression<F, Fut>(plan: &SendPlan, ui: &Ui, measure: F) -> Compression
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<f64>>,
{
    match plan.compress {
        CompressChoice::None => Compression::None,
        CompressChoice::Zstd => Compression::Zstd,
        CompressChoice::Gzip => Compression::Gzip,
        CompressChoice::Auto => {
            let rate = measure().await.unwrap_or(0.0);
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
    }
}

/// What the target offers for receiving archives.
struct TargetKit {
    /// `zstd` is installed there.
    zstd: bool,
    /// The receiver's binary, whose `migrate sink` writes archives there.
    sink: Option<String>,
    /// That sink can leave CRIU's zero pages out.
    zero_pages: bool,
    /// The containers' addresses that move with them.
    moving: Vec<crate::engine::address::Moving>,
}

/// Each container as it will be moved.
fn items(
    plan: &SendPlan,
    infos: Vec<ContainerInfo>,
    compression: Compression,
    target: &TargetKit,
    local_dir: &std::path::Path,
    lazy: bool,
) -> anyhow::Result<Vec<Item>> {
    let order = restore_order(&infos, plan.sequential_restore);
    infos
        .into_iter()
        .zip(order)
        .map(|(info, after)| {
            let lazy = match lazy {
                true => Some(std::sync::Arc::new(super::lazy::LazyItem::new(
                    local_dir.join(format!("lazy-{}", info.name)),
                )?)),
                false => None,
            };
            let locks = podman::holds_file_locks(info.pid).unwrap_or(true);
            // zstd travels as a stream the target decompresses as it arrives (podman
            // exports plain tar, restores plain tar: both faster); without the `zstd`
            // command there, podman compresses itself.
            let stream_zstd =
                compression == Compression::Zstd && (target.zstd || target.sink.is_some());
            let podman_compression = if stream_zstd {
                Compression::None
            } else {
                compression
            };
            let archive_name = format!("{}.{}", info.name, podman_compression.extension());
            anyhow::Ok(Item {
                stream_zstd,
                sink: target.sink.clone(),
                // A lazy archive holds no pages.
                drop_zero_pages: !plan.keep_zero_pages && target.zero_pages && lazy.is_none(),
                opts: plan.target.tcp.criu(locks),
                local_archive: local_dir.join(&archive_name),
                fifo: local_dir.join(format!("{}.fifo", info.name)),
                archive_name,
                // Without a usable freezer CRIU freezes the container itself. A lazy
                // dump is left to CRIU: its tasks stay frozen through the window.
                freezer: match lazy {
                    None => Freezer::of_pid(info.pid).ok(),
                    Some(_) => None,
                },
                lazy,
                addresses: target
                    .moving
                    .iter()
                    .filter(|m| m.container == info.name)
                    .map(|m| crate::protocol::AddressEntry {
                        network: m.network.name.clone(),
                        ips: m.ips.clone(),
                    })
                    .collect(),
                info,
                after,
            })
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

/// Sends a few MB to the target's /dev/null and returns bytes per second.
pub(super) async fn measure_link(ssh: &Ssh) -> anyhow::Result<f64> {
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

/// What the freeze needs open before it starts.
pub(super) struct Channels<'a> {
    /// The upload channel of every archive, in the order of the items.
    pub streams: Vec<RemoteStream<'a>>,
    /// The post-sync of every data folder, held before its file list.
    pub armed: Vec<rsync::Armed>,
    /// Bytes the pre-sync sent.
    pub presync_bytes: u64,
}

/// Pre-syncs the data folders while the service runs; meanwhile the upload channels and
/// the post-syncs start (see [`open_sessions`]).
pub(super) async fn presync_and_channels<'a>(
    run: &'a Run<'_>,
    signals: &mut Signals,
    rec: &mut Record,
) -> Result<Channels<'a>, Stop> {
    let presync = Stopwatch::start();
    let (presynced, sessions) =
        tokio::join!(presync_dirs(run, signals, &presync), open_sessions(run));
    let presync_bytes = match presynced {
        Ok(b) => b,
        Err(stop) => {
            drop(sessions);
            return Err(stop);
        }
    };
    rec.presync_s = Some(presync.secs());
    let (streams, armed) =
        sessions.map_err(|s| Stop::new(s.why, s.error.context("nothing was frozen")))?;
    Ok(Channels {
        streams,
        armed,
        presync_bytes,
    })
}

/// rsync of every data folder, then the target writes them to disk. Returns the bytes sent.
async fn presync_dirs(run: &Run<'_>, signals: &mut Signals, sw: &Stopwatch) -> Result<u64, Stop> {
    let mut bytes = 0u64;
    for dir in &run.plan.target.data {
        run.ui.phase(&format!("pre-sync {}", dir.display()));
        let r = tokio::select! {
            r = rsync::sync(dir, &run.ssh, run.compress_sync) => r,
            _ = signals.changed() => return Err(Stop::interrupted("interrupted during pre-sync")),
        };
        let s = r.map_err(|e| {
            let e = anyhow!(e).context(format!(
                "pre-sync of {} failed; nothing was frozen",
                dir.display()
            ));
            Stop::new("pre-sync failed", e)
        })?;
        run.ui.info(&format!(
            "pre-sync {}: {} files, sent {} in {:.3}s",
            dir.display(),
            s.files_transferred,
            human_bytes(s.bytes_sent),
            sw.secs()
        ));
        bytes += s.bytes_sent;
    }
    if !run.plan.target.data.is_empty() {
        flush_target(run, signals).await?;
    }
    Ok(bytes)
}

/// What the pre-sync wrote sits in the target's page cache; written back during the
/// freeze it competes with the restore (1 GiB of data folders: ~0.4 s more downtime
/// here). Written now, it costs migration time only.
async fn flush_target(run: &Run<'_>, signals: &mut Signals) -> Result<(), Stop> {
    run.ui.phase("flushing the pre-synced data on the target");
    let flush = Stopwatch::start();
    let mut args = vec!["-f".to_string()];
    args.extend(run.plan.target.data.iter().map(|d| d.display().to_string()));
    let r = tokio::select! {
        r = run.ssh.run("sync", &args, FLUSH_TIMEOUT) => r,
        _ = signals.changed() => return Err(Stop::interrupted("interrupted during pre-sync")),
    };
    match r {
        Ok(_) => run.ui.info(&format!(
            "the target wrote the pre-synced data to disk in {:.3}s",
            flush.secs()
        )),
        Err(e) => run.ui.warn(&format!(
            "the target could not write the pre-synced data to disk ({e}); going on"
        )),
    }
    Ok(())
}

/// The upload channel of every archive and the post-sync of every data folder (held
/// before its file list), with the FIFOs podman exports into. Returns once every remote
/// side runs: the remote login shells' start-up (whatever the user's rc files do) is
/// paid while the service still runs, not inside the freeze.
async fn open_sessions<'a>(
    run: &'a Run<'_>,
) -> Result<(Vec<RemoteStream<'a>>, Vec<rsync::Armed>), Stop> {
    let data = &run.plan.target.data;
    let post_sync = |dir: &std::path::Path, e: anyhow::Error| {
        let e = e.context(format!("starting the post-sync of {}", dir.display()));
        Stop::new("cannot start the post-sync", e)
    };
    let streams_err = |e: anyhow::Error| Stop::new("cannot prepare the archive streams", e);
    let mut armed = Vec::new();
    for dir in data {
        let a =
            rsync::arm(dir, &run.ssh, run.compress_sync).map_err(|e| post_sync(dir, anyhow!(e)))?;
        armed.push(a);
    }
    for it in &run.items {
        let fifo = it.fifo.display().to_string();
        crate::exec::run("mkfifo", &["-m".into(), "600".into(), fifo], REMOTE_TIMEOUT)
            .await
            .map_err(|e| streams_err(anyhow!(e)))?;
    }
    let streams = futures::future::try_join_all(run.items.iter().map(|it| {
        let path = remote_join(&run.remote_dir, &it.archive_name);
        async move {
            open_upload(&run.ssh, &path, it)
                .await
                .map_err(|e| streams_err(anyhow!(e)))
        }
    }));
    let ready =
        futures::future::try_join_all(armed.iter_mut().zip(data).map(|(a, dir)| async move {
            a.ready(REMOTE_TIMEOUT)
                .await
                .map_err(|e| post_sync(dir, anyhow!(e)))
        }));
    let (streams, _) = tokio::try_join!(streams, ready)?;
    Ok((streams, armed))
}

/// Opens the upload of one archive: through the receiver's `migrate sink` when it runs
/// there (it decodes zstd and leaves the archive's digest for the receiver), else through `zstd -d`
/// or `cat`.
pub(super) async fn open_upload<'a>(
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

#[cfg(test)]
mod tests {
    use super::*;

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
            networks: Vec::new(),
            published: false,
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
}
