//! A guard that outlives the sender. Before anything is frozen, `send` writes the run
//! journal ([`crate::journal`]) and starts `migrate watchdog` (this binary again) in a
//! session of its own, holding the other end of a pipe. The sender updates the journal
//! at each phase and, when it ends, removes it and writes `released`. If the pipe closes
//! without that (the sender was killed, or crashed), the watchdog repairs the run at once
//! with the journal's last word, as `migrate recover` would: it thaws the cgroups,
//! lets a checkpoint podman is still writing finish, and brings the containers back from
//! their kept checkpoints, or (after "OK") asks the target over SSH. What it found and
//! did is written into the journal, for `migrate recover` to report.
//!
//! The normal path costs no downtime: the watchdog starts before the pre-sync, and each
//! phase change is one small file replaced (no fsync), the one before "OK" included.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::Args;

use crate::exit::Exit;
use crate::journal::{Entry, Journal, Phase, TargetRef, WatchdogNote};
use crate::plan::SendPlan;
use crate::progress::Ui;
use crate::timing::now_us;

/// How long the watchdog may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// What the sender writes when it no longer needs the watchdog.
const RELEASED: &str = "released";

/// Options of the hidden `migrate watchdog`.
#[derive(Debug, Args)]
pub struct WatchdogArgs {
    /// The run journal to act on when the sender goes away.
    #[arg(long, value_name = "FILE")]
    pub journal: PathBuf,
}

/// The sender's side: the journal it keeps and the watchdog it holds.
pub struct Guard {
    path: PathBuf,
    journal: Option<Journal>,
    child: Option<(Child, ChildStdin)>,
}

impl Guard {
    pub fn new(plan: &SendPlan) -> Guard {
        Guard {
            path: Journal::path_in(&plan.workdir, &plan.run_id),
            journal: None,
            child: None,
        }
    }

    /// Writes the journal (phase `prepared`) and starts the watchdog; returns once it
    /// holds the pipe. Nothing is frozen yet.
    pub async fn start(
        &mut self,
        plan: &SendPlan,
        containers: Vec<Entry>,
        pod: Option<&str>,
        local_dir: &Path,
        remote_dir: &str,
    ) -> anyhow::Result<String> {
        let mut j = first_journal(plan, containers, local_dir, remote_dir);
        j.pod = pod.map(str::to_string);
        j.save(&self.path)
            .with_context(|| format!("cannot write the run journal {}", self.path.display()))?;
        self.journal = Some(j);
        let log_path = Journal::watchdog_log(&self.path);
        let (child, stdin, stdout) = spawn(&self.path, &log_path)?;
        let pid = child.id();
        self.child = Some((child, stdin));
        if !ready(stdout).await {
            if let Some((mut c, _)) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            return Err(anyhow!(
                "the watchdog (pid {pid}) did not start; its log is {}",
                log_path.display()
            ));
        }
        let j = self.journal.as_mut().expect("set above");
        j.watchdog_pid = Some(pid);
        j.watchdog_start = crate::journal::start_time(pid);
        j.save(&self.path)
            .with_context(|| format!("cannot write the run journal {}", self.path.display()))?;
        Ok(format!(
            "run {}: journal {}, watchdog pid {pid} (repairs the run if this process dies; `migrate recover` shows it)",
            j.run_id,
            self.path.display()
        ))
    }

    /// Records a new phase: what a watchdog would act on if the sender died from here on.
    pub fn phase(&mut self, phase: Phase) -> anyhow::Result<()> {
        let Some(j) = self.journal.as_mut() else {
            return Ok(());
        };
        j.phase = phase;
        j.save(&self.path).with_context(|| {
            format!(
                "cannot record phase {} in the run journal {}",
                phase.as_str(),
                self.path.display()
            )
        })
    }

    /// The sender ends: the journal goes unless the run needs `migrate recover`
    /// (`keep`), and the watchdog is released either way.
    pub fn end(mut self, keep: bool) {
        if self.journal.is_some() && !keep {
            Journal::remove(&self.path);
        }
        if let Some((child, mut stdin)) = self.child.take() {
            let _ = writeln!(stdin, "{RELEASED}");
            drop(stdin);
            // Not waited for: it exits by itself, and this process is about to.
            drop(child);
        }
    }
}

