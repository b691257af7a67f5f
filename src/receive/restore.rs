//! Restoring what arrived: the archives are verified, then the containers restored in
//! waves (dependencies first, each wave at once). A failed restore removes everything
//! this migration brought up here, so nothing half-restored stays; what cannot be removed
//! is reported, so the source does not restore it too.

use std::path::Path;
use std::time::Duration;

use super::Ctx;
use super::archives::verify_archives;
use super::lazy::LazyRestore;
use crate::engine::address;
use crate::engine::podman::{CriuOptions, Podman, PodmanError};
use crate::progress::Ui;
use crate::protocol::{
    AddressEntry, ContainerEntry, LeftOnTarget, Manifest, PodSpec, TargetOutcome, restore_waves,
};
use crate::timing::{Stopwatch, now_us};

/// Attempts at removing a container of a failed restore (the last one after SIGKILL).
const REMOVE_ATTEMPTS: u32 = 3;

/// Verifies the shipped archives and restores the containers in manifest order; on a
/// failure removes what it had restored.
pub(super) async fn restore(
    manifest: &Manifest,
    run_id: &str,
    dir: &Path,
    ready_us: i64,
    ctx: &Ctx,
    lazies: &mut Vec<LazyRestore>,
) -> TargetOutcome {
    let mut out = TargetOutcome {
        ready_us,
        ..Default::default()
    };
    let verify = Stopwatch::start();
    // Names were checked before the freeze (the sender's preflight); one taken since
    // makes podman's restore fail, and that container, not ours, is left alone below.
    if let Err(e) = verify_archives(manifest, run_id, dir, &ctx.ui).await {
        ctx.ui.warn(&format!("{e:#}"));
        out.error = Some(format!("{e:#}"));
        return out;
    }
    out.verify_s = verify.secs();
    let clock = Stopwatch::start();
    let podman = Podman;
    let pod = match &manifest.pod {
        None => None,
        Some(spec) => match create_pod(&podman, spec, ctx).await {
            Ok(id) => Some(id),
            Err(e) => {
                out.error = Some(e);
                out.restore_s = clock.secs();
                return out;
            }
        },
    };
    let waves = restore_waves(&manifest.containers).expect("validated: no cycle");
    let mut restored: Vec<&str> = Vec::new();
    for wave in waves {
        let into = pod.as_deref();
        let kept: Vec<&AddressEntry> = wave
            .iter()
            .filter(|c| c.tcp_established)
            .flat_map(|c| &c.addresses)
            .collect();
        let guard = address::guard_for(run_id, &kept, &ctx.ui).await;
        let done = restore_wave(
            &podman,
            &wave,
            dir,
            into,
            ctx,
            &mut restored,
            &mut out,
            lazies,
        )
        .await;
        address::unguard(guard, &ctx.ui).await;
        if let Err(failed) = done {
            // Their daemons and relays end (the source's page servers fail: its tasks run on).
            lazies.clear();
            let mut error = undo(&podman, &failed, &restored, ctx, &mut out.left_on_target).await;
            if let (Some(spec), Some(id)) = (&manifest.pod, &pod) {
                remove_pod(
                    &podman,
                    (&spec.name, id),
                    ctx,
                    &mut error,
                    &mut out.left_on_target,
                )
                .await;
            }
            out.error = Some(error);
            out.restore_s = clock.secs();
            return out;
        }
    }
    out.restore_s = clock.secs();
    out.up_us = Some(now_us());
    out.restored = true;
    ctx.ui.info(&format!("UP: {} running", restored.join(", ")));
    for c in &manifest.containers {
        address::announce_container(&c.name, &c.addresses, &ctx.ui).await;
    }
    out
}

/// Creates the pod the members are restored into and starts its infra container; returns
/// its ID (podman 4.3 restores into a pod only by ID). When `pod create` fails nothing
/// is removed (a pod of that name is somebody else's); when only the start fails, the pod
/// it created goes, by its ID.
async fn create_pod(podman: &Podman, spec: &PodSpec, ctx: &Ctx) -> Result<String, String> {
    ctx.ui.phase(&format!("creating pod {}", spec.name));
    let sw = Stopwatch::start();
    let failed = |what: &str, e: PodmanError| {
        let msg = format!("{what} pod {} failed: {e}", spec.name);
        ctx.ui.warn(&msg);
        msg
    };
    let id = podman
        .pod_create(spec)
        .await
        .map_err(|e| failed("creating", e))?;
    if let Err(e) = podman.pod_start(&id).await {
        let mut msg = failed("starting", e);
        if let Err(e) = podman.pod_remove(&id).await {
            msg.push_str(&format!(
                "; pod {} ({id}) NOT removed on {}: {e}",
                spec.name, ctx.hostname
            ));
        }
        return Err(msg);
    }
    ctx.ui
        .info(&format!("pod {} created in {:.3}s", spec.name, sw.secs()));
    Ok(id)
}

/// After a failed restore into the pod this run created: the pod goes too (its members
/// went first). What cannot be removed is reported like a container.
async fn remove_pod(
    podman: &Podman,
    (name, id): (&str, &str),
    ctx: &Ctx,
    error: &mut String,
    left: &mut Vec<LeftOnTarget>,
) {
    if let Err(e) = podman.pod_remove(id).await {
        let text = format!(
            "pod {name} NOT removed on {} after the failed restore: {e}",
            ctx.hostname
        );
        ctx.ui.warn(&text);
        error.push_str("; ");
        error.push_str(&text);
        left.push(LeftOnTarget {
            name: name.to_string(),
            state: "pod".into(),
            error: e.to_string(),
        });
    }
}

