//! `migrate`: live migration of Podman containers between hosts with CRIU over SSH.
#![deny(unsafe_code)]

mod check;
mod cli;
mod digest;
mod engine;
mod exec;
mod hooks;
mod journal;
mod plan;
mod preflight;
mod probe;
mod progress;
mod protocol;
mod receive;
mod recover;
mod rundir;
mod secret;
mod send;
mod settle;
mod signals;
mod sink;
mod sync;
mod timing;
mod transport;
mod watchdog;
mod wire;
mod zeropages;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser};

use crate::cli::{Cli, Command};
use crate::progress::{Ui, say};
pub use crate::signals::Signals;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            say!("migrate: cannot start: {e}");
            return ExitCode::from(3);
        }
    };
    ExitCode::from(runtime.block_on(dispatch(cli)))
}

async fn dispatch(cli: Cli) -> u8 {
    match cli.command {
        Command::Receive(args) => {
            let ui = Arc::new(Ui::new("receive"));
            match receive::run(args, ui.clone()).await {
                Ok(code) => code,
                Err(e) => {
                    ui.finish();
                    say!("migrate receive: error: {e:#}");
                    2
                }
            }
        }
        Command::Send(args) => {
            let ui = Arc::new(Ui::new("send"));
            let plan = match plan::SendPlan::resolve(&args) {
                Ok(p) => p,
                Err(e) => {
                    say!("migrate send: error: {e}");
                    return send::Exit::Refused as u8;
                }
            };
            if plan.dry_run {
                return send::dry_run(&plan, &ui).await;
            }
            let mut signals = match Signals::reporting_to(ui.clone()) {
                Ok(s) => s,
                Err(e) => {
                    say!("migrate send: error: {e:#}");
                    return send::Exit::Refused as u8;
                }
            };
            let (record, result) = send::run(&plan, &ui, &mut signals).await;
            ui.finish();
            let mut stdout = std::io::stdout().lock();
            if let Err(e) = record.write(&mut stdout, plan.format, plan.no_header) {
                say!("migrate send: cannot write the record: {e}");
            }
            match result {
                Ok(()) => send::Exit::Migrated as u8,
                Err(f) => {
                    say!("migrate send: error: {:#}", f.error);
                    f.exit as u8
                }
            }
        }
        Command::Check(args) => check::run(args).await,
        Command::Probe(args) => probe::run(args).await,
        Command::Completions { shell } => {
            // clap_complete panics when its writer fails: it writes into memory.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "migrate", &mut script);
            match std::io::stdout().write_all(&script) {
                Ok(()) => 0,
                Err(e) => {
                    say!("migrate completions: {e}");
                    3
                }
            }
        }
        Command::Sink(args) => sink::run(args),
        Command::Recover(args) => recover::run(args).await,
        Command::Watchdog(args) => watchdog::run(args).await,
        Command::Man => {
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => 0,
                Err(e) => {
                    say!("migrate man: {e}");
                    3
                }
            }
        }
    }
}

/// This host's name, for records and messages.
pub fn hostname() -> String {
    std::env::var("MIGRATE_HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "localhost".into())
}
