//! Checkpoint, restore and inspect through the `podman` command line.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;

use crate::engine::freezer::{Freezer, RuntimeStart};
use crate::exec::{self, ExecError, args};

/// How long one podman call may take before it is treated as hung.
const PODMAN_TIMEOUT: Duration = Duration::from_secs(600);

/// What podman said went wrong.
#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    #[error("no container named {0:?} exists here; `podman ps -a` lists the containers")]
    NoSuchContainer(String),
    // The variants below say their cause in their own message (callers print `{e}`), so
    // they do not also hand it on as a `source`: an error chain would print it twice.
    #[error("{failed}{}", criu_hint(.criu_log))]
    Command {
        failed: ExecError,
        /// CRIU's own log and the lines of it that say why, when podman names one.
        criu_log: Option<(String, String)>,
    },
    #[error("cannot read `podman inspect` output: {0}")]
    Parse(String),
    /// podman wrote the whole archive, then failed: the dump is done, the archive may be
    /// whole, but podman's own verdict is a failure, so it is not used.
    #[error("podman failed after writing the whole archive of {name} ({bytes} bytes): {failed}")]
    FailedAfterExport {
        name: String,
        bytes: u64,
        failed: Box<PodmanError>,
    },
    #[error("cannot write the CRIU option wrapper in {dir}: {io}")]
    Wrapper { dir: String, io: std::io::Error },
    #[error("streaming the checkpoint of {name}: {io}")]
    Stream { name: String, io: std::io::Error },
}

/// Why CRIU refused a dump, read from its own words (never from the command line, which
/// names the options given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CriuRefusal {
    /// An established TCP connection, and no `--tcp-established`.
    Established,
    /// A connection still in its handshake (CRIU's `--skip-in-flight` leaves those out).
    InFlight,
    /// A process CRIU could not seize (uninterruptible sleep through its timeout).
    Stuck,
}

impl CriuRefusal {
    /// Reads CRIU's reason out of podman's stderr and CRIU's log lines.
    pub fn from_words(text: &str) -> Option<CriuRefusal> {
        if text.contains("In-flight connection") {
            Some(CriuRefusal::InFlight)
        } else if text.contains("Connected TCP socket") {
            Some(CriuRefusal::Established)
        } else if text.contains("Unseizable non-zombie") {
            Some(CriuRefusal::Stuck)
        } else {
            None
        }
    }

    /// CRIU's reason for a failed checkpoint, if it refused the dump.
    pub fn of(e: &anyhow::Error) -> Option<CriuRefusal> {
        e.chain()
            .find_map(|c| c.downcast_ref::<PodmanError>())
            .and_then(PodmanError::criu_refusal)
    }
}

impl PodmanError {
    /// CRIU's reason, when podman failed because CRIU refused the dump.
    pub fn criu_refusal(&self) -> Option<CriuRefusal> {
        match self {
            PodmanError::Command { .. } => CriuRefusal::from_words(&self.to_string()),
            PodmanError::FailedAfterExport { failed, .. } => failed.criu_refusal(),
            _ => None,
        }
    }

    /// podman refused to create or restore `name` because another container holds the name.
    pub fn name_in_use(&self, name: &str) -> bool {
        matches!(self, PodmanError::Command { .. })
            && self
                .to_string()
                .contains(&format!("container name \"{name}\" is already in use"))
    }
}

fn criu_hint(log: &Option<(String, String)>) -> String {
    match log {
        Some((path, lines)) if !lines.is_empty() => format!(" (CRIU log {path}: {lines})"),
        Some((path, _)) => format!(" (see CRIU log {path})"),
        None => String::new(),
    }
}

impl From<ExecError> for PodmanError {
    fn from(source: ExecError) -> Self {
        let criu_log = criu_log_excerpt(source.stderr());
        PodmanError::Command {
            failed: source,
            criu_log,
        }
    }
}

/// Finds a CRIU log path (dump.log / restore.log) in podman's stderr and reads the lines
/// of it that explain the failure.
pub fn criu_log_excerpt(stderr: &str) -> Option<(String, String)> {
    let path = stderr
        .split(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == ',')
        .find(|w| w.starts_with('/') && (w.ends_with("dump.log") || w.ends_with("restore.log")))?
        .trim_end_matches(['.', ':', ')'])
        .to_string();
    let lines = std::fs::read_to_string(&path)
        .map(|text| criu_error_lines(&text))
        .unwrap_or_default();
    Some((path, lines))
}

/// The lines of a CRIU log that report errors, at most the last five.
pub fn criu_error_lines(log: &str) -> String {
    let errs: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error (") || l.contains("Error:") || l.contains("err:"))
        .map(str::trim)
        .collect();
    errs[errs.len().saturating_sub(5)..].join(" | ")
}

/// A mount of a container as inspect reports it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Mount {
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "Source")]
    pub source: String,
    #[serde(rename = "Destination")]
    pub destination: String,
}

#[derive(Debug, Deserialize)]
struct RawState {
    #[serde(rename = "Status")]
    status: String,
    #[serde(rename = "Running")]
    running: bool,
    #[serde(rename = "Pid")]
    pid: i64,
}

#[derive(Debug, Default, Deserialize)]
struct RawHostConfig {
    #[serde(rename = "NetworkMode", default)]
    network_mode: String,
    #[serde(rename = "PidMode", default)]
    pid_mode: String,
    #[serde(rename = "IpcMode", default)]
    ipc_mode: String,
    #[serde(rename = "UTSMode", default)]
    uts_mode: String,
    #[serde(rename = "UsernsMode", default)]
    userns_mode: String,
    #[serde(rename = "CgroupnsMode", default)]
    cgroupns_mode: String,
}

