//! `migrate drain`: empties this host onto several targets. It forms the units
//! ([`units`]), asks every target once and places each unit where there is room
//! ([`place`]), then moves up to N units at a time, each with one `send` (the library's
//! [`crate::send::run`], with a receiver spawned there): no second implementation of a
//! migration. One record per unit (the `send` record of its move, or why it did not move)
//! and one summary record go to stdout.

pub mod place;
pub mod units;

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::engine::pod::PodInfo;
use crate::engine::podman::{ContainerInfo, Podman};
use crate::exit::Exit;
use crate::plan::{CompressChoice, SendArgs, SendPlan, TargetArgs, TcpPolicy};
use crate::progress::{Ui, say};
use crate::send::SendFailure;
use crate::signals::Signals;
use crate::timing::{Format, Outcome, OutputArgs, Record, Stopwatch};
use crate::transport::ssh::{Destination, Ssh};

use place::{Decision, Target};
use units::Unit;

const PROBE_TIMEOUT: Duration = Duration::from_secs(120);
const SSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of `migrate drain`.
#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The targets, comma-separated (repeatable), each reached over SSH like `send --to`.
    #[arg(
        long,
        value_name = "[USER@]HOST,...",
        value_delimiter = ',',
        required = true
    )]
    pub to: Vec<String>,

    /// Moves at a time (each to another target: a receiver takes one migration at a time).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub parallel: usize,

    /// Print the placement (one record per unit and the summary) and touch nothing.
    #[arg(long)]
    pub plan: bool,

    /// Go on with the other units after a move failed, was refused or rolled back (by
    /// default no new move starts after one).
    #[arg(long)]
    pub keep_going: bool,

    /// SSH port on the targets.
    #[arg(long, value_name = "N")]
    pub ssh_port: Option<u16>,

    /// SSH private key to use, and only that one.
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,

    /// TCP port of the receivers' control connections.
    #[arg(long, value_name = "N", default_value_t = 12345)]
    pub control_port: u16,

    /// The receivers' work folder on the targets.
    #[arg(long, value_name = "DIR", default_value = crate::rundir::DEFAULT_WORKDIR, env = "MIGRATE_TARGET_WORKDIR")]
    pub target_workdir: PathBuf,

    /// Local work folder (as `send --workdir`).
    #[arg(long, value_name = "DIR", default_value = crate::rundir::DEFAULT_WORKDIR, env = "MIGRATE_WORKDIR")]
    pub workdir: PathBuf,

    /// Copy this very binary to each target and start it there as the receiver (without
    /// it, the target's own migrate of the same version is started).
    #[arg(long)]
    pub install_receiver: bool,

    /// Copy an image a target lacks there first (as `send --ship-image`); without it, a
    /// target without a unit's image is no place for that unit.
    #[arg(long)]
    pub ship_image: bool,

    /// What happens to the containers' TCP connections (as `send --tcp`).
    #[arg(long, value_enum, default_value_t = TcpPolicy::Close, value_name = "POLICY")]
    pub tcp: TcpPolicy,

    /// Place and move even where the target's CPU lacks instruction sets of this one's.
    #[arg(long)]
    pub ignore_cpu: bool,

    /// Move containers a systemd unit here runs (as `send --ignore-systemd-unit`).
    #[arg(long)]
    pub ignore_systemd_unit: bool,

    /// Checkpoint archive compression.
    #[arg(long, value_enum, default_value_t = CompressChoice::Auto)]
    pub compress: CompressChoice,

    /// Free text copied into every record's label column.
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub label: String,

    #[command(flatten)]
    pub output: OutputArgs,

    /// Pods or containers to move (a container of a pod or group brings the whole unit);
    /// default: every running container of this host.
    #[arg(value_name = "CONTAINER|POD")]
    pub names: Vec<String>,
}

/// The help's account of the rule, kept next to the code that follows it.
pub const PLACEMENT_RULE: &str = "\
Units: a pod moves whole with its members; containers that share namespaces, or bind-mount \
the same folder, move together; any other container alone. Each unit's bind-mounted folders \
travel as its --data folders.

Placement: every target is probed once (its podman/CRIU stack and CPU as `check` probes \
them, free memory, free space where the archives and each data folder land, its images, \
containers and pods). Units are placed largest first (resident memory), each on the target \
with the most memory left among those where it fits: the stack works and the CPU has this \
host's instruction sets, no container or pod of its name is there, its images are there \
(or --ship-image), its memory fits in the target's available memory and its archives and \
data fit on the target's file systems (10% margin; what earlier units take is counted). A \
unit that fits nowhere is refused, with every target's reason. Each move is one `send` \
with a receiver spawned on the target (--spawn-receiver); up to --parallel at a time, one \
per target.

