//! Lazy (post-copy) memory: the pieces migrate drives itself around podman.
//!
//! podman 4.3 cannot make a lazy checkpoint (runc always asks CRIU for a plain one), so
//! migrate hands runc a CRIU wrapper of its own: the wrapper gives CRIU alone a private
//! mount namespace in which a per-run folder is bound over `/etc/criu`, and CRIU then
//! reads that folder's `runc.conf` after runc's request (runc names that file whenever a
//! container has no `org.criu.config` annotation). The file carries `lazy-pages`, the page
//! server's loopback address and port, and the `--tcp` policy's options. Nothing changes
//! for any other podman or CRIU command on the host; `/etc/criu` only has to exist (an
//! empty folder is inert).
//!
//! Source: `podman container checkpoint --keep` runs in the background; once CRIU's
//! dump.log says its page server is listening, every image but the memory is written,
//! and [`build_archive`] makes the archive `podman container restore --import` takes
//! (the parts podman would add after the dump are built from what it had before).
//! The checkpoint returns only when the page server has served every page.
//!
//! Target: [`Daemon`] is CRIU's lazy-pages daemon over the images; the restore runs with
//! a wrapper whose `runc.conf` says `lazy-pages` and the daemon's work folder, so the
//! restored tasks' page faults go to the daemon, which fetches the pages from the source.
//! See `docs/design/lazy-pages.md` for the measurements behind each step.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::engine::podman::CriuOptions;
use crate::exec::{self, ExecError};

/// The folder CRIU reads `runc.conf` from; the wrapper binds a per-run folder over it.
pub const ETC_CRIU: &str = "/etc/criu";
/// What CRIU's dump.log says once every image but the memory is written.
const PAGE_SERVER_STARTED: &str = "Starting lazy pages server";
/// How long a dump may take to reach its page server.
const DUMP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the lazy-pages daemon may take to open its socket.
const DAEMON_START: Duration = Duration::from_secs(10);
/// The page server's and the daemon's command for a page: `struct page_server_iov`'s
/// `cmd` (PS_IOV_GET in CRIU's page-xfer.c), low 16 bits.
const PS_IOV_GET: u32 = 7;
/// The size of one request.
const PS_IOV_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("{0}")]
    Exec(#[from] ExecError),
    #[error("{what}: {io}")]
    Io { what: String, io: std::io::Error },
    #[error("the lazy checkpoint of {name} ended before its page server started: {failed}{log}")]
    DumpEnded {
        name: String,
        failed: String,
        log: String,
    },
    #[error("the lazy checkpoint of {name} did not reach its page server within {after:?}{log}")]
    DumpSlow {
        name: String,
        after: Duration,
        log: String,
    },
    #[error("cannot read `podman inspect` of {name}: {why}")]
    Inspect { name: String, why: String },
    #[error("CRIU's lazy-pages daemon did not start: {0}")]
    Daemon(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LazyError {
    let what = what.into();
    move |io| LazyError::Io { what, io }
}

/// Makes sure `/etc/criu` exists as a real folder (the wrapper's mount point).
pub fn ensure_etc_criu() -> Result<(), LazyError> {
    match std::fs::symlink_metadata(ETC_CRIU) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(LazyError::Io {
            what: format!("{ETC_CRIU} is not a folder"),
            io: std::io::Error::other("remove it or make it an (empty) folder"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .mode(0o755)
            .create(ETC_CRIU)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(io(format!("creating {ETC_CRIU}"))),
        Err(e) => Err(io(format!("looking at {ETC_CRIU}"))(e)),
    }
}

/// Writes `dir/etc-criu/runc.conf` with `lines` and `dir/criu-wrap`, the program runc
/// runs instead of `criu` (`--runtime-flag criu=…`). `dir` must be a private folder of
/// this run. Returns the wrapper's path.
pub fn write_wrapper(dir: &Path, lines: &[String]) -> Result<PathBuf, LazyError> {
    let conf_dir = dir.join("etc-criu");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&conf_dir)
        .map_err(io(format!("creating {}", conf_dir.display())))?;
    let conf = format!("{}\n", lines.join("\n"));
    crate::rundir::write_private(&conf_dir, "runc.conf", conf.as_bytes())
        .map_err(io(format!("writing {}/runc.conf", conf_dir.display())))?;
    let script = format!(
        "#!/bin/sh\n# migrate: CRIU with {} (lazy pages) for one podman command\nexec unshare -m --propagation private /bin/sh -c 'mount --bind \"$0\" {ETC_CRIU} && exec criu \"$@\"' {} \"$@\"\n",
        dir.display(),
        exec::shell_quote(&conf_dir.display().to_string())
    );
    crate::rundir::write_private(dir, "criu-wrap", script.as_bytes())
        .map_err(io(format!("writing {}/criu-wrap", dir.display())))?;
    let wrapper = dir.join("criu-wrap");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("making {} executable", wrapper.display())))?;
    Ok(wrapper)
}

/// The source's `runc.conf`: a lazy dump whose page server listens on loopback `port`.
pub fn source_conf(port: u16, opts: CriuOptions) -> Vec<String> {
    let mut lines = vec![
        "lazy-pages".to_string(),
        "address 127.0.0.1".to_string(),
        format!("port {port}"),
    ];
    lines.extend(opts.criu_config_lines().into_iter().map(String::from));
    lines
}

/// The target's `runc.conf`: a lazy restore whose daemon works in `work_dir`.
pub fn target_conf(work_dir: &Path, opts: CriuOptions) -> Vec<String> {
    let mut lines = vec![
        "lazy-pages".to_string(),
        format!("work-dir {}", work_dir.display()),
    ];
    if opts.tcp_close {
        lines.push("tcp-close".to_string());
    }
    lines
}

/// What the archive needs from `podman inspect`, read before the checkpoint (inspect
/// waits for the container's lock, which the checkpoint holds).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceFacts {
    pub name: String,
    /// podman's folder of the container (`userdata`): CRIU's images and logs go there.
    pub static_dir: PathBuf,
    /// The container's root file system as mounted (for the changed files).
    pub merged_dir: PathBuf,
    /// podman's `network.status` as the restore reads it: per network, the address.
    pub network_status: serde_json::Value,
}

