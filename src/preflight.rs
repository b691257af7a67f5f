//! Everything checked before a freeze. `migrate check` reports every finding; `migrate
//! send` runs the very same checks and refuses (exit 2) on the first failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::engine::podman::{self, ContainerInfo, Podman, PodmanError};
use crate::engine::stack::{self, Facts, Finding, Level, Side};
use crate::exec::shell_quote;
use crate::progress::Ui;
use crate::protocol::{Channel, Direction, PROTOCOL_VERSION, PodSpec, ToReceiver, ToSender};
use crate::sink::SinkArgs;
use crate::transport::ssh::{Destination, Ssh};

const SSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CONTROL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CONTROL_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
const REMOTE_TIMEOUT: Duration = Duration::from_secs(120);

/// The sender's end of a control connection.
pub type Control = Channel<BufReader<OwnedReadHalf>, OwnedWriteHalf>;

/// What the caller wants checked.
pub struct Want<'a> {
    pub dest: &'a Destination,
    pub control_port: u16,
    /// The receiver's work folder on the target (`--target-workdir`).
    pub target_workdir: &'a str,
    pub containers: &'a [String],
    pub data: &'a [PathBuf],
    pub ship_images: bool,
    /// What happens to the containers' TCP connections.
    pub tcp: crate::plan::TcpPolicy,
    /// `--ignore-cpu`: a target CPU without some of the source's features only warns.
    pub ignore_cpu: bool,
    /// `--ignore-systemd-unit`: a container run by an active unit only warns.
    pub ignore_systemd_unit: bool,
    pub run_id: &'a str,
    pub label: &'a str,
    /// `send` only: the run folder to create on the target (under the receiver's workdir).
    pub create_run_dir: bool,
    /// Start the receiver on the target over SSH instead of expecting one.
    pub spawn: Option<Spawn>,
}

impl<'a> Want<'a> {
    /// The checks for `target`. `act`: this is a real `send` (create the run folder, really
    /// spawn a receiver) rather than `check` or `--dry-run`.
    pub fn new(
        target: &'a crate::plan::TargetPlan,
        run_id: &'a str,
        label: &'a str,
        act: bool,
    ) -> Want<'a> {
        Want {
            dest: &target.dest,
            control_port: target.control_port,
            target_workdir: &target.target_workdir,
            containers: &target.containers,
            data: &target.data,
            ship_images: target.ship_images,
            tcp: target.tcp,
            ignore_cpu: target.ignore_cpu,
            ignore_systemd_unit: target.ignore_systemd_unit,
            run_id,
            label,
            create_run_dir: act,
            spawn: target.spawn_receiver.then_some(Spawn {
                install: target.install_receiver,
                start: act,
            }),
        }
    }
}

/// `--spawn-receiver` / `--install-receiver`.
#[derive(Debug, Clone, Copy)]
pub struct Spawn {
    /// Copy this very binary to the target when it lacks the same version.
    pub install: bool,
    /// Really start it (`send`); `check` only looks.
    pub start: bool,
}

/// Where `--install-receiver` puts our binary on the target.
pub const INSTALL_DIR: &str = "/var/lib/migrate/bin";
/// How long a spawned receiver waits for its migration before it gives up.
const SPAWNED_IDLE_SECS: u64 = 600;

/// A receiver that answered hello and, for `send`, proved that it holds the run's
/// secret: its control channel is authenticated.
pub struct Welcome {
    pub control: Control,
    pub receiver_version: String,
    pub hostname: String,
}

/// All that the checks found, and what they opened on the way.
#[derive(Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub infos: Vec<ContainerInfo>,
    pub ssh: Option<Ssh>,
    pub receiver: Option<Welcome>,
    /// Images the target lacks (ID, name to save it by).
    pub missing_images: Vec<(String, String)>,
    /// The run folder on the target, when it was created.
    pub remote_dir: Option<String>,
    /// The target can decompress zstd streams (`zstd` command).
    pub target_zstd: bool,
    /// The receiver's binary runs for this SSH user: archives go through `migrate sink`.
    pub target_sink: Option<String>,
    /// That sink can leave CRIU's zero pages out (an older one cannot).
    pub target_zero_pages: bool,
    /// The receiver's binary restores into pods (an older one rejects the manifest's pod).
    pub target_pods: bool,
    /// The stack here, as probed.
    pub source_stack: Option<Facts>,
    /// The stack on the target, when SSH got that far.
    pub target_stack: Option<Facts>,
    /// The OCI runtime of each container (what will checkpoint and restore it).
    pub runtimes: Vec<crate::engine::runtime::Runtime>,
    /// The pod the containers move as, and its infra image's ID.
    pub pod: Option<(PodSpec, String)>,
    /// The containers' addresses that move with them (macvlan/ipvlan networks).
    pub moving: Vec<crate::engine::address::Moving>,
    /// The receiver's binary answered and does not guard and announce such addresses (an
    /// older build).
    pub target_lacks_addresses: bool,
    /// The receiver's binary restores lazily (post-copy memory).
    pub target_lazy: bool,
}

impl Report {
    pub fn first_failure(&self) -> Option<&Finding> {
        self.findings.iter().find(|f| f.level == Level::Fail)
    }
    fn push(&mut self, f: Finding) {
        self.findings.push(f);
    }
}

/// Runs every check that can run; stops early only where later checks need what failed
/// (no SSH → nothing on the target can be checked).
pub async fn run(want: &Want<'_>, ui: &Ui) -> Report {
    let mut r = Report::default();
    ui.phase("checking the containers here");
    source_containers(want, &mut r).await;
    ui.phase("checking podman and CRIU here");
    let local = stack::stack_local().await;
    stack::stack_findings(&local, Side::Source, &mut r.findings);
    runtime_findings(want, &local, &mut r).await;
    r.source_stack = Some(local);

    ui.phase(&format!("checking SSH to {}", want.dest.ssh_target()));
    let Some(ssh) = connect_ssh(want, &mut r).await else {
        return r;
    };
    let (listener, sink) = match receiver_side(&ssh, want, ui, &mut r).await {
        Ok(l) => l,
        Err(f) => {
            r.push(f);
            r.ssh = Some(ssh);
            return r;
        }
    };
    ui.phase("checking the target");
    check_target(&ssh, want, &listener, sink, &mut r).await;
    let secret = place_secret(&ssh, &mut r).await;
    let skip_receiver = !listener.listening() || (want.create_run_dir && secret.is_none());
    if !skip_receiver {
        ui.phase("checking the receiver");
        match connect_receiver(want, secret).await {
            Ok(w) => {
                r.push(receiver_answers(want, &w));
                r.receiver = Some(w);
            }
            Err(f) => r.push(f),
        }
    }
    r.ssh = Some(ssh);
    r
}

/// Which runtime will checkpoint each container here, and what stops it.
async fn runtime_findings(want: &Want<'_>, here: &Facts, r: &mut Report) {
    use crate::engine::runtime;
    let names: Vec<String> = r
        .infos
        .iter()
        .filter(|c| c.running)
        .map(|c| c.name.clone())
        .collect();
    match runtime::of_containers(&names).await {
        Ok(rts) => {
            let opts = want.tcp.criu(false);
            r.findings
                .extend(runtime::source_findings(here, &rts, opts));
            r.runtimes = rts;
        }
        Err(e) => r.push(Finding::new(
            Level::Fail,
            Side::Source,
            "runtime_unreadable",
            format!("cannot read the containers' OCI runtimes: {e}"),
        )),
    }
}

/// The SSH connection to the target, or its failure as a finding.
async fn connect_ssh(want: &Want<'_>, r: &mut Report) -> Option<Ssh> {
    match Ssh::connect(want.dest, SSH_CONNECT_TIMEOUT).await {
        Ok(s) => {
            r.push(Finding::new(
                Level::Ok,
                Side::Target,
                "ssh_ok",
                format!(
                    "SSH to {} works (key accepted, host key known, no prompt)",
                    s.label()
                ),
            ));
            Some(s)
        }
        Err(e) => {
            r.push(Finding::new(
                Level::Fail,
                Side::Target,
                "ssh_failed",
                e.to_string(),
            ));
            None
        }
    }
}

