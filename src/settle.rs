//! After "OK", when the receiver's word is missing or says it could not clean up: what
//! the target shows over SSH decides. The source restores only once the target is known
//! to hold none of the containers; a target that cannot be made clean is reported, with
//! what runs where, and nothing is restored here (that would run the service twice).

use std::time::Duration;

use tokio::time::Instant;

use crate::exec::shell_quote;
use crate::progress::Ui;
use crate::protocol::{LeftOnTarget, TargetOutcome};
use crate::rundir::{PID_FILE, RESULT_FILE};
use crate::transport::ssh::{Ssh, SshError, remote_join};

/// How long the target may take to restore once "OK" is sent: the sender waits that
/// long for the receiver's verdict, the fallback and `recover` as long for its result.
pub const RESTORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(900);

const REMOTE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a receiver may take to exit after SIGTERM: it finishes the restore in
/// progress first, and writes its result.
const TERM_GRACE: Duration = Duration::from_secs(60);
/// How long a receiver may take to disappear after SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(500);
/// Attempts at removing a container on the target (the last one after SIGKILL).
const REMOVE_ATTEMPTS: u32 = 10;

/// What the target shows of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetState {
    /// podman knows no container of that name.
    Absent,
    /// podman's status of it: "running", "exited", "created", "paused", …
    Status(String),
    /// It could not be told (podman failed, or no answer): it may exist, it may run.
    Unknown(String),
}

impl TargetState {
    pub fn running(&self) -> bool {
        matches!(self, TargetState::Status(s) if s == "running")
    }

    /// One answer of [`inspect_script`]: `absent`, `status S` or `unknown WHY`.
    pub fn parse(answer: &str) -> TargetState {
        let (word, rest) = answer.split_once(' ').unwrap_or((answer, ""));
        let rest = rest.trim();
        match word {
            "absent" => TargetState::Absent,
            "status" if !rest.is_empty() => TargetState::Status(rest.to_string()),
            "unknown" => TargetState::Unknown(if rest.is_empty() {
                "no reason given".into()
            } else {
                rest.to_string()
            }),
            _ => TargetState::Unknown(format!("unexpected answer {answer:?}")),
        }
    }

    fn label(&self) -> String {
        match self {
            TargetState::Absent => "absent".into(),
            TargetState::Status(s) => s.clone(),
            TargetState::Unknown(_) => "unknown".into(),
        }
    }
}

/// A script that prints `I absent`, `I status S` or `I unknown WHY` for the I-th name.
/// A failing podman is "unknown", never "absent": only podman's own "no such container"
/// (`podman container exists` exiting 1) is.
pub fn inspect_script(names: &[String]) -> String {
    let mut script = String::new();
    for (i, n) in names.iter().enumerate() {
        let n = shell_quote(n);
        script.push_str(&format!(
            "e=$(podman container exists {n} 2>&1); rc=$?\n\
             case $rc in\n\
             0) if s=$(podman container inspect --format '{{{{.State.Status}}}}' {n} 2>&1); \
                then echo \"{i} status $s\"; \
                else echo \"{i} unknown podman container inspect: $(printf %s \"$s\" | tr '\\n' ' ')\"; fi ;;\n\
             1) echo '{i} absent' ;;\n\
             *) echo \"{i} unknown podman container exists exited with $rc: $(printf %s \"$e\" | tr '\\n' ' ')\" ;;\n\
             esac\n"
        ));
    }
    script
}

/// The states in `names`' order; a name the output does not answer for is unknown.
pub fn parse_states(stdout: &str, names: &[String]) -> Vec<(String, TargetState)> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let prefix = format!("{i} ");
            let state = stdout
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .map(TargetState::parse)
                .unwrap_or_else(|| TargetState::Unknown("no answer from the target".into()));
            (n.clone(), state)
        })
        .collect()
}

/// What to do when the control connection was lost after "OK", from what the target
/// shows over SSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Every container runs on the target: the migration happened.
    Commit,
    /// Not all run there: remove these on the target and look again; roll back here only
    /// once none is left.
    RollBack { remove_on_target: Vec<String> },
}