/// The journal of a run about to start: phase `prepared`, no watchdog yet.
fn first_journal(
    plan: &SendPlan,
    containers: Vec<Entry>,
    local_dir: &Path,
    remote_dir: &str,
) -> Journal {
    let me = std::process::id();
    Journal {
        run_id: plan.run_id.clone(),
        phase: Phase::Prepared,
        sender_pid: me,
        sender_start: crate::journal::start_time(me).unwrap_or_default(),
        watchdog_pid: None,
        watchdog_start: None,
        started_us: now_us(),
        source: crate::host::hostname(),
        target: TargetRef::from(&plan.target.dest),
        remote_dir: remote_dir.to_string(),
        local_dir: local_dir.to_path_buf(),
        containers,
        pod: None,
        watchdog: None,
    }
}

/// Starts `migrate watchdog` for the journal at `journal`, its stderr into `log_path`
/// (a new private file); returns it with the two ends of its pipe.
fn spawn(journal: &Path, log_path: &Path) -> anyhow::Result<(Child, ChildStdin, ChildStdout)> {
    let log = crate::rundir::create_new_private(log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    // /proc/self/exe: this very binary, even if the file was replaced since.
    let mut child = Command::new("/proc/self/exe")
        .arg("watchdog")
        .arg("--journal")
        .arg(journal)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("cannot start the watchdog (`migrate watchdog`)")?;
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    Ok((child, stdin, stdout))
}

/// True once the watchdog said `ready` (within [`READY_TIMEOUT`]).
async fn ready(stdout: ChildStdout) -> bool {
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line)
    });
    matches!(
        tokio::time::timeout(READY_TIMEOUT, line).await,
        Ok(Ok(Ok(l))) if l.trim() == "ready"
    )
}

/// `migrate watchdog --journal FILE`: waits for the sender to release it or to die.
pub async fn run(args: WatchdogArgs) -> u8 {
    // A session of its own: a signal to the sender's terminal or process group, or the
    // terminal going away, does not reach it.
    let _ = rustix::process::setsid();
    {
        let mut out = std::io::stdout().lock();
        if writeln!(out, "ready").and_then(|()| out.flush()).is_err() {
            // The sender is gone before the watchdog started: it never relied on it.
            return Exit::Refused.code();
        }
    }
    let ui = Arc::new(Ui::new("watchdog"));
    ui.info(&format!(
        "watching the sender of {}",
        args.journal.display()
    ));
    if released().await {
        ui.info("released by the sender");
        return Exit::Ok.code();
    }
    let j = match Journal::load(&args.journal) {
        Ok(j) => j,
        Err(e) => {
            // The sender removed its journal and died before it could say so.
            ui.info(&format!("the sender went away; no journal to act on ({e})"));
            return Exit::Ok.code();
        }
    };
    repair(j, &args.journal, &ui).await
}

/// Waits on the pipe: true when the sender wrote `released`, false when the pipe closed
/// without it (the sender died).
async fn released() -> bool {
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let stdin = std::io::stdin();
        let mut lock = stdin.lock();
        loop {
            line.clear();
            match lock.read_line(&mut line) {
                Ok(0) | Err(_) => return false,
                Ok(_) if line.trim() == RELEASED => return true,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// Repairs the run of a sender that died, and writes what it found and did into the
/// journal (at `path`) for `migrate recover` to report.
async fn repair(mut j: Journal, path: &Path, ui: &Arc<Ui>) -> u8 {
    ui.warn(&format!(
        "the sender (pid {}) went away in phase {}: repairing",
        j.sender_pid,
        j.phase.as_str()
    ));
    let report = crate::recover::repair(&j, crate::recover::Mode::Watchdog, ui).await;
    ui.info(&format!(
        "{}: found {}; did {}; {}",
        report.result.as_str(),
        report.found.join(" "),
        if report.actions.is_empty() {
            "nothing".to_string()
        } else {
            report.actions.join("; ")
        },
        report.detail
    ));
    j.watchdog = Some(WatchdogNote {
        at_us: now_us(),
        result: report.result.as_str().to_string(),
        runs_on: report.runs_on,
        found: report.found,
        actions: report.actions,
        detail: report.detail,
    });
    if let Err(e) = j.save(path) {
        ui.warn(&format!("cannot record what was done: {e}"));
        return Exit::Failed.code();
    }
    Exit::Ok.code()
}
