//! What humans see on stderr: a spinner with the current phase when stderr is a
//! terminal, plain time-stamped log lines otherwise.
//!
//! Nothing written to stderr may stop a migration: a reader gone (`send 2>&1 | tee log`
//! and Ctrl-C), a full disk under a log file or a closed stderr are ignored. Every line
//! goes through [`stderr_line`] (or the [`say!`] macro), never `eprintln!`, which panics
//! on such errors.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Writes one line to stderr. A failed write (EPIPE, ENOSPC, a closed stderr) is
/// dropped: logging never panics and never stops what it reports on.
pub fn stderr_line(args: std::fmt::Arguments<'_>) {
    // One write per line, so lines from several tasks do not interleave.
    let mut line = args.to_string();
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// `eprintln!` that never panics: see [`stderr_line`].
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::progress::stderr_line(format_args!($($arg)*))
    };
}
pub use crate::say;

/// The stderr reporter of one command.
pub struct Ui {
    role: &'static str,
    bar: Option<ProgressBar>,
    /// The phase in progress, for a signal that arrives while it runs.
    current: Mutex<String>,
}

impl Ui {
    pub fn new(role: &'static str) -> Ui {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                    .expect("static template"),
            );
            b.enable_steady_tick(Duration::from_millis(100));
            b
        });
        Ui {
            role,
            bar,
            current: Mutex::new(String::new()),
        }
    }

    fn line(&self, level: &str, msg: &str) {
        let ts = chrono::Utc::now().format("%H:%M:%S%.3f");
        let text = format!("{ts} migrate {}{level}: {msg}", self.role);
        match &self.bar {
            Some(b) => b.println(text),
            None => stderr_line(format_args!("{text}")),
        }
    }

    /// A new phase begins.
    pub fn phase(&self, msg: &str) {
        if let Ok(mut c) = self.current.lock() {
            msg.clone_into(&mut c);
        }
        match &self.bar {
            Some(b) => b.set_message(msg.to_string()),
            None => self.line("", msg),
        }
    }

    /// The phase in progress ("" before the first).
    pub fn current(&self) -> String {
        self.current.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Something worth keeping in the log.
    pub fn info(&self, msg: &str) {
        self.line("", msg);
    }

    /// Something the operator should look at.
    pub fn warn(&self, msg: &str) {
        self.line(" warning", msg);
    }

    /// Removes the spinner.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Read};
    use std::process::{Command, Stdio};

    /// Set in the child that [`logging_survives_a_stderr_whose_reader_is_gone`] starts.
    const CHILD: &str = "MIGRATE_TEST_STDERR_GONE";

    #[test]
    fn logging_survives_a_stderr_whose_reader_is_gone() {
        if std::env::var_os(CHILD).is_some() {
            // The child: wait until the parent closed the pipe's read end, then log.
            let mut go = String::new();
            std::io::stdin().lock().read_line(&mut go).unwrap();
            let ui = Ui::new("send");
            for i in 0..100 {
                ui.info(&format!("line {i}"));
                ui.warn("a warning");
                say!("migrate send: error: {i}");
            }
            println!("still here");
            return;
        }
        let me = std::env::current_exe().unwrap();
        let mut child = Command::new(me)
            .args([
                "--exact",
                "progress::tests::logging_survives_a_stderr_whose_reader_is_gone",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Every write to stderr from now on fails with EPIPE.
        drop(child.stderr.take());
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
        drop(stdin);
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success() && out.contains("still here"),
            "the child logging into a closed pipe ended {status}; its stdout:\n{out}"
        );
    }
}