/// The container states on the target decide, never the receiver's word alone: the
/// service must run on exactly one host. A state that cannot be read is never taken
/// for "absent": it is removed like any other, and looked at again.
pub fn decide_settle(states: &[(String, TargetState)]) -> Settle {
    if !states.is_empty() && states.iter().all(|(_, s)| s.running()) {
        Settle::Commit
    } else {
        Settle::RollBack {
            remove_on_target: states
                .iter()
                .filter(|(_, s)| *s != TargetState::Absent)
                .map(|(n, _)| n.clone())
                .collect(),
        }
    }
}

/// After the cleanup: what is still there, or cannot be told. Empty means clean.
pub fn left_over(
    states: &[(String, TargetState)],
    errors: &[(String, String)],
) -> Vec<LeftOnTarget> {
    states
        .iter()
        .filter(|(_, s)| *s != TargetState::Absent)
        .map(|(n, s)| {
            let removal = errors.iter().find(|(e, _)| e == n).map(|(_, e)| e.as_str());
            let error = match (s, removal) {
                (TargetState::Unknown(why), Some(r)) => format!("{r}; {why}"),
                (TargetState::Unknown(why), None) => why.clone(),
                (_, Some(r)) => r.to_string(),
                (_, None) => "still there after podman rm".into(),
            };
            LeftOnTarget {
                name: n.clone(),
                state: s.label(),
                error,
            }
        })
        .collect()
}

/// What the receiver's run folder says about it.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// It wrote its result (the run is over there; it may hold a parse failure: `None`).
    Result(Option<TargetOutcome>),
    /// The pid in its pid file is alive; its command line.
    Alive { pid: u32, argv: Vec<String> },
    /// No live process behind the pid file (none, dead, or a zombie).
    Gone,
}

fn probe_script(remote_dir: &str) -> String {
    format!(
        "r={r}; p={p}\n\
         if [ -f \"$r\" ]; then echo result; cat \"$r\"; exit 0; fi\n\
         pid=$(cat \"$p\" 2>/dev/null)\n\
         case $pid in ''|*[!0-9]*) echo gone; exit 0 ;; esac\n\
         st=$(sed -n 's/^State:[[:space:]]*\\(.\\).*/\\1/p' /proc/$pid/status 2>/dev/null)\n\
         if [ -z \"$st\" ] || [ \"$st\" = Z ]; then echo gone; exit 0; fi\n\
         echo \"alive $pid\"; tr '\\0' '\\n' < /proc/$pid/cmdline\n",
        r = shell_quote(&remote_join(remote_dir, RESULT_FILE)),
        p = shell_quote(&remote_join(remote_dir, PID_FILE)),
    )
}

/// Reads [`probe_script`]'s answer (anything a login shell printed before is skipped).
pub fn parse_probe(stdout: &str) -> Probe {
    let mut lines = stdout.lines();
    while let Some(l) = lines.next() {
        if l == "result" {
            return Probe::Result(serde_json::from_str(&lines.collect::<Vec<_>>().join("\n")).ok());
        }
        if l == "gone" {
            return Probe::Gone;
        }
        if let Some(pid) = l.strip_prefix("alive ").and_then(|p| p.trim().parse().ok()) {
            return Probe::Alive {
                pid,
                argv: lines.map(str::to_string).collect(),
            };
        }
    }
    Probe::Gone
}

/// True when a command line is a `migrate receive`: a pid file may outlive its process,
/// and the pid may since belong to anything else.
pub fn is_receiver(argv: &[String]) -> bool {
    let Some(exe) = argv.first() else {
        return false;
    };
    let base = exe.rsplit('/').next().unwrap_or(exe);
    base.starts_with("migrate") && argv.get(1).map(String::as_str) == Some("receive")
}

/// Sends `signal` to `pid` only while its command line is still `argv` (a pid is checked
/// right before it is signalled: it may have been reused since it was looked at).
fn signal_script(pid: u32, argv: &[String], signal: &str) -> String {
    format!(
        "pid={pid}; want={w}\n\
         [ \"$(tr '\\0' '\\n' < /proc/$pid/cmdline 2>/dev/null)\" = \"$want\" ] && kill -{signal} $pid; true",
        w = shell_quote(&argv.join("\n"))
    )
}

/// What the receiver was last seen doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Its result is written: its restore and cleanup are over.
    Result,
    /// A `migrate receive` for this run is still alive.
    Alive,
    /// None is alive.
    Gone,
}

/// The last signal the fallback sent the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Nothing,
    Term,
    Kill,
}

