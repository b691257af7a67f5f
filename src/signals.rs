//! SIGINT, SIGTERM and SIGHUP, seen as one "stop" event.
//!
//! The first signal asks the command to stop where that is safe: before the freeze it
//! stops, while frozen it rolls back, after "OK" it waits for the target's word. A later
//! signal never cuts short what is then in progress (a rollback half done can lose the
//! service); it only says what that is. The programs `migrate` runs have process groups
//! of their own (see `exec::spawn`), so a Ctrl-C at the terminal reaches `migrate` alone
//! and `migrate` stops them in order.

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};

use crate::progress::Ui;

/// The stop signals that have arrived so far.
pub struct Signals {
    rx: tokio::sync::watch::Receiver<u64>,
}

impl Signals {
    /// Starts listening, silently.
    pub fn new() -> anyhow::Result<Signals> {
        Signals::start(None)
    }

    /// Starts listening; each signal is logged on `ui` with the phase in progress.
    pub fn reporting_to(ui: Arc<Ui>) -> anyhow::Result<Signals> {
        Signals::start(Some(ui))
    }

    fn start(ui: Option<Arc<Ui>>) -> anyhow::Result<Signals> {
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        // A SIGHUP that whoever started us ignores (`nohup`) stays ignored: such a run
        // is meant to outlive its terminal.
        let mut hup = if sighup_ignored() {
            None
        } else {
            Some(signal(SignalKind::hangup())?)
        };
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = int.recv() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                    Some(()) = async {
                        match hup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => "SIGHUP",
                };
                tx.send_modify(|n| *n += 1);
                if let Some(ui) = &ui {
                    report(ui, name, *tx.borrow());
                }
            }
        });
        Ok(Signals { rx })
    }

    /// True once any signal has arrived.
    pub fn fired(&self) -> bool {
        self.count() > 0
    }

    /// How many signals have arrived.
    pub fn count(&self) -> u64 {
        *self.rx.borrow()
    }

    /// Waits for the next signal.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Says which signal came and what is in progress; the command itself says what the
/// first one makes it do.
fn report(ui: &Ui, name: &str, count: u64) {
    let phase = ui.current();
    ui.warn(&message(name, count, &phase));
}

fn message(name: &str, count: u64, phase: &str) -> String {
    let doing = if phase.is_empty() {
        String::new()
    } else {
        format!("; in progress: {phase}")
    };
    if count <= 1 {
        format!("{name} received{doing}")
    } else {
        format!(
            "{name} received again{doing}. Stopping that half-way could lose the service: \
             migrate goes on and stops by itself, wait for it"
        )
    }
}

/// True when SIGHUP is ignored in this process (`nohup`), per /proc/self/status.
fn sighup_ignored() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| ignores_sighup(&s))
}

fn ignores_sighup(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        // Bit n-1 stands for signal n; SIGHUP is 1.
        .is_some_and(|mask| mask & 1 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_signal_names_what_is_in_progress() {
        assert_eq!(
            message("SIGINT", 1, "checkpointing and streaming the archives"),
            "SIGINT received; in progress: checkpointing and streaming the archives"
        );
        let again = message("SIGHUP", 2, "rolling back: restoring db on this host");
        assert!(
            again.starts_with(
                "SIGHUP received again; in progress: rolling back: restoring db on this host."
            ),
            "{again}"
        );
        assert!(again.contains("wait"), "{again}");
        assert_eq!(message("SIGTERM", 1, ""), "SIGTERM received");
    }

    #[test]
    fn nohup_is_read_from_the_ignored_mask() {
        // Lines as /proc/self/status has them, under `nohup` and without.
        let nohup =
            "SigBlk:\t0000000000000000\nSigIgn:\t0000000000001001\nSigCgt:\t0000000180000000\n";
        let plain =
            "SigBlk:\t0000000000000000\nSigIgn:\t0000000000001000\nSigCgt:\t0000000180000000\n";
        assert!(ignores_sighup(nohup));
        assert!(!ignores_sighup(plain));
        assert!(!ignores_sighup("Name:\tmigrate\n"));
    }
}
