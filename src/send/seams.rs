//! The seams of a migration's end: the local container engine, the target host, the
//! clock, the run journal and the signals. The live implementations wrap podman, the
//! control connection with SSH beside it, the system clock, the watchdog's journal and
//! the signal handlers; the unit tests put doubles in their place to drive every order
//! of failures without root or a second host.
//!
//! The traits are used with static dispatch only, inside this crate: `async fn` in them
//! is fine (no `Send` bound is promised to other crates).
#![allow(async_fn_in_trait)]

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use crate::engine::podman::{CriuOptions, Podman, PodmanError};
use crate::hooks::{self, Hook, HookError, When};
use crate::journal::Phase;
use crate::preflight::Control;
use crate::progress::Ui;
use crate::protocol::{Manifest, TargetOutcome, ToReceiver, ToSender};
use crate::rundir::PID_FILE;
use crate::settle::{self, NotClean, Settled};
use crate::signals::Signals;
use crate::transport::ssh::{Destination, Ssh, SshError, remote_join};

use super::{REMOTE_TIMEOUT, SHIP_TIMEOUT};

/// The container engine on this host, as rollback and commit use it.
pub trait Engine {
    /// Whether the container runs here; `Err` when the engine cannot tell.
    async fn running(&self, name: &str) -> Result<bool, PodmanError>;
    /// Restores the container from the checkpoint the engine kept of it.
    async fn restore_in_place(&self, name: &str, opts: CriuOptions) -> Result<(), PodmanError>;
    /// Restores a container from an archive (a pod's member into that pod, by ID).
    async fn restore_import(
        &self,
        archive: &Path,
        opts: CriuOptions,
        pod: Option<&str>,
    ) -> Result<(), PodmanError>;
    /// Removes the container (whatever its state).
    async fn remove(&self, name: &str) -> Result<(), PodmanError>;
    /// Removes a pod with its infra container and whatever is left in it.
    async fn remove_pod(&self, name: &str) -> Result<(), PodmanError>;
}

impl Engine for Podman {
    async fn running(&self, name: &str) -> Result<bool, PodmanError> {
        let found = self
            .inspect(std::slice::from_ref(&name.to_string()))
            .await?;
        Ok(found.first().is_some_and(|c| c.running))
    }

    async fn restore_in_place(&self, name: &str, opts: CriuOptions) -> Result<(), PodmanError> {
        Podman::restore_in_place(self, name, opts).await
    }

    async fn restore_import(
        &self,
        archive: &Path,
        opts: CriuOptions,
        pod: Option<&str>,
    ) -> Result<(), PodmanError> {
        Podman::restore_import(self, archive, opts, pod)
            .await
            .map(drop)
    }

    async fn remove(&self, name: &str) -> Result<(), PodmanError> {
        Podman::remove(self, name).await
    }

    async fn remove_pod(&self, name: &str) -> Result<(), PodmanError> {
        Podman::pod_remove(self, name).await
    }
}

/// The target host once the freeze has begun: its receiver on the control connection,
/// and SSH for everything the receiver cannot be trusted or reached for.
pub trait Target {
    /// Sends "OK" with the manifest: from here on the target decides.
    async fn send_ok(&mut self, manifest: &Manifest) -> anyhow::Result<()>;
    /// Waits for the receiver's verdict.
    async fn outcome(&mut self) -> anyhow::Result<TargetOutcome>;
    /// Tells the receiver to forget this run (best effort).
    async fn abort(&mut self, reason: &str, frozen: bool);
    /// Removes, over SSH, containers the receiver could not remove.
    async fn clean(&self, names: &[String], ui: &Ui) -> Result<(), NotClean>;
    /// Without the receiver's answer: finds out over SSH what the target holds, and
    /// makes it either fully restored or clean (see [`settle::over_ssh`]).
    async fn settle(
        &self,
        order: &[String],
        deadline: Instant,
        ui: &Ui,
    ) -> Result<Settled, SshError>;
    /// Copies a shipped archive back from the run folder there.
    async fn fetch_archive(&self, archive: &str, local: &Path) -> Result<(), SshError>;
    /// Removes the run folder there (the archives hold process memory).
    async fn forget_run(&self);
    /// Removes the receiver's pid file: the run is over for the watchdog.
    async fn release(&self);
    /// Runs the hooks of one point; hooks may run on either host.
    async fn hooks(&self, when: When) -> Result<(), HookError>;
    /// Where the target is, for advice the operator can paste.
    fn dest(&self) -> &Destination;
    /// The run folder there.
    fn run_dir(&self) -> &str;
}