Run it again after a drain that stopped half-way: moved units are no longer here, and a \
named one found on a target is skipped.

Exit status: 0 every unit moved (or placed, with --plan; or nothing to move); 1 the drain \
is incomplete but every unit runs on exactly one host (some moved; others refused, not \
started or rolled back); 2 nothing moved: refused before anything changed (arguments, or \
every unit refused; with --plan: a unit has no place); 3 a move needs a human (its record \
says which).";

/// `migrate drain`.
pub async fn run(args: DrainArgs) -> u8 {
    let ui = Arc::new(Ui::new("drain"));
    let clock = Stopwatch::start();
    let dests = match destinations(&args) {
        Ok(d) => d,
        Err(e) => {
            say!("migrate drain: error: {e}");
            return Exit::Refused.code();
        }
    };
    ui.phase("listing the containers here");
    let (all, pods) = match host_containers().await {
        Ok(x) => x,
        Err(e) => {
            say!("migrate drain: error: cannot list the containers here: {e}");
            return Exit::Refused.code();
        }
    };
    let workdirs = [args.workdir.as_path(), args.target_workdir.as_path()];
    let eligible = |p: &Path| {
        crate::plan::check_data_path(p).is_ok()
            && crate::plan::refuse_system_data(p, &workdirs).is_ok()
    };
    let mem = |c: &ContainerInfo| crate::engine::podman::resident_bytes(c.pid) / 1024;
    let formed = units::form(&all, &pods, &mem, &eligible);
    let (mut units, unknown) = units::select(formed, &args.names);
    for u in &mut units {
        for (i, d) in u.data.iter().enumerate() {
            u.data_kib[i] = crate::preflight::local_kib(d).await;
        }
    }
    ui.phase("asking the targets");
    let targets = probe_targets(&args, &dests, &units).await;
    for t in &targets {
        for w in &t.warnings {
            ui.warn(&format!("{}: {w}", t.to));
        }
    }
    if let Err(e) = account_for_unknown(&unknown, &targets, &ui) {
        ui.finish();
        say!("migrate drain: error: {e}");
        return Exit::Refused.code();
    }
    let decisions = place::place(&units, &targets, args.ship_image);
    let mut out = Output::new(&args.output);
    if args.plan {
        ui.finish();
        return plan_only(&args, &units, &targets, &decisions, &mut out, clock);
    }
    let moves = execute(&args, &units, &targets, &decisions, &ui, &mut out).await;
    ui.finish();
    summarise(&args, &units, &targets, &moves, &mut out, clock)
}

