//! The per-migration run folder and the files in it, for both sides.
//!
//! On the target a run folder is `WORKDIR/runs/RUN_ID`. The sender creates it over SSH
//! (root-owned, 0700, never through a symlink) and places the migration's secret in it
//! before it says anything on the control connection; the receiver reads the secret from
//! there only after checking who owns the folder and the file, without following
//! symlinks. Every file either side creates in it is created new (`O_EXCL`), without
//! following symlinks (`O_NOFOLLOW`) and readable by its owner only.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Default work folder on both hosts.
pub const DEFAULT_WORKDIR: &str = "/var/lib/migrate";
/// The secret that authenticates the control connection.
pub const SECRET_FILE: &str = "secret";
/// The receiver's outcome, for a sender that lost the control connection.
pub const RESULT_FILE: &str = "result.json";
/// The receiver's process id, for a sender that must stop it.
pub const PID_FILE: &str = "receiver.pid";

/// The folder that holds every run folder of a work folder.
pub fn runs_dir(workdir: &Path) -> PathBuf {
    workdir.join("runs")
}

/// Folder of one migration under a work folder.
pub fn run_dir(workdir: &Path, run_id: &str) -> PathBuf {
    runs_dir(workdir).join(run_id)
}

/// The same, as the text the sender puts into remote commands.
pub fn remote_run_dir(workdir: &str, run_id: &str) -> String {
    format!("{}/runs/{run_id}", workdir.trim_end_matches('/'))
}

