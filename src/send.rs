//! The source side: preflight, pre-sync, freeze, ship, post-sync, "OK", then commit or
//! roll back. The rule everywhere: the service ends up running on exactly one host.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::Signals;
use crate::cli::CompressChoice;
use crate::engine::podman::{self, Compression, ContainerInfo, CriuOptions, Podman, PodmanError};
use crate::exec::shell_quote;
use crate::hooks::{self, When};
use crate::plan::SendPlan;
use crate::progress::Ui;
use crate::protocol::{
    Auth, Channel, ClockSample, ContainerEntry, Direction, Manifest, PROTOCOL_VERSION,
    TargetOutcome, ToReceiver, ToSender, estimate_offset,
};
use crate::receive::{PID_FILE, RESULT_FILE, SECRET_FILE};
use crate::sync::rsync;
use crate::timing::{Outcome, Record, Stopwatch, now_us};
use crate::transport::ssh::{Ssh, remote_join};

/// How the `send` ended; the process exit code is the discriminant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Migrated = 0,
    RolledBack = 1,
    Refused = 2,
    Failed = 3,
}

impl Exit {
    pub fn outcome(self) -> Outcome {
        match self {
            Exit::Migrated => Outcome::Ok,
            Exit::RolledBack => Outcome::RolledBack,
            Exit::Refused => Outcome::Refused,
            Exit::Failed => Outcome::Failed,
        }
    }
}

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

const SSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CONTROL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CONTROL_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
const REMOTE_TIMEOUT: Duration = Duration::from_secs(120);
const SHIP_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long the target may take to restore once "OK" is sent.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(900);
const CLOCK_ROUNDS: usize = 8;
/// Bytes sent to measure the link rate when `--compress auto` must choose.
const PROBE_BYTES: usize = 8 << 20;
/// Above this rate, compressing costs more time than it saves.
const FAST_LINK_BYTES_PER_S: f64 = 250e6;

type Control = Channel<BufReader<OwnedReadHalf>, OwnedWriteHalf>;