/// The targets as SSH destinations, each checked like `send --to`.
fn destinations(args: &DrainArgs) -> Result<Vec<Destination>, String> {
    if args.parallel == 0 {
        return Err("--parallel 0: give how many moves may run at once (1 or more)".into());
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for to in &args.to {
        let (user, host) = crate::plan::parse_destination(to).map_err(|e| e.0)?;
        if !seen.insert(host.clone()) {
            return Err(format!("--to {to}: named twice; name each target once"));
        }
        out.push(Destination {
            user,
            host,
            port: args.ssh_port,
            identity: args.identity.clone(),
        });
    }
    Ok(out)
}

/// Every container here and the pods of the running ones.
async fn host_containers() -> anyhow::Result<(Vec<ContainerInfo>, Vec<PodInfo>)> {
    let podman = Podman;
    let all = podman.all().await?;
    let mut ids: Vec<&str> = all
        .iter()
        .filter(|c| c.running && !c.pod.is_empty())
        .map(|c| c.pod.as_str())
        .collect();
    ids.sort();
    ids.dedup();
    let mut pods = Vec::new();
    for id in ids {
        if let Some(p) = podman.pod(id).await? {
            pods.push(p);
        }
    }
    Ok((all, pods))
}

/// Probes every target at once, one SSH round trip each.
async fn probe_targets(args: &DrainArgs, dests: &[Destination], units: &[Unit]) -> Vec<Target> {
    let mut data: Vec<PathBuf> = units.iter().flat_map(|u| u.data.clone()).collect();
    data.sort();
    data.dedup();
    let source = crate::engine::stack::stack_local().await;
    let workdir = args.target_workdir.display().to_string();
    let script = place::probe_script(&workdir, &data);
    let probes = dests.iter().zip(&args.to).map(|(d, to)| {
        let (script, data, source) = (&script, &data, &source);
        async move {
            let ssh = match Ssh::connect(d, SSH_CONNECT_TIMEOUT).await {
                Ok(s) => s,
                Err(e) => return place::unreachable(to, e.to_string()),
            };
            let t = match ssh.sh(script, PROBE_TIMEOUT).await {
                Ok(out) => place::parse(to, &out.stdout, data, source, args.ignore_cpu),
                Err(e) => place::unreachable(to, format!("probing it failed: {e}")),
            };
            ssh.close().await;
            t
        }
    });
    futures::future::join_all(probes).await
}

/// Names given that are no unit here: moved already (found on a target) is fine, said
/// on stderr; anything else is refused.
fn account_for_unknown(unknown: &[String], targets: &[Target], ui: &Ui) -> Result<(), String> {
    for n in unknown {
        match targets
            .iter()
            .find(|t| t.containers.contains(n) || t.pods.contains(n))
        {
            Some(t) => ui.info(&format!("{n} is not here but on {}: skipped", t.to)),
            None => {
                return Err(format!(
                    "{n:?} is no running container or pod here, nor on any target; `podman ps` lists what runs here"
                ));
            }
        }
    }
    Ok(())
}

/// Records on stdout: the CSV header once.
struct Output {
    format: Format,
    header_done: bool,
}

impl Output {
    fn new(o: &OutputArgs) -> Output {
        Output {
            format: o.format,
            header_done: o.no_header,
        }
    }

    fn write(&mut self, rec: &Record) {
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = rec.write(&mut stdout, self.format, self.header_done) {
            say!("migrate drain: cannot write a record: {e}");
        }
        self.header_done = true;
    }
}

/// A record of a unit that did not move (or, `role` "plan", where it would).
fn unit_record(args: &DrainArgs, u: &Unit, role: &'static str) -> Record {
    Record {
        label: args.label.clone(),
        source: crate::host::hostname(),
        containers: u.send_names.clone(),
        role,
        ..Default::default()
    }
}

fn host_of(t: &Target) -> String {
    crate::plan::parse_destination(&t.to)
        .map(|(_, h)| h)
        .unwrap_or_else(|_| t.to.clone())
}

/// `--plan`: the placement as records; exit 0 when every unit has a place, else 2.
fn plan_only(
    args: &DrainArgs,
    units: &[Unit],
    targets: &[Target],
    decisions: &[Decision],
    out: &mut Output,
    clock: Stopwatch,
) -> u8 {
    let mut placed = Vec::new();
    let mut refused = Vec::new();
    for (u, d) in units.iter().zip(decisions) {
        let mut rec = unit_record(args, u, "plan");
        match d {
            Decision::To(ti) => {
                rec.target = host_of(&targets[*ti]);
                placed.push(format!("{}→{}", u.name, rec.target));
            }
            Decision::Refused(why) => {
                rec.outcome = Some(Outcome::Refused);
                rec.error = why.clone();
                refused.push(format!("{} ({why})", u.name));
            }
        }
        say!(
            "plan: {} ({} MiB, data {}) → {}",
            u.name,
            u.mem_kib / 1024,
            data_shown(u),
            if rec.target.is_empty() {
                "refused: ".to_string() + &rec.error
            } else {
                rec.target.clone()
            }
        );
        out.write(&rec);
    }
    let outcome = if refused.is_empty() {
        Outcome::Ok
    } else {
        Outcome::Refused
    };
    let text = format!(
        "placed {} of {}{}; refused {}{}",
        placed.len(),
        units.len(),
        listed(&placed),
        refused.len(),
        listed(&refused)
    );
    say!("plan: {text}");
    out.write(&summary_record(args, units, targets, outcome, text, clock));
    if refused.is_empty() {
        Exit::Ok.code()
    } else {
        Exit::Refused.code()
    }
}

fn data_shown(u: &Unit) -> String {
    if u.data.is_empty() {
        return "none".into();
    }
    u.data
        .iter()
        .zip(&u.data_kib)
        .map(|(d, k)| format!("{} {} MiB", d.display(), k / 1024))
        .collect::<Vec<_>>()
        .join(", ")
}

fn listed(items: &[String]) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!(": {}", items.join(", "))
    }
}