#[derive(Deserialize)]
struct RawFacts {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "StaticDir", default)]
    static_dir: String,
    #[serde(rename = "GraphDriver", default)]
    graph: Option<RawGraph>,
    #[serde(rename = "NetworkSettings", default)]
    net: Option<RawNet>,
}

#[derive(Deserialize)]
struct RawGraph {
    #[serde(rename = "Data", default)]
    data: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawNet {
    #[serde(rename = "Networks", default)]
    networks: Option<std::collections::BTreeMap<String, RawNetwork>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawNetwork {
    #[serde(rename = "IPAddress")]
    ip: String,
    #[serde(rename = "IPPrefixLen")]
    prefix: u32,
    #[serde(rename = "Gateway")]
    gateway: String,
    #[serde(rename = "GlobalIPv6Address")]
    ipv6: String,
    #[serde(rename = "GlobalIPv6PrefixLen")]
    prefix6: u32,
    #[serde(rename = "IPv6Gateway")]
    gateway6: String,
    #[serde(rename = "MacAddress")]
    mac: String,
}

/// Reads [`SourceFacts`] out of `podman container inspect` JSON of one container.
pub fn parse_facts(json: &str) -> Result<SourceFacts, String> {
    let raw: Vec<RawFacts> = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let r = raw.into_iter().next().ok_or("no container in it")?;
    if r.static_dir.is_empty() {
        return Err("it names no StaticDir".into());
    }
    let merged = r
        .graph
        .and_then(|g| g.data.get("MergedDir").cloned())
        .filter(|m| !m.is_empty())
        .ok_or("it names no GraphDriver.Data.MergedDir (is the container running?)")?;
    let mut nets = serde_json::Map::new();
    for (i, (network, n)) in r
        .net
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let mut subnets = Vec::new();
        for (ip, prefix, gw) in [
            (&n.ip, n.prefix, &n.gateway),
            (&n.ipv6, n.prefix6, &n.gateway6),
        ] {
            if ip.is_empty() {
                continue;
            }
            let mut s = serde_json::json!({ "ipnet": format!("{ip}/{prefix}") });
            if !gw.is_empty() {
                s["gateway"] = serde_json::Value::String(gw.clone());
            }
            subnets.push(s);
        }
        // podman's restore reads each interface's addresses and MAC; the name is a key.
        let iface = serde_json::json!({ "subnets": subnets, "mac_address": n.mac });
        nets.insert(
            network,
            serde_json::json!({ "interfaces": { format!("eth{i}"): iface } }),
        );
    }
    Ok(SourceFacts {
        name: r.name,
        static_dir: PathBuf::from(r.static_dir),
        merged_dir: PathBuf::from(merged),
        network_status: serde_json::Value::Object(nets),
    })
}

/// [`SourceFacts`] of a running container.
pub async fn source_facts(name: &str) -> Result<SourceFacts, LazyError> {
    let args: Vec<String> = ["container", "inspect", "--", name]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = exec::run("podman", &args, Duration::from_secs(60)).await?;
    parse_facts(&out.stdout).map_err(|why| LazyError::Inspect {
        name: name.to_string(),
        why,
    })
}

/// A lazy checkpoint whose page server is listening: every image but the memory is on
/// disk. `finish` waits for podman: it returns once every page was served.
#[derive(Debug)]
pub struct Dump {
    podman: exec::Running,
    pub port: u16,
}

/// Starts `podman container checkpoint --keep --export` of `facts.name` through
/// `wrapper` (a source wrapper of [`write_wrapper`]) and waits until CRIU's page server
/// listens.
pub async fn start_dump(
    facts: &SourceFacts,
    opts: CriuOptions,
    wrapper: &Path,
    port: u16,
) -> Result<Dump, LazyError> {
    let log = facts.static_dir.join("dump.log");
    // A log of an earlier checkpoint (kept by --keep) must not count as this one's.
    match std::fs::remove_file(&log) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(format!("removing the old {}", log.display()))(e)),
    }
    // podman writes config.dump and spec.dump only when it exports; the export itself
    // (written once every page is served) is not used.
    let export = wrapper.with_file_name("export.tar");
    let mut args = vec![
        "--runtime-flag".to_string(),
        format!("criu={}", wrapper.display()),
        "container".into(),
        "checkpoint".into(),
        "--keep".into(),
        "--compress".into(),
        "none".into(),
        "--export".into(),
        export.display().to_string(),
    ];
    opts.push_flags(&mut args);
    args.push("--".into());
    args.push(facts.name.clone());
    let mut podman = exec::spawn("podman", &args)?;
    let deadline = tokio::time::Instant::now() + DUMP_TIMEOUT;
    loop {
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains(PAGE_SERVER_STARTED)) {
            return Ok(Dump { podman, port });
        }
        if let Some(status) = podman.try_status() {
            let failed = match podman.finish(Duration::from_secs(5)).await {
                Err(e) => e.to_string(),
                Ok(_) => format!("podman exited ({status}) without an error"),
            };
            return Err(LazyError::DumpEnded {
                name: facts.name.clone(),
                failed,
                log: log_excerpt(&log),
            });
        }
        if tokio::time::Instant::now() > deadline {
            return Err(LazyError::DumpSlow {
                name: facts.name.clone(),
                after: DUMP_TIMEOUT,
                log: log_excerpt(&log),
            });
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// CRIU's error lines of a log, for a message.
fn log_excerpt(log: &Path) -> String {
    match std::fs::read_to_string(log) {
        Ok(t) => {
            let errors = crate::engine::podman::criu_error_lines(&t);
            if errors.is_empty() {
                String::new()
            } else {
                format!(" (CRIU's {}: {errors})", log.display())
            }
        }
        Err(_) => String::new(),
    }
}

impl Dump {
    /// The pid of podman's checkpoint command.
    pub fn pid(&self) -> Option<u32> {
        self.podman.pid()
    }

    /// Waits for podman: `Ok` once the page server served every page and podman cleaned
    /// up the container; an error when the transfer failed (the container then runs on
    /// here, behind CRIU's network lock: see [`remove_network_lock`]).
    pub async fn finish(self, timeout: Duration) -> Result<(), ExecError> {
        self.podman.finish(timeout).await.map(drop)
    }
}

/// Makes a page server that nobody has served yet fail instead of finishing: connects
/// to it and sends a request it cannot parse. (A page server whose peer closes cleanly
/// takes that for the end of the transfer and kills the tasks; one that reads garbage
/// fails its dump, and CRIU lets the tasks run on.) Connection refused: nothing listens.
pub async fn fail_page_server(port: u16) -> std::io::Result<()> {
    let mut s = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(()),
        Err(e) => return Err(e),
    };
    s.write_all(&[0xff; 64]).await?;
    s.flush().await?;
    // The page server reads the request, fails and closes; a reset here is fine.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut b = [0u8; 64];
        use tokio::io::AsyncReadExt;
        while let Ok(n) = s.read(&mut b).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(())
}

