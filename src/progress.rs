//! What humans see on stderr: a spinner with the current phase when stderr is a
//! terminal, plain time-stamped log lines otherwise.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// The stderr reporter of one command.
pub struct Ui {
    role: &'static str,
    bar: Option<ProgressBar>,
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
        Ui { role, bar }
    }

    fn line(&self, level: &str, msg: &str) {
        let ts = chrono::Utc::now().format("%H:%M:%S%.3f");
        let text = format!("{ts} migrate {}{level}: {msg}", self.role);
        match &self.bar {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// A new phase begins.
    pub fn phase(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.set_message(msg.to_string()),
            None => self.line("", msg),
        }
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