/// One container as it will be moved.
#[derive(Debug, Clone)]
struct Item {
    info: ContainerInfo,
    opts: CriuOptions,
    archive_name: String,
    local_archive: PathBuf,
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
        source: crate::hostname(),
        target: plan.dest.host.clone(),
        containers: plan.containers.clone(),
        role: "sender",
        ..Default::default()
    };
    let result = migrate(plan, ui, signals, &mut rec).await;
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
    // rsync compresses only where the archives are compressed too: on slow links.
    let compress_sync = items
        .iter()
        .any(|it| compression_of(&it.archive_name) != Compression::None);

    // Pre-sync while the service runs.
    rec.start_us = Some(now_us());
    let presync = Stopwatch::start();
    let mut sync_bytes = 0u64;
    for dir in &plan.data {
        ui.phase(&format!("pre-sync {}", dir.display()));
        let r = tokio::select! {
            r = rsync::sync(dir, &ssh, compress_sync) => r,
            _ = signals.changed() => {
                abort(&mut control, "interrupted during pre-sync", false).await;
                ssh.close().await;
                return Err(refuse(anyhow!("interrupted before the freeze; nothing was frozen")));
            }
        };
        match r {
            Ok(s) => sync_bytes += s.bytes_sent,
            Err(e) => {
                abort(&mut control, "pre-sync failed", false).await;
                ssh.close().await;
                return Err(refuse(anyhow!(e).context(format!(
                    "pre-sync of {} failed; nothing was frozen",
                    dir.display()
                ))));
            }
        }
    }
    rec.presync_s = Some(presync.secs());
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

    let podman = Podman;
    let rb = Rollback {
        podman: &podman,
        items: &items,
        ui,
        ssh: &ssh,
        remote_dir: &remote_dir,
        hooks: &plan.hooks,
        env: &hook_env,
        hook_timeout: plan.hook_timeout,
    };

    // DOWN: checkpoint every container at once.
    let down = now_us();
    rec.down_us = Some(down);
    ui.info("DOWN: checkpointing");
    let checkpoint = Stopwatch::start();
    let results = futures::future::join_all(items.iter().map(|it| {
        let podman = podman.clone();
        async move {
            let sw = Stopwatch::start();
            let r = podman
                .checkpoint(
                    &it.info.name,
                    &it.local_archive,
                    it.opts,
                    compression_of(&it.archive_name),
                )
                .await;
            (r, sw.secs())
        }
    }))
    .await;
    rec.checkpoint_s = Some(checkpoint.secs());
    let mut checkpointed = Vec::new();
    let mut first_error = None;
    for (it, (r, secs)) in items.iter().zip(results) {
        match r {
            Ok(()) => {
                ui.info(&format!("checkpointed {} in {secs:.3}s", it.info.name));
                checkpointed.push(it.clone());
            }
            Err(e) => {
                let e = anyhow!(e).context(format!("checkpoint of {} failed", it.info.name));
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        abort(&mut control, "checkpoint failed", true).await;
        return Err(rb.run(&checkpointed, e).await);
    }

    // Ship the archives, then the data that changed; give up (and roll back) on a signal.
    let ship = async {
        let transfer = Stopwatch::start();
        let shipped = futures::future::try_join_all(items.iter().map(|it| {
            let ssh = &ssh;
            let remote = remote_join(&remote_dir, &it.archive_name);
            async move {
                let file = tokio::fs::File::open(&it.local_archive)
                    .await
                    .with_context(|| format!("cannot open {}", it.local_archive.display()))?;
                let (size, sha256) = ssh.upload(file, &remote, SHIP_TIMEOUT).await?;
                anyhow::Ok(ContainerEntry {
                    name: it.info.name.clone(),
                    archive: it.archive_name.clone(),
                    size,
                    sha256,
                    image_id: it.info.image_id.clone(),
                    file_locks: it.opts.file_locks,
                    tcp_established: it.opts.tcp_established,
                })
            }
        }))
        .await?;
        let transfer_s = transfer.secs();
        let post = Stopwatch::start();
        let mut bytes = 0;
        for dir in &plan.data {
            bytes += rsync::sync(dir, &ssh, compress_sync)
                .await
                .with_context(|| format!("post-sync of {}", dir.display()))?
                .bytes_sent;
        }
        anyhow::Ok((shipped, transfer_s, post.secs(), bytes))
    };
    ui.phase("shipping archives and changed data");
    let shipped = tokio::select! {
        r = ship => r,
        _ = signals.changed() => Err(anyhow!("interrupted while frozen")),
    };
    let entries = match shipped {
        Ok((entries, transfer_s, postsync_s, bytes)) => {
            rec.transfer_s = Some(transfer_s);
            rec.postsync_s = Some(postsync_s);
            sync_bytes += bytes;
            entries
        }
        Err(e) => {
            abort(&mut control, "shipping failed", true).await;
            return Err(rb.run(&checkpointed, e).await);
        }
    };
    let archive_bytes: u64 = entries.iter().map(|e| e.size).sum();
    rec.archive_bytes = Some(archive_bytes);
    rec.sync_bytes = Some(sync_bytes);
    rec.bytes_sent = Some(archive_bytes + sync_bytes);

    // "OK": from here on the target decides; a signal no longer aborts.
    let manifest = Manifest {
        run_id: plan.run_id.clone(),
        containers: entries,
        data: plan.data.iter().map(|d| d.display().to_string()).collect(),
        down_us: down,
        clock_offset_us: offset_us,
    };
    ui.phase("OK sent; target restoring");
    let control_sw = Stopwatch::start();
    let sent = control.send(&ToReceiver::Ready { manifest }).await;
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
            _ = signals.changed() => ui.warn("signal ignored: the target is restoring; stopping now could lose the service"),
        }
    };
    rec.control_s = Some(control_sw.secs());
    let outcome = match answer {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            ui.warn(&format!(
                "control connection lost after OK ({e:#}); asking the target over SSH"
            ));
            match settle_over_ssh(&ssh, &remote_dir, &plan.containers, ui).await {
                Ok(o) => o,
                Err(e) => return Err(stranded(e, &local_dir)),
            }
        }
        Err(_) => {
            ui.warn("no answer from the target in time; asking it over SSH");
            match settle_over_ssh(&ssh, &remote_dir, &plan.containers, ui).await {
                Ok(o) => o,
                Err(e) => return Err(stranded(e, &local_dir)),
            }
        }
    };
    rec.restore_s = Some(outcome.restore_s);
    rec.verify_s = Some(outcome.verify_s);
    if !outcome.restored {
        let why = outcome
            .error
            .unwrap_or_else(|| "the target did not restore".into());
        return Err(rb.run(&checkpointed, anyhow!(why)).await);
    }
    let up_target = outcome.up_us.unwrap_or_else(|| now_us() + offset_us);
    rec.up_us = Some(up_target - offset_us);
    rec.target_total_s = Some(crate::timing::secs_between(outcome.ready_us, up_target));
    ui.info(&format!(
        "UP on {}: downtime {:.3}s",
        plan.dest.host,
        rec.downtime_s().unwrap_or_default()
    ));

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
    ssh.close().await;
    ui.finish();
    Ok(())
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