#[derive(Debug, Deserialize)]
struct RawInspect {
    #[serde(rename = "HostConfig", default)]
    host_config: RawHostConfig,
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Image")]
    image: String,
    #[serde(rename = "ImageName", default)]
    image_name: String,
    #[serde(rename = "State")]
    state: RawState,
    #[serde(rename = "Mounts", default)]
    mounts: Vec<Mount>,
    #[serde(rename = "Pod", default)]
    pod: String,
    /// Every container this one needs (namespaces it joins, `--requires`): podman's own
    /// list, the one its checkpoint export refuses on.
    #[serde(rename = "Dependencies", default)]
    dependencies: Option<Vec<String>>,
    #[serde(rename = "NetworkSettings", default)]
    network_settings: RawNetworkSettings,
}

#[derive(Debug, Default, Deserialize)]
struct RawNetworkSettings {
    #[serde(rename = "Networks", default)]
    networks: Option<std::collections::BTreeMap<String, RawAttachment>>,
    /// Published ports (`-p`), by container port.
    #[serde(rename = "Ports", default)]
    ports: Option<std::collections::BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Default, Deserialize)]
struct RawAttachment {
    #[serde(rename = "IPAddress", default)]
    ip: String,
    #[serde(rename = "GlobalIPv6Address", default)]
    ipv6: String,
    #[serde(rename = "MacAddress", default)]
    mac: String,
}

/// A container's address on one podman network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub network: String,
    /// Its IPv4 and IPv6 addresses there (none while it is not running).
    pub ips: Vec<std::net::IpAddr>,
    pub mac: String,
}

/// What we need to know about a container.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub image_id: String,
    pub image_name: String,
    pub status: String,
    pub running: bool,
    pub pid: i64,
    pub mounts: Vec<Mount>,
    /// Containers (name or ID) whose namespaces this one joins (`--network container:X`):
    /// they must be restored first.
    pub joins: Vec<String>,
    /// Which namespace this one shares with which container (ID or name), as
    /// `("network", "8854c42…")`.
    pub shares: Vec<(&'static str, String)>,
    /// The IDs of the containers podman says this one depends on (namespaces, `--requires`,
    /// a pod's infra container).
    pub dependencies: Vec<String>,
    /// The ID of the pod this container belongs to, if any.
    pub pod: String,
    /// Its podman networks (none when it joins another's network namespace or uses the
    /// host's).
    pub networks: Vec<Attachment>,
    /// It has ports published on the host's addresses (`-p`).
    pub published: bool,
}

fn attachments(n: &RawNetworkSettings) -> Vec<Attachment> {
    n.networks
        .iter()
        .flatten()
        .map(|(name, a)| Attachment {
            network: name.clone(),
            ips: [&a.ip, &a.ipv6]
                .into_iter()
                .filter_map(|ip| ip.parse().ok())
                .collect(),
            mac: a.mac.clone(),
        })
        .collect()
}

/// Parses `podman container inspect` JSON.
pub fn parse_inspect(json: &str) -> Result<Vec<ContainerInfo>, PodmanError> {
    let raw: Vec<RawInspect> =
        serde_json::from_str(json).map_err(|e| PodmanError::Parse(e.to_string()))?;
    Ok(raw
        .into_iter()
        .map(|r| ContainerInfo {
            id: r.id,
            name: r.name,
            image_id: r.image,
            image_name: r.image_name,
            status: r.state.status,
            running: r.state.running,
            pid: r.state.pid,
            mounts: r.mounts,
            joins: {
                let mut j: Vec<String> =
                    shares(&r.host_config).into_iter().map(|(_, c)| c).collect();
                j.sort();
                j.dedup();
                j
            },
            shares: shares(&r.host_config),
            dependencies: r.dependencies.unwrap_or_default(),
            networks: attachments(&r.network_settings),
            published: r
                .network_settings
                .ports
                .as_ref()
                .is_some_and(|p| p.values().any(|v| !v.is_null())),
            pod: r.pod,
        })
        .collect())
}

/// The namespaces a container shares with another container (`--network container:X`,
/// `--pid container:X`, …), by the name podman's command line gives them.
fn shares(h: &RawHostConfig) -> Vec<(&'static str, String)> {
    [
        ("network", &h.network_mode),
        ("pid", &h.pid_mode),
        ("ipc", &h.ipc_mode),
        ("uts", &h.uts_mode),
        ("user", &h.userns_mode),
        ("cgroup", &h.cgroupns_mode),
    ]
    .into_iter()
    .filter_map(|(kind, m)| Some((kind, m.strip_prefix("container:")?.to_string())))
    .collect()
}

/// Options that both checkpoint and restore must agree on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CriuOptions {
    pub file_locks: bool,
    pub tcp_established: bool,
    /// CRIU's `tcp-close`: established connections are dumped without their state and
    /// restored closed (their peers see a reset and reconnect). A dump made so can only
    /// be restored so.
    pub tcp_close: bool,
    /// CRIU's `skip-in-flight`: connections still in their handshake are left out of the
    /// dump (the client retries its SYN) instead of failing it. Dump only.
    pub skip_in_flight: bool,
}

/// Where the per-option CRIU wrappers live (a tmpfs on every host this runs on: gone at
/// boot, never read by anything but the podman commands that name a wrapper).
pub const CRIU_WRAPPER_DIR: &str = "/run/migrate/criu";

