//! `migrate`: live migration of Podman containers between hosts with CRIU over SSH.
#![deny(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::CommandFactory;

use migrate::cli::{Cli, Command};
use migrate::exit::Exit;
use migrate::progress::{Ui, say};
use migrate::signals::Signals;
use migrate::{check, drain, plan, probe, receive, recover, send, sink, watchdog};

fn main() -> ExitCode {
    let cli = migrate::cli::parse_or_exit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            say!("migrate: cannot start: {e}");
            return ExitCode::from(Exit::Failed.code());
        }
    };
    ExitCode::from(runtime.block_on(dispatch(cli)))
}

async fn dispatch(cli: Cli) -> u8 {
    match cli.command {
        Command::Receive(args) => {
            let ui = Arc::new(Ui::new("receive"));
            match receive::run(args, ui.clone()).await {
                Ok(exit) => exit.code(),
                Err(e) => {
                    // It could not start (work folder, port): nothing was touched.
                    ui.finish();
                    say!("migrate receive: error: {e:#}");
                    Exit::Refused.code()
                }
            }
        }
        Command::Send(args) => {
            let ui = Arc::new(Ui::new("send"));
            let plan = match plan::SendPlan::resolve(&args) {
                Ok(p) => p,
                Err(e) => {
                    say!("migrate send: error: {e}");
                    return Exit::Refused.code();
                }
            };
            if plan.dry_run {
                return send::dry_run(&plan, &ui).await;
            }
            let mut signals = match Signals::reporting_to(ui.clone()) {
                Ok(s) => s,
                Err(e) => {
                    say!("migrate send: error: {e:#}");
                    return Exit::Refused.code();
                }
            };
            let (record, result) = send::run(&plan, &ui, &mut signals).await;
            ui.finish();
            let mut stdout = std::io::stdout().lock();
            if let Err(e) = record.write(&mut stdout, plan.format, plan.no_header) {
                say!("migrate send: cannot write the record: {e}");
            }
            match result {
                Ok(()) => Exit::Ok.code(),
                Err(f) => {
                    say!("migrate send: error: {:#}", f.error);
                    f.exit.code()
                }
            }
        }
        Command::Check(args) => check::run(args).await,
        Command::Drain(args) => drain::run(args).await,
        Command::Probe(args) => probe::run(args).await,
        Command::Completions { shell } => {
            // clap_complete panics when its writer fails: it writes into memory.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "migrate", &mut script);
            match std::io::stdout().write_all(&script) {
                Ok(()) => Exit::Ok.code(),
                Err(e) => {
                    say!("migrate completions: {e}");
                    Exit::Failed.code()
                }
            }
        }
        Command::Sink(args) => sink::run(args),
        Command::Recover(args) => recover::run(args).await,
        Command::Watchdog(args) => watchdog::run(args).await,
        Command::RelayAttach(args) => migrate::transport::relay::attach(args).await,
        Command::Man => {
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => Exit::Ok.code(),
                Err(e) => {
                    say!("migrate man: {e}");
                    Exit::Failed.code()
                }
            }
        }
    }
}
