//! The cgroup freezer of a running container.
//!
//! CRIU freezes a container itself before it dumps it, but it polls the freezer in
//! steps of 100 ms: when the cgroup is not frozen at its first look (it often is not),
//! a tenth of a second of downtime is spent asleep. `send` freezes the container first,
//! the moment podman starts the runtime's checkpoint, waiting for the kernel in steps of
//! a fraction of a millisecond; CRIU then finds the cgroup frozen and goes straight to
//! work. A container that is still there after a
//! failed checkpoint is thawed again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a container's freezer cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FreezerError {
    #[error("reading {path}: {io}")]
    Read { path: PathBuf, io: std::io::Error },
    #[error("writing {path}: {io}")]
    Write { path: PathBuf, io: std::io::Error },
    #[error("process {0} is in no freezer cgroup that is mounted here")]
    NotFound(i64),
    #[error("the cgroup {0} did not freeze within {1:?}")]
    Timeout(PathBuf, Duration),
}

/// Which freezer interface the container's cgroup has (kept in the run journal, so a
/// watchdog can thaw it after the sender died).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Freezer {
    /// cgroup v1: `freezer.state` takes FROZEN / THAWED and reads FREEZING on the way.
    V1 { dir: PathBuf },
    /// cgroup v2: `cgroup.freeze` takes 1 / 0; `cgroup.events` says `frozen 1` when done.
    V2 { dir: PathBuf },
}

/// How long to wait for the kernel to freeze a cgroup before thawing it and leaving the
/// freeze to CRIU. A freeze takes 0.1-2 ms here; a v1 freezer can also stay FREEZING (seen
/// once in 20 benchmark runs, on the web container whose httpd forks a CGI per request):
/// CRIU gets past that by freezing again once it was thawed, so waiting longer only adds
/// downtime (it cost 2 s when this was 2 s).
const FREEZE_TIMEOUT: Duration = Duration::from_millis(100);
/// Pause between two looks at the freezer state.
const POLL: Duration = Duration::from_micros(200);

impl Freezer {
    /// The freezer of the cgroup process `pid` is in, as runc and CRIU will use it: the
    /// v1 freezer controller when one is mounted (hybrid hosts), else the v2 hierarchy.
    pub fn of_pid(pid: i64) -> Result<Freezer, FreezerError> {
        let cgroup = read(Path::new(&format!("/proc/{pid}/cgroup")))?;
        let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
        let f = locate(&cgroup, &mountinfo).ok_or(FreezerError::NotFound(pid))?;
        // The file must be there: a cgroup that was given up is no freezer.
        read(&f.state_file())?;
        Ok(f)
    }

    fn state_file(&self) -> PathBuf {
        match self {
            Freezer::V1 { dir } => dir.join("freezer.state"),
            Freezer::V2 { dir } => dir.join("cgroup.freeze"),
        }
    }