impl CriuOptions {
    /// Podman's own flags for these options; they follow the subcommand.
    pub fn push_flags(&self, a: &mut Vec<String>) {
        if self.file_locks {
            a.push("--file-locks".into());
        }
        if self.tcp_established {
            a.push("--tcp-established".into());
        }
    }

    /// The lines of CRIU configuration podman 4.3 has no flag for (none: no wrapper).
    fn config(&self) -> Vec<&'static str> {
        let mut lines = Vec::new();
        if self.tcp_close {
            lines.push("tcp-close");
        }
        if self.skip_in_flight {
            lines.push("skip-in-flight");
        }
        lines
    }

    /// The CRIU options only the wrapper can give ("tcp-close", "skip-in-flight").
    pub fn criu_config_lines(&self) -> Vec<&'static str> {
        self.config()
    }

    /// The wrapper runc runs instead of `criu` for these options: it points CRIU at a
    /// configuration file of these options only (`CRIU_CONFIG_FILE`), then becomes CRIU.
    /// Handed to runc with podman's `--runtime-flag criu=PATH` on this one command, so
    /// no host-wide file changes and no other podman command is affected.
    pub fn wrapper(&self) -> Option<PathBuf> {
        self.wrapper_in(Path::new(CRIU_WRAPPER_DIR))
    }

    fn wrapper_in(&self, dir: &Path) -> Option<PathBuf> {
        let lines = self.config();
        (!lines.is_empty()).then(|| dir.join(lines.join("+")))
    }

    /// podman's global arguments for these options (before the subcommand).
    fn global(&self) -> Vec<String> {
        match self.wrapper() {
            Some(w) => vec!["--runtime-flag".into(), format!("criu={}", w.display())],
            None => Vec::new(),
        }
    }

    /// Makes sure the wrapper and its configuration exist in [`CRIU_WRAPPER_DIR`].
    pub fn ensure_wrapper(&self) -> std::io::Result<()> {
        self.write_wrapper(Path::new(CRIU_WRAPPER_DIR)).map(drop)
    }

    /// Writes the wrapper and its configuration into `dir` (root-only, never through a
    /// symlink) unless they are there already as they should be.
    fn write_wrapper(&self, dir: &Path) -> std::io::Result<Option<PathBuf>> {
        let Some(wrapper) = self.wrapper_in(dir) else {
            return Ok(None);
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        crate::rundir::check_private_dir(dir).map_err(std::io::Error::other)?;
        let conf = wrapper.with_extension("conf");
        let want_conf = format!("{}\n", self.config().join("\n"));
        let want_script = format!(
            "#!/bin/sh\n# migrate: CRIU with {} for one podman command\nCRIU_CONFIG_FILE={} exec criu \"$@\"\n",
            self.config().join(", "),
            crate::exec::shell_quote(&conf.display().to_string())
        );
        let name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        if std::fs::read_to_string(&conf).ok().as_deref() != Some(want_conf.as_str()) {
            crate::rundir::write_private(dir, &name(&conf), want_conf.as_bytes())?;
        }
        if std::fs::read_to_string(&wrapper).ok().as_deref() != Some(want_script.as_str()) {
            crate::rundir::write_private(dir, &name(&wrapper), want_script.as_bytes())?;
        }
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o700))?;
        Ok(Some(wrapper))
    }
}

/// Archive compression podman applies on export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    None,
    Zstd,
    Gzip,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
        }
    }
    /// File name ending for an exported archive.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "tar",
            Compression::Zstd => "tar.zst",
            Compression::Gzip => "tar.gz",
        }
    }
}

/// `podman container inspect` arguments.
pub fn inspect_args(names: &[String]) -> Vec<String> {
    let mut a = args(["container", "inspect"]);
    a.extend(names.iter().cloned());
    a
}

/// `podman container checkpoint` arguments: export to `archive`, keep CRIU's files so
/// the container can be restored in place on the source if the migration fails.
pub fn checkpoint_args(
    name: &str,
    archive: &Path,
    opts: CriuOptions,
    compress: Compression,
) -> Vec<String> {
    let mut a = opts.global();
    a.extend(args(["container", "checkpoint", "--keep", "--print-stats"]));
    a.push("--compress".into());
    a.push(compress.as_str().into());
    a.push("--export".into());
    a.push(archive.display().to_string());
    opts.push_flags(&mut a);
    a.push(name.into());
    a
}

/// `podman container restore --import` arguments; a pod's member goes into the pod of
/// that ID (podman 4.3 takes only the ID there: it stores a name where the ID belongs).
pub fn restore_import_args(archive: &Path, opts: CriuOptions, pod: Option<&str>) -> Vec<String> {
    let mut a = opts.global();
    a.extend(args(["container", "restore", "--print-stats", "--import"]));
    a.push(archive.display().to_string());
    if let Some(pod) = pod {
        a.push("--pod".into());
        a.push(pod.into());
    }
    opts.push_flags(&mut a);
    a
}

/// `podman container restore NAME` (in place, from the kept checkpoint) arguments.
pub fn restore_in_place_args(name: &str, opts: CriuOptions) -> Vec<String> {
    let mut a = opts.global();
    a.extend(args(["container", "restore", "--keep"]));
    opts.push_flags(&mut a);
    a.push(name.into());
    a
}

/// What `--print-stats` says, in seconds: podman's whole operation and, inside it, the
/// time CRIU kept the processes frozen (checkpoint) or spent restoring them (restore).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub podman_s: Option<f64>,
    pub criu_s: Option<f64>,
}