/// Deletes the network lock a failed lazy dump leaves in the container's network
/// namespace (tables `ip filter` / `ip6 filter` with CRIU's `CRIU` chain, which drop
/// every packet). Returns how many tables it removed; tables without that chain are not
/// touched.
pub async fn remove_network_lock(pid: i64) -> Result<usize, ExecError> {
    let mut removed = 0;
    for family in ["ip", "ip6"] {
        let ns = |rest: &[&str]| -> Vec<String> {
            ["-t", &pid.to_string(), "-n", "nft"]
                .iter()
                .chain(rest)
                .map(|s| s.to_string())
                .collect()
        };
        let listed = exec::run(
            "nsenter",
            &ns(&["list", "table", family, "filter"]),
            Duration::from_secs(10),
        )
        .await;
        let Ok(out) = listed else { continue };
        if !out.stdout.contains("chain CRIU") {
            continue;
        }
        exec::run(
            "nsenter",
            &ns(&["delete", "table", family, "filter"]),
            Duration::from_secs(10),
        )
        .await?;
        removed += 1;
    }
    Ok(removed)
}

/// The restore's archive, built while the page server waits: podman's `config.dump` and
/// `spec.dump`, CRIU's images (`checkpoint/`), `network.status` (the addresses podman
/// restores), the changed files of the root file system (`rootfs-diff.tar`,
/// `deleted.files`) and `/dev/shm` (`devshm-checkpoint.tar`), as podman's own export
/// lays them out.
pub async fn build_archive(facts: &SourceFacts) -> Result<Vec<u8>, LazyError> {
    let diff = rootfs_changes(&facts.name).await?;
    let facts = facts.clone();
    tokio::task::spawn_blocking(move || archive_blocking(&facts, &diff))
        .await
        .map_err(|e| io("building the archive")(std::io::Error::other(e)))?
}

