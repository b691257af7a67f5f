//! Resolves what the user typed into a checked plan, before anything is touched.
//! Every error names the flag or argument at fault and what to do.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use std::time::Duration;

use crate::hooks::{Hook, Place, parse_hook};
use crate::protocol::valid_container_name;
use crate::timing::Format;
use crate::timing::OutputArgs;
use crate::transport::ssh::Destination;
use clap::{Args, ValueEnum};

/// A bad argument, described in one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

fn bad<T>(msg: impl Into<String>) -> Result<T, PlanError> {
    Err(PlanError(msg.into()))
}

/// A checked `send`.
#[derive(Debug, Clone)]
pub struct SendPlan {
    pub run_id: String,
    /// Where to, what to move, what must hold there.
    pub target: TargetPlan,
    pub workdir: PathBuf,
    pub compress: CompressChoice,
    pub format: Format,
    pub no_header: bool,
    pub label: String,
    pub hooks: Vec<Hook>,
    pub hook_timeout: Duration,
    pub dry_run: bool,
    pub sequential_restore: bool,
    pub keep_zero_pages: bool,
    pub memory: MemoryChoice,
}

/// Splits `[user@]host`.
pub fn parse_destination(to: &str) -> Result<(Option<String>, String), PlanError> {
    let (user, host) = match to.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_string()), h.to_string()),
        None => (None, to.to_string()),
    };
    if let Some(u) = &user
        && (u.is_empty() || u.contains(char::is_whitespace))
    {
        return bad(format!(
            "--to {to:?}: the user name is empty or has spaces; use --to USER@HOST"
        ));
    }
    let host_ok = !host.is_empty()
        && !host.starts_with('-')
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b));
    if !host_ok {
        return bad(format!(
            "--to {to:?}: not a host name or address; use --to [USER@]HOST"
        ));
    }
    if host.contains(':') && !host.starts_with('[') && host.matches(':').count() == 1 {
        return bad(format!(
            "--to {to:?}: put the SSH port in --ssh-port, not in the host name"
        ));
    }
    Ok((
        user,
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    ))
}

/// Checks one `--data` folder: absolute, an existing directory, not `/`, no `..`.
pub fn check_data_path(p: &Path) -> Result<PathBuf, PlanError> {
    let shown = p.display();
    if !p.is_absolute() {
        return bad(format!(
            "--data {shown}: must be an absolute path (it lands at the same path on the target)"
        ));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return bad(format!("--data {shown}: must not contain `..`"));
    }
    if p.to_str().is_none_or(|s| s.chars().any(char::is_control)) {
        return bad(format!(
            "--data {shown}: must be UTF-8 without control characters"
        ));
    }
    let clean: PathBuf = p.components().collect();
    if clean == Path::new("/") {
        return bad(
            "--data /: refusing to mirror the whole file system; name the application's data folder",
        );
    }
    match std::fs::metadata(&clean) {
        Ok(m) if m.is_dir() => Ok(clean),
        Ok(_) => bad(format!(
            "--data {shown}: is not a directory; name the folder that holds the data"
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bad(format!(
            "--data {shown}: no such folder here; name the application's existing data folder"
        )),
        Err(e) => bad(format!(
            "--data {shown}: cannot read it ({e}); run as a user who can (usually root)"
        )),
    }
}

/// Checks a work folder flag: absolute, no `..`, nothing a remote script or a log line
/// could misread. Returns it as text.
fn check_workdir(flag: &str, p: &Path) -> Result<String, PlanError> {
    let shown = p.display();
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return bad(format!(
            "{flag} {shown}: must be an absolute path without `..`"
        ));
    }
    match p.to_str() {
        Some(s) if !s.chars().any(char::is_control) => Ok(s.to_string()),
        _ => bad(format!(
            "{flag} {shown}: must be UTF-8 without control characters"
        )),
    }
}

/// Folders `--data` must never name: rsync mirrors a data folder with `--delete`, so
/// these would wipe or overwrite the target's system, its containers or migrate itself.
const SYSTEM_FOLDERS: &[&str] = &[
    "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/opt",
    "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/lib",
    "/var/log", "/var/tmp", "/var/run",
];
/// Trees no data folder may be in or contain: the kernel's, and podman's storage.
const OFF_LIMITS: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/var/lib/containers",
    "/run/containers",
    "/run/libpod",
    "/var/run/containers",
    "/var/run/libpod",
];