    /// Asks the kernel to freeze the cgroup and waits until every task in it is frozen;
    /// returns how long that took. On a timeout the cgroup is thawed again.
    fn freeze_blocking(&self, timeout: Duration) -> Result<Duration, FreezerError> {
        let start = Instant::now();
        let (value, check) = match self {
            Freezer::V1 { dir } => ("FROZEN", dir.join("freezer.state")),
            Freezer::V2 { dir } => ("1", dir.join("cgroup.events")),
        };
        write(&self.state_file(), value)?;
        loop {
            let text = read(&check)?;
            let done = match self {
                Freezer::V1 { .. } => text.trim() == "FROZEN",
                Freezer::V2 { .. } => text.lines().any(|l| l.trim() == "frozen 1"),
            };
            if done {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= timeout {
                let _ = self.thaw();
                return Err(FreezerError::Timeout(self.state_file(), timeout));
            }
            std::thread::sleep(POLL);
        }
    }

    /// True when the cgroup is asked to be frozen (or frozen): `FROZEN`/`FREEZING` in v1,
    /// `1` in v2. A cgroup that is gone is not frozen.
    pub fn is_frozen(&self) -> bool {
        match read(&self.state_file()) {
            Ok(t) => matches!(t.trim(), "FROZEN" | "FREEZING" | "1"),
            Err(_) => false,
        }
    }

    /// Lets the cgroup run again.
    pub fn thaw(&self) -> Result<(), FreezerError> {
        let value = match self {
            Freezer::V1 { .. } => "THAWED",
            Freezer::V2 { .. } => "0",
        };
        write(&self.state_file(), value)
    }
}

/// What watching podman start the OCI runtime's checkpoint gave.
#[derive(Debug)]
pub struct RuntimeStart {
    /// The last look at which the runtime's checkpoint had not started, µs since the
    /// epoch: the container surely still ran then (CRIU cannot freeze it before the
    /// runtime runs).
    pub before_us: i64,
    /// How long the kernel took to freeze the container, or why it did not (CRIU then
    /// froze it itself).
    pub froze: Result<Duration, FreezerError>,
}

/// Pause between two looks at podman's children.
const WATCH: Duration = Duration::from_micros(500);

impl Freezer {
    /// Watches podman (`podman_pid`) until it starts the runtime's `checkpoint` (runc or
    /// crun, not its `--help`), then freezes the container at once: podman's own start-up
    /// (~0.1 s here) runs while the service still answers, and CRIU, tens of
    /// milliseconds later, finds the cgroup frozen. Gives up (`None`) when `stop` is set or
    /// after `limit`, leaving the freeze to CRIU.
    pub fn freeze_at_runtime_start(
        &self,
        podman_pid: u32,
        stop: &std::sync::atomic::AtomicBool,
        limit: Duration,
    ) -> Option<RuntimeStart> {
        let started = Instant::now();
        let own = std::fs::read(format!("/proc/{podman_pid}/cmdline")).ok()?;
        let mut seen = std::collections::HashSet::new();
        loop {
            let before_us = crate::timing::now_us();
            if stop.load(std::sync::atomic::Ordering::Relaxed) || started.elapsed() > limit {
                return None;
            }
            for child in children(podman_pid) {
                if seen.contains(&child) {
                    continue;
                }
                let Ok(cmd) = std::fs::read(format!("/proc/{child}/cmdline")) else {
                    continue;
                };
                // Forked but not yet exec'd: it still shows podman's command line. In the
                // middle of execve the kernel shows an empty one (the new memory has no
                // arguments yet): look again next time, do not mark it as seen.
                if cmd.is_empty() || cmd == own {
                    continue;
                }
                seen.insert(child);
                if is_runtime_checkpoint(&cmd) {
                    let froze = self.freeze_blocking(FREEZE_TIMEOUT);
                    return Some(RuntimeStart { before_us, froze });
                }
            }
            std::thread::sleep(WATCH);
        }
    }
}

/// The children of every thread of process `pid` (Go starts programs from any thread).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|w| w.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// `runc … checkpoint …` as opposed to `runc checkpoint --help`, `runc delete`, `criu swrk`.
fn is_runtime_checkpoint(cmdline: &[u8]) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.iter().skip(1).any(|a| *a == b"checkpoint") && !args.iter().any(|a| *a == b"--help")
}

/// A cgroup this process froze: thawed when dropped unless [`FrozenCgroup::keep`] said the
/// container's processes are gone (CRIU dumped and killed them).
#[derive(Debug)]
pub struct FrozenCgroup {
    freezer: Option<Freezer>,
}

impl FrozenCgroup {
    pub fn new(freezer: Freezer) -> FrozenCgroup {
        FrozenCgroup {
            freezer: Some(freezer),
        }
    }

    /// The processes are gone; there is nothing to thaw.
    pub fn keep(mut self) {
        self.freezer = None;
    }
}

impl Drop for FrozenCgroup {
    fn drop(&mut self) {
        if let Some(f) = self.freezer.take() {
            // A cgroup podman already removed is nothing to thaw.
            let _ = f.thaw();
        }
    }
}

fn read(path: &Path) -> Result<String, FreezerError> {
    std::fs::read_to_string(path).map_err(|source| FreezerError::Read {
        path: path.to_path_buf(),
        io: source,
    })
}

fn write(path: &Path, value: &str) -> Result<(), FreezerError> {
    std::fs::write(path, value).map_err(|source| FreezerError::Write {
        path: path.to_path_buf(),
        io: source,
    })
}

