//! The run journal on the source: one file per `send` in progress,
//! `<workdir>/source-runs/<run_id>.json`, saying how far the migration got, which
//! containers it moves, how they are frozen and where the target is. A sender that ends
//! normally removes it; one that dies leaves it for its watchdog and `migrate recover`.
//!
//! Each change replaces the whole file (a new file created with `O_EXCL|O_NOFOLLOW`, mode
//! 0600, then renamed over the old one): a reader sees the old state or the new one,
//! never half of either. The folder is root's own (0700) and must not be a symlink.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::freezer::Freezer;
use crate::engine::podman::CriuOptions;
use crate::transport::ssh::Destination;

/// The folder of the journals under the work folder.
pub fn dir(workdir: &Path) -> PathBuf {
    workdir.join("source-runs")
}

/// How far a migration got: what a sender that dies at this point leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Checks passed, nothing frozen: the containers run untouched.
    Prepared,
    /// From just before the freeze until "OK" is sent: the containers may be frozen,
    /// being dumped, or dumped and stopped with their checkpoint kept. The target never
    /// restores without "OK", so bringing them back here is always right.
    Checkpointing,
    /// "OK" is (about to be) sent: the target decides; only its state tells whether the
    /// containers must come back here.
    OkSent,
    /// The target confirmed it runs every container: they are being removed here.
    Committing,
    /// The target does not run them (it said so, or SSH showed it): they are being
    /// restored here.
    RollingBack,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Prepared => "prepared",
            Phase::Checkpointing => "checkpointing",
            Phase::OkSent => "ok_sent",
            Phase::Committing => "committing",
            Phase::RollingBack => "rolling_back",
        }
    }
}

/// Where the target is reached over SSH (a [`Destination`] as stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRef {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    pub identity: Option<PathBuf>,
}

impl From<&Destination> for TargetRef {
    fn from(d: &Destination) -> Self {
        TargetRef {
            user: d.user.clone(),
            host: d.host.clone(),
            port: d.port,
            identity: d.identity.clone(),
        }
    }
}

impl From<&TargetRef> for Destination {
    fn from(t: &TargetRef) -> Self {
        Destination {
            user: t.user.clone(),
            host: t.host.clone(),
            port: t.port,
            identity: t.identity.clone(),
        }
    }
}

/// One container of the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    /// The cgroup freezer `send` freezes it through (none: CRIU freezes it).
    pub freezer: Option<Freezer>,
    /// The FIFO podman exports its archive into.
    pub fifo: PathBuf,
    pub file_locks: bool,
    pub tcp_established: bool,
    /// The dump was made with CRIU's tcp-close: its restore needs it too.
    #[serde(default)]
    pub tcp_close: bool,
}

impl Entry {
    pub fn opts(&self) -> CriuOptions {
        CriuOptions {
            file_locks: self.file_locks,
            tcp_established: self.tcp_established,
            tcp_close: self.tcp_close,
            skip_in_flight: false,
        }
    }
}

/// What the watchdog found and did once the sender was gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchdogNote {
    pub at_us: i64,
    pub result: String,
    pub runs_on: String,
    pub found: Vec<String>,
    pub actions: Vec<String>,
    pub detail: String,
}

/// The state of one migration as its sender last wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub run_id: String,
    pub phase: Phase,
    /// The sender's process id, and its start time (clock ticks since boot, from
    /// `/proc/PID/stat`), so a recycled pid is not taken for it.
    pub sender_pid: u32,
    pub sender_start: u64,
    pub watchdog_pid: Option<u32>,
    pub watchdog_start: Option<u64>,
    pub started_us: i64,
    pub source: String,
    pub target: TargetRef,
    /// The run folder on the target.
    pub remote_dir: String,
    /// The run folder here (FIFOs).
    pub local_dir: PathBuf,
    pub containers: Vec<Entry>,
    /// The pod the containers move as: removed here with its infra once the target runs
    /// them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Set by the watchdog after the sender died.
    #[serde(default)]
    pub watchdog: Option<WatchdogNote>,
}

/// Why a journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {io}")]
    Io { path: PathBuf, io: std::io::Error },
    #[error(
        "{0} is not a folder owned by this user with mode 0700 (a symlink, or others can write to it)"
    )]
    UnsafeDir(PathBuf),
    #[error("{path}: not a run journal: {detail}")]
    Parse { path: PathBuf, detail: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        io: source,
    }
}

impl Journal {
    /// The journal's file under `workdir`.
    pub fn path_in(workdir: &Path, run_id: &str) -> PathBuf {
        dir(workdir).join(format!("{run_id}.json"))
    }

    /// The log of the watchdog that guards the journal at `path`, next to it.
    pub fn watchdog_log(path: &Path) -> PathBuf {
        path.with_extension("watchdog.log")
    }

    /// Removes the journal at `path` and its watchdog's log: the run needs nobody any more.
    pub fn remove(path: &Path) {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(Journal::watchdog_log(path));
    }