/// Who listens on the control port, as the target's kernel tells it over SSH, after
/// starting a receiver there when asked; and the receiver's binary, for `migrate sink`.
async fn receiver_side(
    ssh: &Ssh,
    want: &Want<'_>,
    ui: &Ui,
    r: &mut Report,
) -> Result<(Listener, Option<String>), Finding> {
    ui.phase("checking who listens on the control port");
    let mut listener = verified_listener(ssh, want).await?;
    let mut sink = listener.receiver_exe();
    if let Some(spawn) = want.spawn {
        ui.phase("checking migrate on the target");
        let (findings, spawned) = spawn_receiver(ssh, want, spawn, &listener).await?;
        r.findings.extend(findings);
        if let Some(bin) = spawned {
            sink = Some(bin);
            // What listens now must be the receiver just started.
            listener = verified_listener(ssh, want).await?;
        }
    }
    if let Some(note) = listener.note() {
        r.push(note);
    }
    Ok((listener, sink))
}

/// Inspects the target in one SSH round trip: its stack, the names and images the
/// containers need, bind mounts, free space, the sink, and the run folder (created for
/// `send`).
async fn check_target(
    ssh: &Ssh,
    want: &Want<'_>,
    listener: &Listener,
    sink: Option<String>,
    r: &mut Report,
) {
    let step = match (listener.listening(), want.create_run_dir) {
        (false, _) => RunDirStep::Skip,
        (true, false) => RunDirStep::Check,
        (true, true) => RunDirStep::Create,
    };
    let mut script = target_script(&r.infos, want.data, want.target_workdir, want.run_id, step);
    if let Some((pod, infra_id)) = &r.pod {
        script.push_str(&crate::engine::pod::target_script(pod, infra_id));
    }
    script.push_str(&crate::engine::address::target_script(&r.moving));
    if let Some(exe) = &sink {
        script.push_str(&SinkArgs::probe().shell_command(exe));
        script.push_str(" 2>/dev/null\n");
    }
    let out = match ssh.sh(&script, REMOTE_TIMEOUT).await {
        Ok(out) => out.stdout,
        Err(e) => {
            r.push(Finding::new(
                Level::Fail,
                Side::Target,
                "target_probe_failed",
                format!("checking the target failed: {e}"),
            ));
            return;
        }
    };
    let facts = Facts::parse(&out);
    stack::stack_findings(&facts, Side::Target, &mut r.findings);
    if let Some(here) = &r.source_stack {
        r.findings.extend(crate::engine::runtime::pair_findings(
            here,
            &facts,
            &r.runtimes,
        ));
        r.push(crate::engine::cpu::cpu_finding(
            here,
            &facts,
            want.ignore_cpu,
        ));
    }
    r.target_zstd = facts.zstd;
    r.target_stack = Some(facts);
    if let Some(ready) = crate::sink::Readiness::parse(&out) {
        r.target_sink = sink;
        r.target_zero_pages = ready.zero_pages;
        r.target_pods = ready.pods;
        r.target_lacks_addresses = !ready.addresses;
        r.target_lazy = ready.lazy;
    }
    r.findings.extend(crate::engine::address::target_findings(
        &out,
        &r.moving,
        want.tcp == crate::plan::TcpPolicy::Established,
        !r.target_lacks_addresses,
    ));
    let mut needs = vec![(
        "archives".to_string(),
        r.infos
            .iter()
            .map(|c| podman::resident_bytes(c.pid) / 1024)
            .sum::<u64>(),
    )];
    for d in want.data {
        needs.push((d.display().to_string(), local_kib(d).await));
    }
    let (findings, missing) = target_findings(&out, &r.infos, want.data, &needs, want.ship_images);
    r.findings.extend(findings);
    r.missing_images = missing;
    if let Some((pod, infra_id)) = &r.pod {
        let (findings, ship) =
            crate::engine::pod::target_findings(&out, pod, infra_id, want.ship_images);
        r.findings.extend(findings);
        r.missing_images.extend(ship);
        if !r.target_pods {
            // Its receiver would read the manifest's pod only after the freeze, and refuse.
            r.push(
                Finding::new(
                    Level::Fail,
                    Side::Target,
                    "receiver_without_pods",
                    format!(
                        "the receiver's migrate on the target cannot restore into a pod (an older build): pod {} cannot move to it",
                        pod.name
                    ),
                )
                .fix("install this build there (`--install-receiver`) and start its receiver again"),
            );
        }
    }
    let run_dir = crate::rundir::remote_run_dir(want.target_workdir, want.run_id);
    let said = out.lines().find_map(|l| l.strip_prefix("run_dir="));
    match (said, step) {
        (Some("ok"), RunDirStep::Create) => r.remote_dir = Some(run_dir),
        (Some("ok"), _) => {}
        (Some(why), _) => r.push(
            Finding::new(Level::Fail, Side::Target, "run_dir_unsafe", format!("run folder: {why}")).fix(
                "the receiver's work folder must be a plain folder owned by the SSH user and closed to others; pass --target-workdir if the receiver uses another --workdir",
            ),
        ),
        (None, RunDirStep::Create) => r.push(Finding::new(
            Level::Fail,
            Side::Target,
            "run_dir_not_created",
            format!("could not create {run_dir}"),
        )),
        (None, _) => {}
    }
}

/// Only a run folder that SSH made gets the secret, and only then does the sender talk
/// to the port: the receiver must prove it read that secret before it hears more.
async fn place_secret(ssh: &Ssh, r: &mut Report) -> Option<Vec<u8>> {
    let dir = r
        .remote_dir
        .as_ref()
        .filter(|_| r.first_failure().is_none())?;
    let secret = crate::secret::random_hex(32);
    let path = crate::transport::ssh::remote_join(dir, crate::rundir::SECRET_FILE);
    match ssh.upload(secret.as_bytes(), &path, REMOTE_TIMEOUT).await {
        Ok(_) => Some(hex::decode(&secret).expect("hex")),
        Err(e) => {
            r.push(Finding::new(
                Level::Fail,
                Side::Target,
                "secret_not_placed",
                format!("cannot place the migration secret there: {e}"),
            ));
            None
        }
    }
}

fn receiver_answers(want: &Want<'_>, w: &Welcome) -> Finding {
    Finding::new(
        Level::Ok,
        Side::Target,
        "receiver_answers",
        format!(
            "receiver on {}:{} answers (migrate {} on {}{})",
            want.dest.host,
            want.control_port,
            w.receiver_version,
            w.hostname,
            if want.create_run_dir {
                ", proved it holds this run's secret"
            } else {
                ""
            }
        ),
    )
}