/// What `podman diff` says changed in the container's root file system.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct RootfsDiff {
    #[serde(default)]
    pub changed: Option<Vec<String>>,
    #[serde(default)]
    pub added: Option<Vec<String>>,
    #[serde(default)]
    pub deleted: Option<Vec<String>>,
}

async fn rootfs_changes(name: &str) -> Result<RootfsDiff, LazyError> {
    // `podman diff` takes no container lock: it answers while the checkpoint runs.
    let args: Vec<String> = ["diff", "--format", "json", "--", name]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = exec::run("podman", &args, Duration::from_secs(60)).await?;
    if out.stdout.trim().is_empty() {
        return Ok(RootfsDiff::default());
    }
    serde_json::from_str(&out.stdout).map_err(|e| LazyError::Inspect {
        name: name.to_string(),
        why: format!("`podman diff` JSON: {e}"),
    })
}

fn archive_blocking(facts: &SourceFacts, diff: &RootfsDiff) -> Result<Vec<u8>, LazyError> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    let sd = &facts.static_dir;
    for f in ["config.dump", "spec.dump"] {
        b.append_path_with_name(sd.join(f), f)
            .map_err(io(format!("adding {}", sd.join(f).display())))?;
    }
    b.append_dir_all("checkpoint", sd.join("checkpoint"))
        .map_err(io(format!("adding {}/checkpoint", sd.display())))?;
    let status = serde_json::to_vec(&facts.network_status).expect("JSON value");
    append_bytes(&mut b, "network.status", &status)?;
    let (rootfs, deleted) = rootfs_parts(&facts.merged_dir, diff)?;
    if let Some(t) = rootfs {
        append_bytes(&mut b, "rootfs-diff.tar", &t)?;
    }
    if !deleted.is_empty() {
        let d = serde_json::to_vec(&deleted).expect("JSON array");
        append_bytes(&mut b, "deleted.files", &d)?;
    }
    let shm = sd.join("shm");
    if std::fs::read_dir(&shm).is_ok_and(|mut d| d.next().is_some()) {
        let mut inner = tar::Builder::new(Vec::new());
        inner.follow_symlinks(false);
        inner
            .append_dir_all(".", &shm)
            .map_err(io(format!("adding {}", shm.display())))?;
        let t = inner.into_inner().map_err(io("closing the /dev/shm tar"))?;
        append_bytes(&mut b, "devshm-checkpoint.tar", &t)?;
    }
    b.into_inner().map_err(io("closing the archive"))
}