/// The live target: the authenticated control connection and the SSH session.
pub struct LiveTarget<'a> {
    pub control: Control,
    pub ssh: &'a Ssh,
    pub dest: &'a Destination,
    pub remote_dir: &'a str,
    pub hooks: &'a [Hook],
    pub hook_env: &'a [(String, String)],
    pub hook_timeout: Duration,
}

impl<'a> LiveTarget<'a> {
    pub fn new(
        plan: &'a crate::plan::SendPlan,
        control: Control,
        ssh: &'a Ssh,
        remote_dir: &'a str,
        hook_env: &'a [(String, String)],
    ) -> LiveTarget<'a> {
        LiveTarget {
            control,
            ssh,
            dest: &plan.target.dest,
            remote_dir,
            hooks: &plan.hooks,
            hook_env,
            hook_timeout: plan.hook_timeout,
        }
    }
}

impl Target for LiveTarget<'_> {
    async fn send_ok(&mut self, manifest: &Manifest) -> anyhow::Result<()> {
        let frame = ToReceiver::Ready {
            manifest: manifest.clone(),
        };
        Ok(self.control.send(&frame).await?)
    }

    async fn outcome(&mut self) -> anyhow::Result<TargetOutcome> {
        loop {
            if let ToSender::Outcome(o) = self.control.recv().await? {
                return Ok(o);
            }
        }
    }

    async fn abort(&mut self, reason: &str, frozen: bool) {
        super::abort(&mut self.control, reason, frozen).await;
    }

    async fn clean(&self, names: &[String], ui: &Ui) -> Result<(), NotClean> {
        settle::clean(self.ssh, names, ui).await
    }

    async fn settle(
        &self,
        order: &[String],
        deadline: Instant,
        ui: &Ui,
    ) -> Result<Settled, SshError> {
        settle::over_ssh(self.ssh, self.remote_dir, order, deadline, ui).await
    }

    async fn fetch_archive(&self, archive: &str, local: &Path) -> Result<(), SshError> {
        let remote = remote_join(self.remote_dir, archive);
        self.ssh
            .download(&remote, local, SHIP_TIMEOUT)
            .await
            .map(drop)
    }

    async fn forget_run(&self) {
        let args = ["-rf".to_string(), self.remote_dir.to_string()];
        let _ = self.ssh.run("rm", &args, REMOTE_TIMEOUT).await;
    }

    async fn release(&self) {
        let args = ["-f".to_string(), remote_join(self.remote_dir, PID_FILE)];
        let _ = self.ssh.run("rm", &args, REMOTE_TIMEOUT).await;
    }

    async fn hooks(&self, when: When) -> Result<(), HookError> {
        let (list, env) = (self.hooks, self.hook_env);
        hooks::run_all(list, when, env, Some(self.ssh), self.hook_timeout).await
    }

    fn dest(&self) -> &Destination {
        self.dest
    }

    fn run_dir(&self) -> &str {
        self.remote_dir
    }
}

/// The wall clock, in µs since the epoch.
pub trait Clock {
    fn now_us(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> i64 {
        crate::timing::now_us()
    }
}

/// Where a run's phases are written down for `migrate recover` and the watchdog.
pub trait Journal {
    fn phase(&mut self, phase: Phase) -> anyhow::Result<()>;
}

impl Journal for crate::watchdog::Guard {
    fn phase(&mut self, phase: Phase) -> anyhow::Result<()> {
        crate::watchdog::Guard::phase(self, phase)
    }
}

/// The operator's signals.
pub trait Interrupts {
    /// How many arrived so far.
    fn count(&self) -> u64;
    /// Resolves when the next one arrives.
    async fn changed(&mut self);
}

impl Interrupts for Signals {
    fn count(&self) -> u64 {
        Signals::count(self)
    }

    async fn changed(&mut self) {
        Signals::changed(self).await
    }
}