    /// Replaces the journal file atomically.
    pub fn save(&self, path: &Path) -> Result<(), JournalError> {
        let parent = path.parent().unwrap_or(Path::new("."));
        ensure_dir(parent)?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("journal");
        let text = serde_json::to_vec_pretty(self).expect("a journal serializes");
        crate::rundir::write_private(parent, name, &text).map_err(io(path))
    }

    /// Reads a journal file (never through a symlink).
    pub fn load(path: &Path) -> Result<Journal, JournalError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io(path))?;
        serde_json::from_reader(std::io::BufReader::new(f)).map_err(|e| JournalError::Parse {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
    }

    /// Every journal under `workdir`, oldest run first (run ids sort by time). A missing
    /// folder means none.
    pub fn list(workdir: &Path) -> Result<Vec<PathBuf>, JournalError> {
        let d = dir(workdir);
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&d)(e)),
        };
        check_dir(&d)?;
        let mut out: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && !p
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.'))
            })
            .collect();
        out.sort();
        Ok(out)
    }
}

/// Creates the journal folder (0700) or checks the one there.
fn ensure_dir(d: &Path) -> Result<(), JournalError> {
    match std::fs::DirBuilder::new().mode(0o700).create(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => check_dir(d),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(io(d))?;
            check_dir(d)
        }
        Err(e) => Err(io(d)(e)),
    }
}

fn check_dir(d: &Path) -> Result<(), JournalError> {
    use crate::rundir::RunDirError;
    match crate::rundir::check_private_dir(d) {
        Ok(()) => Ok(()),
        Err(RunDirError::Io { error, .. }) => Err(io(d)(error)),
        Err(_) => Err(JournalError::UnsafeDir(d.to_path_buf())),
    }
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`), if it exists.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True while the process `pid` that started at `start` runs (a zombie counts as gone).
pub fn alive(pid: u32, start: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    let mut f = rest.split_whitespace();
    let state = f.next();
    state != Some("Z") && state != Some("X") && start_time(pid) == Some(start)
}

/// Helpers for other modules' unit tests.
#[cfg(test)]
pub mod tests_support {
    /// Makes a FIFO with `mkfifo` (the crate has no unsafe code).
    pub fn mkfifo(path: &std::path::Path) {
        let st = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Journal {
        Journal {
            run_id: "20260101T000000Z-abcd".into(),
            phase: Phase::Checkpointing,
            sender_pid: 42,
            sender_start: 7,
            watchdog_pid: None,
            watchdog_start: None,
            started_us: 1,
            source: "a".into(),
            target: TargetRef {
                user: Some("root".into()),
                host: "b".into(),
                port: Some(2222),
                identity: None,
            },
            remote_dir: "/var/lib/migrate/runs/x".into(),
            local_dir: "/var/lib/migrate/runs/x".into(),
            containers: vec![Entry {
                name: "db".into(),
                freezer: Some(Freezer::V2 {
                    dir: "/sys/fs/cgroup/x".into(),
                }),
                fifo: "/var/lib/migrate/runs/x/db.fifo".into(),
                tcp_close: true,
                file_locks: true,
                tcp_established: false,
            }],
            pod: None,
            watchdog: None,
        }
    }

    #[test]
    fn saves_atomically_private_and_reads_back() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let mut j = sample();
        let path = Journal::path_in(d.path(), &j.run_id);
        j.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = std::fs::metadata(dir(d.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dmode & 0o777, 0o700);
        j.phase = Phase::OkSent;
        j.save(&path).unwrap();
        assert_eq!(Journal::load(&path).unwrap(), j);
        // No temporary file is left, and listing finds exactly the journal.
        assert_eq!(Journal::list(d.path()).unwrap(), vec![path]);
        assert_eq!(std::fs::read_dir(dir(d.path())).unwrap().count(), 1);
    }

    #[test]
    fn refuses_symlinks_and_open_folders() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let j = sample();
        // The journal folder is a symlink to somewhere else: refused.
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir(d.path())).unwrap();
        let path = Journal::path_in(d.path(), &j.run_id);
        assert!(matches!(j.save(&path), Err(JournalError::UnsafeDir(_))));
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
        // A journal file that is a symlink is not read through.
        let d2 = tempfile::tempdir().unwrap();
        let path2 = Journal::path_in(d2.path(), &j.run_id);
        j.save(&path2).unwrap();
        let target = d2.path().join("other.json");
        std::fs::rename(&path2, &target).unwrap();
        std::os::unix::fs::symlink(&target, &path2).unwrap();
        assert!(Journal::load(&path2).is_err());
        // A folder others can write to is refused.
        std::fs::set_permissions(dir(d2.path()), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            Journal::list(d2.path()),
            Err(JournalError::UnsafeDir(_))
        ));
    }

    #[test]
    fn phases_order_as_the_migration_goes() {
        assert!(Phase::Prepared < Phase::Checkpointing);
        assert!(Phase::Checkpointing < Phase::OkSent);
        assert_eq!(
            serde_json::to_string(&Phase::OkSent).unwrap(),
            "\"ok_sent\""
        );
    }

    #[test]
    fn this_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id();
        let start = start_time(me).unwrap();
        assert!(alive(me, start));
        assert!(!alive(me, start + 1));
        assert!(!alive(u32::MAX - 1, start));
    }
}
