//! After the freeze: "OK" and the target's answer (or, without one, what SSH finds
//! there), then commit or roll back. Everything here acts through the [`seams`], so the
//! unit tests can drive each target outcome against each failure point.
//!
//! [`seams`]: super::seams

use std::path::Path;

use anyhow::anyhow;

use crate::engine::podman;
use crate::exit::Exit;
use crate::hooks::When;
use crate::journal::Phase;
use crate::progress::Ui;
use crate::protocol::{Manifest, TargetOutcome};
use crate::settle::Settled;
use crate::timing::{Record, Stopwatch};

use super::seams::{Clock, Engine, Interrupts, Journal, Target};
use super::{Item, SendFailure, stranded};
use crate::settle::RESTORE_TIMEOUT;

/// What the freeze produced.
pub enum Froze {
    /// Every archive is complete on the target and the data folders are in sync.
    Shipped {
        manifest: Manifest,
        checkpointed: Vec<Item>,
    },
    /// Something failed while frozen: nothing may be restored there.
    Failed {
        checkpointed: Vec<Item>,
        error: anyhow::Error,
    },
}

/// What the end of a migration acts on.
pub struct End<'a, E, T, C> {
    pub engine: &'a E,
    pub target: &'a mut T,
    pub clock: &'a C,
    pub ui: &'a Ui,
    /// Every container of the migration.
    pub items: &'a [Item],
    /// This run's folder here.
    pub local_dir: &'a Path,
    /// Target clock minus source clock (µs).
    pub offset_us: i64,
    /// Whether post-up hooks are configured (they run before the source is retired).
    pub post_up_hooks: bool,
    /// The pod the containers moved as: removed here with its infra at commit.
    pub pod: Option<&'a str>,
}

/// A stop before the freeze: the receiver forgets the run, nothing here was touched.
pub async fn refuse(target: &mut impl Target, why: &str, error: anyhow::Error) -> SendFailure {
    target.abort(why, false).await;
    super::refuse(error)
}

/// From the end of the freeze to the end of the run. `Ok` means the target runs the
/// service and the source has retired it.
pub async fn conclude<E: Engine, T: Target, C: Clock>(
    end: &mut End<'_, E, T, C>,
    froze: Froze,
    journal: &mut impl Journal,
    interrupts: &mut impl Interrupts,
    rec: &mut Record,
) -> Result<(), SendFailure> {
    let (manifest, checkpointed) = match froze {
        Froze::Shipped {
            manifest,
            checkpointed,
        } => (manifest, checkpointed),
        Froze::Failed {
            checkpointed,
            error,
        } => return Err(end.fail_frozen(&checkpointed, error).await),
    };
    // Before "OK" leaves: from here a watchdog must ask the target, never restore blindly.
    if let Err(e) = journal.phase(Phase::OkSent) {
        return Err(end.fail_frozen(&checkpointed, e).await);
    }
    let outcome = end
        .handover(&manifest, &checkpointed, interrupts, rec)
        .await?;
    rec.restore_s = Some(outcome.restore_s);
    rec.criu_restore_s = outcome.criu_restore_s;
    rec.verify_s = Some(outcome.verify_s);
    if !outcome.restored {
        let why = outcome
            .error
            .unwrap_or_else(|| "the target did not restore".into());
        if let Err(e) = journal.phase(Phase::RollingBack) {
            end.ui.warn(&format!("{e:#}"));
        }
        return Err(end.roll_back(&checkpointed, anyhow!(why)).await);
    }
    if let Err(e) = journal.phase(Phase::Committing) {
        end.ui.warn(&format!("{e:#}"));
    }
    let up_target = outcome
        .up_us
        .unwrap_or_else(|| end.clock.now_us() + end.offset_us);
    rec.up_us = Some(up_target - end.offset_us);
    rec.target_total_s = Some(crate::timing::secs_between(outcome.ready_us, up_target));
    end.ui.info(&format!(
        "UP on {}: downtime {:.3}s",
        end.target.dest().host,
        rec.downtime_s().unwrap_or_default()
    ));
    if end.items.iter().any(|it| it.lazy.is_some())
        && let Err(e) = end.lazy_window(rec).await
    {
        return Err(end.window_failed(e).await);
    }
    end.commit(rec).await;
    Ok(())
}

