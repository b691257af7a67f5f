//! The target side: wait for a sender, check what it shipped, restore, answer.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};

use crate::cli::ReceiveArgs;
use crate::engine::podman::{CriuOptions, Podman, PodmanError};
use crate::progress::Ui;
use crate::protocol::{
    Auth, Channel, Direction, LeftOnTarget, Manifest, PROTOCOL_VERSION, ProtocolError,
    TargetOutcome, ToReceiver, ToSender, restore_waves, valid_run_id,
};
use crate::rundir::{self, PID_FILE, RESULT_FILE, SECRET_FILE, run_dir};
use crate::sink::{Received, Sizes};
use crate::timing::{Format, Outcome, Record, Stopwatch, now_us};

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an authenticated sender may stay silent (pre-sync of big folders); a sender
/// whose host vanished is noticed sooner by TCP keepalive.
const IDLE_TIMEOUT: Duration = Duration::from_secs(12 * 3600);

/// Attempts at removing a container of a failed restore (the last one after SIGKILL).
const REMOVE_ATTEMPTS: u32 = 3;

struct Ctx {
    workdir: PathBuf,
    hostname: String,
    busy: Mutex<()>,
    ui: Arc<Ui>,
    format: Format,
    header_done: AtomicBool,
}

/// What one finished migration means for the receiver's exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    Restored,
    NotRestored,
    /// Aborted or dropped by the sender before "OK": nothing was restored.
    Ended,
}

/// Runs the receiver; returns the process exit code.
pub async fn run(args: ReceiveArgs, ui: Arc<Ui>) -> anyhow::Result<u8> {
    let runs = args.workdir.join("runs");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&runs)
        .with_context(|| {
            format!(
                "cannot create work folder {}: pass a writable --workdir",
                runs.display()
            )
        })?;
    // Run folders are made there over SSH and hold the secret: nobody else may write there.
    rundir::check_private_dir(&runs).with_context(|| {
        format!(
            "work folder {} is not private: `chmod 700` it (and make it a plain folder owned by this user)",
            runs.display()
        )
    })?;
    let listener = TcpListener::bind(args.listen).await.with_context(|| {
        format!(
            "cannot listen on {}: is another receiver running? pick another --listen",
            args.listen
        )
    })?;
    let ctx = Arc::new(Ctx {
        workdir: args.workdir.clone(),
        hostname: crate::host::hostname(),
        busy: Mutex::new(()),
        ui: ui.clone(),
        format: args.output.format,
        header_done: AtomicBool::new(args.output.no_header),
    });
    let idle = args.idle_timeout.map(Duration::from_secs);
    let mut idle_deadline = idle.map(|d| tokio::time::Instant::now() + d);
    ui.info(&format!(
        "listening on {} (work folder {}){}",
        args.listen,
        args.workdir.display(),
        if args.serve {
            ", serving until stopped"
        } else {
            ", for one migration"
        }
    ));
    let (done_tx, mut done_rx) = mpsc::channel::<Done>(4);
    let mut signals = crate::signals::Signals::new()?;
    let mut stopping = false;
    let mut accept_warned = false;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (sock, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors (or similar): back off instead of spinning.
                        if !accept_warned {
                            ui.warn(&format!("accept failed: {e}; retrying every 100 ms"));
                            accept_warned = true;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                accept_warned = false;
                let ctx = ctx.clone();
                let done_tx = done_tx.clone();
                tokio::spawn(async move {
                    if let Some(done) = handle(sock, peer, &ctx).await {
                        let _ = done_tx.send(done).await;
                    }
                });
            }
            Some(done) = done_rx.recv() => {
                if !args.serve || stopping {
                    return Ok(if done == Done::Restored { 0 } else { 1 });
                }
                idle_deadline = idle.map(|d| tokio::time::Instant::now() + d);
                ui.info("waiting for the next migration");
            }
            _ = async { tokio::time::sleep_until(idle_deadline.expect("guarded")).await },
                if idle_deadline.is_some() => {
                // A migration in progress is bounded by its own timeouts; the idle clock
                // counts again once it is over.
                if ctx.busy.try_lock().is_ok() {
                    ui.warn("no migration within --idle-timeout; exiting");
                    return Ok(1);
                }
                idle_deadline = idle.map(|d| tokio::time::Instant::now() + d);
            }
            _ = signals.changed() => {
                if ctx.busy.try_lock().is_ok() {
                    ui.info("stopped by signal");
                    return Ok(130);
                }
                ui.warn("signal received: finishing the migration in progress first");
                stopping = true;
            }
        }
    }
}