async fn source_containers(want: &Want<'_>, r: &mut Report) {
    let podman = Podman;
    for name in &crate::engine::pod::expand(&podman, want.containers).await {
        match podman.inspect(std::slice::from_ref(name)).await {
            Ok(mut v) if !v.is_empty() => {
                let c = v.remove(0);
                if !c.running {
                    r.push(
                        Finding::new(
                            Level::Fail,
                            Side::Source,
                            "container_not_running",
                            format!("container {} is not running (it is {})", c.name, c.status),
                        )
                        .fix("start it or leave it out"),
                    );
                } else {
                    r.push(Finding::new(
                        Level::Ok,
                        Side::Source,
                        "container_running",
                        format!("container {} runs (image {})", c.name, short(&c.image_id)),
                    ));
                    if podman::holds_file_locks(c.pid).unwrap_or(false) {
                        r.push(Finding::new(
                            Level::Info,
                            Side::Source,
                            "container_file_locks",
                            format!("{} holds file locks: it is checkpointed and restored with --file-locks", c.name),
                        ));
                    }
                    if let Some(f) = crate::engine::privileges::dump_finding(&c.name, c.pid) {
                        r.push(f);
                    }
                    match crate::engine::tcp::Connections::of_pid(c.pid) {
                        Ok(n) => r.push(connection_finding(&c.name, n, want.tcp)),
                        Err(e) => r.push(Finding::new(
                            Level::Warn,
                            Side::Source,
                            "container_tcp_unreadable",
                            format!("cannot read {}'s TCP connections: {e}", c.name),
                        )),
                    }
                }
                r.infos.push(c);
            }
            Ok(_) | Err(PodmanError::NoSuchContainer(_)) => r.push(
                Finding::new(
                    Level::Fail,
                    Side::Source,
                    "container_missing",
                    format!("container {name:?} does not exist on this host"),
                )
                .fix("`podman ps` lists the running containers"),
            ),
            Err(e) => r.push(Finding::new(
                Level::Fail,
                Side::Source,
                "container_inspect_failed",
                format!("cannot inspect {name}: {e}"),
            )),
        }
    }
    keeper_findings(want, r).await;
    address_findings(want, r).await;
    // podman finds out that it cannot export a container that depends on another only
    // after CRIU has dumped (and so stopped) it: that is checked here, before anything.
    match podman.all().await {
        Ok(all) => {
            r.findings.extend(dependency_findings(&r.infos, &all));
            let (findings, pod) = crate::engine::pod::source_pod(&podman, &r.infos, &all).await;
            r.findings.extend(findings);
            r.pod = pod;
        }
        Err(e) => r.push(Finding::new(
            Level::Fail,
            Side::Source,
            "container_list_failed",
            format!("cannot list the containers here to check what shares their namespaces: {e}"),
        )),
    }
}

/// Which addresses move with their containers, and which connections cannot be kept.
async fn address_findings(want: &Want<'_>, r: &mut Report) {
    use crate::engine::address;
    match address::networks_of(&r.infos).await {
        Ok(nets) => {
            r.moving = address::moving(&r.infos, &nets);
            let keep = want.tcp == crate::plan::TcpPolicy::Established;
            let found = address::source_findings(&r.infos, &r.moving, keep);
            r.findings.extend(found);
        }
        Err(e) => r.push(Finding::new(
            Level::Fail,
            Side::Source,
            "address_networks_unreadable",
            format!("cannot read the containers' podman networks: {e}"),
        )),
    }
}

/// Restart policies and systemd units: what could start a moved container here again.
async fn keeper_findings(want: &Want<'_>, r: &mut Report) {
    use crate::engine::units;
    let names: Vec<String> = r.infos.iter().map(|c| c.name.clone()).collect();
    if names.is_empty() {
        return;
    }
    let keepers = match units::keepers(&names).await {
        Ok(k) => k,
        Err(e) => {
            r.push(Finding::new(
                Level::Warn,
                Side::Source,
                "container_keepers_unreadable",
                format!("cannot read the containers' restart policies and units: {e}"),
            ));
            return;
        }
    };
    for k in &keepers {
        let state = match &k.unit {
            Some(u) => Some(units::unit_state(u).await),
            None => None,
        };
        r.findings
            .extend(units::findings(k, state.as_ref(), want.ignore_systemd_unit));
    }
}

/// What the connection policy will do with a container's TCP connections now; with
/// `--tcp refuse`, established connections fail before the freeze (CRIU would refuse
/// them at the dump).
pub fn connection_finding(
    name: &str,
    n: crate::engine::tcp::Connections,
    tcp: crate::plan::TcpPolicy,
) -> Finding {
    use crate::plan::TcpPolicy;
    let now = format!(
        "{name} has {} listening, {} established, {} in handshake TCP connections",
        n.listening, n.established, n.handshake
    );
    let what = match tcp {
        TcpPolicy::Close => {
            "established ones are restored closed on the target (their clients see a reset and reconnect), handshakes are left out (the client retries)"
        }
        TcpPolicy::Established => {
            "established ones are carried over (the container's address must move with it), handshakes are left out"
        }
        TcpPolicy::Refuse if n.established > 0 => {
            return Finding::new(
                Level::Fail,
                Side::Source,
                "tcp_established_refused",
                format!("{now}: with --tcp refuse CRIU would refuse the established ones"),
            )
            .fix("use --tcp close (the default: clients reconnect) or --tcp established");
        }
        TcpPolicy::Refuse => {
            "one still in its handshake at the freeze fails the checkpoint (it is retried)"
        }
    };
    Finding::new(
        Level::Info,
        Side::Source,
        "tcp_connections",
        format!("{now}; --tcp {}: {what}", tcp.as_str()),
    )
}