/// The fallback's next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Look again in a moment.
    Wait,
    /// SIGTERM: it finishes the restore in progress, writes its result and exits.
    Term,
    /// SIGKILL.
    Kill,
    /// The receiver is done: look at the containers.
    Inspect,
    /// Alive after SIGKILL: what it does can no longer be told.
    Stuck,
}

/// `time_up`: the wait that goes with `sent` is over (the restore's own deadline before
/// any signal, then the grace after SIGTERM, then after SIGKILL).
pub fn next_step(seen: Seen, sent: Sent, time_up: bool) -> Next {
    match (seen, sent, time_up) {
        (Seen::Result | Seen::Gone, _, _) => Next::Inspect,
        (Seen::Alive, _, false) => Next::Wait,
        (Seen::Alive, Sent::Nothing, true) => Next::Term,
        (Seen::Alive, Sent::Term, true) => Next::Kill,
        (Seen::Alive, Sent::Kill, true) => Next::Stuck,
    }
}

/// Why the source must not restore: the target is not known to be clean.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NotClean {
    /// Containers still there, or whose state cannot be read.
    pub containers: Vec<LeftOnTarget>,
    /// Processes of this run still alive on the target after SIGKILL ("PID command").
    pub processes: Vec<String>,
}

/// How the fallback ended.
#[derive(Debug)]
pub enum Settled {
    /// Every container runs on the target.
    Restored(TargetOutcome),
    /// None of them exists on the target: roll back here.
    Clean(TargetOutcome),
    /// The target could not be made clean: do not restore here.
    NotClean(NotClean, Option<String>),
}

/// After losing the control connection: waits for the receiver to write its result or
/// die until `deadline`, then stops it (SIGTERM, then SIGKILL, each checked again), stops
/// any restore of this run still in flight the same way, looks at the containers on the
/// target and decides. `Err` means SSH itself could not tell.
pub async fn over_ssh(
    ssh: &Ssh,
    remote_dir: &str,
    names: &[String],
    deadline: Instant,
    ui: &Ui,
) -> Result<Settled, SshError> {
    let Receiver {
        reported,
        mut stuck,
    } = wait_for_receiver(ssh, remote_dir, deadline, ui).await?;
    stuck.extend(stop_restores(ssh, remote_dir).await?);
    let states = inspect(ssh, names).await;
    let error = reported.as_ref().and_then(|o| o.error.clone());
    match decide_settle(&states) {
        Settle::Commit => {
            ui.info("the target runs every container: the migration happened");
            Ok(Settled::Restored(
                reported
                    .filter(|o| o.restored)
                    .unwrap_or_else(|| TargetOutcome {
                        restored: true,
                        ..Default::default()
                    }),
            ))
        }
        Settle::RollBack { .. } if !stuck.is_empty() => {
            // Removing now could race with what is still alive there.
            let containers = left_over(&states, &[]);
            Ok(Settled::NotClean(
                NotClean {
                    containers,
                    processes: stuck,
                },
                error,
            ))
        }
        Settle::RollBack { remove_on_target } => match clean(ssh, &remove_on_target, ui).await {
            Ok(()) => Ok(Settled::Clean(TargetOutcome {
                restored: false,
                error: Some(error.unwrap_or_else(|| {
                    "the receiver went away before every container ran on the target".into()
                })),
                ..Default::default()
            })),
            Err(nc) => Ok(Settled::NotClean(nc, error)),
        },
    }
}

/// How the receiver ended, as far as its run folder and processes tell.
struct Receiver {
    /// Its result, when it wrote one (and it could be read).
    reported: Option<TargetOutcome>,
    /// It is still alive after SIGKILL: "PID command".
    stuck: Vec<String>,
}

/// Waits for the receiver to write its result or to die until `deadline`, then stops it
/// (SIGTERM, then SIGKILL after a grace each).
async fn wait_for_receiver(
    ssh: &Ssh,
    remote_dir: &str,
    deadline: Instant,
    ui: &Ui,
) -> Result<Receiver, SshError> {
    let probe = probe_script(remote_dir);
    let mut sent = Sent::Nothing;
    let mut until = deadline;
    let mut reported: Option<TargetOutcome> = None;
    loop {
        let found = parse_probe(&ssh.sh(&probe, REMOTE_TIMEOUT).await?.stdout);
        let (seen, alive) = seen(found, &mut reported, ui);
        match next_step(seen, sent, Instant::now() >= until) {
            Next::Inspect => {
                return Ok(Receiver {
                    reported,
                    stuck: Vec::new(),
                });
            }
            Next::Wait => tokio::time::sleep(POLL).await,
            Next::Term | Next::Kill => {
                let (pid, argv) = alive.expect("only a live receiver is signalled");
                let grace;
                (sent, grace) = signal_receiver(ssh, pid, &argv, sent, ui).await?;
                until = Instant::now() + grace;
            }
            Next::Stuck => {
                let (pid, argv) = alive.expect("stuck means alive");
                let stuck = vec![format!("{pid} {} (the receiver)", argv.join(" "))];
                return Ok(Receiver { reported, stuck });
            }
        }
    }
}