fn summary_record(
    args: &DrainArgs,
    units: &[Unit],
    targets: &[Target],
    outcome: Outcome,
    text: String,
    clock: Stopwatch,
) -> Record {
    Record {
        run_id: crate::plan::new_run_id(),
        label: args.label.clone(),
        source: crate::host::hostname(),
        target: targets.iter().map(host_of).collect::<Vec<_>>().join(","),
        containers: units.iter().map(|u| u.name.clone()).collect(),
        outcome: Some(outcome),
        source_total_s: Some(clock.secs()),
        role: "drain",
        error: text,
        ..Default::default()
    }
}

/// How one unit's drain ended.
struct Move {
    unit: usize,
    target: Option<usize>,
    outcome: Outcome,
    why: String,
}

/// The `send` plan of one unit's move.
fn send_plan(args: &DrainArgs, u: &Unit, to: &str) -> Result<SendPlan, String> {
    let a = SendArgs {
        target: TargetArgs {
            to: to.to_string(),
            ssh_port: args.ssh_port,
            identity: args.identity.clone(),
            control_port: args.control_port,
            target_workdir: args.target_workdir.clone(),
            data: u.data.clone(),
            spawn_receiver: true,
            install_receiver: args.install_receiver,
            ship_image: args.ship_image,
            tcp: args.tcp,
            tcp_established: false,
            ignore_cpu: args.ignore_cpu,
            ignore_systemd_unit: args.ignore_systemd_unit,
        },
        workdir: args.workdir.clone(),
        dry_run: false,
        sequential_restore: false,
        compress: args.compress,
        keep_zero_pages: false,
        memory: crate::plan::MemoryChoice::Copy,
        output: OutputArgs {
            format: args.output.format,
            no_header: true,
        },
        hooks: Vec::new(),
        target_hooks: Vec::new(),
        hook_timeout: 30,
        label: args.label.clone(),
        containers: u.send_names.clone(),
    };
    SendPlan::resolve(&a).map_err(|e| e.0)
}

/// One move: `send` as the library runs it, with a reporter and signals of its own.
async fn move_one(
    unit: usize,
    target: usize,
    name: &str,
    plan: &SendPlan,
) -> (usize, usize, Record, Result<(), SendFailure>) {
    let role: &'static str = Box::leak(format!("send {name}").into_boxed_str());
    let ui = Arc::new(Ui::new(role));
    let (rec, result) = match Signals::reporting_to(ui.clone()) {
        Ok(mut signals) => crate::send::run(plan, &ui, &mut signals).await,
        Err(e) => {
            let rec = Record::default();
            let f = SendFailure {
                exit: Exit::Refused,
                error: e,
            };
            (rec, Err(f))
        }
    };
    ui.finish();
    (unit, target, rec, result)
}

/// Moves the placed units, up to `--parallel` at a time and one per target; prints each
/// unit's record as it ends.
async fn execute(
    args: &DrainArgs,
    units: &[Unit],
    targets: &[Target],
    decisions: &[Decision],
    ui: &Ui,
    out: &mut Output,
) -> Vec<Move> {
    let mut moves = Vec::new();
    let mut plans: Vec<Option<SendPlan>> = vec![None; units.len()];
    let mut pending = VecDeque::new();
    for (i, (u, d)) in units.iter().zip(decisions).enumerate() {
        let refused = |why: String| Move {
            unit: i,
            target: None,
            outcome: Outcome::Refused,
            why,
        };
        match d {
            Decision::To(ti) => match send_plan(args, u, &targets[*ti].to) {
                Ok(p) => {
                    plans[i] = Some(p);
                    pending.push_back((i, *ti));
                }
                Err(why) => moves.push(refused(why)),
            },
            Decision::Refused(why) => moves.push(refused(why.clone())),
        }
    }
    for m in &moves {
        let mut rec = unit_record(args, &units[m.unit], "drain");
        rec.outcome = Some(Outcome::Refused);
        rec.error = m.why.clone();
        ui.warn(&format!("{} stays here: {}", units[m.unit].name, m.why));
        out.write(&rec);
    }
    prepare_criu_wrappers(args.tcp);
    let signals = Signals::new().ok();
    let mut busy = BTreeSet::new();
    let mut running = FuturesUnordered::new();
    let mut stop: Option<String> = None;
    loop {
        while stop.is_none() && running.len() < args.parallel {
            let Some(pos) = pending.iter().position(|(_, t)| !busy.contains(t)) else {
                break;
            };
            let (i, ti) = pending.remove(pos).expect("found");
            busy.insert(ti);
            ui.info(&format!("moving {} to {}", units[i].name, targets[ti].to));
            let plan = plans[i].as_ref().expect("planned");
            running.push(move_one(i, ti, &units[i].name, plan));
        }
        let Some((i, ti, rec, result)) = running.next().await else {
            break;
        };
        busy.remove(&ti);
        out.write(&rec);
        let outcome = rec.outcome.unwrap_or(Outcome::Failed);
        let why = match &result {
            Ok(()) => String::new(),
            Err(f) => format!("{:#}", f.error),
        };
        ui.info(&format!(
            "{} → {}: {}",
            units[i].name,
            targets[ti].to,
            outcome.as_str()
        ));
        if outcome != Outcome::Ok && !args.keep_going && stop.is_none() {
            stop = Some(format!(
                "not started: the move of {} ended {} (no --keep-going)",
                units[i].name,
                outcome.as_str()
            ));
        }
        if stop.is_none() && signals.as_ref().is_some_and(Signals::fired) {
            stop = Some("not started: drain interrupted by a signal".into());
        }
        moves.push(Move {
            unit: i,
            target: Some(ti),
            outcome,
            why,
        });
    }
    let why = stop.unwrap_or_default();
    for (i, _) in pending {
        let mut rec = unit_record(args, &units[i], "drain");
        rec.outcome = Some(Outcome::Refused);
        rec.error = why.clone();
        out.write(&rec);
        moves.push(Move {
            unit: i,
            target: None,
            outcome: Outcome::Refused,
            why: why.clone(),
        });
    }
    moves
}