/// Refuses a `--data` folder that is a system folder, lies in or contains podman's
/// storage or one of `workdirs` (migrate's own), or resolves (through symlinks) to any of
/// these.
pub fn refuse_system_data(d: &Path, workdirs: &[&Path]) -> Result<(), PlanError> {
    let real = std::fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf());
    let mut user_storage = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        user_storage.push(PathBuf::from(home).join(".local/share/containers"));
    }
    for p in [d, real.as_path()] {
        if let Some(s) = SYSTEM_FOLDERS.iter().find(|s| p == Path::new(s)) {
            return bad(format!(
                "--data {}: refusing {s}, a system folder (rsync mirrors a data folder with --delete); name the application's own folder",
                d.display()
            ));
        }
        let storage = OFF_LIMITS
            .iter()
            .map(PathBuf::from)
            .chain(user_storage.iter().cloned());
        for s in storage {
            if p.starts_with(&s) || s.starts_with(p) {
                return bad(format!(
                    "--data {}: overlaps {}, which the system or podman owns; name the application's own folder",
                    d.display(),
                    s.display()
                ));
            }
        }
        for w in workdirs {
            if p.starts_with(w) || w.starts_with(p) {
                return bad(format!(
                    "--data {}: overlaps migrate's work folder {}; name the application's own folder",
                    d.display(),
                    w.display()
                ));
            }
        }
    }
    Ok(())
}

/// A fresh id for one migration: sortable time plus randomness.
pub fn new_run_id() -> String {
    let mut rnd = [0u8; 4];
    crate::secret::fill_random(&mut rnd);
    format!(
        "{}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        hex::encode(rnd)
    )
}

/// The checked `TargetArgs` (shared by `send` and `check`).
#[derive(Debug, Clone)]
pub struct TargetPlan {
    pub dest: Destination,
    pub control_port: u16,
    /// The receiver's work folder on the target.
    pub target_workdir: String,
    pub data: Vec<PathBuf>,
    pub containers: Vec<String>,
    pub ship_images: bool,
    /// What happens to the containers' TCP connections.
    pub tcp: crate::plan::TcpPolicy,
    pub spawn_receiver: bool,
    pub install_receiver: bool,
    /// `--ignore-cpu`: missing CPU features warn instead of refusing.
    pub ignore_cpu: bool,
    pub ignore_systemd_unit: bool,
}

impl TargetPlan {
    pub fn resolve(a: &TargetArgs, containers: &[String]) -> Result<TargetPlan, PlanError> {
        let (user, host) = parse_destination(&a.to)?;
        if let Some(id) = &a.identity
            && !id.is_file()
        {
            return bad(format!(
                "--identity {}: no such file; give the path of the SSH private key",
                id.display()
            ));
        }
        if a.ssh_port == Some(0) {
            return bad("--ssh-port 0: give the target's SSH port (default 22)");
        }
        if a.control_port == 0 {
            return bad(
                "--control-port 0: give the port `migrate receive --listen` uses (default 12345)",
            );
        }
        let mut seen = HashSet::new();
        for c in containers {
            if !valid_container_name(c) {
                return bad(format!(
                    "container {c:?}: not a valid container name; give the name or ID `podman ps` shows"
                ));
            }
            if !seen.insert(c) {
                return bad(format!(
                    "container {c:?} is named twice; name each container once"
                ));
            }
        }
        let target_workdir = check_workdir("--target-workdir", &a.target_workdir)?;
        let mut data: Vec<PathBuf> = Vec::new();
        for p in &a.data {
            let clean = check_data_path(p)?;
            refuse_system_data(&clean, &[Path::new(&target_workdir)])?;
            for other in &data {
                if clean.starts_with(other) || other.starts_with(&clean) {
                    return bad(format!(
                        "--data {} and --data {} overlap; name each folder once",
                        clean.display(),
                        other.display()
                    ));
                }
            }
            data.push(clean);
        }
        Ok(TargetPlan {
            dest: Destination {
                user,
                host,
                port: a.ssh_port,
                identity: a.identity.clone(),
            },
            control_port: a.control_port,
            target_workdir,
            data,
            containers: containers.to_vec(),
            ship_images: a.ship_image,
            tcp: if a.tcp_established {
                crate::plan::TcpPolicy::Established
            } else {
                a.tcp
            },
            spawn_receiver: a.spawn_receiver || a.install_receiver,
            install_receiver: a.install_receiver,
            ignore_cpu: a.ignore_cpu,
            ignore_systemd_unit: a.ignore_systemd_unit,
        })
    }
}

