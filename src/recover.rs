//! `migrate recover`: what `send` runs that died left behind on this (source) host, and
//! its repair. The same repair runs in the watchdog the moment a sender dies
//! ([`crate::watchdog`]); `recover` is for what the watchdog could not settle (the target
//! unreachable, the watchdog itself killed) and reports every such run either way.
//!
//! The rule is `send`'s: the service ends up running on exactly one host. The journal's
//! phase says who may decide. Before "OK" the target never restores, so the containers
//! come back here; after "OK" only the target's state (over SSH) decides, and when it
//! cannot be learnt nothing is restored.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::engine::podman::{Podman, PodmanError};
use crate::exit::Exit;
use crate::journal::{Journal, Phase};
use crate::progress::Ui;
use crate::settle::Settled;
use crate::timing::Format;
use crate::timing::OutputArgs;
use crate::transport::ssh::{Destination, Ssh};

/// Options of `migrate recover`.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// The work folder `send` used; its run journals are in DIR/source-runs.
    #[arg(
        long,
        value_name = "DIR",
        default_value = crate::rundir::DEFAULT_WORKDIR,
        env = "MIGRATE_WORKDIR"
    )]
    pub workdir: PathBuf,

    /// Only list what each run left; change nothing.
    #[arg(long)]
    pub list: bool,

    /// Only the run with this id.
    #[arg(long, value_name = "RUN_ID")]
    pub run: Option<String>,

    #[command(flatten)]
    pub output: OutputArgs,
}

/// How a run stands after `recover` (or the watchdog) looked at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Nothing was left to repair.
    Clean,
    /// Something was left and is repaired: the service runs on one host.
    Repaired,
    /// Its sender (or its watchdog) still runs: not touched.
    InProgress,
    /// The target's state could not be learnt: nothing was restored.
    Undetermined,
    /// A repair failed: see the detail.
    Failed,
    /// `--list`: what was found, nothing changed.
    Listed,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Clean => "clean",
            Verdict::Repaired => "repaired",
            Verdict::InProgress => "in_progress",
            Verdict::Undetermined => "undetermined",
            Verdict::Failed => "failed",
            Verdict::Listed => "listed",
        }
    }
}

/// One record per run on stdout.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub phase: String,
    pub started: String,
    pub source: String,
    pub target: String,
    pub containers: Vec<String>,
    /// `running` or `gone`.
    pub sender: String,
    /// `none`, `running`, `gone`, or what it did: `done:<result>`.
    pub watchdog: String,
    /// Each container as found here: `db=running`, `web=frozen`, `web=exited` …
    pub found: Vec<String>,
    pub actions: Vec<String>,
    pub result: Verdict,
    /// `source`, `target`, `nowhere` or `unknown`.
    pub runs_on: String,
    pub detail: String,
}

impl RunReport {
    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("run_id", self.run_id.clone()),
            ("phase", self.phase.clone()),
            ("started", self.started.clone()),
            ("source", self.source.clone()),
            ("target", self.target.clone()),
            ("containers", self.containers.join(" ")),
            ("sender", self.sender.clone()),
            ("watchdog", self.watchdog.clone()),
            ("found", self.found.join(" ")),
            ("actions", self.actions.join("; ")),
            ("result", self.result.as_str().to_string()),
            ("runs_on", self.runs_on.clone()),
            ("detail", self.detail.clone()),
        ]
    }

    /// Writes the record as CSV (header unless `no_header`) or one JSON line.
    pub fn write(
        &self,
        out: &mut dyn std::io::Write,
        format: Format,
        header: bool,
    ) -> std::io::Result<()> {
        match format {
            Format::Csv => {
                let mut w = csv::Writer::from_writer(out);
                let f = self.fields();
                if header {
                    w.write_record(f.iter().map(|(n, _)| *n))?;
                }
                w.write_record(f.iter().map(|(_, v)| v))?;
                w.flush()
            }
            Format::Json => {
                serde_json::to_writer(&mut *out, self)?;
                writeln!(out)
            }
        }
    }
}

/// Who runs the repair: the watchdog right after the sender died, or `recover`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Watchdog,
    Recover,
    List,
}

/// How long podman checkpoints the sender left may take to finish (their archives drained
/// here) before the repair goes on without them.
const PODMAN_DRAIN_LIMIT: Duration = Duration::from_secs(600);
const SSH_TIMEOUT: Duration = Duration::from_secs(15);
const REMOTE_TIMEOUT: Duration = Duration::from_secs(60);