impl<E: Engine, T: Target, C: Clock> End<'_, E, T, C> {
    /// A failure while frozen: the receiver forgets the run, the source takes the
    /// service back.
    async fn fail_frozen(&mut self, checkpointed: &[Item], error: anyhow::Error) -> SendFailure {
        self.ui
            .phase("rolling back: waiting for podman to end its checkpoints");
        self.target.abort("failed while frozen", true).await;
        self.roll_back(checkpointed, error).await
    }

    /// "OK", then the target's verdict. Without one (the connection lost, or no answer in
    /// time) SSH finds out, and leaves the target either fully restored or clean. The
    /// returned outcome is one the source can act on; a target that could not be made
    /// clean is a failure here, with nothing restored on the source.
    async fn handover(
        &mut self,
        manifest: &Manifest,
        checkpointed: &[Item],
        interrupts: &mut impl Interrupts,
        rec: &mut Record,
    ) -> Result<TargetOutcome, SendFailure> {
        // Dependencies first: the order to restore by hand, should it come to that.
        let order: Vec<String> = manifest.containers.iter().map(|c| c.name.clone()).collect();
        let control_sw = Stopwatch::start();
        let deadline = tokio::time::Instant::now() + RESTORE_TIMEOUT;
        let answer = self.answer(manifest, interrupts).await;
        rec.control_s = Some(control_sw.secs());
        let settled = match answer {
            Ok(o) if !o.restored && !o.left_on_target.is_empty() => self.clean_after(o).await,
            Ok(o) => Settled::Restored(o),
            Err(e) => {
                self.ui.warn(&format!("{e:#}; asking the target over SSH"));
                self.target
                    .settle(&order, deadline, self.ui)
                    .await
                    .map_err(|e| stranded(anyhow!(e).context("asking the target over SSH")))?
            }
        };
        match settled {
            Settled::Restored(o) | Settled::Clean(o) => Ok(o),
            Settled::NotClean(nc, why) => Err(self.not_clean(&nc, why, &order, checkpointed)),
        }
    }

    /// Sends "OK" and waits for the verdict; a first signal meanwhile is ignored (with a
    /// word), later ones are answered by the signal handler itself.
    async fn answer(
        &mut self,
        manifest: &Manifest,
        interrupts: &mut impl Interrupts,
    ) -> anyhow::Result<TargetOutcome> {
        let ui = self.ui;
        let target = &mut *self.target;
        let exchange = async {
            let lost = |e: anyhow::Error| e.context("control connection lost after OK");
            target.send_ok(manifest).await.map_err(lost)?;
            // Said once the frame is on its way (a test kills the sender at this line).
            ui.phase("OK sent; target restoring");
            target.outcome().await.map_err(lost)
        };
        let mut exchange = std::pin::pin!(tokio::time::timeout(RESTORE_TIMEOUT, exchange));
        loop {
            tokio::select! {
                a = &mut exchange => {
                    return a.unwrap_or_else(|_| Err(anyhow!("no answer from the target in time")));
                }
                _ = interrupts.changed() => if interrupts.count() == 1 {
                    ui.warn("signal ignored: the target is restoring; stopping now could lose the service");
                },
            }
        }
    }

    /// The receiver could not remove what it had restored: once more over SSH, then look.
    /// Nothing is restored here while any of it may be there.
    async fn clean_after(&mut self, o: TargetOutcome) -> Settled {
        let names: Vec<String> = o.left_on_target.iter().map(|l| l.name.clone()).collect();
        self.ui.warn(&format!(
            "the target could not remove {} after its failed restore; trying over SSH",
            names.join(", ")
        ));
        match self.target.clean(&names, self.ui).await {
            Ok(()) => Settled::Clean(o),
            Err(nc) => Settled::NotClean(nc, o.error),
        }
    }

    /// The target may hold part of the service: one message that ends with what to do.
    fn not_clean(
        &self,
        nc: &crate::settle::NotClean,
        why: Option<String>,
        order: &[String],
        checkpointed: &[Item],
    ) -> SendFailure {
        let restore_here: Vec<String> = order
            .iter()
            .filter_map(|n| checkpointed.iter().find(|it| &it.info.name == n))
            .map(|it| {
                let args = podman::restore_in_place_args(&it.info.name, it.opts);
                crate::exec::display_command("podman", &args)
            })
            .collect();
        let report = crate::settle::not_clean_report(
            nc,
            &self.target.dest().ssh_target(),
            &crate::host::hostname(),
            order,
            &restore_here,
            self.target.run_dir(),
        );
        let why = why.unwrap_or_else(|| "the target did not restore".into());
        SendFailure {
            exit: Exit::Failed,
            error: anyhow!("migration failed ({why}); {report}"),
        }
    }

    /// The target runs the service: post-up hooks first (traffic moves the moment UP is
    /// confirmed), then the source retires its containers.
    async fn commit(&mut self, rec: &mut Record) {
        if self.post_up_hooks {
            self.ui.phase("post-up hooks");
            let took = crate::timing::Stopwatch::start();
            match self.target.hooks(When::PostUp).await {
                Ok(()) => self
                    .ui
                    .info(&format!("post-up hooks done in {:.3}s", took.secs())),
                Err(e) => {
                    self.ui
                        .warn(&format!("{e}; the migration itself succeeded"));
                    rec.error = e.to_string();
                }
            }
        }
        for it in self.items {
            if let Err(e) = self.engine.remove(&it.info.name).await {
                self.ui.warn(&format!(
                    "{} runs on the target now, but removing it here failed: {e}",
                    it.info.name
                ));
            }
        }
        if let Some(pod) = self.pod
            && let Err(e) = self.engine.remove_pod(pod).await
        {
            self.ui.warn(&format!(
                "pod {pod} runs on the target now, but removing it here failed: {e}"
            ));
        }
        let _ = std::fs::remove_dir_all(self.local_dir);
        self.target.release().await;
    }
}