/// How long the sender may take from `Welcome` to its first authenticated frame (it
/// measures the clock offset at once).
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(60);

/// One control connection. Returns `Some` when it carried an authenticated migration
/// that ended (restored, failed, aborted, or dropped by the sender).
async fn handle(sock: TcpStream, peer: SocketAddr, ctx: &Ctx) -> Option<Done> {
    let _ = sock.set_nodelay(true);
    let _ = crate::protocol::keepalive(&sock);
    let (r, w) = sock.into_split();
    let mut ch = Channel::new(BufReader::new(r), w, Direction::ToSender);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, ch.recv::<ToReceiver>()).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            ctx.ui.warn(&format!("refused connection from {peer}: {e}"));
            return None;
        }
        Err(_) => {
            ctx.ui.warn(&format!(
                "refused connection from {peer}: no hello within {}s",
                HELLO_TIMEOUT.as_secs()
            ));
            return None;
        }
    };
    let ToReceiver::Hello {
        protocol,
        run_id,
        source_host,
        label,
        challenge,
        ..
    } = hello
    else {
        ctx.ui.warn(&format!(
            "refused connection from {peer}: it did not start with hello"
        ));
        return None;
    };
    let refuse = async |ch: &mut Channel<_, _>, reason: String| {
        ctx.ui
            .warn(&format!("refused connection from {peer}: {reason}"));
        let _ = ch.send(&ToSender::Refused { reason }).await;
    };
    if protocol != PROTOCOL_VERSION || !valid_run_id(&run_id) {
        let reason = format!(
            "protocol {protocol} / run id {run_id:?} not accepted (this receiver speaks protocol {PROTOCOL_VERSION})"
        );
        refuse(&mut ch, reason).await;
        return None;
    }
    let nonce = crate::protocol::fresh_nonce();
    let welcome = |proof| ToSender::Welcome {
        protocol: PROTOCOL_VERSION,
        receiver_version: env!("CARGO_PKG_VERSION").into(),
        hostname: ctx.hostname.clone(),
        nonce: nonce.clone(),
        proof,
    };
    let Some(challenge) = challenge else {
        // `check` only looks: say who answers, then close.
        let _ = ch.send(&welcome(None)).await;
        return None;
    };
    if !crate::protocol::valid_nonce(&challenge) {
        refuse(&mut ch, "malformed challenge".into()).await;
        return None;
    }
    let Ok(_guard) = ctx.busy.try_lock() else {
        refuse(&mut ch, "busy with another migration".into()).await;
        return None;
    };
    // The secret was placed over SSH before the sender connected: proving that we hold
    // it is what tells the sender that it talks to the receiver SSH vouches for.
    let dir = run_dir(&ctx.workdir, &run_id);
    let secret = match rundir::read_secret(&dir) {
        Ok(s) => s,
        Err(e) => {
            let reason = format!(
                "no usable secret for run {run_id} in this receiver's work folder {} ({e}); if the receiver runs with another --workdir, pass that as send's --target-workdir",
                ctx.workdir.display()
            );
            refuse(&mut ch, reason).await;
            return None;
        }
    };
    let auth = Auth::new(secret, &challenge, &nonce);
    if ch.send(&welcome(Some(auth.proof()))).await.is_err() {
        return None;
    }
    ch.authenticate(auth);
    let first = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, ch.recv::<ToReceiver>()).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            ctx.ui.warn(&format!(
                "refused message from {peer} for run {run_id}: {e}; not acted on"
            ));
            return None;
        }
        Err(_) => {
            ctx.ui.warn(&format!(
                "{peer} said nothing for run {run_id} within {}s of the welcome; closing",
                FIRST_FRAME_TIMEOUT.as_secs()
            ));
            return None;
        }
    };
    if let Err(e) = rundir::write_private(&dir, PID_FILE, std::process::id().to_string().as_bytes())
    {
        ctx.ui.warn(&format!(
            "cannot write {PID_FILE} in {}: {e}",
            dir.display()
        ));
    }
    ctx.ui.info(&format!(
        "migration {run_id} from {source_host} ({peer}) authenticated"
    ));

    let mut msg = first;
    let mut closing_reason = "the migration ended before \"OK\"; nothing was restored".to_string();
    loop {
        let got_us = now_us();
        match msg {
            ToReceiver::TimeProbe { t0 } => {
                if ch
                    .send(&ToSender::TimeReply {
                        t0,
                        t1: got_us,
                        t2: now_us(),
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
            ToReceiver::Abort { reason, frozen } => {
                ctx.ui
                    .warn(&format!("sender aborted migration {run_id}: {reason}"));
                if frozen {
                    // The sender rolls back and may fetch an archive back; it removes the
                    // run folder when done.
                    remove_secret(&dir);
                } else {
                    remove_archives(&dir);
                }
                return Some(if frozen {
                    Done::NotRestored
                } else {
                    Done::Ended
                });
            }
            ToReceiver::Ready { manifest } => {
                ctx.ui.info("OK received: verifying and restoring");
                let outcome = restore(&manifest, &run_id, &dir, got_us, ctx).await;
                let written = write_result(&dir, &outcome);
                let restored = outcome.restored;
                if restored {
                    remove_archives(&dir);
                } else {
                    // Kept for the sender's rollback (it removes the run folder when done).
                    remove_secret(&dir);
                }
                // A full disk: removing the archives may have made room for it.
                if let Err(e) = written.or_else(|_| write_result(&dir, &outcome)) {
                    ctx.ui.warn(&format!(
                        "cannot write {}: {e}",
                        dir.join(RESULT_FILE).display()
                    ));
                }
                if let Err(e) = ch.send(&ToSender::Outcome(outcome.clone())).await {
                    ctx.ui.warn(&format!("could not tell the sender the outcome ({e}); it will read {RESULT_FILE} over SSH"));
                }
                print_record(ctx, &run_id, &label, &source_host, &manifest, &outcome);
                return Some(if restored {
                    Done::Restored
                } else {
                    Done::NotRestored
                });
            }
            ToReceiver::Hello { .. } => {
                ctx.ui.warn(&format!(
                    "migration {run_id}: unexpected second hello; closing"
                ));
                break;
            }
        }
        msg = match tokio::time::timeout(IDLE_TIMEOUT, ch.recv::<ToReceiver>()).await {
            Ok(Ok(m)) => m,
            Ok(Err(ProtocolError::Closed)) => {
                ctx.ui.warn(&format!(
                    "sender of {run_id} went away before OK; nothing was restored"
                ));
                break;
            }
            Ok(Err(e)) => {
                ctx.ui
                    .warn(&format!("migration {run_id}: {e}; not acted on, closing"));
                closing_reason = format!("the receiver refused a message: {e}");
                break;
            }
            Err(_) => {
                ctx.ui.warn(&format!(
                    "migration {run_id}: sender silent for {}h; closing",
                    IDLE_TIMEOUT.as_secs() / 3600
                ));
                break;
            }
        };
    }
    // A sender that lost us after "OK" reads this over SSH: nothing was restored here.
    let outcome = TargetOutcome {
        restored: false,
        error: Some(closing_reason),
        ready_us: now_us(),
        up_us: None,
        verify_s: 0.0,
        restore_s: 0.0,
        container_restore_s: Vec::new(),
        criu_restore_s: None,
        left_on_target: Vec::new(),
    };
    let _ = write_result(&dir, &outcome);
    remove_archives(&dir);
    Some(Done::Ended)
}

/// podman refused to restore `name` because somebody else's container holds it here.
fn name_taken(name: &str, e: &crate::engine::podman::PodmanError) -> bool {
    e.to_string()
        .contains(&format!("container name \"{name}\" is already in use"))
}

/// Verifies the shipped archives and restores the containers in manifest order; on a
/// failure removes what it had restored.
async fn restore(
    manifest: &Manifest,
    run_id: &str,
    dir: &Path,
    ready_us: i64,
    ctx: &Ctx,
) -> TargetOutcome {
    let mut out = TargetOutcome {
        restored: false,
        error: None,
        ready_us,
        up_us: None,
        verify_s: 0.0,
        restore_s: 0.0,
        container_restore_s: Vec::new(),
        criu_restore_s: None,
        left_on_target: Vec::new(),
    };
    let verify = Stopwatch::start();
    let podman = Podman;
    // Names were checked before the freeze (the sender's preflight); one taken since
    // makes podman's restore fail, and that container, not ours, is left alone below.
    if let Err(e) = verify_archives(manifest, run_id, dir, &ctx.ui).await {
        ctx.ui.warn(&format!("{e:#}"));
        out.error = Some(format!("{e:#}"));
        return out;
    }
    out.verify_s = verify.secs();
    let restore = Stopwatch::start();
    let waves = restore_waves(&manifest.containers).expect("validated: no cycle");
    let mut restored: Vec<&str> = Vec::new();
    for wave in waves {
        let names: Vec<&str> = wave.iter().map(|c| c.name.as_str()).collect();
        ctx.ui.phase(&format!("restoring {}", names.join(", ")));
        let results = futures::future::join_all(wave.iter().map(|c| {
            let podman = &podman;
            async move {
                let sw = Stopwatch::start();
                let opts = CriuOptions {
                    file_locks: c.file_locks,
                    tcp_established: c.tcp_established,
                    tcp_close: c.tcp_close,
                    skip_in_flight: false,
                };
                (
                    podman.restore_import(&dir.join(&c.archive), opts).await,
                    sw.secs(),
                )
            }
        }))
        .await;
        let mut failures = Vec::new();
        // Restores refused because somebody else's container holds the name.
        let mut taken = Vec::new();
        for (c, (r, secs)) in wave.iter().zip(results) {
            match r {
                Ok(stats) => {
                    restored.push(&c.name);
                    out.container_restore_s.push((c.name.clone(), secs));
                    if let Some(criu) = stats.criu_s {
                        out.criu_restore_s = Some(out.criu_restore_s.unwrap_or(0.0).max(criu));
                    }
                    ctx.ui.info(&format!("restored {} in {secs:.3}s", c.name));
                }
                Err(e) if name_taken(&c.name, &e) => taken.push((
                    c.name.as_str(),
                    format!(
                        "a container named {} already exists on {}; remove it there first",
                        c.name, ctx.hostname
                    ),
                )),
                Err(e) => {
                    failures.push((c.name.as_str(), format!("restoring {} failed: {e}", c.name)))
                }
            }
        }
        if !failures.is_empty() || !taken.is_empty() {
            let msg = taken
                .iter()
                .chain(&failures)
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            ctx.ui.warn(&msg);
            // Whatever podman left of the failed ones, and all that came up: nothing
            // half-restored stays here. What cannot be removed is reported as such: the
            // source must not restore it too.
            for name in failures
                .iter()
                .map(|(n, _)| *n)
                .chain(restored.iter().rev().copied())
            {
                if let Some(left) = remove_restored(&podman, name, &ctx.ui).await {
                    out.left_on_target.push(left);
                }
            }
            let mut msg = msg;
            if !out.left_on_target.is_empty() {
                let left = out
                    .left_on_target
                    .iter()
                    .map(|l| format!("{} ({}: {})", l.name, l.state, l.error))
                    .collect::<Vec<_>>()
                    .join(", ");
                let text = format!(
                    "NOT removed on {} after the failed restore, so it may still exist or run there: {left}",
                    ctx.hostname
                );
                ctx.ui.warn(&text);
                msg = format!("{msg}; {text}");
            }
            out.error = Some(msg);
            out.restore_s = restore.secs();
            return out;
        }
    }
    out.restore_s = restore.secs();
    out.up_us = Some(now_us());
    out.restored = true;
    ctx.ui.info(&format!("UP: {} running", restored.join(", ")));
    out
}

/// Removes a container this migration restored (or that podman half-created for it):
/// `rm --force`, once more after a moment (a stopped restore's mounts can stay busy),
/// then SIGKILL and `rm --force` again. Returns what is left of it when it is still
/// there, or when that cannot be told.
async fn remove_restored(podman: &Podman, name: &str, ui: &Ui) -> Option<LeftOnTarget> {
    let mut last = match podman.exists(name).await {
        Ok(false) => return None,
        Ok(true) => String::new(),
        // Unknown: try to remove it anyway, then look again.
        Err(e) => format!("podman inspect: {e}"),
    };
    for attempt in 1..=REMOVE_ATTEMPTS {
        if attempt == REMOVE_ATTEMPTS
            && let Err(e) = podman.kill(name).await
        {
            ui.warn(&format!("killing {name} after the failed restore: {e}"));
        }
        match podman.remove(name).await {
            Ok(()) => break,
            Err(e) => {
                ui.warn(&format!(
                    "removing {name} after the failed restore (attempt {attempt} of {REMOVE_ATTEMPTS}): {e}"
                ));
                last = e.to_string();
                if attempt < REMOVE_ATTEMPTS {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    match podman.inspect(&[name.to_string()]).await {
        Err(PodmanError::NoSuchContainer(_)) => None,
        Ok(found) => Some(LeftOnTarget {
            name: name.to_string(),
            state: found
                .first()
                .map(|c| c.status.clone())
                .unwrap_or_else(|| "unknown".into()),
            error: if last.is_empty() {
                "podman rm reported success, yet it is still there".into()
            } else {
                last
            },
        }),
        Err(e) => Some(LeftOnTarget {
            name: name.to_string(),
            state: "unknown".into(),
            error: if last.is_empty() {
                format!("podman inspect: {e}")
            } else {
                format!("{last}; podman inspect: {e}")
            },
        }),
    }
}

async fn verify_archives(
    manifest: &Manifest,
    run_id: &str,
    dir: &Path,
    ui: &Ui,
) -> anyhow::Result<()> {
    manifest.validate(run_id)?;
    for c in &manifest.containers {
        let path = dir.join(&c.archive);
        let size = std::fs::metadata(&path)
            .with_context(|| format!("archive {} of {} is missing", path.display(), c.name))?
            .len();
        // Written by `migrate sink` from the very bytes it received: no second read. Its
        // sizes are those of the stream; the file may be smaller by the zero pages it left
        // out. Without a sink's file (or from an older sink) the file is the stream.
        let sink = std::fs::read_to_string(crate::sink::digest_path(&path))
            .ok()
            .and_then(|line| Received::parse(&line));
        let sizes = sink.as_ref().and_then(|(_, s)| *s).unwrap_or(Sizes {
            received: size,
            dropped: 0,
            written: size,
        });
        if sizes.received != c.size {
            bail!(
                "archive {} is {} bytes, the manifest says {}",
                path.display(),
                sizes.received,
                c.size
            );
        }
        if sizes.written != size {
            bail!(
                "archive {} is {size} bytes on disk, its sink wrote {}",
                path.display(),
                sizes.written
            );
        }
        let digest = match sink {
            Some((digest, _)) => digest,
            None => {
                let p = path.clone();
                tokio::task::spawn_blocking(move || crate::digest::of_file(&p)).await??
            }
        };
        if digest != c.digest {
            bail!(
                "archive {} does not match its {} digest in the manifest",
                path.display(),
                crate::digest::NAME
            );
        }
        if sizes.dropped > 0 {
            ui.info(&format!(
                "{}: {} MiB of zero pages left out of its archive ({} MiB to restore)",
                c.name,
                sizes.dropped >> 20,
                size >> 20
            ));
        }
    }
    Ok(())
}

/// Writes `result.json` so a sender that lost the control connection can read it over SSH.
fn write_result(dir: &Path, outcome: &TargetOutcome) -> std::io::Result<()> {
    // write_private removes its partial file on failure (a full disk).
    rundir::write_private(dir, RESULT_FILE, &serde_json::to_vec(outcome)?)
}

fn remove_secret(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(SECRET_FILE));
}

/// Archives hold process memory (keys included): delete them once used.
fn remove_archives(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.contains(".tar") || name == SECRET_FILE {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn print_record(
    ctx: &Ctx,
    run_id: &str,
    label: &str,
    source: &str,
    m: &Manifest,
    o: &TargetOutcome,
) {
    // Receiver times are moved onto the sender's clock with the sender's offset estimate.
    let to_sender = |us: i64| us - m.clock_offset_us;
    let rec = Record {
        run_id: run_id.into(),
        label: label.into(),
        source: source.into(),
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
        outcome: Some(if o.restored {
            Outcome::Ok
        } else {
            Outcome::Failed
        }),
        role: "receiver",
        error: o.error.clone().unwrap_or_default(),
        ..Default::default()
    };
    let no_header = ctx.header_done.swap(true, Ordering::SeqCst);
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = rec.write(&mut stdout, ctx.format, no_header) {
        ctx.ui.warn(&format!("cannot write the record: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ContainerEntry;

    fn manifest(dir: &Path, data: &[u8], digest: &str) -> Manifest {
        std::fs::write(dir.join("db.tar"), data).unwrap();
        Manifest {
            run_id: "r1".into(),
            containers: vec![ContainerEntry {
                name: "db".into(),
                archive: "db.tar".into(),
                size: data.len() as u64,
                digest: digest.into(),
                image_id: "i".into(),
                file_locks: false,
                tcp_established: false,
                tcp_close: true,
                after: vec![],
            }],
            data: vec![],
            down_us: 0,
            clock_offset_us: 0,
        }
    }

    #[tokio::test]
    async fn archives_are_checked_by_the_sinks_digest_or_by_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"archive bytes".to_vec();
        let good = crate::digest::of_bytes(&data);
        let ui = Ui::new("receive");
        // No digest file: the archive is read and hashed.
        let m = manifest(dir.path(), &data, &good);
        verify_archives(&m, "r1", dir.path(), &ui).await.unwrap();
        let bad = manifest(dir.path(), &data, &"0".repeat(64));
        assert!(verify_archives(&bad, "r1", dir.path(), &ui).await.is_err());
        // The digest `migrate sink` left decides; a wrong one is refused even though the
        // archive itself would match.
        let digest = crate::sink::digest_path(&dir.path().join("db.tar"));
        std::fs::write(&digest, format!("{}\n", "f".repeat(64))).unwrap();
        let err = verify_archives(&m, "r1", dir.path(), &ui)
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("BLAKE3"), "{err:#}");
        std::fs::write(&digest, format!("{good}\n")).unwrap();
        verify_archives(&m, "r1", dir.path(), &ui).await.unwrap();
        // A wrong size is refused before any hash.
        let mut short = m.clone();
        short.containers[0].size += 1;
        assert!(
            verify_archives(&short, "r1", dir.path(), &ui)
                .await
                .is_err()
        );
        // A sink that left zero pages out: the stream's size counts, not the file's.
        let mut bigger = m.clone();
        bigger.containers[0].size = 8192 + data.len() as u64;
        assert!(
            verify_archives(&bigger, "r1", dir.path(), &ui)
                .await
                .is_err()
        );
        let n = data.len();
        std::fs::write(&digest, format!("{good} {} 8192 {n}\n", 8192 + n)).unwrap();
        verify_archives(&bigger, "r1", dir.path(), &ui)
            .await
            .unwrap();
        std::fs::write(&digest, format!("{good} {} 8192 {n}\n", 4096 + n)).unwrap();
        assert!(
            verify_archives(&bigger, "r1", dir.path(), &ui)
                .await
                .is_err()
        );
        // The file on disk must be what the sink wrote.
        std::fs::write(&digest, format!("{good} {} 8192 {}\n", 8192 + n, n + 1)).unwrap();
        let err = verify_archives(&bigger, "r1", dir.path(), &ui)
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("its sink wrote"), "{err:#}");
    }
}