/// The state of one container here.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Local {
    Running,
    /// Its cgroup is frozen.
    Frozen,
    /// It exists and does not run (podman's status: `exited`, `stopped` …).
    Stopped(String),
    Absent,
    /// podman could not say.
    Unknown(String),
}

impl Local {
    fn word(&self) -> String {
        match self {
            Local::Running => "running".into(),
            Local::Frozen => "frozen".into(),
            Local::Stopped(s) => s.clone(),
            Local::Absent => "absent".into(),
            Local::Unknown(_) => "unknown".into(),
        }
    }
}

async fn local_state(podman: &Podman, j: &Journal, i: usize) -> Local {
    let c = &j.containers[i];
    if c.freezer.as_ref().is_some_and(|f| f.is_frozen()) {
        return Local::Frozen;
    }
    match podman.inspect(std::slice::from_ref(&c.name)).await {
        Ok(v) => match v.first() {
            Some(i) if i.running => Local::Running,
            Some(i) => Local::Stopped(i.status.clone()),
            None => Local::Absent,
        },
        Err(PodmanError::NoSuchContainer(_)) => Local::Absent,
        Err(e) => Local::Unknown(e.to_string()),
    }
}

/// The pids of podman processes still exporting into one of `fifos` (their command line
/// names the FIFO); zombies do not count.
fn exporters(fifos: &[PathBuf]) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let wanted: Vec<Vec<u8>> = fifos
        .iter()
        .map(|f| f.as_os_str().as_encoded_bytes().to_vec())
        .collect();
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let hit = cmd
                .split(|&b| b == 0)
                .any(|a| wanted.iter().any(|w| w == a));
            hit && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rfind(')')
                        .map(|i| s[i + 1..].split_whitespace().next() != Some("Z"))
                })
                .unwrap_or(false)
        })
        .collect()
}