impl SendPlan {
    pub fn resolve(a: &SendArgs) -> Result<SendPlan, PlanError> {
        let t = TargetPlan::resolve(&a.target, &a.containers)?;
        let workdir = check_workdir("--workdir", &a.workdir)?;
        for d in &t.data {
            refuse_system_data(d, &[Path::new(&workdir)])?;
        }
        let mut hooks = Vec::new();
        for h in &a.hooks {
            hooks.push(parse_hook(h, Place::Source).map_err(PlanError)?);
        }
        for h in &a.target_hooks {
            hooks.push(parse_hook(h, Place::Target).map_err(PlanError)?);
        }
        if a.hook_timeout == 0 {
            return bad("--hook-timeout 0: give the seconds a hook may run");
        }
        Ok(SendPlan {
            run_id: new_run_id(),
            target: t,
            workdir: a.workdir.clone(),

            compress: a.compress,
            format: a.output.format,
            no_header: a.output.no_header,
            label: a.label.clone(),
            hooks,
            hook_timeout: Duration::from_secs(a.hook_timeout),
            dry_run: a.dry_run,
            sequential_restore: a.sequential_restore,
            keep_zero_pages: a.keep_zero_pages,
            memory: a.memory,
        })
    }
}

/// `send --tcp`: what happens to the containers' TCP connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TcpPolicy {
    /// Skip handshakes, restore established connections closed (clients reconnect).
    Close,
    /// Carry established connections over; skip handshakes.
    Established,
    /// Fail on any connection CRIU cannot take as it is (the behaviour of podman alone).
    Refuse,
}

impl TcpPolicy {
    /// The CRIU options of this policy, for both the dump and the restore.
    pub fn criu(self, file_locks: bool) -> crate::engine::podman::CriuOptions {
        crate::engine::podman::CriuOptions {
            file_locks,
            tcp_established: self == TcpPolicy::Established,
            tcp_close: self == TcpPolicy::Close,
            skip_in_flight: self != TcpPolicy::Refuse,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TcpPolicy::Close => "close",
            TcpPolicy::Established => "established",
            TcpPolicy::Refuse => "refuse",
        }
    }
}

/// How the containers' memory moves (`--memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MemoryChoice {
    /// `lazy` where both hosts can do it, no container is in a pod, and the containers
    /// hold at least 256 MiB of resident memory together; `copy` otherwise.
    Auto,
    /// All of it inside the archive, while the containers are frozen.
    Copy,
    /// Post-copy: the containers run on the target before their memory is there.
    Lazy,
}

impl MemoryChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryChoice::Auto => "auto",
            MemoryChoice::Copy => "copy",
            MemoryChoice::Lazy => "lazy",
        }
    }
}

/// Resident memory from which `--memory auto` moves it lazily: below it, copying inside
/// the archive is as fast as setting up the page server and the target's daemon.
pub const LAZY_AUTO_BYTES: u64 = 256 << 20;

/// Archive compression: `auto` picks from the measured link rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressChoice {
    Auto,
    None,
    Zstd,
    Gzip,
}