/// Containers that cannot be moved by a checkpoint archive because of another container,
/// found before anything is frozen. podman (4.3 to this day) checks this only after
/// CRIU's dump, which has stopped the container by then:
/// - one that joins another's namespaces (`--network/--pid/--ipc/--uts container:X`) or
///   requires another (`--requires`): podman refuses to export it ("cannot export
///   checkpoints of containers with dependencies"), even when X is moved along;
/// - one in a pod whose other members stay here: podman restores a pod's member only into
///   a pod (`restore --import --pod`, which runc accepts as long as it knows
///   `restore --lsm-mount-context` and CRIU is 3.16 or newer), and migrate moves a pod
///   whole, re-creating it on the target;
/// - one whose namespaces a container that stays here shares: that one would be left
///   with the namespaces of a container gone to the target, and podman would not remove
///   the moved one here.
///
/// `moved`: the containers to move; `all`: every container on this host.
pub fn dependency_findings(moved: &[ContainerInfo], all: &[ContainerInfo]) -> Vec<Finding> {
    let is = |c: &ContainerInfo, r: &str| {
        c.name == r || c.id == r || (r.len() >= 12 && c.id.starts_with(r))
    };
    let name_of = |r: &str| {
        all.iter()
            .chain(moved)
            .find(|c| is(c, r))
            .map_or_else(|| short(r).to_string(), |c| c.name.clone())
    };
    let mut out = Vec::new();
    for c in moved {
        if !c.pod.is_empty() {
            let left: Vec<&str> = all
                .iter()
                .filter(|o| o.pod == c.pod && !c.dependencies.contains(&o.id))
                .filter(|o| !moved.iter().any(|m| m.id == o.id))
                .map(|o| o.name.as_str())
                .collect();
            if !left.is_empty()
                && !out
                    .iter()
                    .any(|f: &Finding| f.code == "pod_split" && f.text.contains(short(&c.pod)))
            {
                out.push(
                    Finding::new(
                        Level::Fail,
                        Side::Source,
                        "pod_split",
                        format!(
                            "{} is in pod {} and shares the namespaces of its infra container with {}, which {} not being moved: a pod moves whole",
                            c.name,
                            short(&c.pod),
                            left.join(", "),
                            if left.len() == 1 { "is" } else { "are" }
                        ),
                    )
                    .fix(format!(
                        "name the pod to move all of its members together (migrate send --to HOST POD), or run {} outside a pod",
                        c.name
                    )),
                );
            }
        }
        let pod_infra =
            |dep: &String| !c.pod.is_empty() && all.iter().any(|o| is(o, dep) && o.pod == c.pod);
        for dep in c.dependencies.iter().filter(|d| !pod_infra(d)) {
            let dep_name = name_of(dep);
            let kinds: Vec<&str> = c
                .shares
                .iter()
                .filter(|(_, r)| {
                    all.iter().chain(moved).any(|o| is(o, r) && is(o, dep)) || r == dep
                })
                .map(|(k, _)| *k)
                .collect();
            let how = if kinds.is_empty() {
                format!("requires {dep_name} (--requires)")
            } else {
                format!("shares the {} namespace of {dep_name}", kinds.join(", "))
            };
            let along = if moved.iter().any(|m| is(m, dep)) {
                ""
            } else {
                ", which is not being moved"
            };
            out.push(
                Finding::new(
                    Level::Fail,
                    Side::Source,
                    "container_depends",
                    format!(
                        "{name} {how}{along}: podman refuses to export the checkpoint of a container that depends on another (\"cannot export checkpoints of containers with dependencies\"), even when both move, and says so only after CRIU's dump has stopped {name}",
                        name = c.name
                    ),
                )
                .fix(format!(
                    "moving them together does not help: start {name} with namespaces of its own (for example publish its ports instead of --network container:{dep_name}) to move it, or move {dep_name} without it only once nothing joins {dep_name}'s namespaces",
                    name = c.name
                )),
            );
        }
    }
    for o in all {
        if moved.iter().any(|m| m.id == o.id) {
            continue;
        }
        for m in moved {
            if o.dependencies.iter().any(|d| is(m, d)) {
                out.push(
                    Finding::new(
                        Level::Fail,
                        Side::Source,
                        "container_depended_on",
                        format!(
                            "{} depends on {} (it shares its namespaces or requires it) and stays here: it would be left with the namespaces of a container gone to the target, and podman would not remove {} here",
                            o.name, m.name, m.name
                        ),
                    )
                    .fix(format!(
                        "stop and remove {} first (or leave {} where it is); podman cannot move {} itself by checkpoint",
                        o.name, m.name, o.name
                    )),
                );
            }
        }
    }
    out
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Makes sure the target can run a receiver of our version and, when asked, starts one
/// in the background over SSH (it handles one migration, then exits).
/// Returns the findings and, when it started one, the receiver's binary.
async fn spawn_receiver(
    ssh: &Ssh,
    want: &Want<'_>,
    spawn: Spawn,
    listener: &Listener,
) -> Result<(Vec<Finding>, Option<String>), Finding> {
    let mut findings = Vec::new();
    let Some(bin) = receiver_binary(ssh, spawn, &mut findings).await? else {
        return Ok((findings, None));
    };
    if !spawn.start {
        return Ok((findings, None));
    }
    // A receiver may already listen there (verified by `Listener::verdict`): then use it.
    if listener.listening() {
        findings.push(Finding::new(
            Level::Info,
            Side::Target,
            "receiver_already_listening",
            format!(
                "a receiver already listens on port {}; using it",
                want.control_port
            ),
        ));
        return Ok((findings, None));
    }
    findings.push(start_receiver(ssh, want, &bin).await?);
    Ok((findings, Some(bin)))
}

/// The target's migrate of our version: found there, or (`--install-receiver`, `send`)
/// this very binary copied there. `None` when `check` only says what would be copied.
async fn receiver_binary(
    ssh: &Ssh,
    spawn: Spawn,
    findings: &mut Vec<Finding>,
) -> Result<Option<String>, Finding> {
    let ours = env!("CARGO_PKG_VERSION");
    let installed = format!("{INSTALL_DIR}/migrate-{ours}");
    let probe = format!(
        "for b in {i} \"$(command -v migrate)\"; do [ -x \"$b\" ] && v=$(\"$b\" --version 2>/dev/null) && echo \"$b=$v\"; done; true",
        i = shell_quote(&installed)
    );
    let out = ssh.sh(&probe, REMOTE_TIMEOUT).await.map_err(|e| {
        Finding::new(
            Level::Fail,
            Side::Target,
            "migrate_lookup_failed",
            format!("cannot look for migrate there: {e}"),
        )
    })?;
    let found = out
        .stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .find(|(_, v)| v.trim() == format!("migrate {ours}"))
        .map(|(b, _)| b.to_string());
    match (found, spawn.install) {
        // --install-receiver: always this very binary, so both ends are the same build.
        (_, true) if spawn.start => {
            install_self(ssh, &installed).await?;
            findings.push(Finding::new(
                Level::Info,
                Side::Target,
                "installed",
                format!("installed this migrate {ours} as {installed}"),
            ));
            Ok(Some(installed))
        }
        (_, true) => {
            findings.push(Finding::new(
                Level::Info,
                Side::Target,
                "will_install",
                format!("--install-receiver will copy this binary to {installed}"),
            ));
            Ok(None)
        }
        (Some(b), false) => {
            findings.push(Finding::new(
                Level::Ok,
                Side::Target,
                "migrate_same_version",
                format!("{b} is migrate {ours}, the same version"),
            ));
            Ok(Some(b))
        }
        (None, false) => {
            let have = out.stdout.lines().collect::<Vec<_>>().join(", ");
            let found = if have.is_empty() {
                String::new()
            } else {
                format!(" (found {have})")
            };
            Err(Finding::new(
                Level::Fail,
                Side::Target,
                "migrate_missing",
                format!("no migrate {ours} there{found}"),
            )
            .fix("install the same version there, or add --install-receiver to copy this binary"))
        }
    }
}

/// Copies this very binary to `installed` on the target.
async fn install_self(ssh: &Ssh, installed: &str) -> Result<(), Finding> {
    let me = std::env::current_exe().map_err(|e| {
        Finding::new(
            Level::Fail,
            Side::Source,
            "own_binary_missing",
            format!("cannot find this binary: {e}"),
        )
    })?;
    let file = tokio::fs::File::open(&me).await.map_err(|e| {
        Finding::new(
            Level::Fail,
            Side::Source,
            "own_binary_unreadable",
            format!("cannot read {}: {e}", me.display()),
        )
    })?;
    ssh.sh(&format!("mkdir -p {INSTALL_DIR}"), REMOTE_TIMEOUT)
        .await
        .and(ssh.upload(file, installed, REMOTE_TIMEOUT).await.map(drop))
        .and(
            ssh.run(
                "chmod",
                &["0755".into(), installed.to_string()],
                REMOTE_TIMEOUT,
            )
            .await
            .map(drop),
        )
        .map_err(|e| {
            Finding::new(
                Level::Fail,
                Side::Target,
                "install_failed",
                format!("cannot install migrate there: {e}"),
            )
        })
}

/// Starts `bin receive` in the background on the target and waits until it listens.
async fn start_receiver(ssh: &Ssh, want: &Want<'_>, bin: &str) -> Result<Finding, Finding> {
    let workdir = want.target_workdir.trim_end_matches('/');
    let log = format!("{workdir}/receiver-{}.log", want.run_id);
    let start = format!(
        "umask 077 && mkdir -p {w} && set -C && nohup setsid {b} receive --listen 0.0.0.0:{p} --workdir {w} --idle-timeout {SPAWNED_IDLE_SECS} > {l} 2>&1 < /dev/null &",
        b = shell_quote(bin),
        w = shell_quote(workdir),
        p = want.control_port,
        l = shell_quote(&log)
    );
    ssh.sh(&start, REMOTE_TIMEOUT).await.map_err(|e| {
        Finding::new(
            Level::Fail,
            Side::Target,
            "receiver_start_failed",
            format!("cannot start the receiver there: {e}"),
        )
    })?;
    let addr = format!("{}:{}", bracketed(&want.dest.host), want.control_port);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        // Only a connection attempt: nothing is said before the receiver is verified.
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(&addr)).await
        {
            return Ok(Finding::new(
                Level::Ok,
                Side::Target,
                "receiver_started",
                format!("started a receiver there over SSH (log {log})"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(Finding::new(
        Level::Fail,
        Side::Target,
        "spawned_receiver_not_listening",
        format!("the receiver started over SSH does not listen on {addr}"),
    )
    .fix(format!("read {log} on the target")))
}

fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// What listens on the control port on the target, from `ss` run there over SSH.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Listener {
    /// The SSH user's uid there.
    pub me: Option<u32>,
    /// `ss` is missing there: nobody can be named.
    pub no_ss: bool,
    /// Listening sockets on the port.
    pub sockets: usize,
    /// The processes holding them (visible to the SSH user).
    pub procs: Vec<ListenerProc>,
}

/// One process listening on the control port.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerProc {
    pub pid: u32,
    pub uid: Option<u32>,
    /// Its first argument (`receive` for a receiver).
    pub verb: String,
    /// Its binary, as `/proc/PID/exe` says.
    pub exe: String,
}

impl ListenerProc {
    /// A `migrate receive` run by root or by the SSH user: the same trust as SSH itself.
    fn is_receiver(&self, me: Option<u32>) -> bool {
        self.verb == "receive" && self.uid.is_some_and(|u| u == 0 || Some(u) == me)
    }
}

/// Reports what listens on TCP `port` on the target.
fn listener_script(port: u16) -> String {
    format!(
        r#"echo "me=$(id -u)"
command -v ss >/dev/null 2>&1 || {{ echo no_ss; exit 0; }}
echo "sockets=$(ss -Htln 'sport = :{port}' | wc -l)"
for pid in $(ss -Htlnp 'sport = :{port}' | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
  uid=$(awk '/^Uid:/ {{print $2}}' /proc/$pid/status 2>/dev/null)
  verb=$(tr '\0' '\n' < /proc/$pid/cmdline 2>/dev/null | sed -n 2p)
  exe=$(readlink /proc/$pid/exe 2>/dev/null)
  printf 'proc=%s\t%s\t%s\t%s\n' "$pid" "$uid" "$verb" "$exe"
done
"#
    )
}

impl Listener {
    pub fn parse(out: &str) -> Listener {
        let mut l = Listener::default();
        for line in out.lines() {
            if let Some(v) = line.strip_prefix("me=") {
                l.me = v.trim().parse().ok();
            } else if line == "no_ss" {
                l.no_ss = true;
            } else if let Some(v) = line.strip_prefix("sockets=") {
                l.sockets = v.trim().parse().unwrap_or(0);
            } else if let Some(v) = line.strip_prefix("proc=") {
                let f: Vec<&str> = v.splitn(4, '\t').collect();
                if let [pid, uid, verb, exe] = f[..]
                    && let Ok(pid) = pid.parse()
                {
                    l.procs.push(ListenerProc {
                        pid,
                        uid: uid.parse().ok(),
                        verb: verb.to_string(),
                        exe: exe.to_string(),
                    });
                }
            }
        }
        l
    }

    /// Something listens (or, without `ss`, maybe does).
    pub fn listening(&self) -> bool {
        self.no_ss || self.sockets > 0
    }

    /// Fails when the port is held by anything but a receiver SSH vouches for: nothing
    /// will be sent to it. A port nobody listens on fails unless a receiver is to be
    /// spawned.
    pub fn verdict(&self, want: &Want<'_>) -> Result<(), Finding> {
        let port = want.control_port;
        if let Some(p) = self.procs.iter().find(|p| !p.is_receiver(self.me)) {
            return Err(Finding::new(
                Level::Fail,
                Side::Target,
                "port_held_by_stranger",
                format!(
                    "port {port} there is held by pid {} (uid {}, `{}` {}), which is not a migrate receiver of root or of the SSH user: nothing was sent to it",
                    p.pid,
                    p.uid.map_or("?".into(), |u| u.to_string()),
                    p.exe,
                    p.verb
                ),
            )
            .fix("stop that process on the target (or pick another --control-port) and start `migrate receive` there"));
        }
        let spawning = want.spawn.is_some();
        if !self.listening() && !spawning {
            return Err(Finding::new(
                Level::Fail,
                Side::Target,
                "receiver_not_listening",
                format!("no receiver listening on port {port} there"),
            )
            .fix("start `migrate receive` on the target first, pass --spawn-receiver, or fix --control-port"));
        }
        Ok(())
    }

    /// The receiver's own binary, for `migrate sink`.
    fn receiver_exe(&self) -> Option<String> {
        self.procs
            .iter()
            .find(|p| p.is_receiver(self.me))
            .map(|p| p.exe.clone())
            .filter(|e| e.starts_with('/') && !e.ends_with(" (deleted)"))
    }

    /// A warning when the listener could not be named (its proof still decides).
    fn note(&self) -> Option<Finding> {
        let why = if self.no_ss {
            "`ss` is missing there"
        } else if self.sockets > 0 && self.procs.is_empty() {
            "the SSH user cannot see its process"
        } else {
            return None;
        };
        Some(Finding::new(
            Level::Warn,
            Side::Target,
            "listener_unknown",
            format!(
                "cannot tell who listens on the control port ({why}); the receiver must still prove it holds the run's secret"
            ),
        ))
    }
}

/// What listens on the control port, refused (as a finding) unless it is a receiver SSH
/// vouches for, or nothing while a receiver is to be spawned.
async fn verified_listener(ssh: &Ssh, want: &Want<'_>) -> Result<Listener, Finding> {
    let out = ssh
        .sh(&listener_script(want.control_port), REMOTE_TIMEOUT)
        .await
        .map_err(|e| {
            Finding::new(
                Level::Fail,
                Side::Target,
                "port_lookup_failed",
                format!("cannot look at the control port there: {e}"),
            )
        })?;
    let l = Listener::parse(&out.stdout);
    l.verdict(want)?;
    Ok(l)
}

/// Connects to the receiver and says hello. With the run's `secret` (`send`), the
/// receiver must prove that it holds it before the sender says anything else, and the
/// channel comes back authenticated; without it (`check`) the receiver only says who it
/// is.
async fn connect_receiver(want: &Want<'_>, secret: Option<Vec<u8>>) -> Result<Welcome, Finding> {
    let addr = format!("{}:{}", bracketed(&want.dest.host), want.control_port);
    let fail = |code: &'static str, text: String, fix: &str| {
        Finding::new(Level::Fail, Side::Target, code, text).fix(fix)
    };
    let sock = match tokio::time::timeout(CONTROL_CONNECT_TIMEOUT, TcpStream::connect(&addr)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(fail(
                "receiver_not_listening",
                format!("no receiver listening on {addr} ({e})"),
                "start `migrate receive` on the target first, pass --spawn-receiver, or fix --control-port",
            ));
        }
        Err(_) => {
            return Err(fail(
                "receiver_silent",
                format!(
                    "no answer from a receiver on {addr} within {}s",
                    CONTROL_CONNECT_TIMEOUT.as_secs()
                ),
                "start `migrate receive` on the target and open the control port in its firewall",
            ));
        }
    };
    let _ = sock.set_nodelay(true);
    let _ = crate::protocol::keepalive(&sock);
    let (rd, wr) = sock.into_split();
    let mut control = Channel::new(BufReader::new(rd), wr, Direction::ToReceiver);
    let challenge = secret.as_ref().map(|_| crate::protocol::fresh_nonce());
    let hello = ToReceiver::Hello {
        protocol: PROTOCOL_VERSION,
        run_id: want.run_id.to_string(),
        sender_version: env!("CARGO_PKG_VERSION").into(),
        source_host: crate::host::hostname(),
        label: want.label.to_string(),
        challenge: challenge.clone(),
    };
    let welcome = async {
        control.send(&hello).await?;
        control.recv::<ToSender>().await
    };
    match tokio::time::timeout(CONTROL_REPLY_TIMEOUT, welcome).await {
        Ok(Ok(ToSender::Welcome {
            nonce,
            proof,
            receiver_version,
            hostname,
            ..
        })) => {
            if let (Some(secret), Some(challenge)) = (secret, challenge) {
                let auth = crate::protocol::Auth::new(secret, &challenge, &nonce);
                if !crate::protocol::valid_nonce(&nonce)
                    || !proof.as_deref().is_some_and(|p| auth.check_proof(p))
                {
                    return Err(fail(
                        "receiver_unproven",
                        format!(
                            "the listener on {addr} did not prove that it holds this run's secret: it is not the receiver SSH set up (a stranger on the port?); nothing more was sent to it"
                        ),
                        "look at what listens on the control port on the target (ss -tlnp), stop it, and start `migrate receive` there",
                    ));
                }
                control.authenticate(auth);
            }
            Ok(Welcome {
                control,
                receiver_version,
                hostname,
            })
        }
        Ok(Ok(ToSender::Refused { reason })) => Err(fail(
            "receiver_refused",
            format!("the receiver on {addr} refused: {reason}"),
            "use the same migrate version on both hosts, and --target-workdir for a receiver with another --workdir",
        )),
        Ok(Ok(_)) => Err(fail(
            "receiver_not_migrate",
            format!("the receiver on {addr} did not answer hello with a welcome"),
            "is it a migrate receiver? check --control-port",
        )),
        Ok(Err(e)) => Err(fail(
            "receiver_not_migrate",
            format!("{addr} does not speak the migrate protocol ({e})"),
            "check --control-port",
        )),
        Err(_) => Err(fail(
            "receiver_silent",
            format!("{addr} accepted the connection but never answered"),
            "is it a migrate receiver? check --control-port",
        )),
    }
}

/// The shell script that inspects the target in one SSH round trip. Every value from the
/// user or from podman enters it as one single-quoted word, never inside double quotes,
/// and leaves it through `printf '%s'`, never `echo` (which may read backslashes).
pub fn target_script(
    infos: &[ContainerInfo],
    data: &[PathBuf],
    workdir: &str,
    run_id: &str,
    run_dir: RunDirStep,
) -> String {
    let mut s = stack::probe_script();
    for c in infos {
        s.push_str(&format!(
            "podman container exists {n} && printf 'exists=%s\\n' {n}\n",
            n = shell_quote(&c.name)
        ));
        s.push_str(&format!(
            "podman image exists {i} || printf 'missing_image=%s\\n' {i}\n",
            i = shell_quote(&c.image_id)
        ));
    }
    s.push_str(&bind_script(infos, data));
    s.push_str(&space_script(
        &crate::rundir::remote_run_dir(workdir, run_id),
        data,
    ));
    match run_dir {
        RunDirStep::Skip => {}
        RunDirStep::Check => s.push_str(&crate::rundir::create_script(workdir, run_id, false)),
        RunDirStep::Create => s.push_str(&crate::rundir::create_script(workdir, run_id, true)),
    }
    s
}

/// What the target script does about the run folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunDirStep {
    /// Nothing (no receiver there yet).
    Skip,
    /// Check that the work folder is safe to make one in (`check`, `--dry-run`).
    Check,
    /// Make it (`send`).
    Create,
}