/// Why a run folder or a file in it is not to be trusted.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path} is a symbolic link or not a {kind}; refusing it")]
    NotPlain { path: String, kind: &'static str },
    #[error("{path} belongs to uid {owner}, not to this receiver's uid {me}; refusing it")]
    Owner { path: String, owner: u32, me: u32 },
    #[error("{path} has mode {mode:o}: readable or writable by others; refusing it")]
    Mode { path: String, mode: u32 },
    #[error("{path}: {0}", path = .1)]
    Content(String, String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunDirError + '_ {
    move |error| RunDirError::Io {
        path: path.display().to_string(),
        error,
    }
}

/// Creates `path` as a new file, mode 0600: fails if anything (a file, a symlink) is
/// there already.
pub fn create_new_private(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Writes `bytes` to `dir/name` by way of a new temporary file renamed over it: never
/// through a symlink, never readable by others, never half-written. Not synced to disk
/// (some callers write inside the freeze; none needs to outlive a reboot).
pub fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    // A leftover of this very pid (one that died between create and rename).
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let res = create_new_private(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| std::fs::rename(&tmp, dir.join(name)));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Checks that `dir` is a real folder (not a symlink) owned by this process's user and
/// closed to everyone else.
pub fn check_private_dir(dir: &Path) -> Result<(), RunDirError> {
    let meta = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    check_meta(dir, &meta, "folder", meta.is_dir())
}

fn check_meta(
    path: &Path,
    meta: &std::fs::Metadata,
    kind: &'static str,
    right_kind: bool,
) -> Result<(), RunDirError> {
    let shown = || path.display().to_string();
    if !right_kind {
        return Err(RunDirError::NotPlain {
            path: shown(),
            kind,
        });
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(RunDirError::Owner {
            path: shown(),
            owner: meta.uid(),
            me,
        });
    }
    if meta.mode() & 0o077 != 0 {
        return Err(RunDirError::Mode {
            path: shown(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Reads the migration's secret from a run folder, trusting it only when the folder and
/// the file are plain, owned by this user and closed to others.
pub fn read_secret(dir: &Path) -> Result<Vec<u8>, RunDirError> {
    check_private_dir(dir)?;
    let path = dir.join(SECRET_FILE);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&path)
        .map_err(io(&path))?;
    let meta = f.metadata().map_err(io(&path))?;
    check_meta(&path, &meta, "regular file", meta.is_file())?;
    let mut text = String::new();
    f.by_ref()
        .take(4096)
        .read_to_string(&mut text)
        .map_err(io(&path))?;
    let secret = hex::decode(text.trim())
        .map_err(|_| RunDirError::Content(path.display().to_string(), "not hex".into()))?;
    if secret.len() < 16 {
        return Err(RunDirError::Content(
            path.display().to_string(),
            "secret too short".into(),
        ));
    }
    Ok(secret)
}

/// Writes the receiver's pid, for a sender that must stop it.
pub fn write_pid(dir: &Path) -> std::io::Result<()> {
    write_private(dir, PID_FILE, std::process::id().to_string().as_bytes())
}

/// Writes the receiver's outcome, for a sender that lost the control connection and
/// reads it over SSH. A partial file is removed on failure (a full disk).
pub fn write_result(dir: &Path, outcome: &crate::protocol::TargetOutcome) -> std::io::Result<()> {
    write_private(dir, RESULT_FILE, &serde_json::to_vec(outcome)?)
}

/// Removes the secret: nobody can authenticate for this run any more.
pub fn remove_secret(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(SECRET_FILE));
}

/// Removes the archives (and the secret). Archives hold process memory, keys included:
/// they go as soon as they are of no more use.
pub fn remove_archives(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.contains(".tar") || name == SECRET_FILE {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The shell script (run over SSH on the target) that creates the run folder `run_dir`
/// under `workdir` for `send`: the work folder and its `runs` must be real folders owned
/// by the SSH user, not writable by others; the run folder itself must not exist yet.
/// Prints `run_dir=ok` on success, else `run_dir=` and the reason. Without `mkdir` (for
/// `check`) it only checks the work folder.
pub fn create_script(workdir: &str, run_id: &str, mkdir: bool) -> String {
    let q = crate::exec::shell_quote;
    let w = workdir.trim_end_matches('/');
    let w = if w.is_empty() { "/" } else { w };
    format!(
        r#"mk_run_dir() {{
  me=$(id -u)
  for d in {w} {runs}; do
    if [ -L "$d" ] || [ ! -d "$d" ]; then printf 'run_dir=%s is not a folder (a symbolic link or missing): is the receiver started with this --workdir?\n' "$d"; return; fi
    set -- $(stat -c '%u %a' "$d")
    if [ "$1" != "$me" ]; then printf 'run_dir=%s belongs to uid %s, not to the SSH user (uid %s)\n' "$d" "$1" "$me"; return; fi
    case "$2" in *[2367]?|*[2367]) printf 'run_dir=%s has mode %s: writable by others\n' "$d" "$2"; return;; esac
  done
  {make}
  echo run_dir=ok
}}
mk_run_dir
"#,
        w = q(w),
        runs = q(&format!("{}/runs", w.trim_end_matches('/'))),
        make = if mkdir {
            format!(
                "(umask 077 && mkdir {d}) 2>/dev/null || {{ printf 'run_dir=cannot create %s (it exists already or the folder is not writable)\\n' {d}; return; }}",
                d = q(&remote_run_dir(workdir, run_id))
            )
        } else {
            ":".to_string()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn private_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        d
    }

    #[test]
    fn the_secret_is_read_only_from_a_private_plain_file() {
        let d = private_dir();
        let secret = "ab".repeat(32);
        create_new_private(&d.path().join(SECRET_FILE))
            .and_then(|mut f| std::io::Write::write_all(&mut f, secret.as_bytes()))
            .unwrap();
        assert_eq!(
            read_secret(d.path()).unwrap(),
            hex::decode(&secret).unwrap()
        );

        // Readable by others: refused.
        let p = d.path().join(SECRET_FILE);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_secret(d.path()),
            Err(RunDirError::Mode { .. })
        ));

        // A symlink to a good secret elsewhere: refused, not followed.
        let other = private_dir();
        let real = other.path().join("real");
        create_new_private(&real)
            .and_then(|mut f| std::io::Write::write_all(&mut f, secret.as_bytes()))
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&real, &p).unwrap();
        assert!(read_secret(d.path()).is_err());

        // A run folder open to others: refused.
        std::fs::remove_file(&p).unwrap();
        std::fs::rename(&real, &p).unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            read_secret(d.path()),
            Err(RunDirError::Mode { .. })
        ));

        // A run folder that is a symlink to a good one: refused.
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = other.path().join("link");
        std::os::unix::fs::symlink(d.path(), &link).unwrap();
        assert!(matches!(
            read_secret(&link),
            Err(RunDirError::NotPlain { .. })
        ));
    }

    #[test]
    fn new_files_never_follow_or_replace_anything() {
        let d = private_dir();
        let target = d.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_new_private(&link).is_err());
        assert!(create_new_private(&target).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        // A dangling symlink is not followed either.
        let dangling = d.path().join("dangling");
        std::os::unix::fs::symlink(d.path().join("nowhere"), &dangling).unwrap();
        assert!(create_new_private(&dangling).is_err());
        assert!(!d.path().join("nowhere").exists());

        write_private(d.path(), "result.json", b"{}").unwrap();
        let meta = std::fs::metadata(d.path().join("result.json")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // write_private replaces a symlink by a file; it never writes through it.
        std::os::unix::fs::symlink(&target, d.path().join("r2")).unwrap();
        write_private(d.path(), "r2", b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert_eq!(std::fs::read_to_string(d.path().join("r2")).unwrap(), "new");
    }

    fn run_script(script: &str) -> String {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_create_script_refuses_what_others_could_control() {
        let d = private_dir();
        let w = d.path().join("work dir $(touch pwned) `touch pwned2` \"q");
        std::fs::create_dir(&w).unwrap();
        std::fs::create_dir(w.join("runs")).unwrap();
        for p in [&w, &w.join("runs")] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let ws = w.to_str().unwrap();
        let out = run_script(&create_script(ws, "r1", false));
        assert_eq!(out.trim(), "run_dir=ok", "{out}");
        assert!(!run_dir(&w, "r1").exists(), "a check made the folder");
        let out = run_script(&create_script(ws, "r1", true));
        assert_eq!(out.trim(), "run_dir=ok", "{out}");
        let made = run_dir(&w, "r1");
        let meta = std::fs::symlink_metadata(&made).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        assert!(!Path::new("pwned").exists() && !Path::new("pwned2").exists());
        assert!(!w.join("pwned").exists());

        // Exists already: refused.
        let out = run_script(&create_script(ws, "r1", true));
        assert!(out.starts_with("run_dir=cannot create"), "{out}");

        // runs writable by others: refused.
        std::fs::set_permissions(w.join("runs"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let out = run_script(&create_script(ws, "r2", true));
        assert!(out.contains("writable by others"), "{out}");
        assert!(!run_dir(&w, "r2").exists());

        // runs a symlink to a folder someone else prepared: refused.
        std::fs::set_permissions(w.join("runs"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::rename(w.join("runs"), w.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(w.join("elsewhere"), w.join("runs")).unwrap();
        let out = run_script(&create_script(ws, "r3", true));
        assert!(out.contains("not a folder"), "{out}");
        assert!(!w.join("elsewhere").join("r3").exists());
    }
}