/// Where the target is and what must be true there: shared by `send` and `check`.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Target host, reached over SSH as root (or a user allowed to run podman).
    #[arg(long, value_name = "[USER@]HOST")]
    pub to: String,

    /// SSH port on the target.
    #[arg(long, value_name = "N")]
    pub ssh_port: Option<u16>,

    /// SSH private key to use, and only that one (default: ssh's own choice, e.g.
    /// ~/.ssh/id_ed25519).
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,

    /// TCP port of the receiver's control connection on the target.
    #[arg(long, value_name = "N", default_value_t = 12345)]
    pub control_port: u16,

    /// The receiver's work folder on the target (its --workdir). The run folder and the
    /// migration's secret are placed there over SSH before anything is said on the control
    /// port, and the receiver must prove it read them.
    #[arg(
        long,
        value_name = "DIR",
        default_value = crate::rundir::DEFAULT_WORKDIR,
        env = "MIGRATE_TARGET_WORKDIR"
    )]
    pub target_workdir: PathBuf,

    /// Data folder to sync to the same path on the target (repeatable): synced while the
    /// containers run, then again (only what changed) after the freeze.
    #[arg(long, value_name = "PATH")]
    pub data: Vec<PathBuf>,

    /// Start the receiver on the target over the SSH connection (one command instead of
    /// two terminals); uses the target's `migrate` of the same version.
    #[arg(long)]
    pub spawn_receiver: bool,

    /// Copy this very binary to the target (/var/lib/migrate/bin) and start it there as the
    /// receiver, so both ends are the same build. Implies --spawn-receiver.
    #[arg(long)]
    pub install_receiver: bool,

    /// When a container's image is missing on the target, copy it there first (podman
    /// save | podman load over SSH); without it, a missing image is refused.
    #[arg(long)]
    pub ship_image: bool,

    /// What happens to the containers' TCP connections. `close` (default): connections
    /// still in their handshake are left out (the client retries its SYN) and established
    /// ones are dumped and restored closed, so their clients see a reset and reconnect at
    /// once to wherever the service now is (right with published ports).
    /// `established`: established connections are carried over; handshakes are left
    /// out. Their clients keep them only where the container's address moves with it (its
    /// own address on a macvlan/ipvlan network that both hosts have: the target then holds
    /// TCP to that address back during the restore and announces it after). `refuse`: any
    /// connection that CRIU cannot take as it is fails the checkpoint, and `check`/`send`
    /// refuse established connections before the freeze. Set per migration: no CRIU
    /// configuration file is written.
    #[arg(long, value_enum, default_value_t = TcpPolicy::Close, value_name = "POLICY")]
    pub tcp: TcpPolicy,

    /// The same as `--tcp established`.
    #[arg(long, hide = true, conflicts_with = "tcp")]
    pub tcp_established: bool,

    /// Move even when the target's CPU lacks instruction sets the source's has (AVX-512,
    /// SHA, TSX …); `check` and `send` then warn instead of refusing. A restored process
    /// that uses a missing one dies of SIGILL (exit 132): use it only when the containers'
    /// programs are known not to. A different CPU architecture is refused all the same.
    #[arg(long)]
    pub ignore_cpu: bool,

    /// Move containers that a systemd unit on this host runs (podman labels them
    /// PODMAN_SYSTEMD_UNIT) although the unit is active or enabled; `check` and `send`
    /// then warn instead of refusing. Whoever passes it makes sure the unit does not start
    /// the service here again after the move.
    #[arg(long)]
    pub ignore_systemd_unit: bool,
}