/// What one probe of the run folder shows; a live receiver comes with its pid and
/// command line. A result is kept in `reported`.
fn seen(
    found: Probe,
    reported: &mut Option<TargetOutcome>,
    ui: &Ui,
) -> (Seen, Option<(u32, Vec<String>)>) {
    match found {
        Probe::Result(r) => {
            *reported = r;
            (Seen::Result, None)
        }
        Probe::Alive { pid, argv } if is_receiver(&argv) => (Seen::Alive, Some((pid, argv))),
        Probe::Alive { pid, argv } => {
            ui.warn(&format!(
                "pid {pid} of the receiver's pid file is not a migrate receiver now ({}); not touched",
                argv.join(" ")
            ));
            (Seen::Gone, None)
        }
        Probe::Gone => (Seen::Gone, None),
    }
}

/// SIGTERM when nothing was sent yet, else SIGKILL; returns what was sent and how long
/// the receiver has to go.
async fn signal_receiver(
    ssh: &Ssh,
    pid: u32,
    argv: &[String],
    sent: Sent,
    ui: &Ui,
) -> Result<(Sent, Duration), SshError> {
    let (signal, grace, now_sent) = if sent == Sent::Nothing {
        ("TERM", TERM_GRACE, Sent::Term)
    } else {
        ("KILL", KILL_GRACE, Sent::Kill)
    };
    ui.warn(&format!(
        "the receiver (pid {pid} on {}) has not finished: sending it SIG{signal}",
        ssh.label()
    ));
    // Checked again right before the signal: the pid must still be the same receiver.
    ssh.sh(&signal_script(pid, argv, signal), REMOTE_TIMEOUT)
        .await?;
    Ok((now_sent, grace))
}

/// A receiver that died may have left restores running (its podman children live on).
/// They are let finish (a podman stopped half-way can leave a conmon holding the
/// container's ports with no container podman knows of); one still running after a
/// minute gets SIGTERM, then SIGKILL. Returns what survives that ("PID command").
async fn stop_restores(ssh: &Ssh, remote_dir: &str) -> Result<Vec<String>, SshError> {
    let pattern = shell_quote(&self_excluding_pattern(remote_dir));
    let out = ssh
        .sh(
            &format!(
                "p={pattern}\n\
                 w() {{ i=0; while pgrep -f -- \"$p\" >/dev/null && [ $i -lt $1 ]; do sleep 0.1; i=$((i+1)); done; }}\n\
                 w 600; pkill -TERM -f -- \"$p\"; w 100; pkill -KILL -f -- \"$p\"; w 50\n\
                 pgrep -a -f -- \"$p\"; true"
            ),
            REMOTE_TIMEOUT,
        )
        .await?;
    Ok(out
        .stdout
        .lines()
        .filter(|l| {
            l.split_once(' ')
                .is_some_and(|(p, _)| p.parse::<u32>().is_ok())
        })
        .map(str::to_string)
        .collect())
}

/// The states of `names` on the target; all unknown when SSH cannot tell.
async fn inspect(ssh: &Ssh, names: &[String]) -> Vec<(String, TargetState)> {
    match ssh.sh(&inspect_script(names), REMOTE_TIMEOUT).await {
        Ok(out) => parse_states(&out.stdout, names),
        Err(e) => names
            .iter()
            .map(|n| (n.clone(), TargetState::Unknown(e.to_string())))
            .collect(),
    }
}