/// Prints `present_path=C=P` or `missing_path=C=P` for each bind mount no data folder
/// covers.
pub fn bind_script(infos: &[ContainerInfo], data: &[PathBuf]) -> String {
    let mut s = String::new();
    for (c, m) in uncovered_binds(infos, data) {
        s.push_str(&format!(
            "if [ -e {p} ]; then w=present_path; else w=missing_path; fi; printf '%s=%s=%s\\n' \"$w\" {c} {p}\n",
            p = shell_quote(&m),
            c = shell_quote(&c)
        ));
    }
    s
}

/// Prints `space=KEY=AVAIL_KIB DEVICE PRESENT_KIB` for the archives (KEY `archives`) and
/// each data folder (KEY `dataN`, in order): free space on the file system that holds
/// (or will hold) the path, and what of it is there already.
pub fn space_script(run_dir: &str, data: &[PathBuf]) -> String {
    let mut s = String::from(
        "avail() { p=$1; while [ ! -e \"$p\" ]; do p=$(dirname \"$p\"); done; printf '%s %s' \"$(df -Pk \"$p\" | awk 'NR==2 {print $4}')\" \"$(stat -c %d \"$p\")\"; }\n",
    );
    s.push_str(&format!(
        "printf 'space=archives=%s 0\\n' \"$(avail {d})\"\n",
        d = shell_quote(run_dir)
    ));
    for (i, d) in data.iter().enumerate() {
        let d = shell_quote(&d.display().to_string());
        s.push_str(&format!(
            "printf 'space=data{i}=%s %s\\n' \"$(avail {d})\" \"$( [ -e {d} ] && du -sk {d} | cut -f1 || echo 0)\"\n"
        ));
    }
    s
}