fn stranded(e: anyhow::Error, local_dir: &Path) -> SendFailure {
    SendFailure {
        exit: Exit::Failed,
        error: e.context(format!(
            "cannot tell whether the target runs the containers; the checkpoints are kept in {} — check the target, and if the containers do not run there, bring them back here with `podman container restore --keep NAME`",
            local_dir.display()
        )),
    }
}

/// Everything before the freeze. Any failure here is a refusal: nothing was touched.
async fn preflight(
    plan: &SendPlan,
    ui: &Arc<Ui>,
    rec: &mut Record,
) -> Result<Prepared, SendFailure> {
    let podman = Podman;
    ui.phase("preflight: local containers");
    let infos = podman
        .inspect(&plan.containers)
        .await
        .map_err(|e| match e {
            PodmanError::NoSuchContainer(n) => refuse(anyhow!(
                "container {n:?} does not exist on this host; `podman ps` lists the running ones"
            )),
            e => refuse(anyhow!(e).context("cannot inspect the containers")),
        })?;
    for c in &infos {
        if !c.running {
            return Err(refuse(anyhow!(
                "container {} is not running (it is {}); start it or leave it out",
                c.name,
                c.status
            )));
        }
    }
    let local = crate::check::stack_local().await;
    if let Some(problem) = local.problem() {
        return Err(refuse(anyhow!("this host: {problem}")));
    }

    ui.phase(&format!("preflight: SSH to {}", plan.dest.ssh_target()));
    let ssh = Ssh::connect(&plan.dest, SSH_CONNECT_TIMEOUT)
        .await
        .map_err(refuse)?;

    ui.phase("preflight: receiver");
    let addr = format!("{}:{}", bracket(&plan.dest.host), plan.control_port);
    let sock = match tokio::time::timeout(CONTROL_CONNECT_TIMEOUT, TcpStream::connect(&addr)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            ssh.close().await;
            return Err(refuse(anyhow!(
                "no receiver listening on {addr} ({e}); start `migrate receive` on the target first (or pass --control-port)"
            )));
        }
        Err(_) => {
            ssh.close().await;
            return Err(refuse(anyhow!(
                "no answer from a receiver on {addr} within {}s; start `migrate receive` on the target and open the port in its firewall",
                CONTROL_CONNECT_TIMEOUT.as_secs()
            )));
        }
    };
    let _ = sock.set_nodelay(true);
    let (r, w) = sock.into_split();
    let mut control = Channel::new(BufReader::new(r), w, Direction::ToReceiver);
    let hello = ToReceiver::Hello {
        protocol: PROTOCOL_VERSION,
        run_id: plan.run_id.clone(),
        sender_version: env!("CARGO_PKG_VERSION").into(),
        source_host: crate::hostname(),
        label: plan.label.clone(),
    };
    let welcome = async {
        control.send(&hello).await?;
        control.recv::<ToSender>().await
    };
    let (workdir, nonce) = match tokio::time::timeout(CONTROL_REPLY_TIMEOUT, welcome).await {
        Ok(Ok(ToSender::Welcome { workdir, nonce, .. })) => (workdir, nonce),
        Ok(Ok(ToSender::Refused { reason })) => {
            ssh.close().await;
            return Err(refuse(anyhow!("the receiver on {addr} refused: {reason}")));
        }
        Ok(Ok(other)) => {
            ssh.close().await;
            return Err(refuse(anyhow!(
                "the receiver on {addr} answered {other:?} to hello"
            )));
        }
        Ok(Err(e)) => {
            ssh.close().await;
            return Err(refuse(
                anyhow!(e).context(format!("{addr} does not speak the migrate protocol")),
            ));
        }
        Err(_) => {
            ssh.close().await;
            return Err(refuse(anyhow!(
                "{addr} accepted the connection but never answered; is it a migrate receiver?"
            )));
        }
    };
    let remote_dir = remote_join(&remote_join(&workdir, "runs"), &plan.run_id);

    ui.phase("preflight: target");
    let checks = remote_checks(plan, &infos, &ssh, &remote_dir, ui).await;
    if let Err(e) = checks {
        ssh.close().await;
        return Err(refuse(e));
    }

    // Place the per-migration secret where only root on the target can read it.
    let secret = crate::secret::random_hex(32);
    if let Err(e) = ssh
        .upload(
            secret.as_bytes(),
            &remote_join(&remote_dir, SECRET_FILE),
            REMOTE_TIMEOUT,
        )
        .await
    {
        ssh.close().await;
        return Err(refuse(
            anyhow!(e).context("cannot place the migration secret on the target"),
        ));
    }
    control.authenticate(Auth::new(hex::decode(&secret).expect("hex"), nonce));
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
            Ok(Ok(ToSender::Refused { reason })) => {
                ssh.close().await;
                return Err(refuse(anyhow!("the receiver refused: {reason}")));
            }
            other => {
                ssh.close().await;
                return Err(refuse(anyhow!(
                    "the receiver did not accept our authenticated messages ({other:?}); is --workdir on both sides writable and the same receiver reached over SSH?"
                )));
            }
        }
    }
    let (offset_us, delay_us) = estimate_offset(&samples).expect("at least one sample");
    rec.clock_delay_us = Some(delay_us);
    ui.info(&format!(
        "clock offset target−source {:+.6}s (round trip {:.6}s)",
        offset_us as f64 / 1e6,
        delay_us as f64 / 1e6
    ));

    // Compression for this link.
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

    let local_dir = crate::receive::run_dir(&plan.workdir, &plan.run_id);
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&local_dir)
    {
        abort(&mut control, "local work folder", false).await;
        ssh.close().await;
        return Err(refuse(anyhow!(e).context(format!(
            "cannot create {}: pass a writable --workdir",
            local_dir.display()
        ))));
    }
    let items = infos
        .into_iter()
        .map(|info| {
            let locks = podman::holds_file_locks(info.pid).unwrap_or(true);
            if locks {
                ui.info(&format!(
                    "{} holds file locks: checkpointing with --file-locks",
                    info.name
                ));
            }
            let archive_name = format!("{}.{}", info.name, compression.extension());
            Item {
                opts: CriuOptions {
                    file_locks: locks,
                    tcp_established: plan.tcp_established,
                },
                local_archive: local_dir.join(&archive_name),
                archive_name,
                info,
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

/// The migration's facts for hooks.
fn hook_env(plan: &SendPlan, rec: &Record) -> Vec<(String, String)> {
    vec![
        ("MIGRATE_RUN_ID".into(), plan.run_id.clone()),
        ("MIGRATE_SOURCE".into(), rec.source.clone()),
        ("MIGRATE_TARGET".into(), plan.dest.host.clone()),
        ("MIGRATE_CONTAINERS".into(), plan.containers.join(" ")),
    ]
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// Sends a few MB to the target's /dev/null and returns bytes per second.
async fn measure_link(ssh: &Ssh) -> anyhow::Result<f64> {
    let mut data = vec![0u8; PROBE_BYTES];
    crate::secret::fill_random(&mut data[..64 * 1024]);
    for i in 1..(PROBE_BYTES / (64 * 1024)) {
        data.copy_within(0..64 * 1024, i * 64 * 1024);
    }
    // Warm up the channel, then time a full probe.
    ssh.stream_into(&data[..64 * 1024], "cat > /dev/null", REMOTE_TIMEOUT)
        .await?;
    let sw = Stopwatch::start();
    ssh.stream_into(&data[..], "cat > /dev/null", REMOTE_TIMEOUT)
        .await?;
    Ok(PROBE_BYTES as f64 / sw.secs().max(1e-6))
}

/// Checks the target in one SSH round trip (plus image shipping when needed) and creates
/// the run folder there.
async fn remote_checks(
    plan: &SendPlan,
    infos: &[ContainerInfo],
    ssh: &Ssh,
    remote_dir: &str,
    ui: &Arc<Ui>,
) -> anyhow::Result<()> {
    let mut script = String::from(crate::check::STACK_SCRIPT);
    for c in infos {
        script.push_str(&format!(
            "podman container exists {n} && echo exists={n}\n",
            n = shell_quote(&c.name)
        ));
        script.push_str(&format!(
            "podman image exists {i} || echo missing_image={i}\n",
            i = shell_quote(&c.image_id)
        ));
    }
    for (c, m) in uncovered_binds(infos, &plan.data) {
        script.push_str(&format!(
            "[ -e {p} ] || echo missing_path={c}={p}\n",
            p = shell_quote(&m),
            c = shell_quote(&c)
        ));
    }
    // Free space where the archives and each data folder will land.
    script.push_str(
        "avail() { p=$1; while [ ! -e \"$p\" ]; do p=$(dirname \"$p\"); done; df -Pk \"$p\" | awk 'NR==2 {print $4, $6}'; }\n",
    );
    script.push_str(&format!(
        "echo \"space=archives=$(avail {d}) 0\"\n",
        d = shell_quote(remote_dir)
    ));
    for d in &plan.data {
        let d = shell_quote(&d.display().to_string());
        script.push_str(&format!(
            "echo \"space={d}=$(avail {d}) $( [ -e {d} ] && du -sk {d} | cut -f1 || echo 0)\"\n"
        ));
    }
    script.push_str(&format!(
        "umask 077 && mkdir -p {d} && echo run_dir=ok\n",
        d = shell_quote(remote_dir)
    ));
    let out = ssh
        .sh(&script, REMOTE_TIMEOUT)
        .await
        .context("checking the target")?;
    let facts = crate::check::Facts::parse(&out.stdout);
    if let Some(problem) = facts.problem() {
        anyhow::bail!("target {}: {problem}", ssh.label());
    }
    for line in out.stdout.lines() {
        if let Some(name) = line.strip_prefix("exists=") {
            anyhow::bail!(
                "a container named {name} already exists on {}; remove it there first (podman rm {name})",
                ssh.label()
            );
        }
        if let Some(rest) = line.strip_prefix("missing_path=") {
            let (c, p) = rest.split_once('=').unwrap_or(("?", rest));
            anyhow::bail!(
                "container {c} bind-mounts {p}, which no --data covers and which does not exist on {}; add --data {p}",
                ssh.label()
            );
        }
    }
    let mut needs = vec![(
        "archives".to_string(),
        infos
            .iter()
            .map(|c| podman::resident_bytes(c.pid) / 1024)
            .sum::<u64>(),
    )];
    for d in &plan.data {
        needs.push((d.display().to_string(), local_kib(d).await));
    }
    if let Some(problem) = space_problem(&out.stdout, &needs) {
        anyhow::bail!("target {}: {problem}", ssh.label());
    }
    if !out.stdout.lines().any(|l| l == "run_dir=ok") {
        anyhow::bail!("cannot create {remote_dir} on {}", ssh.label());
    }
    let missing: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("missing_image="))
        .collect();
    for id in missing {
        let info = infos
            .iter()
            .find(|c| c.image_id == id)
            .expect("asked for it");
        let image = if info.image_name.is_empty() {
            id.to_string()
        } else {
            info.image_name.clone()
        };
        ui.info(&format!(
            "image {image} is missing on the target: shipping it (podman save | podman load)"
        ));
        ssh.pipe_from_local(
            "podman",
            &[
                "save".into(),
                "--format".into(),
                "docker-archive".into(),
                image.clone(),
            ],
            "podman",
            &["load".into()],
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
    }
    Ok(())
}

/// Size of a local folder in KiB (`du -sk`).
async fn local_kib(dir: &Path) -> u64 {
    crate::exec::run(
        "du",
        &["-sk".into(), dir.display().to_string()],
        REMOTE_TIMEOUT,
    )
    .await
    .ok()
    .and_then(|o| o.stdout.split_whitespace().next()?.parse().ok())
    .unwrap_or(0)
}

/// Compares what must land on each target file system with what is free there.
/// `report` holds lines `space=WHAT=AVAIL_KIB MOUNT PRESENT_KIB`; `needs` (WHAT, KiB).
pub fn space_problem(report: &str, needs: &[(String, u64)]) -> Option<String> {
    let mut per_mount: BTreeMap<String, (u64, u64, Vec<String>)> = BTreeMap::new();
    for line in report.lines() {
        let Some(rest) = line.strip_prefix("space=") else {
            continue;
        };
        let Some((what, fields)) = rest.rsplit_once('=') else {
            continue;
        };
        let mut f = fields.split_whitespace();
        let (Some(avail), Some(mount)) = (f.next().and_then(|v| v.parse::<u64>().ok()), f.next())
        else {
            continue;
        };
        let present: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let need = needs
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, n)| *n)
            .unwrap_or(0);
        let e = per_mount
            .entry(mount.to_string())
            .or_insert((avail, 0, Vec::new()));
        e.1 += need.saturating_sub(present);
        e.2.push(what.to_string());
    }
    per_mount.into_iter().find_map(|(mount, (avail, need, whats))| {
        // Leave a margin: archives and file systems have overheads.
        (need + need / 10 > avail).then(|| {
            format!(
                "not enough free space on {mount}: {} MiB free, about {} MiB needed for {}; free some space there (or use another --workdir on the receiver)",
                avail / 1024,
                (need + need / 10) / 1024,
                whats.join(", ")
            )
        })
    })
}

/// Bind-mount sources of the containers that no `--data` folder covers.
pub fn uncovered_binds(infos: &[ContainerInfo], data: &[PathBuf]) -> Vec<(String, String)> {
    infos
        .iter()
        .flat_map(|c| {
            c.mounts
                .iter()
                .filter(|m| m.kind == "bind")
                .filter(|m| !data.iter().any(|d| Path::new(&m.source).starts_with(d)))
                .map(|m| (c.name.clone(), m.source.clone()))
        })
        .collect()
}

/// What to do when the control connection was lost after "OK", from what the target
/// shows over SSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Every container runs on the target: the migration happened.
    Commit,
    /// Not all run there: remove these on the target, then roll back here.
    RollBack { remove_on_target: Vec<String> },
}

/// The container states on the target decide, never the receiver's word alone: the
/// service must run on exactly one host.
pub fn decide_settle(states: &BTreeMap<String, String>, names: &[String]) -> Settle {
    if names
        .iter()
        .all(|n| states.get(n).map(String::as_str) == Some("true"))
    {
        Settle::Commit
    } else {
        Settle::RollBack {
            remove_on_target: names
                .iter()
                .filter(|n| states.get(*n).is_some_and(|s| s != "absent"))
                .cloned()
                .collect(),
        }
    }
}

/// After losing the control connection: waits for the receiver to finish or die, stops
/// any restore still in flight, looks at the containers on the target and decides.
async fn settle_over_ssh(
    ssh: &Ssh,
    remote_dir: &str,
    names: &[String],
    ui: &Arc<Ui>,
) -> anyhow::Result<TargetOutcome> {
    let result = remote_join(remote_dir, RESULT_FILE);
    let pid = remote_join(remote_dir, PID_FILE);
    let probe = format!(
        "if [ -f {r} ]; then echo result; cat {r}; \
         elif [ -f {p} ] && [ \"$(sed -n 's/^State:[[:space:]]*\\(.\\).*/\\1/p' /proc/$(cat {p})/status 2>/dev/null)\" != Z ] \
              && [ -d /proc/$(cat {p}) ]; then echo busy; else echo gone; fi",
        r = shell_quote(&result),
        p = shell_quote(&pid)
    );
    let deadline = tokio::time::Instant::now() + RESTORE_TIMEOUT;
    let mut reported: Option<TargetOutcome> = None;
    loop {
        let out = ssh
            .sh(&probe, REMOTE_TIMEOUT)
            .await
            .context("asking the target over SSH")?;
        let mut lines = out.stdout.lines();
        match lines.next() {
            Some("result") => {
                reported = serde_json::from_str(&lines.collect::<Vec<_>>().join("\n")).ok();
                break;
            }
            Some("busy") if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ => break,
        }
    }
    // A receiver that died may have left a restore running: stop it before looking.
    let _ = ssh
        .sh(
            &format!(
                "pkill -f -- {} || true",
                shell_quote(&self_excluding_pattern(remote_dir))
            ),
            REMOTE_TIMEOUT,
        )
        .await;
    let mut script = String::new();
    for n in names {
        script.push_str(&format!(
            "echo {n}=$(podman container inspect --format '{{{{.State.Running}}}}' {n} 2>/dev/null || echo absent)\n",
            n = shell_quote(n)
        ));
    }
    let out = ssh
        .sh(&script, REMOTE_TIMEOUT)
        .await
        .context("inspecting the containers on the target")?;
    let states: BTreeMap<String, String> = out
        .stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect();
    match decide_settle(&states, names) {
        Settle::Commit => {
            ui.info("the target runs every container: the migration happened");
            Ok(reported.filter(|o| o.restored).unwrap_or(TargetOutcome {
                restored: true,
                error: None,
                ready_us: 0,
                up_us: None,
                verify_s: 0.0,
                restore_s: 0.0,
                container_restore_s: Vec::new(),
            }))
        }
        Settle::RollBack { remove_on_target } => {
            for n in &remove_on_target {
                ui.warn(&format!("removing the partial {n} on the target"));
                ssh.run(
                    "podman",
                    &["rm".into(), "--force".into(), n.clone()],
                    REMOTE_TIMEOUT,
                )
                .await
                .with_context(|| format!("removing {n} on the target"))?;
            }
            Ok(TargetOutcome {
                restored: false,
                error: Some(reported.and_then(|o| o.error).unwrap_or_else(|| {
                    "the receiver went away before every container ran on the target".into()
                })),
                ready_us: 0,
                up_us: None,
                verify_s: 0.0,
                restore_s: 0.0,
                container_restore_s: Vec::new(),
            })
        }
    }
}

/// A `pkill -f` pattern for `path` that does not match the command line carrying it
/// (`/x/y` becomes `[/]x/y`), so the remote shell does not kill itself.
fn self_excluding_pattern(path: &str) -> String {
    let mut chars = path.chars();
    match chars.next() {
        Some(c) => format!("[{c}]{}", chars.as_str()),
        None => String::new(),
    }
}

/// What bringing the containers back on this host needs.
struct Rollback<'a> {
    podman: &'a Podman,
    items: &'a [Item],
    ui: &'a Arc<Ui>,
    ssh: &'a Ssh,
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
            remote_dir,
            hooks: hook_list,
            env,
            hook_timeout,
        } = self;
        ui.warn(&format!("{cause:#}; rolling back on this host"));
        let mut problems = Vec::new();
        for it in checkpointed {
            let name = &it.info.name;
            if podman.restore_in_place(name, it.opts).await.is_ok() {
                ui.info(&format!("{name} restored here from its kept checkpoint"));
                continue;
            }
            let again = async {
                podman.remove(name).await?;
                podman.restore_import(&it.local_archive, it.opts).await
            };
            match again.await {
                Ok(()) => ui.info(&format!(
                    "{name} restored here from {}",
                    it.local_archive.display()
                )),
                Err(e) => problems.push(format!("{name}: {e}")),
            }
        }
        // Containers whose checkpoint failed normally keep running (CRIU resumes them);
        // make sure every one of them runs.
        for it in items.iter() {
            let name = &it.info.name;
            let running = podman
                .inspect(std::slice::from_ref(name))
                .await
                .map(|v| v.first().is_some_and(|c| c.running))
                .unwrap_or(false);
            if !running && !problems.iter().any(|p| p.starts_with(&format!("{name}:"))) {
                problems.push(format!("{name}: not running after the rollback"));
            }
        }
        let _ = ssh
            .run(
                "rm",
                &["-rf".into(), remote_dir.to_string()],
                REMOTE_TIMEOUT,
            )
            .await;
        if problems.is_empty() {
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
                "migration failed AND the rollback failed ({}); the archives are kept in their work folder",
                problems.join("; ")
            )),
        }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::podman::Mount;

    fn states(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn names() -> Vec<String> {
        vec!["db".into(), "web".into()]
    }

    #[test]
    fn settle_commits_only_when_all_run_on_the_target() {
        assert_eq!(
            decide_settle(&states(&[("db", "true"), ("web", "true")]), &names()),
            Settle::Commit
        );
    }

    #[test]
    fn settle_rolls_back_and_removes_partial_restores() {
        assert_eq!(
            decide_settle(&states(&[("db", "true"), ("web", "absent")]), &names()),
            Settle::RollBack {
                remove_on_target: vec!["db".into()]
            }
        );
        assert_eq!(
            decide_settle(&states(&[("db", "false"), ("web", "true")]), &names()),
            Settle::RollBack {
                remove_on_target: vec!["db".into(), "web".into()]
            }
        );
        assert_eq!(
            decide_settle(&states(&[]), &names()),
            Settle::RollBack {
                remove_on_target: vec![]
            }
        );
    }

    #[test]
    fn finds_bind_mounts_no_data_folder_covers() {
        let info = ContainerInfo {
            id: "x".into(),
            name: "db".into(),
            image_id: "i".into(),
            image_name: String::new(),
            status: "running".into(),
            running: true,
            pid: 1,
            mounts: vec![
                Mount {
                    kind: "bind".into(),
                    source: "/srv/app/mysql".into(),
                    destination: "/var/lib/mysql".into(),
                },
                Mount {
                    kind: "bind".into(),
                    source: "/etc/app.conf".into(),
                    destination: "/etc/app.conf".into(),
                },
                Mount {
                    kind: "volume".into(),
                    source: "/var/lib/containers/storage/volumes/v/_data".into(),
                    destination: "/v".into(),
                },
            ],
        };
        let got = uncovered_binds(&[info], &[PathBuf::from("/srv/app")]);
        assert_eq!(got, vec![("db".to_string(), "/etc/app.conf".to_string())]);
    }

    #[test]
    fn space_is_checked_per_file_system() {
        let report = "space=archives=1000000 / 0\nspace=/srv/app=50000 /srv 10000\n";
        let needs = vec![
            ("archives".to_string(), 200_000),
            ("/srv/app".to_string(), 40_000),
        ];
        assert_eq!(space_problem(report, &needs), None);
        let needs = vec![
            ("archives".to_string(), 200_000),
            ("/srv/app".to_string(), 60_000),
        ];
        let p = space_problem(report, &needs).unwrap();
        assert!(p.contains("/srv") && p.contains("/srv/app"), "{p}");
        // Two things on one file system add up.
        let report = "space=archives=100000 / 0\nspace=/srv/app=100000 / 0\n";
        let needs = vec![
            ("archives".to_string(), 60_000),
            ("/srv/app".to_string(), 60_000),
        ];
        assert!(space_problem(report, &needs).is_some());
    }

    #[test]
    fn pkill_pattern_skips_its_own_shell() {
        assert_eq!(
            self_excluding_pattern("/var/lib/migrate/runs/x"),
            "[/]var/lib/migrate/runs/x"
        );
    }

    #[test]
    fn exit_codes_match_the_contract() {
        assert_eq!(Exit::Migrated as u8, 0);
        assert_eq!(Exit::RolledBack as u8, 1);
        assert_eq!(Exit::Refused as u8, 2);
        assert_eq!(Exit::Failed as u8, 3);
        assert_eq!(Exit::RolledBack.outcome().as_str(), "rolled_back");
    }
}
