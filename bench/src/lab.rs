//! Running commands inside lab hosts (`scripts/lab exec HOST ...`), always with a time
//! limit, and background processes that can be stopped by their process group.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Set by SIGINT/SIGTERM: every wait checks it and gives up.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Like INTERRUPTED, but never cleared (cleanup clears INTERRUPTED to run its commands).
static EVER_INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    EVER_INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether a SIGINT/SIGTERM arrived at any time.
pub fn was_interrupted() -> bool {
    EVER_INTERRUPTED.load(Ordering::SeqCst)
}

pub fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleep in small steps, giving up early on interrupt.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupt()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

#[derive(Clone, Debug)]
pub struct Lab {
    pub repo: PathBuf,
}

impl Lab {
    pub fn script(&self) -> PathBuf {
        self.repo.join("scripts/lab")
    }

    /// `timeout T scripts/lab exec HOST ARGS...` (in its own process group).
    fn command(&self, host: &str, args: &[&str], timeout_s: u64) -> Command {
        let mut c = Command::new("timeout");
        c.arg("-k")
            .arg("5")
            .arg(timeout_s.to_string())
            .arg(self.script())
            .arg("exec")
            .arg(host)
            .args(args)
            .current_dir(&self.repo)
            .stdin(Stdio::null())
            .process_group(0);
        c
    }

    /// Run ARGS in HOST; the output whatever the status.
    pub fn run(&self, host: &str, args: &[&str], timeout_s: u64) -> Result<Output> {
        check_interrupt()?;
        let child = self
            .command(host, args, timeout_s)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting scripts/lab exec {host} {}", args.join(" ")))?;
        let pid = child.id();
        let out = wait_output(child, timeout_s + 10);
        if out.is_err() {
            kill_group(pid);
        }
        out
    }

    /// Run a shell snippet in HOST; its stdout (trimmed) on success, an error otherwise.
    pub fn sh(&self, host: &str, script: &str, timeout_s: u64) -> Result<String> {
        let out = self.run(host, &["sh", "-c", script], timeout_s)?;
        if !out.status.success() {
            bail!(
                "on {host}: `{}` failed ({}): {}",
                script.lines().next().unwrap_or(""),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A lab subcommand outside `exec` (e.g. `workload up d --rows 100`).
    pub fn lab(&self, args: &[&str], timeout_s: u64) -> Result<String> {
        check_interrupt()?;
        let mut c = Command::new("timeout");
        c.arg("-k")
            .arg("5")
            .arg(timeout_s.to_string())
            .arg(self.script())
            .args(args);
        c.current_dir(&self.repo)
            .stdin(Stdio::null())
            .process_group(0);
        let child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let pid = child.id();
        let out = wait_output(child, timeout_s + 10).inspect_err(|_| kill_group(pid))?;
        if !out.status.success() {
            bail!(
                "scripts/lab {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Start ARGS in HOST in the background, stdout and stderr to files.
    pub fn spawn(
        &self,
        host: &str,
        args: &[&str],
        timeout_s: u64,
        stdout: &Path,
        stderr: &Path,
    ) -> Result<Bg> {
        check_interrupt()?;
        let child = self
            .command(host, args, timeout_s)
            .stdout(File::create(stdout)?)
            .stderr(File::create(stderr)?)
            .spawn()
            .with_context(|| format!("starting scripts/lab exec {host} {}", args.join(" ")))?;
        Ok(Bg {
            child: Some(child),
            stdout: stdout.to_path_buf(),
            stderr: stderr.to_path_buf(),
        })
    }
}

fn wait_output(mut child: Child, limit_s: u64) -> Result<Output> {
    use std::io::Read;
    // Read the pipes in threads so a chatty child cannot block on a full pipe.
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let t1 = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = so.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let t2 = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = se.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let end = Instant::now() + Duration::from_secs(limit_s);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if interrupted() || Instant::now() > end {
            kill_group(child.id());
            let _ = child.wait();
            bail!(if interrupted() {
                "interrupted"
            } else {
                "timed out"
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: t1.join().unwrap_or_default(),
        stderr: t2.join().unwrap_or_default(),
    })
}

/// SIGTERM the process group PID (which we created), then SIGKILL.
pub fn kill_group(pid: u32) {
    let pg = -(pid as libc::pid_t);
    // SAFETY: plain kill(2) on a process group this program created.
    unsafe {
        libc::kill(pg, libc::SIGTERM);
    }
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        // SAFETY: signal 0 only checks existence.
        if unsafe { libc::kill(pg, 0) } != 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe {
        libc::kill(pg, libc::SIGKILL);
    }
}

/// A background process in a lab host. Dropping it kills it (by its process group).
pub struct Bg {
    child: Option<Child>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Bg {
    /// Wait for it to exit (its exit code, -1 if killed by a signal); kill it after `limit`.
    pub fn wait(&mut self, limit: Duration) -> Result<i32> {
        let child = self.child.as_mut().context("already waited")?;
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st.code().unwrap_or(-1));
            }
            if interrupted() || Instant::now() > end {
                let pid = child.id();
                kill_group(pid);
                let _ = child.wait();
                self.child = None;
                if interrupted() {
                    bail!("interrupted");
                }
                bail!("timed out after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Wait until `needle` appears in its stdout or stderr (or it exits, or time runs out).
    pub fn wait_for_text(&mut self, needle: &str, limit: Duration) -> Result<()> {
        let end = Instant::now() + limit;
        loop {
            let a = std::fs::read_to_string(&self.stdout).unwrap_or_default();
            let b = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            if a.contains(needle) || b.contains(needle) {
                return Ok(());
            }
            if !self.running() {
                bail!("exited before printing '{needle}': {}", b.trim());
            }
            check_interrupt()?;
            if Instant::now() > end {
                bail!("no '{needle}' within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_group(c.id());
            let _ = c.wait();
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        self.kill();
    }
}