/// Parallel sends would race to write the same CRIU wrapper the first time: it is written
/// once before they start (best effort: each send makes sure of it again).
fn prepare_criu_wrappers(tcp: TcpPolicy) {
    for locks in [false, true] {
        let _ = tcp.criu(locks).ensure_wrapper();
    }
}

/// The summary record and the exit status of a drain that moved.
fn summarise(
    args: &DrainArgs,
    units: &[Unit],
    targets: &[Target],
    moves: &[Move],
    out: &mut Output,
    clock: Stopwatch,
) -> u8 {
    let of = |o: Outcome| -> Vec<String> {
        moves
            .iter()
            .filter(|m| m.outcome == o)
            .map(|m| match (o, m.target) {
                (Outcome::Ok, Some(t)) => {
                    format!("{}→{}", units[m.unit].name, host_of(&targets[t]))
                }
                _ => format!("{} ({})", units[m.unit].name, m.why),
            })
            .collect()
    };
    let (moved, refused, rolled, failed) = (
        of(Outcome::Ok),
        of(Outcome::Refused),
        of(Outcome::RolledBack),
        of(Outcome::Failed),
    );
    let (outcome, exit) = verdict(moved.len(), refused.len(), rolled.len(), failed.len());
    let text = if units.is_empty() {
        "nothing to move: no running container here".to_string()
    } else {
        format!(
            "moved {} of {}{}; refused {}{}; rolled back {}{}; failed {}{}",
            moved.len(),
            units.len(),
            listed(&moved),
            refused.len(),
            listed(&refused),
            rolled.len(),
            listed(&rolled),
            failed.len(),
            listed(&failed)
        )
    };
    say!("drain: {text}");
    out.write(&summary_record(args, units, targets, outcome, text, clock));
    exit.code()
}

/// The summary's outcome and the exit status from the counts of moves per outcome.
fn verdict(moved: usize, refused: usize, rolled: usize, failed: usize) -> (Outcome, Exit) {
    if failed > 0 {
        (Outcome::Failed, Exit::Failed)
    } else if rolled > 0 {
        (Outcome::RolledBack, Exit::RolledBack)
    } else if refused > 0 && moved == 0 {
        (Outcome::Refused, Exit::Refused)
    } else if refused > 0 {
        (Outcome::Refused, Exit::RolledBack)
    } else {
        (Outcome::Ok, Exit::Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_says_how_far_the_drain_got() {
        assert_eq!(verdict(4, 0, 0, 0), (Outcome::Ok, Exit::Ok));
        assert_eq!(verdict(0, 0, 0, 0), (Outcome::Ok, Exit::Ok));
        assert_eq!(verdict(0, 2, 0, 0), (Outcome::Refused, Exit::Refused));
        assert_eq!(verdict(3, 1, 0, 0), (Outcome::Refused, Exit::RolledBack));
        assert_eq!(verdict(3, 0, 1, 0), (Outcome::RolledBack, Exit::RolledBack));
        assert_eq!(verdict(3, 0, 1, 1), (Outcome::Failed, Exit::Failed));
    }
}