/// Reads the target script's output into findings; also returns the images to ship.
pub fn target_findings(
    stdout: &str,
    infos: &[ContainerInfo],
    data: &[PathBuf],
    needs: &[(String, u64)],
    ship_images: bool,
) -> (Vec<Finding>, Vec<(String, String)>) {
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for line in stdout.lines() {
        if let Some(name) = line.strip_prefix("exists=") {
            out.push(
                Finding::new(
                    Level::Fail,
                    Side::Target,
                    "container_name_taken",
                    format!("a container named {name} already exists there"),
                )
                .fix(format!("remove it there first (podman rm {name})")),
            );
        } else if let Some(id) = line.strip_prefix("missing_image=") {
            let name = infos
                .iter()
                .find(|c| c.image_id == id)
                .map(|c| {
                    if c.image_name.is_empty() {
                        id.to_string()
                    } else {
                        c.image_name.clone()
                    }
                })
                .unwrap_or_else(|| id.to_string());
            let text = format!(
                "image {name} ({}) is missing there (a restore needs the same image ID)",
                short(id)
            );
            if ship_images {
                out.push(Finding::new(
                    Level::Info,
                    Side::Target,
                    "image_shipped",
                    format!("{text}: it will be shipped (--ship-image)"),
                ));
            } else {
                out.push(
                    Finding::new(Level::Fail, Side::Target, "image_missing", text)
                        .fix("pass --ship-image to copy it there (podman save | podman load), or load the same image archive there"),
                );
            }
            missing.push((id.to_string(), name));
        } else if let Some(rest) = line.strip_prefix("missing_path=") {
            let (c, p) = rest.split_once('=').unwrap_or(("?", rest));
            out.push(
                Finding::new(
                    Level::Fail,
                    Side::Target,
                    "bind_missing",
                    format!("container {c} bind-mounts {p}, which no --data covers and which does not exist there"),
                )
                .fix(format!("add --data {p} (or create it on the target)")),
            );
        } else if let Some(rest) = line.strip_prefix("present_path=") {
            let (c, p) = rest.split_once('=').unwrap_or(("?", rest));
            out.push(Finding::new(
                Level::Warn,
                Side::Target,
                "bind_uncovered",
                format!("container {c} bind-mounts {p}, which no --data covers: the target's own copy will be used"),
            ));
        }
    }
    if !infos.is_empty() && !out.iter().any(|f| f.text.contains("already exists")) {
        out.push(Finding::new(
            Level::Ok,
            Side::Target,
            "container_names_free",
            "no container of the same name there",
        ));
    }
    if infos
        .iter()
        .all(|c| !missing.iter().any(|(id, _)| id == &c.image_id))
        && !infos.is_empty()
    {
        out.push(Finding::new(
            Level::Ok,
            Side::Target,
            "images_present",
            "every image is there with the same ID",
        ));
    }
    match space_problem(stdout, data, needs) {
        Some(p) => out.push(
            Finding::new(Level::Fail, Side::Target, "space_short", p)
                .fix("free some space there (or give the receiver another --workdir)"),
        ),
        None => out.push(Finding::new(
            Level::Ok,
            Side::Target,
            "space_enough",
            "enough free space for the archives and the data",
        )),
    }
    (out, missing)
}

