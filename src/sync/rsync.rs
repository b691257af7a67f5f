//! Pre- and post-freeze sync of data folders with rsync over the migration's SSH master
//! connection. The folder lands at the same path on the target (bind-mount paths are part
//! of the checkpoint).

use std::path::Path;
use std::time::Duration;

use crate::exec::{self, ExecError};
use crate::transport::ssh::Ssh;

/// A sync may run long on a big first copy; it still has an end.
const SYNC_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// What one rsync run moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Bytes rsync wrote to the connection.
    pub bytes_sent: u64,
    /// Files whose content was sent.
    pub files_transferred: u64,
    /// Size of the files whose content differs (what a real run would send at most).
    pub transferred_file_size: u64,
}

/// The rsync argument vector for mirroring `dir` to the same path on the target.
pub fn rsync_args(dir: &Path, rsh: &str, target: &str, compress: bool) -> Vec<String> {
    let d = dir.display().to_string();
    let d = d.trim_end_matches('/');
    let mut a = exec::args([
        "--archive",
        "--hard-links",
        "--numeric-ids",
        "--delete",
        "--mkpath",
        "--stats",
        "--rsh",
    ]);
    a.push(rsh.into());
    if compress {
        a.push("--compress".into());
    }
    a.push(format!("{d}/"));
    a.push(format!("{target}:{d}/"));
    a
}

/// Mirrors `dir` to the target.
pub async fn sync(dir: &Path, ssh: &Ssh, compress: bool) -> Result<SyncStats, ExecError> {
    let a = rsync_args(dir, &ssh.rsync_shell(), &ssh.rsync_target(), compress);
    let out = exec::run("rsync", &a, SYNC_TIMEOUT).await?;
    Ok(parse_stats(&out.stdout))
}

/// An rsync started ahead of time: connected to the target, with its remote side up,
/// and waiting for its file list. [`Armed::fire`] hands it the list, so what is left
/// for the frozen window is the comparison and the changed bytes, not starting rsync
/// and a remote session (~0.1 s each on an idle pair).
#[derive(Debug)]
pub struct Armed {
    rsync: exec::Running,
    /// The write end of the file-list FIFO; rsync sees its end when this closes.
    list: std::fs::File,
    _dir: tempfile::TempDir,
}

/// Starts the mirror of `dir` to the target, held before its file list.
pub fn arm(dir: &Path, ssh: &Ssh, compress: bool) -> Result<Armed, ExecError> {
    let spawn_err = |source: std::io::Error| ExecError::Spawn {
        cmd: "mkfifo (rsync file list)".into(),
        io: source,
    };
    let tmp = tempfile::Builder::new()
        .prefix("migrate-rsync-")
        .tempdir()
        .map_err(spawn_err)?;
    let fifo = tmp.path().join("files");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
    )
    .map_err(|e| spawn_err(e.into()))?;
    // Read-write: opening never blocks, and rsync's own open of the FIFO succeeds at once.
    let list = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .map_err(spawn_err)?;
    let mut a = rsync_args(dir, &ssh.rsync_shell(), &ssh.rsync_target(), compress);
    // The list is the folder itself, recursively: the same mirror as a plain run. The
    // remote side says on stderr when its shell has started and execs rsync.
    a.splice(
        0..0,
        [
            "--recursive".to_string(),
            format!("--files-from={}", fifo.display()),
            format!("--rsync-path=sh -c 'echo {READY_LINE} >&2; exec rsync \"$@\"' sh"),
        ],
    );
    let rsync = exec::spawn("rsync", &a)?;
    Ok(Armed {
        rsync,
        list,
        _dir: tmp,
    })
}

/// What the armed rsync's remote side prints on stderr once it runs.
const READY_LINE: &str = "migrate-post-sync-ready";

impl Armed {
    /// Waits until the remote rsync runs: the remote login shell's start-up is over
    /// before the freeze, not inside it.
    pub async fn ready(&mut self, timeout: Duration) -> Result<(), ExecError> {
        self.rsync.wait_for_stderr_line(READY_LINE, timeout).await
    }

    /// Lets the armed rsync run and waits for it.
    pub async fn fire(self) -> Result<SyncStats, ExecError> {
        let Armed {
            rsync,
            mut list,
            _dir,
        } = self;
        use std::io::Write;
        // "." is the source folder; a failed write shows as rsync's own error.
        let _ = list.write_all(b".\n");
        drop(list);
        let out = rsync.finish(SYNC_TIMEOUT).await?;
        Ok(parse_stats(&out.stdout))
    }
}

/// What a sync would send now, without sending it (`rsync --dry-run`).
pub async fn preview(dir: &Path, ssh: &Ssh) -> Result<SyncStats, ExecError> {
    let mut a = rsync_args(dir, &ssh.rsync_shell(), &ssh.rsync_target(), false);
    a.insert(0, "--dry-run".into());
    let out = exec::run("rsync", &a, SYNC_TIMEOUT).await?;
    Ok(parse_stats(&out.stdout))
}

/// Reads `--stats` output (numbers may carry thousands separators).
pub fn parse_stats(stdout: &str) -> SyncStats {
    let number = |label: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| {
                let digits: String = rest
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == '.')
                    .filter(char::is_ascii_digit)
                    .collect();
                digits.parse().ok()
            })
            .unwrap_or(0)
    };
    SyncStats {
        bytes_sent: number("Total bytes sent:"),
        files_transferred: number("Number of regular files transferred:"),
        transferred_file_size: number("Total transferred file size:"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from rsync 3.2.7 --stats.
    const STATS: &str = "
Number of files: 12 (reg: 10, dir: 2)
Number of created files: 0
Number of deleted files: 0
Number of regular files transferred: 3
Total file size: 52,428,800 bytes
Total transferred file size: 1,048,576 bytes
Literal data: 4,096 bytes
Matched data: 1,044,480 bytes
File list size: 0
File list generation time: 0.001 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 9,731
Total bytes received: 6,265

sent 9,731 bytes  received 6,265 bytes  31,992.00 bytes/sec
total size is 52,428,800  speedup is 3,277.61
";

    #[test]
    fn parses_stats() {
        assert_eq!(
            parse_stats(STATS),
            SyncStats {
                bytes_sent: 9731,
                files_transferred: 3,
                transferred_file_size: 1_048_576,
            }
        );
        assert_eq!(parse_stats(""), SyncStats::default());
    }

    #[test]
    fn mirrors_to_the_same_path() {
        let a = rsync_args(Path::new("/srv/app/www/"), "ssh -o X", "root@b", false);
        assert_eq!(a[a.len() - 2], "/srv/app/www/");
        assert_eq!(a[a.len() - 1], "root@b:/srv/app/www/");
        assert!(a.contains(&"--delete".to_string()));
        assert!(!a.contains(&"--compress".to_string()));
    }
}