/// Finds the freezer directory from the text of `/proc/PID/cgroup` and
/// `/proc/self/mountinfo`.
fn locate(cgroup: &str, mountinfo: &str) -> Option<Freezer> {
    let mut v1 = None;
    let mut v2 = None;
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path);
        } else if controllers.split(',').any(|c| c == "freezer") {
            v1 = Some(path);
        }
    }
    let mounts: Vec<MountLine> = mountinfo.lines().filter_map(MountLine::parse).collect();
    if let Some(path) = v1 {
        let m = mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.super_opts.split(',').any(|o| o == "freezer"))?;
        return Some(Freezer::V1 { dir: m.join(path)? });
    }
    let path = v2?;
    let m = mounts.iter().find(|m| m.fstype == "cgroup2")?;
    Some(Freezer::V2 { dir: m.join(path)? })
}

/// The fields of one `/proc/self/mountinfo` line that matter here.
struct MountLine<'a> {
    root: &'a str,
    mount_point: &'a str,
    fstype: &'a str,
    super_opts: &'a str,
}

impl<'a> MountLine<'a> {
    /// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
    fn parse(line: &'a str) -> Option<MountLine<'a>> {
        let (left, right) = line.split_once(" - ")?;
        let mut l = left.split(' ');
        let root = l.nth(3)?;
        let mount_point = l.next()?;
        let mut r = right.split(' ');
        let fstype = r.next()?;
        let _source = r.next()?;
        let super_opts = r.next().unwrap_or("");
        Some(MountLine {
            root,
            mount_point,
            fstype,
            super_opts,
        })
    }

    /// Where cgroup `path` (as `/proc/PID/cgroup` names it) lies under this mount.
    fn join(&self, path: &str) -> Option<PathBuf> {
        let rel = if self.root == "/" {
            path
        } else {
            let rest = path.strip_prefix(self.root)?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            rest
        };
        let rel = rel.trim_start_matches('/');
        if rel.split('/').any(|c| c == "..") {
            return None;
        }
        let base = Path::new(unescape(self.mount_point).as_ref()).to_path_buf();
        Some(if rel.is_empty() { base } else { base.join(rel) })
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains('\\') {
        return s.into();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &tempfile::TempDir, name: &str) -> String {
        std::fs::read_to_string(dir.path().join(name)).unwrap()
    }

    const HYBRID_CGROUP: &str = "12:freezer:/libpod_parent/libpod-abc\n\
        11:memory:/libpod_parent/libpod-abc\n\
        1:name=systemd:/libpod_parent/libpod-abc\n\
        0::/libpod_parent/libpod-abc\n";
    const HYBRID_MOUNTS: &str = "\
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
31 30 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
36 30 0:32 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer\n\
40 30 0:36 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";

    #[test]
    fn hybrid_hosts_use_the_v1_freezer_like_runc() {
        assert_eq!(
            locate(HYBRID_CGROUP, HYBRID_MOUNTS),
            Some(Freezer::V1 {
                dir: "/sys/fs/cgroup/freezer/libpod_parent/libpod-abc".into()
            })
        );
    }

    #[test]
    fn unified_hosts_use_cgroup_freeze() {
        let mounts =
            "29 24 0:25 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        let f = locate("0::/machine.slice/libpod-abc.scope/container\n", mounts).unwrap();
        assert_eq!(
            f,
            Freezer::V2 {
                dir: "/sys/fs/cgroup/machine.slice/libpod-abc.scope/container".into()
            }
        );
        assert_eq!(
            f.state_file(),
            Path::new("/sys/fs/cgroup/machine.slice/libpod-abc.scope/container/cgroup.freeze")
        );
    }

    #[test]
    fn a_mount_of_a_sub_tree_is_joined_below_its_root() {
        let mounts = "29 24 0:25 /user.slice /cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            locate("0::/user.slice/u/c\n", mounts),
            Some(Freezer::V2 {
                dir: "/cg/u/c".into()
            })
        );
        // Outside the mounted sub-tree: not reachable from here.
        assert_eq!(locate("0::/system.slice/c\n", mounts), None);
        assert_eq!(locate("0::/user.slicex/c\n", mounts), None);
    }

    #[test]
    fn no_freezer_mounted_means_none() {
        assert_eq!(
            locate(HYBRID_CGROUP, "1 0 0:1 / / rw - ext4 /dev/sda rw\n"),
            None
        );
        assert_eq!(locate("", HYBRID_MOUNTS), None);
        assert_eq!(
            locate(
                "0::/../../etc\n",
                "1 0 0:1 / /sys/fs/cgroup rw - cgroup2 c rw\n"
            ),
            None
        );
    }

    #[test]
    fn only_the_runtime_s_real_checkpoint_counts() {
        let c = |args: &[&str]| args.join("\0").into_bytes();
        assert!(is_runtime_checkpoint(&c(&[
            "/usr/bin/runc",
            "checkpoint",
            "--image-path",
            "/x",
            "abc"
        ])));
        assert!(is_runtime_checkpoint(&c(&[
            "crun",
            "--root",
            "/r",
            "checkpoint",
            "abc"
        ])));
        assert!(!is_runtime_checkpoint(&c(&[
            "/usr/bin/runc",
            "checkpoint",
            "--help"
        ])));
        assert!(!is_runtime_checkpoint(&c(&[
            "/usr/bin/runc",
            "delete",
            "--force",
            "abc"
        ])));
        assert!(!is_runtime_checkpoint(&c(&["/usr/sbin/criu", "swrk", "3"])));
        assert!(!is_runtime_checkpoint(&c(&["checkpoint"])));
    }

    #[test]
    fn watching_freezes_when_the_child_starts_and_gives_up_when_told() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("freezer.state"), "THAWED\n").unwrap();
        let f = Freezer::V1 {
            dir: d.path().to_path_buf(),
        };
        // This test process stands for podman; its child runs `sh -c … checkpoint`.
        let stop = std::sync::atomic::AtomicBool::new(false);
        let me = std::process::id();
        // `read` is a builtin: no grandchild outlives the kill below.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read x", "sh", "checkpoint"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t0 = crate::timing::now_us();
        let r = f
            .freeze_at_runtime_start(me, &stop, Duration::from_secs(5))
            .expect("saw the child");
        assert!(r.before_us >= t0);
        r.froze.unwrap();
        assert_eq!(file(&d, "freezer.state"), "FROZEN");
        child.kill().unwrap();
        child.wait().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(
            f.freeze_at_runtime_start(me, &stop, Duration::from_secs(5))
                .is_none()
        );
    }

    #[test]
    fn escaped_mount_points() {
        let mounts = "36 30 0:32 / /sys/fs/my\\040cgroups rw - cgroup cgroup rw,freezer\n";
        assert_eq!(
            locate("3:freezer:/x\n", mounts),
            Some(Freezer::V1 {
                dir: "/sys/fs/my cgroups/x".into()
            })
        );
    }

    #[test]
    fn freeze_and_thaw_write_the_state_file_and_wait_for_the_kernel() {
        let d = tempfile::tempdir().unwrap();
        let f = Freezer::V1 {
            dir: d.path().to_path_buf(),
        };
        // A "kernel" that has frozen at once.
        std::fs::write(d.path().join("freezer.state"), "THAWED\n").unwrap();
        let took = f.freeze_blocking(Duration::from_millis(100)).unwrap();
        assert!(took < Duration::from_millis(100));
        assert_eq!(file(&d, "freezer.state"), "FROZEN");
        drop(FrozenCgroup::new(f.clone()));
        assert_eq!(file(&d, "freezer.state"), "THAWED");
        // Kept: the processes are gone, nothing is written.
        std::fs::write(d.path().join("freezer.state"), "FROZEN").unwrap();
        FrozenCgroup::new(f).keep();
        assert_eq!(file(&d, "freezer.state"), "FROZEN");
    }

    #[test]
    fn a_cgroup_that_never_freezes_times_out_and_is_thawed() {
        let d = tempfile::tempdir().unwrap();
        let f = Freezer::V2 {
            dir: d.path().to_path_buf(),
        };
        std::fs::write(d.path().join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let e = f.freeze_blocking(Duration::from_millis(20)).unwrap_err();
        assert!(matches!(e, FreezerError::Timeout(..)), "{e}");
        assert_eq!(file(&d, "cgroup.freeze"), "0");
        std::fs::write(d.path().join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        f.freeze_blocking(Duration::from_millis(20)).unwrap();
        assert_eq!(file(&d, "cgroup.freeze"), "1");
    }
}