/// Options of `migrate send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// Local folder for checkpoint archives (kept until the target confirms).
    #[arg(
        long,
        value_name = "DIR",
        default_value = crate::rundir::DEFAULT_WORKDIR,
        env = "MIGRATE_WORKDIR"
    )]
    pub workdir: PathBuf,

    /// Check everything, measure the link, print the plan with an estimated downtime, and
    /// exit without freezing anything.
    #[arg(long)]
    pub dry_run: bool,

    /// Restore the containers one after the other in the order given, instead of all at
    /// once (containers that join another's namespaces always wait for it).
    #[arg(long)]
    pub sequential_restore: bool,

    /// Checkpoint archive compression.
    #[arg(long, value_enum, default_value_t = CompressChoice::Auto)]
    pub compress: CompressChoice,

    /// Keep the zero-filled memory pages CRIU dumped in the archives written on the
    /// target. By default the target leaves out the all-zero pages of a single-process
    /// container's private anonymous memory (they read as zeros after the restore
    /// anyway), so podman unpacks and CRIU restores less while the service is down.
    #[arg(long)]
    pub keep_zero_pages: bool,

    /// How the memory moves. `copy`: inside the checkpoint archive, while the containers
    /// are frozen (downtime grows with the memory). `lazy` (post-copy): the archive
    /// holds everything but the memory; the containers run on the target at once and
    /// their pages follow through SSH, on demand when touched and in the background
    /// until all are there; only then is the source released. Until UP a failure rolls
    /// back as with `copy`; after UP the target is the service (see the user guide,
    /// "Lazy memory"). `auto`: `lazy` when `check` finds it possible on both hosts, no
    /// container is in a pod, and the containers hold at least 256 MiB of resident
    /// memory together; `copy` otherwise.
    #[arg(long, value_enum, default_value_t = MemoryChoice::Auto)]
    pub memory: MemoryChoice,

    #[command(flatten)]
    pub output: OutputArgs,

    /// Run a shell command at a point of the migration: WHEN is `pre-freeze` (after the
    /// pre-sync, before the freeze; a failure stops the migration before anything is
    /// frozen), `post-up` (after the target confirmed UP; a failure is only reported) or
    /// `rollback` (after the containers run on this host again). The command sees
    /// MIGRATE_PHASE, MIGRATE_RUN_ID, MIGRATE_SOURCE, MIGRATE_TARGET, MIGRATE_CONTAINERS.
    /// Repeatable; hooks of one point run in order.
    #[arg(long = "hook", value_name = "WHEN=CMD")]
    pub hooks: Vec<String>,

    /// Like --hook, but the command runs on the target over the migration's SSH connection.
    #[arg(long = "target-hook", value_name = "WHEN=CMD")]
    pub target_hooks: Vec<String>,

    /// Seconds a hook may run before it is killed (and counts as failed).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub hook_timeout: u64,

    /// Free text copied into the record's label column.
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub label: String,

    /// Containers to move. They are restored in parallel (a container that joins another's
    /// namespaces waits for it); with --sequential-restore, in this order.
    #[arg(value_name = "CONTAINER", required = true)]
    pub containers: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        assert_eq!(
            parse_destination("root@10.0.0.2").unwrap(),
            (Some("root".into()), "10.0.0.2".into())
        );
        assert_eq!(parse_destination("lab-b").unwrap(), (None, "lab-b".into()));
        assert_eq!(parse_destination("[fe80::1]").unwrap().1, "fe80::1");
        assert!(parse_destination("").is_err());
        assert!(parse_destination("@host").is_err());
        assert!(
            parse_destination("host:22")
                .unwrap_err()
                .0
                .contains("--ssh-port")
        );
        assert!(parse_destination("-oProxyCommand=x").is_err());
        assert!(parse_destination("a b").is_err());
    }

    #[test]
    fn data_paths() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("data");
        std::fs::create_dir(&d).unwrap();
        assert_eq!(check_data_path(&d.join("")).unwrap(), d);
        assert!(
            check_data_path(Path::new("relative"))
                .unwrap_err()
                .0
                .contains("absolute")
        );
        assert!(check_data_path(Path::new("/")).is_err());
        assert!(check_data_path(&d.join("missing")).is_err());
        assert!(check_data_path(&d.join("../data")).is_err());
        let f = dir.path().join("file");
        std::fs::write(&f, "x").unwrap();
        assert!(
            check_data_path(&f)
                .unwrap_err()
                .0
                .contains("not a directory")
        );
    }

    #[test]
    fn system_folders_podman_storage_and_work_folders_are_refused_as_data() {
        let work = Path::new("/var/lib/migrate");
        for d in [
            "/etc",
            "/var",
            "/usr",
            "/var/lib",
            "/home",
            "/var/lib/containers",
            "/var/lib/containers/storage/volumes/v",
            "/run/containers",
            "/var/lib/migrate",
            "/var/lib/migrate/runs",
        ] {
            let e = refuse_system_data(Path::new(d), &[work]).unwrap_err();
            assert!(
                e.0.contains(d) && e.0.contains("name the application"),
                "{d}: {e}"
            );
        }
        for d in ["/srv/app", "/opt/app/data", "/var/lib/mysql", "/home/u/app"] {
            refuse_system_data(Path::new(d), &[work]).unwrap();
        }
        // Through a symlink: the folder it resolves to counts.
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("etc-link");
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        assert!(refuse_system_data(&link, &[work]).is_err());
        // Another work folder is honoured.
        assert!(refuse_system_data(Path::new("/srv/w/x"), &[Path::new("/srv/w")]).is_err());
        // Control characters never reach a remote script or a log line.
        assert!(check_data_path(Path::new("/srv/a\nb")).is_err());
        assert!(check_workdir("--target-workdir", Path::new("/srv/a\tb")).is_err());
        assert!(check_workdir("--target-workdir", Path::new("rel")).is_err());
    }

    #[test]
    fn run_ids_are_valid_and_distinct() {
        let a = new_run_id();
        let b = new_run_id();
        assert!(crate::protocol::valid_run_id(&a), "{a}");
        assert_ne!(a, b);
    }
}