impl Stats {
    /// Parses podman 4's and 5's `--print-stats` JSON (durations in µs); missing parts stay
    /// `None`.
    pub fn parse(stdout: &str) -> Stats {
        let Some(v) = stdout
            .find('{')
            .and_then(|i| serde_json::from_str::<serde_json::Value>(&stdout[i..]).ok())
        else {
            return Stats::default();
        };
        let us = |x: &serde_json::Value| x.as_f64().map(|u| u / 1e6);
        let podman_s =
            us(&v["podman_checkpoint_duration"]).or_else(|| us(&v["podman_restore_duration"]));
        let criu_s = v["container_statistics"].as_array().and_then(|cs| {
            cs.iter()
                .filter_map(|c| {
                    let s = &c["criu_statistics"];
                    us(&s["frozen_time"]).or_else(|| us(&s["restore_time"]))
                })
                .reduce(f64::max)
        });
        Stats { podman_s, criu_s }
    }
}

/// One archive podman exported into a FIFO, as it was read.
#[derive(Debug)]
pub struct Streamed {
    pub size: u64,
    /// The archive's digest ([`crate::digest`]).
    pub digest: String,
    /// When podman began writing the archive: CRIU's dump was over, the processes gone.
    pub first_byte: Option<Instant>,
    /// When the whole archive had been handed to the sink.
    pub complete: Instant,
    /// When podman exited (successfully), after it had cleaned up the container.
    pub exited: Instant,
    /// podman's own timing (`--print-stats`).
    pub stats: Stats,
    /// When podman started the runtime's checkpoint and the container was frozen; `None`
    /// when that was not watched (no cgroup freezer) or not seen.
    pub runtime_start: Option<RuntimeStart>,
}

/// How a checkpoint is exported: into `fifo`, with these CRIU options and compression,
/// the container frozen through `freezer` when podman starts the runtime's checkpoint.
pub struct Export<'a> {
    pub fifo: &'a Path,
    pub opts: CriuOptions,
    pub compress: Compression,
    pub freezer: Option<&'a Freezer>,
}

/// How long podman may take to start the runtime's checkpoint before the watch gives up
/// (CRIU then freezes the container itself).
const WATCH_LIMIT: Duration = Duration::from_secs(60);

/// Bytes read from the FIFO at a time; the pipe is widened to this where allowed.
const PIPE_BYTES: usize = 1 << 20;
const TAR_BLOCK: usize = 512;

/// A wider pipe lets podman write the archive in fewer, larger steps; failing to widen
/// it (a lower `fs.pipe-max-size`) only costs speed.
fn widen_pipe(rx: &pipe::Receiver) {
    let _ = rustix::pipe::fcntl_setpipe_size(rx, PIPE_BYTES);
}

/// Keeps the last two tar blocks seen.
fn keep_tail(tail: &mut Vec<u8>, chunk: &[u8]) {
    tail.extend_from_slice(&chunk[chunk.len().saturating_sub(2 * TAR_BLOCK)..]);
    let extra = tail.len().saturating_sub(2 * TAR_BLOCK);
    tail.drain(..extra);
}

/// Reads the FIFO to its end and waits for podman, within [`PODMAN_TIMEOUT`].
async fn drain(
    rx: &mut pipe::Receiver,
    buf: &mut [u8],
    exit: &mut tokio::task::JoinHandle<Result<Stats, PodmanError>>,
    exited: bool,
) {
    let _ = tokio::time::timeout(PODMAN_TIMEOUT, async {
        while matches!(rx.read(buf).await, Ok(n) if n > 0) {}
        if !exited {
            let _ = exit.await;
        }
    })
    .await;
}

/// Hashes the archive on a thread of its own, off the path between the FIFO and the
/// upload.
struct Hasher {
    tx: tokio::sync::mpsc::Sender<std::sync::Arc<[u8]>>,
    done: tokio::task::JoinHandle<std::io::Result<String>>,
}

fn spawn_hasher() -> Hasher {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::sync::Arc<[u8]>>(64);
    let done = tokio::task::spawn_blocking(move || {
        let mut hasher = crate::digest::Digest::new();
        while let Some(chunk) = rx.blocking_recv() {
            hasher.update(&chunk);
        }
        Ok(hasher.hex())
    });
    Hasher { tx, done }
}

impl Hasher {
    async fn finish(self) -> std::io::Result<String> {
        drop(self.tx);
        self.done.await.map_err(std::io::Error::other)?
    }
}

/// The local podman.
#[derive(Debug, Clone, Default)]
pub struct Podman;

impl Podman {
    async fn run(&self, a: Vec<String>) -> Result<String, PodmanError> {
        Ok(exec::run("podman", &a, PODMAN_TIMEOUT).await?.stdout)
    }