/// The changed files as podman's export packs them: added paths and changed paths that
/// are not folders, read from the mounted root file system (never following a link out
/// of it); and the deleted paths.
fn rootfs_parts(
    merged: &Path,
    diff: &RootfsDiff,
) -> Result<(Option<Vec<u8>>, Vec<String>), LazyError> {
    let mut paths: Vec<&String> = diff.added.iter().flatten().collect();
    for p in diff.changed.iter().flatten() {
        let inside = merged.join(p.trim_start_matches('/'));
        if std::fs::symlink_metadata(&inside).is_ok_and(|m| !m.is_dir()) {
            paths.push(p);
        }
    }
    let deleted: Vec<String> = diff.deleted.clone().unwrap_or_default();
    if paths.is_empty() {
        return Ok((None, deleted));
    }
    let mut t = tar::Builder::new(Vec::new());
    t.follow_symlinks(false);
    for p in paths {
        let rel = p.trim_start_matches('/');
        if rel.is_empty() || rel.split('/').any(|c| c == "..") {
            continue;
        }
        let inside = merged.join(rel);
        let Ok(meta) = std::fs::symlink_metadata(&inside) else {
            continue; // gone since podman diff looked
        };
        if meta.is_dir() {
            t.append_dir(rel, &inside)
        } else {
            t.append_path_with_name(&inside, rel)
        }
        .map_err(io(format!("adding {}", inside.display())))?;
    }
    let t = t.into_inner().map_err(io("closing rootfs-diff.tar"))?;
    Ok((Some(t), deleted))
}

fn append_bytes(b: &mut tar::Builder<Vec<u8>>, name: &str, bytes: &[u8]) -> Result<(), LazyError> {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o600);
    h.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    h.set_cksum();
    b.append_data(&mut h, name, bytes)
        .map_err(io(format!("adding {name}")))
}

/// Unpacks the CRIU images (`checkpoint/…`) of an archive into `into`, for the daemon.
pub fn extract_images(archive: &Path, into: &Path) -> Result<(), LazyError> {
    let file =
        std::fs::File::open(archive).map_err(io(format!("opening {}", archive.display())))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(into)
        .map_err(io(format!("creating {}", into.display())))?;
    let mut a = tar::Archive::new(std::io::BufReader::new(file));
    let entries = a
        .entries()
        .map_err(io(format!("reading {}", archive.display())))?;
    for e in entries {
        let mut e = e.map_err(io(format!("reading {}", archive.display())))?;
        let path = e.path().map_err(io("an archive path"))?.into_owned();
        let Ok(rest) = path.strip_prefix("checkpoint") else {
            continue;
        };
        if rest.as_os_str().is_empty() {
            continue;
        }
        // unpack_in refuses paths that would leave `into`.
        e.unpack_in(into)
            .map_err(io(format!("unpacking {}", path.display())))?;
    }
    // unpack_in kept the leading "checkpoint/": the daemon reads the images from there.
    Ok(())
}

/// CRIU's lazy-pages daemon on the target.
#[derive(Debug)]
pub struct Daemon {
    child: exec::Running,
    pub work_dir: PathBuf,
}