/// The containers of a wave that did not come up, each with its message.
struct WaveFailed<'m> {
    /// Restores that failed.
    failed: Vec<(&'m str, String)>,
    /// Restores refused because somebody else's container holds the name.
    taken: Vec<(&'m str, String)>,
}

impl WaveFailed<'_> {
    fn message(&self) -> String {
        self.taken
            .iter()
            .chain(&self.failed)
            .map(|(_, m)| m.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Restores one wave at once; what came up is added to `restored` and its times to
/// `out`, the lazy ones' daemons and relays to `lazies`.
#[allow(clippy::too_many_arguments)]
async fn restore_wave<'m>(
    podman: &Podman,
    wave: &[&'m ContainerEntry],
    dir: &Path,
    pod: Option<&str>,
    ctx: &Ctx,
    restored: &mut Vec<&'m str>,
    out: &mut TargetOutcome,
    lazies: &mut Vec<LazyRestore>,
) -> Result<(), WaveFailed<'m>> {
    let names: Vec<&str> = wave.iter().map(|c| c.name.as_str()).collect();
    ctx.ui.phase(&format!("restoring {}", names.join(", ")));
    let results = futures::future::join_all(wave.iter().map(|c| async move {
        let sw = Stopwatch::start();
        let (r, lazy) = restore_one(podman, c, dir, pod).await;
        (r, sw.secs(), lazy)
    }))
    .await;
    let mut failed = WaveFailed {
        failed: Vec::new(),
        taken: Vec::new(),
    };
    for (c, (r, secs, lazy)) in wave.iter().zip(results) {
        lazies.extend(lazy);
        match r {
            Err(Restore::Prepare(e)) => failed.failed.push((
                c.name.as_str(),
                format!("preparing the lazy restore of {} failed: {e}", c.name),
            )),
            Err(Restore::Podman(e)) if e.name_in_use(&c.name) => failed.taken.push((
                c.name.as_str(),
                format!(
                    "a container named {} already exists on {}; remove it there first",
                    c.name, ctx.hostname
                ),
            )),
            Err(Restore::Podman(e)) => failed
                .failed
                .push((c.name.as_str(), format!("restoring {} failed: {e}", c.name))),
            Ok(stats) => {
                restored.push(&c.name);
                out.container_restore_s.push((c.name.clone(), secs));
                if let Some(criu) = stats.criu_s {
                    out.criu_restore_s = Some(out.criu_restore_s.unwrap_or(0.0).max(criu));
                }
                ctx.ui.info(&format!("restored {} in {secs:.3}s", c.name));
            }
        }
    }
    if failed.failed.is_empty() && failed.taken.is_empty() {
        Ok(())
    } else {
        Err(failed)
    }
}

/// Why one container's restore failed.
enum Restore {
    Prepare(String),
    Podman(PodmanError),
}

/// Restores one container: from its archive, or lazily (its daemon and relay returned).
async fn restore_one(
    podman: &Podman,
    c: &ContainerEntry,
    dir: &Path,
    pod: Option<&str>,
) -> (
    Result<crate::engine::podman::Stats, Restore>,
    Option<LazyRestore>,
) {
    let opts = CriuOptions {
        file_locks: c.file_locks,
        tcp_established: c.tcp_established,
        tcp_close: c.tcp_close,
        skip_in_flight: false,
    };
    let archive = dir.join(&c.archive);
    let Some(l) = c.lazy else {
        let r = podman.restore_import(&archive, opts, pod).await;
        return (r.map_err(Restore::Podman), None);
    };
    let lazy = match super::lazy::prepare(c, l, dir).await {
        Ok(lazy) => lazy,
        Err(e) => return (Err(Restore::Prepare(e)), None),
    };
    let r = podman
        .restore_import_lazy(&archive, opts, &lazy.wrapper)
        .await
        .map(|()| crate::engine::podman::Stats::default())
        .map_err(Restore::Podman);
    (r, Some(lazy))
}

/// After a failed wave: removes whatever podman left of the failed restores and all that
/// came up, newest first (a taken name is somebody else's container: left alone). What
/// cannot be removed goes into `left`. Returns the outcome's error.
async fn undo(
    podman: &Podman,
    failed: &WaveFailed<'_>,
    restored: &[&str],
    ctx: &Ctx,
    left: &mut Vec<LeftOnTarget>,
) -> String {
    let msg = failed.message();
    ctx.ui.warn(&msg);
    for name in failed
        .failed
        .iter()
        .map(|(n, _)| *n)
        .chain(restored.iter().rev().copied())
    {
        if let Some(l) = remove_restored(podman, name, &ctx.ui).await {
            left.push(l);
        }
    }
    if left.is_empty() {
        return msg;
    }
    let names = left
        .iter()
        .map(|l| format!("{} ({}: {})", l.name, l.state, l.error))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "NOT removed on {} after the failed restore, so it may still exist or run there: {names}",
        ctx.hostname
    );
    ctx.ui.warn(&text);
    format!("{msg}; {text}")
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
    left_after_removal(podman, name, last).await
}

/// What podman shows of `name` after the attempts at removing it; `last` is the last
/// removal error (empty when podman said it removed it).
async fn left_after_removal(podman: &Podman, name: &str, last: String) -> Option<LeftOnTarget> {
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