    /// Inspects containers by name; a missing one is [`PodmanError::NoSuchContainer`].
    pub async fn inspect(&self, names: &[String]) -> Result<Vec<ContainerInfo>, PodmanError> {
        let mut found = Vec::new();
        for name in names {
            match exec::run(
                "podman",
                &inspect_args(std::slice::from_ref(name)),
                PODMAN_TIMEOUT,
            )
            .await
            {
                Ok(out) => found.extend(parse_inspect(&out.stdout)?),
                Err(e) if is_no_such_container(e.stderr()) => {
                    return Err(PodmanError::NoSuchContainer(name.clone()));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(found)
    }

    /// Every container on this host, in any state.
    /// Every container on this host, in any state. A container removed between the
    /// listing and the inspection makes it list again.
    pub async fn all(&self) -> Result<Vec<ContainerInfo>, PodmanError> {
        let mut attempt = 1;
        loop {
            let ids = self
                .run(args(["ps", "--all", "--no-trunc", "--format", "{{.ID}}"]))
                .await?;
            let ids: Vec<String> = ids.split_whitespace().map(str::to_string).collect();
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            match exec::run("podman", &inspect_args(&ids), PODMAN_TIMEOUT).await {
                Ok(out) => return parse_inspect(&out.stdout),
                Err(e) if attempt < 3 && is_no_such_container(e.stderr()) => attempt += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// True when a container of that name exists.
    pub async fn exists(&self, name: &str) -> Result<bool, PodmanError> {
        match self.inspect(&[name.to_string()]).await {
            Ok(_) => Ok(true),
            Err(PodmanError::NoSuchContainer(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Checkpoints `name` and exports its archive into `fifo`. Every byte read from it
    /// is hashed and written to `sink` (the upload). No local copy is written: it would
    /// compete with the freeze for the disk (a 1 GiB archive cost ~2 s of downtime here);
    /// a rollback restores from the checkpoint podman keeps (`--keep`) or, failing that,
    /// from the target's copy. `dumped` fires with the first byte: CRIU's dump is over and the
    /// container's processes are gone, so its data folders can no longer change.
    ///
    /// Returns once podman has exited. The archive is complete when both its stream ended
    /// (end of file on the FIFO and, for a plain tar, tar's closing blocks) and podman
    /// exited successfully: a podman that fails at any point, even after writing the
    /// whole archive (while it cleans up the container's network and storage), is an
    /// error here ([`PodmanError::FailedAfterExport`] when the archive was whole).
    pub async fn checkpoint_streaming<W: AsyncWrite + Unpin>(
        &self,
        name: &str,
        how: Export<'_>,
        sink: W,
        dumped: &mut Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<Streamed, PodmanError> {
        let Export {
            fifo,
            opts,
            compress,
            freezer,
        } = how;
        ensure_wrapper(opts)?;
        let a = checkpoint_args(name, fifo, opts, compress);
        // Read-only: the end of the archive shows as end of file when podman closes the
        // FIFO (Linux reports no hang-up before a writer has come and gone).
        let rx = pipe::OpenOptions::new()
            .open_receiver(fifo)
            .map_err(|source| PodmanError::Stream {
                name: name.to_string(),
                io: source,
            })?;
        let podman = exec::spawn("podman", &a)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watch = match (freezer, podman.pid()) {
            (Some(f), Some(pid)) => {
                let (f, stop) = (f.clone(), stop.clone());
                Some(tokio::task::spawn_blocking(move || {
                    f.freeze_at_runtime_start(pid, &stop, WATCH_LIMIT)
                }))
            }
            _ => None,
        };
        let r = Self::stream_archive(name, compress, podman, rx, sink, dumped, &stop).await;
        // Joined on every path: a freeze must not land after the caller thawed.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let runtime_start = match watch {
            Some(h) => h.await.ok().flatten(),
            None => None,
        };
        r.map(|mut st| {
            st.runtime_start = runtime_start;
            st
        })
    }

    async fn stream_archive<W: AsyncWrite + Unpin>(
        name: &str,
        compress: Compression,
        podman: exec::Running,
        mut rx: pipe::Receiver,
        mut sink: W,
        dumped: &mut Option<tokio::sync::oneshot::Sender<()>>,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<Streamed, PodmanError> {
        let io = |source: std::io::Error| PodmanError::Stream {
            name: name.to_string(),
            io: source,
        };
        widen_pipe(&rx);
        let hasher = spawn_hasher();
        let mut exit = tokio::spawn(async move {
            let out = podman.finish(PODMAN_TIMEOUT).await?;
            Ok(Stats::parse(&out.stdout))
        });
        let mut first_byte = None;
        let mut buf = vec![0u8; PIPE_BYTES];
        let mut total = 0u64;
        let mut tail = Vec::with_capacity(2 * TAR_BLOCK);
        let mut finished = None;
        loop {
            let n = tokio::select! {
                r = rx.read(&mut buf) => r.map_err(io)?,
                r = &mut exit, if finished.is_none() => {
                    finished = Some(r.unwrap_or_else(|e| Err(io(std::io::Error::other(e)))));
                    // podman closed the FIFO before exiting: what is left sits in the pipe.
                    match rx.try_read(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                        Err(e) => return Err(io(e)),
                    }
                }
            };
            if n == 0 {
                break;
            }
            if first_byte.is_none() {
                first_byte = Some(Instant::now());
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                if let Some(d) = dumped.take() {
                    let _ = d.send(());
                }
            }
            let chunk: std::sync::Arc<[u8]> = buf[..n].into();
            keep_tail(&mut tail, &chunk);
            if hasher.tx.send(chunk.clone()).await.is_err() {
                break;
            }
            if let Err(e) = sink.write_all(&chunk).await {
                // The upload broke (a full disk on the target, say) while podman still
                // writes: let it finish into nothing, so that it ends and keeps its
                // checkpoint whole for the rollback, rather than meet a FIFO nobody reads.
                drain(&mut rx, &mut buf, &mut exit, finished.is_some()).await;
                return Err(io(e));
            }
            total += n as u64;
        }
        sink.shutdown().await.map_err(io)?;
        let complete = Instant::now();
        let digest = hasher.finish().await.map_err(io)?;
        // The stream's own end: a plain tar ends with two zero blocks.
        let closed = compress != Compression::None
            || (total >= (2 * TAR_BLOCK) as u64 && tail.iter().all(|&b| b == 0));
        // podman's verdict: it may still be cleaning up the container (network, storage).
        let exit = match finished {
            Some(r) => r,
            None => exit
                .await
                .unwrap_or_else(|e| Err(io(std::io::Error::other(e)))),
        };
        let exited = Instant::now();
        let stats = match exit {
            Ok(stats) => stats,
            Err(e) if closed && total > 0 => {
                return Err(PodmanError::FailedAfterExport {
                    name: name.to_string(),
                    bytes: total,
                    failed: Box::new(e),
                });
            }
            Err(e) => return Err(e),
        };
        if !closed {
            return Err(PodmanError::Stream {
                name: name.to_string(),
                io: std::io::Error::other(format!(
                    "podman succeeded, but the archive it wrote ({total} bytes) does not end with tar's closing blocks"
                )),
            });
        }
        Ok(Streamed {
            size: total,
            digest,
            first_byte,
            complete,
            exited,
            stats,
            runtime_start: None,
        })
    }

    /// Restores from an exported archive; returns podman's own timing (`--print-stats`).
    pub async fn restore_import(
        &self,
        archive: &Path,
        opts: CriuOptions,
        pod: Option<&str>,
    ) -> Result<Stats, PodmanError> {
        ensure_wrapper(opts)?;
        let out = self.run(restore_import_args(archive, opts, pod)).await?;
        Ok(Stats::parse(&out))
    }

    /// Restores from a lazy archive through `wrapper` (see [`crate::engine::lazy`]): the
    /// tasks start before their memory is here, CRIU's lazy-pages daemon serves it.
    pub async fn restore_import_lazy(
        &self,
        archive: &Path,
        opts: CriuOptions,
        wrapper: &Path,
    ) -> Result<(), PodmanError> {
        let mut a = vec![
            "--runtime-flag".to_string(),
            format!("criu={}", wrapper.display()),
        ];
        a.extend(args(["container", "restore", "--import"]));
        a.push(archive.display().to_string());
        opts.push_flags(&mut a);
        self.run(a).await.map(drop)
    }

    pub async fn restore_in_place(&self, name: &str, opts: CriuOptions) -> Result<(), PodmanError> {
        ensure_wrapper(opts)?;
        match self.run(restore_in_place_args(name, opts)).await {
            // A checkpoint that failed after CRIU's dump (or whose podman died) can leave
            // the container "stopped": its processes are gone but podman has not cleaned
            // up, and it refuses to restore that state. Clean up, then once more.
            Err(e) if e.to_string().contains("container state improper") => {
                self.cleanup(name).await?;
                self.run(restore_in_place_args(name, opts)).await.map(drop)
            }
            r => r.map(drop),
        }
    }

    /// Removes a container, stopping it first if needed.
    pub async fn remove(&self, name: &str) -> Result<(), PodmanError> {
        self.run(args(["rm", "--force", "--time", "5", name]))
            .await
            .map(drop)
    }

    /// Finishes podman's own bookkeeping of a container whose processes are gone but which
    /// podman still calls "stopped" (its checkpoint died half-way): after it the
    /// container is "exited" and its kept checkpoint can be restored.
    async fn cleanup(&self, name: &str) -> Result<(), PodmanError> {
        self.run(args(["container", "cleanup", name]))
            .await
            .map(drop)
    }

    /// Kills a container's processes at once (SIGKILL), for a removal that failed.
    pub async fn kill(&self, name: &str) -> Result<(), PodmanError> {
        self.run(args(["kill", "--signal", "KILL", name]))
            .await
            .map(drop)
    }
}

/// [`CriuOptions::ensure_wrapper`] as a podman error.
fn ensure_wrapper(opts: CriuOptions) -> Result<(), PodmanError> {
    opts.ensure_wrapper().map_err(|e| PodmanError::Wrapper {
        dir: CRIU_WRAPPER_DIR.into(),
        io: e,
    })
}

/// podman's wording for a missing container, across 4.x versions.
pub fn is_no_such_container(stderr: &str) -> bool {
    stderr.contains("no such container") || stderr.contains("no container with name or ID")
}

/// True when any process in the pid namespace of `pid` holds a POSIX or flock lock
/// (`/proc/locks`). Such a container needs `--file-locks` at checkpoint and restore.
pub fn holds_file_locks(pid: i64) -> std::io::Result<bool> {
    if pid <= 0 {
        return Ok(false);
    }
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid"))?;
    let locks = std::fs::read_to_string("/proc/locks")?;
    Ok(lock_pids(&locks).into_iter().any(|p| {
        std::fs::read_link(format!("/proc/{p}/ns/pid"))
            .map(|n| n == ns)
            .unwrap_or(false)
    }))
}

/// The pids that `/proc/locks` lists as lock holders.
pub fn lock_pids(locks: &str) -> Vec<i64> {
    locks
        .lines()
        .filter(|l| !l.contains("->"))
        .filter_map(|l| l.split_whitespace().nth(4)?.parse().ok())
        .collect()
}

/// Resident memory of all processes in the pid namespace of `pid`, in bytes: an estimate
/// of how large an uncompressed checkpoint will be.
pub fn resident_bytes(pid: i64) -> u64 {
    let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/pid")) else {
        return 0;
    };
    let page = 4096u64;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/ns/pid"))
                .map(|n| n == ns)
                .unwrap_or(false)
        })
        .filter_map(|p| {
            let statm = std::fs::read_to_string(format!("/proc/{p}/statm")).ok()?;
            statm.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum::<u64>()
        * page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_refusals_are_read_from_criu_not_from_the_command_line() {
        // The command line names --tcp-established; CRIU's log says why it failed.
        let cmd = "`podman container checkpoint --export /x/web.fifo --tcp-established web` exited with status 125: CRIU log dump.log: ";
        assert_eq!(
            CriuRefusal::from_words(&format!(
                "{cmd}(10.002103) Error (compel/src/lib/infect.c:262): Unseizable non-zombie 7403 found, state D, err -1/4"
            )),
            Some(CriuRefusal::Stuck)
        );
        assert_eq!(
            CriuRefusal::from_words(&format!(
                "{cmd}(00.1) Error (criu/sk-inet.c:200): Connected TCP socket, consider using --tcp-established option."
            )),
            Some(CriuRefusal::Established)
        );
        assert_eq!(
            CriuRefusal::from_words(&format!(
                "{cmd}(00.1) Error (criu/sk-inet.c:185): In-flight connection (l) for 1a2b"
            )),
            Some(CriuRefusal::InFlight)
        );
        assert_eq!(
            CriuRefusal::from_words(&format!("{cmd}(00.1) Error: something else")),
            None
        );
    }

    #[test]
    fn parses_inspect() {
        let json = r#"[{"Id":"abc","Name":"db","Image":"img1","ImageName":"localhost/m:latest",
            "State":{"Status":"running","Running":true,"Pid":123,"Other":1},
            "Mounts":[{"Type":"bind","Source":"/srv/app/mysql","Destination":"/var/lib/mysql","Options":["rbind"]}],
            "Config":{},"HostConfig":{"NetworkMode":"container:abc123","IpcMode":"private"}}]"#;
        let c = &parse_inspect(json).unwrap()[0];
        assert_eq!(c.name, "db");
        assert_eq!(c.image_id, "img1");
        assert!(c.running);
        assert_eq!(c.mounts[0].source, "/srv/app/mysql");
        assert_eq!(c.joins, vec!["abc123"]);
        assert_eq!(c.shares, vec![("network", "abc123".to_string())]);
        assert!(c.dependencies.is_empty() && c.pod.is_empty());
    }

    #[test]
    fn parses_dependencies_and_pods() {
        // As podman 4.3.1 prints them for `podman run --network container:base --pid
        // container:base` (trimmed), and for a container with none (`null`).
        let json = r#"[{"Id":"49a2f879","Name":"app","Image":"i","State":{"Status":"running","Running":true,"Pid":7},
            "Pod":"","Dependencies":["8854c4216652f8202d76eca89e92d4aa6686adfd78970afc7ddc7ee7bbbc3b81"],
            "HostConfig":{"NetworkMode":"container:8854c4216652f8202d76eca89e92d4aa6686adfd78970afc7ddc7ee7bbbc3b81","PidMode":"container:8854c4216652f8202d76eca89e92d4aa6686adfd78970afc7ddc7ee7bbbc3b81","IpcMode":"shareable","UTSMode":"private","UsernsMode":"","CgroupnsMode":"host"}},
            {"Id":"77","Name":"member","Image":"i","State":{"Status":"running","Running":true,"Pid":8},
            "Pod":"f00d","Dependencies":["1nfra"],"HostConfig":{}},
            {"Id":"88","Name":"alone","Image":"i","State":{"Status":"running","Running":true,"Pid":9},
            "Pod":"","Dependencies":null,"HostConfig":{}}]"#;
        let v = parse_inspect(json).unwrap();
        let base = "8854c4216652f8202d76eca89e92d4aa6686adfd78970afc7ddc7ee7bbbc3b81".to_string();
        assert_eq!(
            v[0].shares,
            vec![("network", base.clone()), ("pid", base.clone())]
        );
        assert_eq!(v[0].joins, vec![base.clone()]);
        assert_eq!(v[0].dependencies, vec![base]);
        assert_eq!(v[1].pod, "f00d");
        assert_eq!(v[1].dependencies, vec!["1nfra"]);
        assert!(v[2].dependencies.is_empty() && v[2].shares.is_empty());
    }

    #[test]
    fn builds_checkpoint_and_restore_lines() {
        let opts = CriuOptions {
            file_locks: true,
            ..CriuOptions::default()
        };
        let a = checkpoint_args("db", Path::new("/w/db.tar"), opts, Compression::None);
        assert_eq!(
            a.join(" "),
            "container checkpoint --keep --print-stats --compress none --export /w/db.tar --file-locks db"
        );
        let r = restore_import_args(Path::new("/w/db.tar"), opts, None);
        assert!(r.contains(&"--file-locks".to_string()));
        let r = restore_import_args(Path::new("/w/db.tar"), opts, Some("0c72f4254fe7"));
        assert_eq!(
            r[4..8].join(" "),
            "/w/db.tar --pod 0c72f4254fe7 --file-locks"
        );
        // Options podman has no flag for go to runc as a wrapper for `criu`, on this
        // command only.
        let close = CriuOptions {
            tcp_close: true,
            skip_in_flight: true,
            ..CriuOptions::default()
        };
        let a = checkpoint_args("db", Path::new("/w/db.tar"), close, Compression::None);
        assert_eq!(
            a[..2].join(" "),
            "--runtime-flag criu=/run/migrate/criu/tcp-close+skip-in-flight"
        );
        assert_eq!(a[2], "container");
        let r = restore_in_place_args("db", close);
        assert_eq!(r[1], "criu=/run/migrate/criu/tcp-close+skip-in-flight");
        assert_eq!(
            restore_import_args(Path::new("/w/db.tar"), opts, None)[0],
            "container"
        );
    }

    #[test]
    fn the_wrapper_hands_criu_its_options_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let wdir = dir.path().join("criu");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        // A stand-in for criu that shows what it was given.
        std::fs::write(
            bin.join("criu"),
            "#!/bin/sh\necho \"args=$*\"\necho \"conf=$CRIU_CONFIG_FILE\"\ncat \"$CRIU_CONFIG_FILE\"\n",
        )
        .unwrap();
        std::fs::set_permissions(bin.join("criu"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let close = CriuOptions {
            tcp_close: true,
            skip_in_flight: true,
            ..CriuOptions::default()
        };
        let w = close.write_wrapper(&wdir).unwrap().unwrap();
        // Written twice: the same files, still private.
        assert_eq!(close.write_wrapper(&wdir).unwrap(), Some(w.clone()));
        let mode = std::fs::metadata(&wdir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let out = std::process::Command::new(&w)
            .args(["swrk", "3"])
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("args=swrk 3"), "{text}");
        assert!(text.contains("tcp-close\nskip-in-flight"), "{text}");
        // No options podman lacks: no wrapper at all.
        assert_eq!(CriuOptions::default().write_wrapper(&wdir).unwrap(), None);
        assert_eq!(CriuOptions::default().global(), Vec::<String>::new());
    }

    #[test]
    fn reads_print_stats() {
        // Shapes printed by podman 4.3 (trimmed).
        let cp = r#"{"podman_checkpoint_duration":480123,"container_statistics":[{"Id":"x","runtime_checkpoint_duration":300000,"criu_statistics":{"freezing_time":1000,"frozen_time":140000,"memdump_time":9000,"memwrite_time":4000,"pages_scanned":20000,"pages_written":2000}}]}"#;
        let s = Stats::parse(cp);
        assert_eq!(s.podman_s, Some(0.480123));
        assert_eq!(s.criu_s, Some(0.14));
        let rs = r#"{"podman_restore_duration":710000,"container_statistics":[{"Id":"x","runtime_restore_duration":400000,"criu_statistics":{"forking_time":2000,"restore_time":120000,"pages_restored":2000}}]}"#;
        let s = Stats::parse(rs);
        assert_eq!(s.podman_s, Some(0.71));
        assert_eq!(s.criu_s, Some(0.12));
        assert_eq!(Stats::parse("not json"), Stats::default());
    }

    #[test]
    fn reads_podman_5_print_stats() {
        // podman 5.4.2 (Debian 13) with CRIU 4.2.1: no "RawInput", CRIU's newer keys,
        // pretty-printed after the cgroups-v1 warning line podman 5 may print first.
        let cp = "time=\"2026-12-03T07:12:16Z\" level=warning msg=\"Using cgroups-v1 which is deprecated\"\n{\n    \"podman_checkpoint_duration\": 587743,\n    \"container_statistics\": [\n        {\n            \"Id\": \"fa16a430a56b\",\n            \"runtime_checkpoint_duration\": 236011,\n            \"criu_statistics\": {\n                \"freezing_time\": 102,\n                \"frozen_time\": 75426,\n                \"memdump_time\": 1130,\n                \"memwrite_time\": 806,\n                \"pages_scanned\": 1206,\n                \"pages_written\": 47\n            }\n        }\n    ]\n}\n";
        let s = Stats::parse(cp);
        assert_eq!(s.podman_s, Some(0.587743));
        assert_eq!(s.criu_s, Some(0.075426));
        let rs = r#"{"podman_restore_duration":313277,"container_statistics":[{"Id":"x","runtime_restore_duration":200000,"criu_statistics":{"forking_time":900,"restore_time":119048,"pages_restored":47,"pages_compared":0,"pages_skipped_cow":0}}]}"#;
        let s = Stats::parse(rs);
        assert_eq!(s.podman_s, Some(0.313277));
        assert_eq!(s.criu_s, Some(0.119048));
        // A failed checkpoint: statistics null, podman's duration still read.
        let failed = r#"{"podman_checkpoint_duration":402311,"container_statistics":null}"#;
        let s = Stats::parse(failed);
        assert_eq!(s.podman_s, Some(0.402311));
        assert_eq!(s.criu_s, None);
    }

    #[test]
    fn reads_lock_holders() {
        let locks = "1: POSIX  ADVISORY  WRITE 4242 00:2f:1234 0 EOF\n\
                     1: -> POSIX  ADVISORY  WRITE 99 00:2f:1234 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 17 fd:00:55 0 EOF\n";
        assert_eq!(lock_pids(locks), vec![4242, 17]);
    }

    #[test]
    fn criu_log_lines() {
        let log = "(00.1) foo\n(00.2) Error (criu/files-reg.c:1234): Can't open file\n(00.3) bar\n";
        assert_eq!(
            criu_error_lines(log),
            "(00.2) Error (criu/files-reg.c:1234): Can't open file"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("restore.log");
        std::fs::write(&path, log).unwrap();
        let stderr = format!(
            "Error: criu failed: type RESTORE errno 0\nlog file: {}\n",
            path.display()
        );
        let (p, lines) = criu_log_excerpt(&stderr).unwrap();
        assert_eq!(p, path.display().to_string());
        assert!(lines.contains("Can't open file"));
    }

    #[test]
    fn no_such_container_wording() {
        assert!(is_no_such_container("Error: no such container nope"));
        assert!(is_no_such_container(
            "Error: inspecting object: no such container \"x\""
        ));
    }
}