/// Starts `criu lazy-pages` over the images in `images`, working in `work_dir` (the
/// restore's `work-dir`), fetching pages from loopback `port`; returns once its socket
/// is there.
pub async fn start_daemon(images: &Path, work_dir: &Path, port: u16) -> Result<Daemon, LazyError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(work_dir)
        .map_err(io(format!("creating {}", work_dir.display())))?;
    let args: Vec<String> = vec![
        "lazy-pages".into(),
        "--page-server".into(),
        "--address".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "--images-dir".into(),
        images.display().to_string(),
        "--work-dir".into(),
        work_dir.display().to_string(),
        "-o".into(),
        "lazy-pages.log".into(),
    ];
    let mut child = exec::spawn("criu", &args)?;
    let socket = work_dir.join("lazy-pages.socket");
    let deadline = tokio::time::Instant::now() + DAEMON_START;
    loop {
        if socket.exists() {
            return Ok(Daemon {
                child,
                work_dir: work_dir.to_path_buf(),
            });
        }
        if child.try_status().is_some() || tokio::time::Instant::now() > deadline {
            let why = match child.finish(Duration::from_secs(1)).await {
                Err(e) => e.to_string(),
                Ok(_) => "it exited before opening its socket".into(),
            };
            let log = work_dir.join("lazy-pages.log");
            let errors = std::fs::read_to_string(&log)
                .map(|t| crate::engine::podman::criu_error_lines(&t))
                .unwrap_or_default();
            return Err(LazyError::Daemon(
                format!("{why} {errors}").trim().to_string(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

impl Daemon {
    /// The daemon's process ID.
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// Waits until the daemon ends: `Ok` when it served every restored task to the end.
    pub async fn finish(self, timeout: Duration) -> Result<(), LazyError> {
        let log = self.work_dir.join("lazy-pages.log");
        match self.child.finish(timeout).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let errors = std::fs::read_to_string(&log)
                    .map(|t| crate::engine::podman::criu_error_lines(&t))
                    .unwrap_or_default();
                Err(LazyError::Daemon(
                    format!("{e} {errors}").trim().to_string(),
                ))
            }
        }
    }
}

/// Counts the pages the daemon asked for, from the bytes it sent to the page server
/// (`struct page_server_iov`: `u32 cmd`, padding, `u64 nr_pages`, `u64 vaddr`, `u64
/// dst_id`, 32 bytes in the host's byte order): a fault asks for one page, the background
/// transfer for longer runs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PageRequests {
    partial: Vec<u8>,
    /// Requests of exactly one page: a task faulted on it.
    pub demand_pages: u64,
    /// Pages of longer requests: pushed in the background.
    pub pushed_pages: u64,
    /// The stream held something that is not a page request; counting stopped.
    pub unreadable: bool,
    /// The daemon said goodbye (PS_IOV_CLOSE): every page it wanted was served.
    pub closed: bool,
}

impl PageRequests {
    pub fn feed(&mut self, mut bytes: &[u8]) {
        if self.unreadable {
            return;
        }
        while !bytes.is_empty() {
            let take = (PS_IOV_BYTES - self.partial.len()).min(bytes.len());
            self.partial.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.partial.len() < PS_IOV_BYTES {
                return;
            }
            let cmd = u32::from_ne_bytes(self.partial[0..4].try_into().expect("4 bytes"));
            let nr = u64::from_ne_bytes(self.partial[8..16].try_into().expect("8 bytes"));
            self.partial.clear();
            match cmd & 0xffff {
                PS_IOV_GET if nr == 1 => self.demand_pages += 1,
                PS_IOV_GET => self.pushed_pages += nr,
                // The daemon's goodbye: PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE.
                0x1023 | 0x1024 => self.closed = true,
                c if c >= 0x1000 => {}
                _ => {
                    self.unreadable = true;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_status_is_built_from_inspect() {
        let json = r#"[{"Name":"hog","StaticDir":"/var/lib/containers/storage/overlay-containers/abc/userdata",
          "GraphDriver":{"Name":"overlay","Data":{"MergedDir":"/var/lib/containers/storage/overlay/x/merged"}},
          "NetworkSettings":{"Networks":{"podman":{"IPAddress":"10.88.0.7","IPPrefixLen":16,"Gateway":"10.88.0.1",
          "GlobalIPv6Address":"","GlobalIPv6PrefixLen":0,"IPv6Gateway":"","MacAddress":"aa:bb:cc:dd:ee:ff"}}}}]"#;
        let f = parse_facts(json).unwrap();
        assert_eq!(f.name, "hog");
        assert_eq!(
            f.merged_dir,
            PathBuf::from("/var/lib/containers/storage/overlay/x/merged")
        );
        assert_eq!(
            f.network_status,
            serde_json::json!({"podman": {"interfaces": {"eth0": {
                "subnets": [{"ipnet": "10.88.0.7/16", "gateway": "10.88.0.1"}],
                "mac_address": "aa:bb:cc:dd:ee:ff"}}}})
        );
        assert!(parse_facts(r#"[{"Name":"x","StaticDir":"/s"}]"#).is_err());
    }

    #[test]
    fn wrapper_binds_its_own_folder_over_etc_criu() {
        let dir = tempfile::tempdir().unwrap();
        let w = write_wrapper(dir.path(), &source_conf(4242, CriuOptions::default())).unwrap();
        let script = std::fs::read_to_string(&w).unwrap();
        assert!(
            script.contains("unshare -m --propagation private"),
            "{script}"
        );
        assert!(script.contains("mount --bind"), "{script}");
        let conf = std::fs::read_to_string(dir.path().join("etc-criu/runc.conf")).unwrap();
        assert_eq!(conf, "lazy-pages\naddress 127.0.0.1\nport 4242\n");
        let opts = CriuOptions {
            tcp_close: true,
            skip_in_flight: true,
            ..Default::default()
        };
        assert_eq!(
            source_conf(1, opts)[3..],
            ["tcp-close".to_string(), "skip-in-flight".to_string()]
        );
        assert_eq!(
            target_conf(Path::new("/r/wd"), opts),
            ["lazy-pages", "work-dir /r/wd", "tcp-close"]
        );
    }

    fn request(cmd: u32, nr: u64) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&cmd.to_ne_bytes());
        v.extend_from_slice(&[0u8; 4]);
        v.extend_from_slice(&nr.to_ne_bytes());
        v.extend_from_slice(&[0u8; 16]);
        assert_eq!(v.len(), PS_IOV_BYTES);
        v
    }

    #[test]
    fn page_requests_split_faults_from_pushes_across_chunks() {
        let mut stream = Vec::new();
        stream.extend(request(PS_IOV_GET | (1 << 16), 1));
        stream.extend(request(PS_IOV_GET | (1 << 16), 16));
        stream.extend(request(PS_IOV_GET | (1 << 16), 1));
        stream.extend(request(0x1023, 0));
        let mut p = PageRequests::default();
        for chunk in stream.chunks(7) {
            p.feed(chunk);
        }
        assert_eq!(
            (p.demand_pages, p.pushed_pages, p.unreadable),
            (2, 16, false)
        );
        assert!(p.closed, "the goodbye was seen");
        p.feed(&request(3, 0));
        assert!(p.unreadable);
    }

    #[test]
    fn the_archive_holds_what_podman_restore_reads() {
        let root = tempfile::tempdir().unwrap();
        let sd = root.path().join("userdata");
        std::fs::create_dir_all(sd.join("checkpoint")).unwrap();
        std::fs::create_dir_all(sd.join("shm")).unwrap();
        std::fs::write(sd.join("config.dump"), "{}").unwrap();
        std::fs::write(sd.join("spec.dump"), "{}").unwrap();
        std::fs::write(sd.join("checkpoint/core-1.img"), "core").unwrap();
        let merged = root.path().join("merged");
        std::fs::create_dir_all(merged.join("etc")).unwrap();
        std::fs::write(merged.join("etc/new"), "n").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", merged.join("etc/link")).unwrap();
        let facts = SourceFacts {
            name: "x".into(),
            static_dir: sd.clone(),
            merged_dir: merged,
            network_status: serde_json::json!({}),
        };
        let diff = RootfsDiff {
            changed: Some(vec!["/etc".into()]),
            added: Some(vec!["/etc/new".into(), "/etc/link".into(), "/../x".into()]),
            deleted: Some(vec!["/etc/old".into()]),
        };
        let bytes = archive_blocking(&facts, &diff).unwrap();
        let file = root.path().join("a.tar");
        std::fs::write(&file, &bytes).unwrap();
        let mut names: Vec<String> = tar::Archive::new(&bytes[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "checkpoint/",
                "checkpoint/core-1.img",
                "config.dump",
                "deleted.files",
                "network.status",
                "rootfs-diff.tar",
                "spec.dump"
            ]
        );
        let out = root.path().join("images");
        extract_images(&file, &out).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("checkpoint/core-1.img")).unwrap(),
            "core"
        );
        assert!(!out.join("config.dump").exists());
    }
}
