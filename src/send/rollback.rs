//! Rolling back: every container of the migration runs on this host again, or the
//! failure names each one that does not, with the commands that can still bring it back.

use anyhow::anyhow;

use crate::engine::podman::{self, CriuOptions};
use crate::exit::Exit;
use crate::hooks::When;
use crate::transport::ssh::Destination;

use super::finish::End;
use super::seams::{Clock, Engine, Target};
use super::{Item, SendFailure};

impl<E: Engine, T: Target, C: Clock> End<'_, E, T, C> {
    /// Brings the containers back on this host. Returns the failure to report: rolled
    /// back when every container runs again here, failed otherwise.
    pub(super) async fn roll_back(
        &mut self,
        checkpointed: &[Item],
        cause: anyhow::Error,
    ) -> SendFailure {
        self.ui
            .warn(&format!("{cause:#}; rolling back on this host"));
        let mut problems = Vec::new();
        for it in checkpointed {
            let back = match &it.lazy {
                Some(l) => {
                    self.ui.phase(&format!(
                        "rolling back: stopping {}'s page server, its tasks run on",
                        it.info.name
                    ));
                    l.resume(it.info.pid, self.ui)
                        .await
                        .map_err(|e| format!("{}: {e}", it.info.name))
                }
                None => self.bring_back(it).await,
            };
            if let Err(p) = back {
                problems.push(p);
            }
        }
        for it in self.items {
            if !checkpointed.iter().any(|c| c.info.name == it.info.name)
                && let Err(p) = self.revive(it).await
            {
                problems.push(p);
            }
        }
        self.ui
            .phase("rolling back: checking that every container runs here");
        for it in self.items {
            let name = &it.info.name;
            if problems.iter().any(|p| p.starts_with(&format!("{name}:"))) {
                continue;
            }
            if let Err(p) = self.ensure_running(it, checkpointed).await {
                problems.push(p);
            }
        }
        if !problems.is_empty() {
            return SendFailure {
                exit: Exit::Failed,
                error: cause.context(format!(
                    "migration failed AND the rollback failed ({}); the archives are kept on the target in {}",
                    problems.join("; "),
                    self.target.run_dir()
                )),
            };
        }
        // The archives on the target are not needed any more (they hold process memory);
        // after a failed rollback they stay, as a way back.
        self.ui
            .phase("rolled back: removing the archives on the target, rollback hooks");
        self.target.forget_run().await;
        if let Err(e) = self.target.hooks(When::Rollback).await {
            self.ui.warn(&e.to_string());
        }
        for it in checkpointed {
            let _ = std::fs::remove_file(&it.local_archive);
        }
        SendFailure {
            exit: Exit::RolledBack,
            error: cause.context("migration failed; the containers run on this host again"),
        }
    }

    /// After UP, the pages did not all reach the target: its receiver stops its copy
    /// (a container with missing pages must not run), and the source's tasks, whose
    /// memory is whole here, run on from DOWN.
    pub(super) async fn window_failed(&mut self, e: anyhow::Error) -> SendFailure {
        let mut problems = Vec::new();
        for it in self.items {
            if let Some(l) = &it.lazy
                && let Err(p) = l.resume(it.info.pid, self.ui).await
            {
                problems.push(format!("{}: {p}", it.info.name));
            }
        }
        if problems.is_empty() {
            return SendFailure {
                exit: Exit::RolledBack,
                error: e.context(
                    "the post-copy window failed: the target stops its copy, the containers run on this host again from their state at DOWN (what they changed on the target since UP is lost)",
                ),
            };
        }
        SendFailure {
            exit: Exit::Failed,
            error: e.context(format!(
                "the post-copy window failed, and the containers could not run on here: {}",
                problems.join("; ")
            )),
        }
    }

    /// A checkpointed container, back here. With its connections kept and an address
    /// of its own, that address is guarded during the restore and announced after it,
    /// as on the target (this host's namespace for it is a new one too).
    async fn bring_back(&mut self, it: &Item) -> Result<(), String> {
        let kept: Vec<&crate::protocol::AddressEntry> = match it.opts.tcp_established {
            true => it.addresses.iter().collect(),
            false => Vec::new(),
        };
        let tag = format!("rollback_{}", it.info.name);
        let guard = crate::engine::address::guard_for(&tag, &kept, self.ui).await;
        let back = self.restore_here(it).await;
        crate::engine::address::unguard(guard, self.ui).await;
        if back.is_ok() {
            crate::engine::address::announce_container(&it.info.name, &it.addresses, self.ui).await;
        }
        back
    }

    /// From the checkpoint podman kept, failing that from its archive fetched back from
    /// the target (complete there once it was shipped).
    async fn restore_here(&mut self, it: &Item) -> Result<(), String> {
        let name = &it.info.name;
        self.ui
            .phase(&format!("rolling back: restoring {name} on this host"));
        let Err(in_place) = self.engine.restore_in_place(name, it.opts).await else {
            self.ui
                .info(&format!("{name} restored here from its kept checkpoint"));
            return Ok(());
        };
        self.ui.warn(&format!(
            "{name}: restoring it from its kept checkpoint failed: {in_place}; fetching its archive back from the target"
        ));
        self.ui.phase(&format!(
            "rolling back: fetching {name}'s archive back from the target to restore it here"
        ));
        let again = async {
            self.target
                .fetch_archive(&it.archive_name, &it.local_archive)
                .await
                .map_err(|e| {
                    (
                        Stuck::Fetching,
                        anyhow!(e).context("fetching the archive back from the target"),
                    )
                })?;
            self.engine
                .remove(name)
                .await
                .map_err(|e| (Stuck::Removing, anyhow!(e)))?;
            self.engine
                .restore_import(
                    &it.local_archive,
                    it.opts,
                    Some(it.info.pod.as_str()).filter(|p| !p.is_empty()),
                )
                .await
                .map_err(|e| (Stuck::Importing, anyhow!(e)))?;
            Ok::<_, (Stuck, anyhow::Error)>(())
        };
        match again.await {
            Ok(()) => {
                self.ui.info(&format!(
                    "{name} restored here from its archive, fetched back from the target"
                ));
                Ok(())
            }
            Err((stuck, e)) => {
                let remote =
                    crate::transport::ssh::remote_join(self.target.run_dir(), &it.archive_name);
                let way = WayBack {
                    name,
                    opts: it.opts,
                    local: &it.local_archive,
                    dest: self.target.dest(),
                    remote: &remote,
                    pod: Some(it.info.pod.as_str()).filter(|p| !p.is_empty()),
                };
                Err(format!("{name}: {e:#} ({})", rollback_advice(stuck, &way)))
            }
        }
    }

    /// A container whose checkpoint failed normally runs on: podman or CRIU refused
    /// before the dump (CRIU resumes what it froze; `send`'s own freeze was undone), and it
    /// is the very same container and processes. podman can also fail after CRIU's dump
    /// has stopped it (podman 4.3 refuses to export a container with dependencies only
    /// then, the container Exited 137): then the checkpoint podman kept brings it back, as
    /// the same container.
    async fn revive(&mut self, it: &Item) -> Result<(), String> {
        let name = &it.info.name;
        if let Some(f) = &it.freezer {
            // Thawed already when its checkpoint failed; a cgroup that is gone is nothing
            // to thaw.
            let _ = f.thaw();
        }
        match self.engine.running(name).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(format!("{name}: cannot tell whether it runs: {e}")),
        }
        match self.engine.restore_in_place(name, it.opts).await {
            Ok(()) => {
                self.ui.info(&format!(
                    "{name}: its checkpoint failed after CRIU's dump had stopped it; restored here from the checkpoint podman kept"
                ));
                Ok(())
            }
            Err(e) => Err(format!(
                "{name}: stopped by a checkpoint that failed, and restoring it from the checkpoint podman kept failed: {e} (once the cause is fixed: `{}`; failing that `podman start {}` starts it afresh, its memory state lost)",
                crate::exec::display_command(
                    "podman",
                    &podman::restore_in_place_args(name, it.opts)
                ),
                crate::exec::shell_quote(name)
            )),
        }
    }

    /// Whatever was restored, every container must run now. One whose dump was over when
    /// its archive's stream broke (a full disk on the target) is gone: its kept
    /// checkpoint brings it back.
    async fn ensure_running(&mut self, it: &Item, checkpointed: &[Item]) -> Result<(), String> {
        let name = &it.info.name;
        if self.engine.running(name).await.unwrap_or(false) {
            return Ok(());
        }
        if !checkpointed.iter().any(|c| &c.info.name == name)
            && self.engine.restore_in_place(name, it.opts).await.is_ok()
            && self.engine.running(name).await.unwrap_or(false)
        {
            self.ui.info(&format!(
                "{name} restored here from its kept checkpoint (its dump was over when its checkpoint failed)"
            ));
            return Ok(());
        }
        Err(format!("{name}: not running after the rollback"))
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
    dest: &'a Destination,
    /// The archive on the target.
    remote: &'a str,
    /// The ID of the pod here that the container belongs to.
    pod: Option<&'a str>,
}

/// What the operator can run to bring a container back by hand after a failed rollback:
/// only commands that can still work at the point where it failed.
fn rollback_advice(stuck: Stuck, w: &WayBack<'_>) -> String {
    use crate::exec::{display_command, shell_quote};
    let in_place = display_command("podman", &podman::restore_in_place_args(w.name, w.opts));
    let import_args: Vec<String> = podman::restore_import_args(w.local, w.opts, w.pod)
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
            pod: None,
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
}