/// Reads away what podman processes the dead sender left still export into the run's
/// FIFOs, until they are gone: with nobody reading, podman would wait forever to open its
/// FIFO (holding the container's lock), or fail half-way. Returns what happened.
fn drain_exports(fifos: &[PathBuf], limit: Duration) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    if exporters(fifos).is_empty() {
        return None;
    }
    let started = Instant::now();
    let mut open: Vec<std::fs::File> = fifos
        .iter()
        .filter_map(|f| {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
                .open(f)
                .ok()
        })
        .collect();
    let mut buf = vec![0u8; 1 << 20];
    let mut drained = 0u64;
    loop {
        for f in &mut open {
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                drained += n as u64;
            }
        }
        if exporters(fifos).is_empty() {
            return Some(format!(
                "waited {:.1}s for podman's checkpoint to end (read away {drained} bytes of its export)",
                started.elapsed().as_secs_f64()
            ));
        }
        if started.elapsed() > limit {
            return Some(format!(
                "podman's checkpoint still runs after {}s; going on without it",
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn watchdog_word(j: &Journal) -> String {
    match (&j.watchdog, j.watchdog_pid, j.watchdog_start) {
        (Some(n), _, _) => format!("done:{}", n.result),
        (None, Some(pid), Some(start)) if crate::journal::alive(pid, start) => "running".into(),
        (None, Some(_), _) => "gone".into(),
        (None, None, _) => "none".into(),
    }
}

fn base_report(j: &Journal) -> RunReport {
    let sender = if crate::journal::alive(j.sender_pid, j.sender_start) {
        "running"
    } else {
        "gone"
    };
    RunReport {
        run_id: j.run_id.clone(),
        phase: j.phase.as_str().into(),
        started: chrono::DateTime::from_timestamp_micros(j.started_us)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default(),
        source: j.source.clone(),
        target: Destination::from(&j.target).ssh_target(),
        containers: j.containers.iter().map(|c| c.name.clone()).collect(),
        sender: sender.into(),
        watchdog: watchdog_word(j),
        found: Vec::new(),
        actions: Vec::new(),
        result: Verdict::Clean,
        runs_on: "unknown".into(),
        detail: String::new(),
    }
}

/// Looks at what the run left here and repairs it (unless `mode` is [`Mode::List`]).
pub async fn repair(j: &Journal, mode: Mode, ui: &Arc<Ui>) -> RunReport {
    let mut r = base_report(j);
    if mode != Mode::Watchdog
        && let Some(detail) = still_running(j, &r)
    {
        r.result = Verdict::InProgress;
        r.detail = detail;
        return r;
    }
    let podman = Podman;
    if mode == Mode::List {
        return list(&podman, j, r).await;
    }
    thaw(j, &mut r);
    let_exports_finish(j, &mut r).await;
    let states = look_here(&podman, j, &mut r).await;
    settle(&podman, j, &states, &mut r, ui).await;
    // Undetermined: what runs on the target is unknown, so everything stays as it is.
    if r.result != Verdict::Undetermined {
        remove_leftovers(j, &mut r).await;
    }
    r
}

/// Who of the run is still alive (its sender, or its watchdog), said so; `None` when
/// both are gone.
fn still_running(j: &Journal, r: &RunReport) -> Option<String> {
    if r.sender == "running" {
        Some(format!(
            "its sender (pid {}) still runs; nothing touched",
            j.sender_pid
        ))
    } else if r.watchdog == "running" {
        Some(format!(
            "its watchdog (pid {}) still runs; nothing touched",
            j.watchdog_pid.unwrap_or_default()
        ))
    } else {
        None
    }
}

/// `--list`: what the run left here, and what its phase means; nothing changes.
async fn list(podman: &Podman, j: &Journal, mut r: RunReport) -> RunReport {
    r.result = Verdict::Listed;
    let fifos: Vec<PathBuf> = j.containers.iter().map(|c| c.fifo.clone()).collect();
    if !exporters(&fifos).is_empty() {
        r.found.push("podman-still-checkpointing".into());
        r.detail = "podman's checkpoint of this run still runs".into();
        return r;
    }
    let states = look_here(podman, j, &mut r).await;
    r.runs_on = where_from_local(&states);
    r.detail = match j.phase {
        Phase::Prepared => "died before the freeze".into(),
        Phase::Checkpointing => {
            "died after the freeze began, before \"OK\": the containers belong here".into()
        }
        Phase::OkSent => "died after \"OK\": the target's state decides".into(),
        Phase::Committing => "died while removing the containers here; the target runs them".into(),
        Phase::RollingBack => "died while restoring the containers here".into(),
    };
    r
}

/// Nothing stays frozen: from the freeze on, every cgroup `send` may have frozen is
/// thawed (before it, `send` froze nothing, and a freeze is somebody else's).
fn thaw(j: &Journal, r: &mut RunReport) {
    if j.phase < Phase::Checkpointing {
        return;
    }
    for c in &j.containers {
        if let Some(f) = &c.freezer
            && f.is_frozen()
        {
            match f.thaw() {
                Ok(()) => r.actions.push(format!("thawed {}", c.name)),
                Err(e) => r.actions.push(format!("thawing {} failed: {e}", c.name)),
            }
        }
    }
}

/// podman checkpoints still exporting to a reader that died are let finish.
async fn let_exports_finish(j: &Journal, r: &mut RunReport) {
    let fifos: Vec<PathBuf> = j.containers.iter().map(|c| c.fifo.clone()).collect();
    let waited = tokio::task::spawn_blocking(move || drain_exports(&fifos, PODMAN_DRAIN_LIMIT))
        .await
        .ok()
        .flatten();
    if let Some(w) = waited {
        r.actions.push(w);
    }
}

/// The state of each container here, also written into the report's `found`.
async fn look_here(podman: &Podman, j: &Journal, r: &mut RunReport) -> Vec<Local> {
    let mut states = Vec::new();
    for i in 0..j.containers.len() {
        states.push(local_state(podman, j, i).await);
    }
    r.found = j
        .containers
        .iter()
        .zip(&states)
        .map(|(c, s)| format!("{}={}", c.name, s.word()))
        .collect();
    states
}

/// Makes the service run on one host, by the journal's phase: before "OK" here; after
/// it, where the target's state says.
async fn settle(podman: &Podman, j: &Journal, states: &[Local], r: &mut RunReport, ui: &Arc<Ui>) {
    match j.phase {
        Phase::Prepared => {
            r.detail =
                "the sender died before the freeze: nothing was frozen or checkpointed".into();
            r.runs_on = where_from_local(states);
        }
        Phase::Checkpointing | Phase::RollingBack => {
            restore_here(podman, j, states, r, ui).await;
        }
        Phase::Committing => {
            remove_here(podman, j, states, r).await;
        }
        Phase::OkSent => {
            ask_target(podman, j, states, r, ui).await;
        }
    }
}

/// After "OK" only the target's state decides: asked over SSH, as a sender that lost the
/// control connection would.
async fn ask_target(
    podman: &Podman,
    j: &Journal,
    states: &[Local],
    r: &mut RunReport,
    ui: &Arc<Ui>,
) {
    let ssh = match Ssh::connect(&Destination::from(&j.target), SSH_TIMEOUT).await {
        Ok(s) => s,
        Err(e) => {
            r.result = Verdict::Undetermined;
            r.runs_on = "unknown".into();
            r.detail = undetermined(j, states, &e.to_string());
            return;
        }
    };
    // A receiver still restoring gets the time a sender would give it; then the
    // target's state decides.
    let deadline = tokio::time::Instant::now() + crate::settle::RESTORE_TIMEOUT;
    let names = r.containers.clone();
    match crate::settle::over_ssh(&ssh, &j.remote_dir, &names, deadline, ui).await {
        Ok(Settled::Restored(_)) => {
            remove_here(podman, j, states, r).await;
        }
        Ok(Settled::Clean(o)) => {
            restore_here(podman, j, states, r, ui).await;
            r.detail = format!(
                "the target {} does not run them ({}); {}",
                r.target,
                o.error.unwrap_or_default(),
                r.detail
            );
        }
        Ok(Settled::NotClean(nc, _)) => {
            // Some of it may run there and cannot be removed: restoring here could run
            // the service twice.
            r.result = Verdict::Undetermined;
            r.detail = undetermined(j, states, &format!("{nc:?}"));
        }
        Err(e) => {
            r.result = Verdict::Undetermined;
            r.detail = undetermined(j, states, &format!("{e:#}"));
        }
    }
    ssh.close().await;
}

/// Leftovers: the run folders on both hosts (the target's holds process memory), once
/// the service runs on one host.
async fn remove_leftovers(j: &Journal, r: &mut RunReport) {
    if r.result == Verdict::Failed {
        return;
    }
    if j.phase != Phase::OkSent && j.phase != Phase::Committing {
        remove_remote_dir(j, r).await;
    }
    if j.local_dir.exists() {
        match std::fs::remove_dir_all(&j.local_dir) {
            Ok(()) => r.actions.push(format!("removed {}", j.local_dir.display())),
            Err(e) => r
                .actions
                .push(format!("removing {} failed: {e}", j.local_dir.display())),
        }
    }
}

fn where_from_local(states: &[Local]) -> String {
    if states.iter().all(|s| *s == Local::Running) {
        "source".into()
    } else {
        "unknown".into()
    }
}

fn undetermined(j: &Journal, states: &[Local], why: &str) -> String {
    let here: Vec<String> = j
        .containers
        .iter()
        .zip(states)
        .map(|(c, s)| format!("{} is {}", c.name, s.word()))
        .collect();
    format!(
        "cannot tell whether the target runs the containers ({why}). Here on {}: {}; their checkpoints are kept. On {}: unknown (the run folder is {}). Nothing was restored. Run `migrate recover` again once the target answers over SSH; or check there with `podman ps -a`, and only if none of {} runs there, `podman container restore --keep NAME` here",
        j.source,
        here.join(", "),
        Destination::from(&j.target).ssh_target(),
        j.remote_dir,
        j.containers
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Brings every container that does not run back from its kept checkpoint.
async fn restore_here(
    podman: &Podman,
    j: &Journal,
    states: &[Local],
    r: &mut RunReport,
    ui: &Arc<Ui>,
) {
    let mut problems = Vec::new();
    let mut repaired = false;
    for (c, s) in j.containers.iter().zip(states) {
        match s {
            Local::Running => {}
            Local::Frozen => problems.push(format!("{} stays frozen", c.name)),
            Local::Absent => problems.push(format!(
                "{} is gone here; its archive may be on the target in {}",
                c.name, j.remote_dir
            )),
            Local::Unknown(e) => problems.push(format!("{}: {e}", c.name)),
            Local::Stopped(_) => {
                ui.info(&format!(
                    "{}: restoring it from its kept checkpoint",
                    c.name
                ));
                match podman.restore_in_place(&c.name, c.opts()).await {
                    Ok(()) => {
                        repaired = true;
                        r.actions
                            .push(format!("restored {} from its kept checkpoint", c.name));
                    }
                    Err(e) => problems.push(format!(
                        "restoring {} failed: {e} (the archive may still be on the target in {})",
                        c.name, j.remote_dir
                    )),
                }
            }
        }
    }
    if !r.actions.is_empty() {
        repaired = true;
    }
    if problems.is_empty() {
        r.result = if repaired {
            Verdict::Repaired
        } else {
            Verdict::Clean
        };
        r.runs_on = "source".into();
        r.detail = format!(
            "the run never reached \"OK\" (or the target does not run it): every container runs here on {}",
            j.source
        );
    } else {
        r.result = Verdict::Failed;
        r.runs_on = "nowhere".into();
        r.detail = problems.join("; ");
    }
}

/// The target runs the containers: the ones here go (as `send`'s commit would).
async fn remove_here(podman: &Podman, j: &Journal, states: &[Local], r: &mut RunReport) {
    let mut problems = Vec::new();
    for (c, s) in j.containers.iter().zip(states) {
        if *s == Local::Absent {
            continue;
        }
        match podman.remove(&c.name).await {
            Ok(()) => r.actions.push(format!("removed {} here", c.name)),
            Err(e) => problems.push(format!("removing {} here failed: {e}", c.name)),
        }
    }
    // The pod's infra container holds its published ports here: it goes too.
    if let Some(pod) = &j.pod {
        match podman.pod_remove(pod).await {
            Ok(()) => r.actions.push(format!("removed pod {pod} here")),
            Err(e) => problems.push(format!("removing pod {pod} here failed: {e}")),
        }
    }
    r.runs_on = "target".into();
    if problems.is_empty() {
        r.result = if r.actions.is_empty() {
            Verdict::Clean
        } else {
            Verdict::Repaired
        };
        r.detail = format!(
            "the migration happened: the target {} runs every container",
            r.target
        );
    } else {
        r.result = Verdict::Failed;
        r.detail = format!(
            "the target {} runs every container, but: {}",
            r.target,
            problems.join("; ")
        );
    }
}

/// Removes the run folder on the target (best effort: an unreachable target is said).
async fn remove_remote_dir(j: &Journal, r: &mut RunReport) {
    match Ssh::connect(&Destination::from(&j.target), SSH_TIMEOUT).await {
        Ok(ssh) => {
            let res = ssh
                .run("rm", &["-rf".into(), j.remote_dir.clone()], REMOTE_TIMEOUT)
                .await;
            match res {
                Ok(_) => r.actions.push(format!(
                    "removed the run folder {} on the target",
                    j.remote_dir
                )),
                Err(e) => r.actions.push(format!(
                    "could not remove the run folder {} on the target: {e}",
                    j.remote_dir
                )),
            }
            ssh.close().await;
        }
        Err(e) => r.actions.push(format!(
            "could not reach the target to remove its run folder {} ({e}); remove it there by hand",
            j.remote_dir
        )),
    }
}

/// `migrate recover`: one record per run on stdout, the story on stderr. Its exit: `Ok`
/// when nothing needs a human, `Refused` when the journals cannot be read, `Failed` when a
/// repair failed, a journal could not be read, or a target's state is unknown (each
/// record's `result` and `detail` say which).
pub async fn run(args: RecoverArgs) -> u8 {
    recover(args).await.code()
}

async fn recover(args: RecoverArgs) -> Exit {
    let ui = Arc::new(Ui::new("recover"));
    let paths = match crate::journal::Journal::list(&args.workdir) {
        Ok(p) => p,
        Err(e) => {
            crate::progress::say!(
                "migrate recover: error: cannot read the run journals: {e}; pass the --workdir `send` used"
            );
            return Exit::Refused;
        }
    };
    let mode = if args.list { Mode::List } else { Mode::Recover };
    let mut code = Exit::Ok;
    let mut header = !args.output.no_header;
    let mut seen = 0;
    for path in paths {
        let j = match Journal::load(&path) {
            Ok(j) => j,
            Err(e) => {
                ui.warn(&format!("skipping {}: {e}", path.display()));
                code = Exit::Failed;
                continue;
            }
        };
        if args.run.as_ref().is_some_and(|r| *r != j.run_id) {
            continue;
        }
        seen += 1;
        let report = repair(&j, mode, &ui).await;
        let mut text = format!(
            "run {} (phase {}, sender {}, watchdog {}): {}",
            report.run_id,
            report.phase,
            report.sender,
            report.watchdog,
            report.result.as_str()
        );
        if !report.actions.is_empty() {
            text.push_str(&format!("; did: {}", report.actions.join("; ")));
        }
        if let Some(n) = &j.watchdog {
            text.push_str(&format!(
                "; its watchdog had found {} and done: {}",
                n.found.join(" "),
                if n.actions.is_empty() {
                    "nothing".to_string()
                } else {
                    n.actions.join("; ")
                }
            ));
        }
        text.push_str(&format!("; {}", report.detail));
        match report.result {
            Verdict::Failed | Verdict::Undetermined => ui.warn(&text),
            _ => ui.info(&text),
        }
        let mut out = std::io::stdout().lock();
        if let Err(e) = report.write(&mut out, args.output.format, header) {
            ui.warn(&format!("cannot write the record: {e}"));
        }
        header = false;
        match report.result {
            Verdict::Undetermined | Verdict::Failed => code = Exit::Failed,
            Verdict::Clean | Verdict::Repaired => {
                // Settled: the journal (and its watchdog's log) has been reported and goes.
                Journal::remove(&path);
            }
            Verdict::InProgress | Verdict::Listed => {}
        }
    }
    if seen == 0 {
        ui.info(&format!(
            "no run journals in {}: no `send` died here with work left",
            crate::journal::dir(&args.workdir).display()
        ));
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_have_one_line_and_the_same_columns() {
        let r = RunReport {
            run_id: "r1".into(),
            phase: "checkpointing".into(),
            started: "2026-01-01T00:00:00.000Z".into(),
            source: "a".into(),
            target: "root@b".into(),
            containers: vec!["db".into(), "web".into()],
            sender: "gone".into(),
            watchdog: "done:repaired".into(),
            found: vec!["db=exited".into(), "web=running".into()],
            actions: vec![
                "thawed web".into(),
                "restored db, from its kept checkpoint".into(),
            ],
            result: Verdict::Repaired,
            runs_on: "source".into(),
            detail: "x, \"quoted\"".into(),
        };
        let mut out = Vec::new();
        r.write(&mut out, Format::Json, true).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["result"], "repaired");
        assert_eq!(v["found"][0], "db=exited");
        let mut out = Vec::new();
        r.write(&mut out, Format::Csv, true).unwrap();
        let mut rdr = csv::Reader::from_reader(out.as_slice());
        let h = rdr.headers().unwrap().clone();
        let row = rdr.records().next().unwrap().unwrap();
        assert_eq!(h.len(), row.len());
        assert_eq!(&h[10], "result");
        assert_eq!(&row[10], "repaired");
        assert_eq!(&row[12], "x, \"quoted\"");
    }

    #[test]
    fn an_unknown_target_is_stated_with_what_runs_here() {
        let j = Journal {
            run_id: "r".into(),
            phase: Phase::OkSent,
            sender_pid: 1,
            sender_start: 1,
            watchdog_pid: None,
            watchdog_start: None,
            started_us: 0,
            source: "lab-a".into(),
            target: crate::journal::TargetRef {
                user: Some("root".into()),
                host: "10.0.0.2".into(),
                port: None,
                identity: None,
            },
            remote_dir: "/var/lib/migrate/runs/r".into(),
            local_dir: "/var/lib/migrate/runs/r".into(),
            containers: vec![],
            pod: None,
            watchdog: None,
        };
        let t = undetermined(&j, &[], "SSH to root@10.0.0.2 failed");
        assert!(t.contains("Nothing was restored"), "{t}");
        assert!(t.contains("root@10.0.0.2: unknown"), "{t}");
    }

    #[test]
    fn a_dead_reader_s_export_is_drained_until_its_writer_ends() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("db.fifo");
        crate::journal::tests_support::mkfifo(&fifo);
        // Stands for podman: its command line names the FIFO; it blocks opening it until
        // somebody reads, then writes 3 MB and exits.
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "exec 3>\"$1\"; head -c 3000000 /dev/zero >&3; true",
                "sh",
                fifo.to_str().unwrap(),
            ])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while exporters(std::slice::from_ref(&fifo)).is_empty() {
            assert!(Instant::now() < deadline, "the writer never showed");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The shell itself; for an instant also its child between fork and exec (which
        // still has the shell's command line), so "contains", not "equals".
        let found = exporters(std::slice::from_ref(&fifo));
        assert!(
            found.contains(&child.id()),
            "{found:?} lacks {}",
            child.id()
        );
        assert!(exporters(&[d.path().join("other.fifo")]).is_empty());
        let note = drain_exports(std::slice::from_ref(&fifo), Duration::from_secs(20))
            .expect("there was an exporter");
        assert!(note.contains("read away 3000000 bytes"), "{note}");
        assert!(child.wait().unwrap().success());
        // Nobody exports any more: nothing to wait for.
        assert_eq!(
            drain_exports(std::slice::from_ref(&fifo), Duration::from_secs(1)),
            None
        );
    }
}