/// Size of a local folder in KiB (`du -sk`).
pub async fn local_kib(dir: &Path) -> u64 {
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
pub fn space_problem(report: &str, data: &[PathBuf], needs: &[(String, u64)]) -> Option<String> {
    let mut per_mount: BTreeMap<String, (u64, u64, Vec<String>)> = BTreeMap::new();
    for line in report.lines() {
        let Some(rest) = line.strip_prefix("space=") else {
            continue;
        };
        let Some((key, fields)) = rest.split_once('=') else {
            continue;
        };
        let what = match key.strip_prefix("data") {
            Some(i) => match i.parse::<usize>().ok().and_then(|i| data.get(i)) {
                Some(d) => d.display().to_string(),
                None => continue,
            },
            None => key.to_string(),
        };
        let mut f = fields.split_whitespace();
        let (Some(avail), Some(mount)) = (f.next().and_then(|v| v.parse::<u64>().ok()), f.next())
        else {
            continue;
        };
        let present: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let need = needs
            .iter()
            .find(|(w, _)| *w == what)
            .map(|(_, n)| *n)
            .unwrap_or(0);
        let e = per_mount
            .entry(mount.to_string())
            .or_insert((avail, 0, Vec::new()));
        e.1 += need.saturating_sub(present);
        e.2.push(what);
    }
    per_mount
        .into_iter()
        .find_map(|(mount, (avail, need, whats))| {
            // Leave a margin: archives and file systems have overheads.
            (need + need / 10 > avail).then(|| {
                let _ = mount;
                format!(
                    "not enough free space on the file system of {}: {} MiB free, about {} MiB needed",
                    whats.join(", "),
                    avail / 1024,
                    (need + need / 10) / 1024,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::podman::Mount;

    fn info() -> ContainerInfo {
        ContainerInfo {
            id: "x".into(),
            name: "db".into(),
            image_id: "img123".into(),
            image_name: "localhost/m:latest".into(),
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
            joins: vec![],
            shares: vec![],
            dependencies: vec![],
            pod: String::new(),
            networks: Vec::new(),
            published: false,
        }
    }

    const INFRA: &str = "1nfra0000000000000000000";
    const FRONT: &str = "f0f0f0f0f0f0f0f0";
    const COUNTER: &str = "c0c0c0c0c0c0c0c0";

    fn ctr(name: &str, id: &str, deps: &[&str], shares: &[(&'static str, &str)]) -> ContainerInfo {
        ContainerInfo {
            name: name.into(),
            id: id.into(),
            dependencies: deps.iter().map(|d| d.to_string()).collect(),
            shares: shares.iter().map(|(k, r)| (*k, r.to_string())).collect(),
            mounts: vec![],
            ..info()
        }
    }

    const BASE: &str = "8854c4216652f8202d76eca89e92d4aa6686adfd78970afc7ddc7ee7bbbc3b81";
    const APP: &str = "49a2f87907eacabc5a81f9a106a9d61ee74a9b96044e4c4385d802cfcb4189fa";

    #[test]
    fn a_container_sharing_namespaces_is_refused_naming_both() {
        let base = ctr("base", BASE, &[], &[]);
        let app = ctr("app", APP, &[BASE], &[("network", BASE), ("pid", BASE)]);
        let all = [base.clone(), app.clone()];
        // Moved without base.
        let f = dependency_findings(std::slice::from_ref(&app), &all);
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!(f[0].level, Level::Fail);
        let line = f[0].one_line();
        assert!(
            line.contains(
                "app shares the network, pid namespace of base, which is not being moved"
            ),
            "{line}"
        );
        assert!(
            line.contains("cannot export checkpoints of containers with dependencies"),
            "{line}"
        );
        assert!(line.contains("--network container:base"), "{line}");
        // Moved together: podman still refuses app's export.
        let f = dependency_findings(&all, &all);
        assert_eq!(f.len(), 1, "{f:#?}");
        assert!(
            f[0].text
                .contains("app shares the network, pid namespace of base:"),
            "{}",
            f[0].text
        );
        assert!(f[0].text.contains("even when both move"), "{}", f[0].text);
        // base moved without app, which stays with base's namespaces.
        let f = dependency_findings(std::slice::from_ref(&base), &all);
        assert_eq!(f.len(), 1, "{f:#?}");
        assert!(
            f[0].text.starts_with("app depends on base"),
            "{}",
            f[0].text
        );
        // Nobody depends on anybody: nothing to say.
        let alone = ctr("alone", "aaaa", &[], &[]);
        assert!(
            dependency_findings(std::slice::from_ref(&alone), &[alone.clone(), base]).is_empty()
        );
    }

    #[test]
    fn requires_and_pods_are_refused_too() {
        let base = ctr("base", BASE, &[], &[]);
        let app = ctr("app", APP, &[BASE], &[]);
        let f = dependency_findings(std::slice::from_ref(&app), &[base, app.clone()]);
        assert!(
            f[0].text.starts_with("app requires base (--requires)"),
            "{}",
            f[0].text
        );
    }

    #[test]
    fn a_pod_moves_whole_or_not_at_all() {
        const POD: &str = "f00dfeedcafe0123";
        let in_pod = |name: &str, id: &str| ContainerInfo {
            pod: POD.into(),
            ..ctr(name, id, &[INFRA], &[("network", INFRA), ("ipc", INFRA)])
        };
        let infra = ContainerInfo {
            pod: POD.into(),
            ..ctr("f00dfeedcafe-infra", INFRA, &[], &[])
        };
        let (front, counter) = (in_pod("front", FRONT), in_pod("counter", COUNTER));
        let all = [infra, front.clone(), counter.clone()];
        // Both members: the infra is no dependency that stops them, nothing else is said.
        let f = dependency_findings(&[front.clone(), counter.clone()], &all);
        assert!(f.is_empty(), "{f:#?}");
        // One member alone: refused, naming the member left behind (not the infra).
        let f = dependency_findings(std::slice::from_ref(&front), &all);
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!(f[0].code, "pod_split");
        assert!(
            f[0].text.contains("front is in pod f00dfeedcafe")
                && f[0].text.contains("with counter, which is not being moved"),
            "{}",
            f[0].text
        );
        assert!(!f[0].text.contains("runc"), "{}", f[0].text);
        assert!(f[0].fix.as_deref().unwrap().contains("name the pod"));
    }

    #[test]
    fn finds_bind_mounts_no_data_folder_covers() {
        let got = uncovered_binds(&[info()], &[PathBuf::from("/srv/app")]);
        assert_eq!(got, vec![("db".to_string(), "/etc/app.conf".to_string())]);
    }

    #[test]
    fn space_is_checked_per_file_system() {
        let data = [PathBuf::from("/srv/app")];
        let report = "space=archives=1000000 2049 0\nspace=data0=50000 2050 10000\n";
        let needs = vec![
            ("archives".to_string(), 200_000),
            ("/srv/app".to_string(), 40_000),
        ];
        assert_eq!(space_problem(report, &data, &needs), None);
        let needs = vec![
            ("archives".to_string(), 200_000),
            ("/srv/app".to_string(), 60_000),
        ];
        let p = space_problem(report, &data, &needs).unwrap();
        assert!(p.contains("/srv/app") && p.contains("48 MiB free"), "{p}");
        // Two things on one file system add up.
        let report = "space=archives=100000 2049 0\nspace=data0=100000 2049 0\n";
        let needs = vec![
            ("archives".to_string(), 60_000),
            ("/srv/app".to_string(), 60_000),
        ];
        assert!(space_problem(report, &data, &needs).is_some());
    }

    /// Runs a script with `sh` in a fresh folder; returns stdout and whether anything
    /// was created there that the script did not mean to create.
    fn run_hostile(script: &str, dir: &Path) -> String {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn hostile_paths_stay_literal_in_remote_scripts() {
        let hostile = [
            "$(touch pwned1)",
            "`touch pwned2`",
            "a\"b; touch pwned3; \"",
            "it's; touch pwned4",
            "with space",
            "back\\slash\\n",
            "$HOME ${IFS} *",
        ];
        let tmp = tempfile::tempdir().unwrap();
        let mut data = Vec::new();
        for (i, h) in hostile.iter().enumerate() {
            let d = tmp.path().join(format!("{i} {h}"));
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("f"), vec![0u8; 64 << 10]).unwrap();
            data.push(d);
        }
        let run_dir = tmp.path().join("work $(touch pwned5)/runs/r1");
        let out = run_hostile(&space_script(run_dir.to_str().unwrap(), &data), tmp.path());
        let names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with("pwned")),
            "a path ran a command: {names:?}\n{out}"
        );
        // Every folder was measured (its space line parsed), the archives too.
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("space=")).collect();
        assert_eq!(lines.len(), data.len() + 1, "{out}");
        for (i, l) in lines[1..].iter().enumerate() {
            let fields: Vec<&str> = l
                .split_once('=')
                .unwrap()
                .1
                .split_once('=')
                .unwrap()
                .1
                .split_whitespace()
                .collect();
            assert_eq!(fields.len(), 3, "{l}");
            assert!(
                fields[2].parse::<u64>().unwrap() >= 64,
                "data{i} not measured: {l}"
            );
        }
        // A need on a hostile path is found again from the report.
        let needs = vec![(data[4].display().to_string(), u64::MAX / 4)];
        let p = space_problem(&out, &data, &needs).expect("the space check ran");
        assert!(p.contains("with space"), "{p}");

        // The bind-mount probe and the run folder script keep names literal too.
        let mut c = info();
        c.mounts = data
            .iter()
            .map(|d| Mount {
                kind: "bind".into(),
                source: d.display().to_string(),
                destination: "/x".into(),
            })
            .collect();
        let out = run_hostile(&bind_script(&[c], &[]), tmp.path());
        let present: Vec<String> = out
            .lines()
            .filter_map(|l| l.strip_prefix("present_path=db="))
            .map(str::to_string)
            .collect();
        let want: Vec<String> = data.iter().map(|d| d.display().to_string()).collect();
        assert_eq!(present, want, "{out}");
        let script = target_script(
            &[],
            &[],
            tmp.path().join("w `touch pwned6`").to_str().unwrap(),
            "r1",
            RunDirStep::Create,
        );
        let _ = run_hostile(&script, tmp.path());
        let names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with("pwned")), "{names:?}");
    }

    /// What `send` wants checked, for a target at `dest` with a receiver on `port`.
    fn send_want(dest: &Destination, port: u16) -> Want<'_> {
        Want {
            dest,
            control_port: port,
            target_workdir: "/var/lib/migrate",
            containers: &[],
            data: &[],
            ship_images: false,
            tcp: crate::plan::TcpPolicy::Close,
            ignore_cpu: false,
            ignore_systemd_unit: false,
            run_id: "r1",
            label: "",
            create_run_dir: true,
            spawn: None,
        }
    }

    /// A listener on 127.0.0.1 that answers hello with a welcome whose proof was made
    /// with `key`, then keeps every byte it gets until the connection ends.
    async fn fake_receiver(key: Vec<u8>) -> (u16, tokio::task::JoinHandle<(String, Vec<u8>)>) {
        use tokio::io::AsyncReadExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (sock, _) = l.accept().await.unwrap();
            let (r, w) = sock.into_split();
            let mut ch = Channel::new(BufReader::new(r), w, Direction::ToSender);
            let hello: ToReceiver = ch.recv().await.unwrap();
            let ToReceiver::Hello { challenge, .. } = hello.clone() else {
                panic!("{hello:?}")
            };
            let nonce = "ab".repeat(16);
            let proof = crate::protocol::Auth::new(key, &challenge.unwrap(), &nonce).proof();
            ch.send(&ToSender::Welcome {
                protocol: PROTOCOL_VERSION,
                receiver_version: "x".into(),
                hostname: "fake".into(),
                nonce,
                proof: Some(proof),
            })
            .await
            .unwrap();
            let (mut r, _w) = ch.into_parts();
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest).await;
            (format!("{hello:?}"), rest)
        });
        (port, task)
    }

    #[tokio::test]
    async fn a_listener_without_the_secret_hears_nothing_after_hello() {
        let dest = Destination {
            user: None,
            host: "127.0.0.1".into(),
            port: None,
            identity: None,
        };
        let secret = b"the-secret-placed-over-ssh-32byte".to_vec();
        for (key, accepted) in [(b"a-guess".to_vec(), false), (secret.clone(), true)] {
            let (port, task) = fake_receiver(key).await;
            let want = send_want(&dest, port);
            let got = connect_receiver(&want, Some(secret.clone())).await;
            match got {
                Ok(mut w) => {
                    assert!(accepted);
                    // The channel is authenticated: its frames carry MACs.
                    w.control
                        .send(&ToReceiver::TimeProbe { t0: 1 })
                        .await
                        .unwrap();
                    drop(w);
                    let (_, rest) = task.await.unwrap();
                    let text = String::from_utf8(rest).unwrap();
                    assert!(text.contains("\"mac\":\""), "{text}");
                }
                Err(f) => {
                    assert!(!accepted, "{f:?}");
                    assert!(f.text.contains("did not prove"), "{f:?}");
                    let (hello, rest) = task.await.unwrap();
                    assert!(hello.contains("challenge: Some"), "{hello}");
                    assert!(rest.is_empty(), "sent after a bad proof: {rest:?}");
                }
            }
        }
    }

    #[test]
    fn the_listener_on_the_control_port_must_be_a_receiver_ssh_vouches_for() {
        let dest = Destination {
            user: None,
            host: "b".into(),
            port: None,
            identity: None,
        };
        let want = send_want(&dest, 12345);
        let ours = "me=0\nsockets=1\nproc=42\t0\treceive\t/usr/bin/migrate\n";
        let l = Listener::parse(ours);
        assert!(l.verdict(&want).is_ok());
        assert_eq!(l.receiver_exe().as_deref(), Some("/usr/bin/migrate"));
        // A user's program squatting on the port: refused, named.
        let squatter = "me=0\nsockets=1\nproc=77\t1000\treceive\t/tmp/migrate\n";
        let f = Listener::parse(squatter).verdict(&want).unwrap_err();
        assert!(
            f.text.contains("pid 77") && f.text.contains("uid 1000"),
            "{f:?}"
        );
        let nc = "me=0\nsockets=1\nproc=78\t0\t-l\t/usr/bin/nc.openbsd\n";
        assert!(Listener::parse(nc).verdict(&want).is_err());
        // Nobody listens: refused unless a receiver is to be spawned.
        let none = Listener::parse("me=0\nsockets=0\n");
        assert!(!none.listening());
        assert!(none.verdict(&want).is_err());
        // Without ss nobody can be named: a warning, the proof decides.
        let blind = Listener::parse("me=0\nno_ss\n");
        assert!(blind.verdict(&want).is_ok() && blind.note().is_some());
        // A binary replaced since it started is not used as the sink.
        let deleted =
            Listener::parse("me=0\nsockets=1\nproc=42\t0\treceive\t/usr/bin/migrate (deleted)\n");
        assert_eq!(deleted.receiver_exe(), None);
    }

    #[test]
    fn target_findings_name_problem_and_fix() {
        let out = "exists=db\nmissing_image=img123\nmissing_path=db=/etc/app.conf\nspace=archives=100 2049 0\n";
        let (f, missing) =
            target_findings(out, &[info()], &[], &[("archives".into(), 1000)], false);
        let fails: Vec<String> = f
            .iter()
            .filter(|f| f.level == Level::Fail)
            .map(Finding::one_line)
            .collect();
        assert_eq!(fails.len(), 4, "{fails:#?}");
        assert!(fails[0].contains("podman rm db"));
        assert!(fails[1].contains("--ship-image") && fails[1].contains("localhost/m:latest"));
        assert!(fails[2].contains("add --data /etc/app.conf"));
        assert!(fails[3].contains("not enough free space"));
        assert_eq!(
            missing,
            vec![("img123".to_string(), "localhost/m:latest".to_string())]
        );
        // With --ship-image the missing image is no longer a failure.
        let (f, _) = target_findings("missing_image=img123\n", &[info()], &[], &[], true);
        assert!(f.iter().all(|f| f.level != Level::Fail), "{f:#?}");
    }
}