/// Removes `names` on the target (`podman rm --force`, retried while a stopped restore's
/// mounts are still busy, the last attempt after `podman kill`), then looks at them
/// again: `Ok` only when none is there any more.
pub async fn clean(ssh: &Ssh, names: &[String], ui: &Ui) -> Result<(), NotClean> {
    let mut errors = Vec::new();
    for n in names {
        ui.warn(&format!("removing {n} on the target ({})", ssh.label()));
        for attempt in 1..=REMOVE_ATTEMPTS {
            if attempt == REMOVE_ATTEMPTS
                && let Err(e) = ssh
                    .run(
                        "podman",
                        &["kill".into(), "--signal".into(), "KILL".into(), n.clone()],
                        REMOTE_TIMEOUT,
                    )
                    .await
            {
                ui.warn(&format!("killing {n} on the target: {e}"));
            }
            let r = ssh
                .run(
                    "podman",
                    &[
                        "rm".into(),
                        "--force".into(),
                        "--time".into(),
                        "5".into(),
                        n.clone(),
                    ],
                    REMOTE_TIMEOUT,
                )
                .await;
            match r {
                Ok(_) => break,
                Err(e) => {
                    ui.warn(&format!(
                        "removing {n} on the target (attempt {attempt} of {REMOVE_ATTEMPTS}): {e}"
                    ));
                    if attempt == REMOVE_ATTEMPTS {
                        errors.push((n.clone(), e.to_string()));
                    } else {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }
    let states = inspect(ssh, names).await;
    let containers = left_over(&states, &errors);
    if containers.is_empty() {
        Ok(())
    } else {
        Err(NotClean {
            containers,
            processes: Vec::new(),
        })
    }
}

/// A `pkill -f` pattern for `path` that does not match the command line carrying it
/// (`/x/y` becomes `[/]x/y`), so the remote shell does not kill itself.
pub fn self_excluding_pattern(path: &str) -> String {
    let mut chars = path.chars();
    match chars.next() {
        Some(c) => format!("[{c}]{}", chars.as_str()),
        None => String::new(),
    }
}

/// Where everything is and what to do, for the operator of a migration whose target
/// could not be made clean. `restore_order`: the containers, dependencies first;
/// `restore_here`: the commands that restore them on the source, in that order.
pub fn not_clean_report(
    nc: &NotClean,
    target: &str,
    source: &str,
    restore_order: &[String],
    restore_here: &[String],
    remote_dir: &str,
) -> String {
    let mut s = format!(
        "the target {target} could not be made clean, so nothing was restored on this host ({source}): that could run the service twice."
    );
    for l in &nc.containers {
        let what = match l.state.as_str() {
            "running" => "runs".to_string(),
            "unknown" => "may exist and run (its state cannot be read)".to_string(),
            other => format!("exists ({other}), not removed"),
        };
        s.push_str(&format!(" On {target}: {} {what} ({}).", l.name, l.error));
    }
    for p in &nc.processes {
        s.push_str(&format!(
            " On {target}: process {p} is still alive after SIGKILL."
        ));
    }
    let present: Vec<&str> = nc.containers.iter().map(|l| l.name.as_str()).collect();
    let gone: Vec<&str> = restore_order
        .iter()
        .map(String::as_str)
        .filter(|n| !present.contains(n))
        .collect();
    if !gone.is_empty() {
        s.push_str(&format!(" On {target}: no {}.", gone.join(", no ")));
    }
    s.push_str(&format!(
        " On {source}: {} stopped, checkpoints kept; the archives stay on {target} in {remote_dir}.",
        restore_order.join(", ")
    ));
    let restore_here = restore_here
        .iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", then ");
    let rm_there = format!("`podman rm --force {}`", restore_order.join(" "));
    s.push_str(&format!(
        " To fix: on {target} run {rm_there} until `podman ps -a` lists none of them (and no process above is left), then here {restore_here}."
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(pairs: &[(&str, TargetState)]) -> Vec<(String, TargetState)> {
        pairs
            .iter()
            .map(|(n, s)| (n.to_string(), s.clone()))
            .collect()
    }

    type States = Vec<(String, TargetState)>;
    /// name, state, why
    type Left<'a> = Vec<(&'a str, &'a str, &'a str)>;

    fn status(s: &str) -> TargetState {
        TargetState::Status(s.into())
    }

    fn unknown() -> TargetState {
        TargetState::Unknown("podman failed".into())
    }

    #[test]
    fn settle_decisions() {
        use TargetState::Absent;
        let rb = |names: &[&str]| Settle::RollBack {
            remove_on_target: names.iter().map(|n| n.to_string()).collect(),
        };
        let table: Vec<(States, Settle)> = vec![
            // All run there: commit.
            (
                st(&[("db", status("running")), ("web", status("running"))]),
                Settle::Commit,
            ),
            // A partial restore: what is there goes, then roll back.
            (
                st(&[("db", status("running")), ("web", Absent)]),
                rb(&["db"]),
            ),
            (
                st(&[("db", status("exited")), ("web", status("running"))]),
                rb(&["db", "web"]),
            ),
            (
                st(&[("db", status("paused")), ("web", status("created"))]),
                rb(&["db", "web"]),
            ),
            (st(&[("db", Absent), ("web", Absent)]), rb(&[])),
            // A state that cannot be read is never "absent", and never "running".
            (st(&[("db", unknown()), ("web", Absent)]), rb(&["db"])),
            (
                st(&[("db", status("running")), ("web", unknown())]),
                rb(&["db", "web"]),
            ),
            // Nothing to look at is not a commit.
            (vec![], rb(&[])),
        ];
        for (states, want) in table {
            assert_eq!(decide_settle(&states), want, "{states:?}");
        }
    }

    #[test]
    fn only_absent_is_clean() {
        use TargetState::Absent;
        let errors = vec![("db".to_string(), "rm: device busy".to_string())];
        let table: Vec<(States, Left)> = vec![
            (st(&[("db", Absent), ("web", Absent)]), vec![]),
            (
                st(&[("db", status("running")), ("web", Absent)]),
                vec![("db", "running", "rm: device busy")],
            ),
            (
                st(&[("db", Absent), ("web", status("exited"))]),
                vec![("web", "exited", "still there after podman rm")],
            ),
            (
                st(&[("db", unknown()), ("web", unknown())]),
                vec![
                    ("db", "unknown", "rm: device busy; podman failed"),
                    ("web", "unknown", "podman failed"),
                ],
            ),
        ];
        for (states, want) in table {
            let got: Vec<(String, String, String)> = left_over(&states, &errors)
                .into_iter()
                .map(|l| (l.name, l.state, l.error))
                .collect();
            let want: Vec<(String, String, String)> = want
                .into_iter()
                .map(|(a, b, c)| (a.into(), b.into(), c.into()))
                .collect();
            assert_eq!(got, want, "{states:?}");
        }
    }

    #[test]
    fn inspect_answers() {
        let names = vec!["db".to_string(), "web".to_string(), "cache".to_string()];
        let table = [
            (
                "0 status running\n1 absent\n2 status exited\n",
                vec![status("running"), TargetState::Absent, status("exited")],
            ),
            // Noise from a login shell; a missing answer; a failing podman.
            (
                "welcome\n1 unknown podman container exists exited with 125: storage locked\n0 absent\n",
                vec![
                    TargetState::Absent,
                    TargetState::Unknown(
                        "podman container exists exited with 125: storage locked".into(),
                    ),
                    TargetState::Unknown("no answer from the target".into()),
                ],
            ),
            (
                "0 status\n1 gibberish\n2 unknown\n",
                vec![
                    TargetState::Unknown("unexpected answer \"status\"".into()),
                    TargetState::Unknown("unexpected answer \"gibberish\"".into()),
                    TargetState::Unknown("no reason given".into()),
                ],
            ),
            (
                "",
                vec![
                    TargetState::Unknown("no answer from the target".into()),
                    TargetState::Unknown("no answer from the target".into()),
                    TargetState::Unknown("no answer from the target".into()),
                ],
            ),
        ];
        for (stdout, want) in table {
            let got: Vec<TargetState> = parse_states(stdout, &names)
                .into_iter()
                .map(|(_, s)| s)
                .collect();
            assert_eq!(got, want, "{stdout:?}");
        }
    }

    #[test]
    fn inspect_script_quotes_names_and_never_says_absent_on_failure() {
        let s = inspect_script(&["db".into(), "we'b".into()]);
        assert!(s.contains("podman container exists 'we'\\''b'"), "{s}");
        // Only exit status 1 of `exists` (podman's "no such container") is "absent".
        assert_eq!(s.matches("absent").count(), 2, "{s}");
        assert!(s.contains("1) echo '0 absent'"), "{s}");
    }

    #[test]
    fn receiver_probe_answers() {
        let outcome = TargetOutcome {
            restored: true,
            ..Default::default()
        };
        let json = serde_json::to_string(&outcome).unwrap();
        let table = [
            (
                format!("result\n{json}\n"),
                Probe::Result(Some(outcome.clone())),
            ),
            ("result\n{\"restored\":".to_string(), Probe::Result(None)),
            ("gone\n".into(), Probe::Gone),
            ("".into(), Probe::Gone),
            (
                "motd\nalive 42\n/usr/local/bin/migrate\nreceive\n--listen\n0.0.0.0:12345\n".into(),
                Probe::Alive {
                    pid: 42,
                    argv: [
                        "/usr/local/bin/migrate",
                        "receive",
                        "--listen",
                        "0.0.0.0:12345",
                    ]
                    .map(String::from)
                    .to_vec(),
                },
            ),
            ("alive x\n".into(), Probe::Gone),
        ];
        for (stdout, want) in table {
            assert_eq!(parse_probe(&stdout), want, "{stdout:?}");
        }
    }

    #[test]
    fn only_a_migrate_receive_is_signalled() {
        let table: [(&[&str], bool); 7] = [
            (
                &["/usr/local/bin/migrate", "receive", "--listen", "x"],
                true,
            ),
            (&["/var/lib/migrate/bin/migrate-0.1.0", "receive"], true),
            (&["migrate", "receive"], true),
            (&["/usr/local/bin/migrate", "send", "receive"], false),
            (&["/usr/bin/sleep", "receive"], false),
            (&["/usr/bin/python3", "migrate", "receive"], false),
            (&[], false),
        ];
        for (argv, want) in table {
            let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
            assert_eq!(is_receiver(&argv), want, "{argv:?}");
        }
    }

    #[test]
    fn the_receiver_is_let_finish_then_terminated_then_killed() {
        use Next::*;
        let table = [
            // Its word, or no receiver at all: look at the containers.
            (Seen::Result, Sent::Nothing, false, Inspect),
            (Seen::Result, Sent::Kill, true, Inspect),
            (Seen::Gone, Sent::Nothing, false, Inspect),
            (Seen::Gone, Sent::Term, true, Inspect),
            (Seen::Gone, Sent::Kill, true, Inspect),
            // Alive: wait while its time runs, then escalate, then give up.
            (Seen::Alive, Sent::Nothing, false, Wait),
            (Seen::Alive, Sent::Nothing, true, Term),
            (Seen::Alive, Sent::Term, false, Wait),
            (Seen::Alive, Sent::Term, true, Kill),
            (Seen::Alive, Sent::Kill, false, Wait),
            (Seen::Alive, Sent::Kill, true, Stuck),
        ];
        for (seen, sent, time_up, want) in table {
            assert_eq!(
                next_step(seen, sent, time_up),
                want,
                "{seen:?} {sent:?} {time_up}"
            );
        }
    }

    fn sh(script: &str, path: Option<&std::path::Path>) -> String {
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c").arg(script);
        if let Some(p) = path {
            let old = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{old}", p.display()));
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn the_inspect_script_runs_and_maps_podmans_answers() {
        use std::os::unix::fs::PermissionsExt;
        // A stand-in podman that answers as podman 4 does: `exists` exits 0, 1 or 125.
        let dir = tempfile::tempdir().unwrap();
        let podman = dir.path().join("podman");
        std::fs::write(
            &podman,
            "#!/bin/sh\n\
             case \"$1 $2 $3\" in\n\
             'container exists db'|'container exists odd') exit 0 ;;\n\
             'container exists web') exit 1 ;;\n\
             'container exists cache') echo 'Error: storage locked' >&2; exit 125 ;;\n\
             'container inspect --format') [ \"$5\" = odd ] && { echo 'Error: boom' >&2; exit 125; }; echo running ;;\n\
             esac\n",
        )
        .unwrap();
        std::fs::set_permissions(&podman, std::fs::Permissions::from_mode(0o755)).unwrap();
        let names: Vec<String> = ["db", "web", "cache", "odd"].map(String::from).to_vec();
        let out = sh(&inspect_script(&names), Some(dir.path()));
        let got: Vec<TargetState> = parse_states(&out, &names)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        assert_eq!(
            got,
            vec![
                status("running"),
                TargetState::Absent,
                TargetState::Unknown(
                    "podman container exists exited with 125: Error: storage locked".into()
                ),
                TargetState::Unknown("podman container inspect: Error: boom".into()),
            ],
            "{out}"
        );
    }

    #[test]
    fn the_probe_script_runs_and_finds_the_pid_files_process() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        // No pid file, a dead pid, garbage: gone.
        assert_eq!(parse_probe(&sh(&probe_script(d), None)), Probe::Gone);
        std::fs::write(dir.path().join(PID_FILE), "999999999").unwrap();
        assert_eq!(parse_probe(&sh(&probe_script(d), None)), Probe::Gone);
        std::fs::write(dir.path().join(PID_FILE), "1; rm -rf /").unwrap();
        assert_eq!(parse_probe(&sh(&probe_script(d), None)), Probe::Gone);
        // A live process: its command line, which is not a receiver's.
        std::fs::write(dir.path().join(PID_FILE), std::process::id().to_string()).unwrap();
        match parse_probe(&sh(&probe_script(d), None)) {
            Probe::Alive { pid, argv } => {
                assert_eq!(pid, std::process::id());
                assert_eq!(argv[0], std::env::args().next().unwrap());
                assert!(!is_receiver(&argv), "{argv:?}");
            }
            other => panic!("{other:?}"),
        }
        // Its result wins.
        let outcome = TargetOutcome {
            restored: true,
            ..Default::default()
        };
        std::fs::write(
            dir.path().join(RESULT_FILE),
            serde_json::to_vec(&outcome).unwrap(),
        )
        .unwrap();
        assert_eq!(
            parse_probe(&sh(&probe_script(d), None)),
            Probe::Result(Some(outcome))
        );
    }

    #[test]
    fn a_pid_is_signalled_only_while_its_command_line_is_the_same() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let argv: Vec<String> = ["sleep", "30"].map(String::from).to_vec();
        let other: Vec<String> = ["sleep", "31"].map(String::from).to_vec();
        sh(&signal_script(pid, &other, "KILL"), None);
        std::thread::sleep(Duration::from_millis(100));
        assert!(child.try_wait().unwrap().is_none(), "killed a stranger");
        sh(&signal_script(pid, &argv, "KILL"), None);
        let st = child.wait().unwrap();
        assert!(!st.success(), "{st:?}");
    }

    #[test]
    fn an_outcome_without_leftovers_reads_and_writes_as_before() {
        let old = r#"{"restored":false,"error":"x","ready_us":1,"up_us":null,"verify_s":0.0,"restore_s":0.0,"container_restore_s":[],"criu_restore_s":null}"#;
        let o: TargetOutcome = serde_json::from_str(old).unwrap();
        assert!(o.left_on_target.is_empty());
        assert_eq!(serde_json::to_string(&o).unwrap(), old);
        let mut o = o;
        o.left_on_target.push(LeftOnTarget {
            name: "db".into(),
            state: "running".into(),
            error: "e".into(),
        });
        let text = serde_json::to_string(&o).unwrap();
        assert!(text.contains(r#""left_on_target":[{"name":"db""#), "{text}");
        assert_eq!(serde_json::from_str::<TargetOutcome>(&text).unwrap(), o);
    }

    #[test]
    fn pkill_pattern_skips_its_own_shell() {
        assert_eq!(
            self_excluding_pattern("/var/lib/migrate/runs/x"),
            "[/]var/lib/migrate/runs/x"
        );
    }

    #[test]
    fn the_report_says_what_runs_where_and_how_to_fix_it() {
        let nc = NotClean {
            containers: vec![LeftOnTarget {
                name: "db".into(),
                state: "running".into(),
                error: "podman rm: injected".into(),
            }],
            processes: vec!["77 podman container restore --import /r/web.tar".into()],
        };
        let names = vec!["db".to_string(), "web".to_string()];
        let cmds = vec![
            "podman container restore --keep --file-locks db".to_string(),
            "podman container restore --keep web".to_string(),
        ];
        let r = not_clean_report(&nc, "root@b", "lab-a", &names, &cmds, "/r");
        for want in [
            "nothing was restored on this host (lab-a)",
            "On root@b: db runs (podman rm: injected)",
            "process 77 podman container restore --import /r/web.tar is still alive after SIGKILL",
            "On root@b: no web.",
            "On lab-a: db, web stopped, checkpoints kept",
            "`podman rm --force db web`",
            "then here `podman container restore --keep --file-locks db`, then `podman container restore --keep web`.",
        ] {
            assert!(r.contains(want), "{want:?} not in {r}");
        }
    }
}
