//! The target side: wait for a sender, check what it shipped, restore, answer.
//!
//! One phase per file:
//! - `mod.rs` (this): the work folder, the listener and the accept loop, and what the
//!   process exits with;
//! - [`session`]: one control connection: hello, proof of the run's secret, then the
//!   sender's frames until "OK", an abort or silence;
//! - [`archives`]: what the sender shipped, checked against its manifest;
//! - [`restore`]: the containers restored wave by wave, or all removed again;
//! - [`report`]: the answer left behind: `result.json` in the run folder and the record
//!   on stdout.
//!
//! Exit status (see [`Exit`]): 0 it restored; 1 a migration ended without restoring
//! (the source keeps the service), or none came within `--idle-timeout`; 2 it could not
//! start (work folder, port): nothing was touched; 130 stopped by a signal while no
//! migration was in progress.

mod archives;
mod lazy;
mod report;
mod restore;
mod session;

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;

use crate::exit::Exit;
use crate::progress::Ui;
use crate::rundir;
use crate::signals::Signals;
use crate::timing::Format;
use crate::timing::OutputArgs;
use clap::Args;

/// What every connection of this receiver shares.
struct Ctx {
    workdir: PathBuf,
    hostname: String,
    /// Held by the one migration in progress.
    busy: Mutex<()>,
    ui: Arc<Ui>,
    format: Format,
    header_done: AtomicBool,
}

impl Ctx {
    fn new(args: &ReceiveArgs, ui: Arc<Ui>) -> Ctx {
        Ctx {
            workdir: args.workdir.clone(),
            hostname: crate::host::hostname(),
            busy: Mutex::new(()),
            ui,
            format: args.output.format,
            header_done: AtomicBool::new(args.output.no_header),
        }
    }

    fn idle(&self) -> bool {
        self.busy.try_lock().is_ok()
    }
}

/// What one finished migration means for the receiver's exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    Restored,
    NotRestored,
    /// Aborted or dropped by the sender before "OK": nothing was restored.
    Ended,
}

impl Done {
    fn exit(self) -> Exit {
        match self {
            Done::Restored => Exit::Ok,
            // Nothing runs here: the source keeps (or got back) the service.
            Done::NotRestored | Done::Ended => Exit::RolledBack,
        }
    }
}

/// Runs the receiver until its migration (or, with `--serve`, a signal) ends it.
/// `Err` means it could not start (work folder, port, signal handlers): nothing was
/// touched, which the caller reports as [`Exit::Refused`].
pub async fn run(args: ReceiveArgs, ui: Arc<Ui>) -> anyhow::Result<Exit> {
    prepare_workdir(&args.workdir)?;
    let listener = listen(args.listen).await?;
    let ctx = Arc::new(Ctx::new(&args, ui.clone()));
    ui.info(&format!(
        "listening on {} (work folder {}){}",
        args.listen,
        args.workdir.display(),
        if args.serve {
            ", serving until stopped"
        } else {
            ", for one migration"
        }
    ));
    let signals = Signals::new()?;
    let idle = args.idle_timeout.map(Duration::from_secs);
    Server::new(ctx, args.serve, idle)
        .serve(listener, signals)
        .await
}

/// Creates the work folder's `runs` (mode 0700) and checks that nobody else can write
/// there: run folders are made in it over SSH and hold the secret.
fn prepare_workdir(workdir: &Path) -> anyhow::Result<()> {
    let runs = rundir::runs_dir(workdir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&runs)
        .with_context(|| {
            format!(
                "cannot create work folder {}: pass a writable --workdir",
                runs.display()
            )
        })?;
    rundir::check_private_dir(&runs).with_context(|| {
        format!(
            "work folder {} is not private: `chmod 700` it (and make it a plain folder owned by this user)",
            runs.display()
        )
    })
}

async fn listen(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr}: is another receiver running? pick another --listen")
    })
}

/// The accept loop's state: connections are served concurrently (one of them at most
/// migrates), and the process ends with the first migration, or with `--serve` on a
/// signal once nothing is in progress.
struct Server {
    ctx: Arc<Ctx>,
    serve: bool,
    idle: Option<Duration>,
    idle_deadline: Option<Instant>,
    /// A signal came while a migration was in progress: exit when it ends.
    stopping: bool,
    accept_warned: bool,
}

impl Server {
    fn new(ctx: Arc<Ctx>, serve: bool, idle: Option<Duration>) -> Server {
        Server {
            ctx,
            serve,
            idle,
            idle_deadline: idle.map(|d| Instant::now() + d),
            stopping: false,
            accept_warned: false,
        }
    }

    async fn serve(mut self, listener: TcpListener, mut signals: Signals) -> anyhow::Result<Exit> {
        let (done_tx, mut done_rx) = mpsc::channel::<Done>(4);
        loop {
            let idle_at = self.idle_deadline;
            let exit = tokio::select! {
                accepted = listener.accept() => {
                    self.accepted(accepted, &done_tx).await;
                    None
                }
                Some(done) = done_rx.recv() => self.finished(done),
                _ = async { tokio::time::sleep_until(idle_at.expect("guarded")).await },
                    if idle_at.is_some() => self.idle_over(),
                _ = signals.changed() => self.signalled(),
            };
            if let Some(exit) = exit {
                return Ok(exit);
            }
        }
    }

    /// Serves a new connection on a task of its own.
    async fn accepted(
        &mut self,
        accepted: std::io::Result<(TcpStream, SocketAddr)>,
        done_tx: &mpsc::Sender<Done>,
    ) {
        let (sock, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors (or similar): back off instead of spinning.
                if !self.accept_warned {
                    self.ctx
                        .ui
                        .warn(&format!("accept failed: {e}; retrying every 100 ms"));
                    self.accept_warned = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
        };
        self.accept_warned = false;
        let ctx = self.ctx.clone();
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            if let Some(done) = session::handle(sock, peer, &ctx).await {
                let _ = done_tx.send(done).await;
            }
        });
    }

    /// A migration ended: the exit, unless the receiver serves on.
    fn finished(&mut self, done: Done) -> Option<Exit> {
        if !self.serve || self.stopping {
            return Some(done.exit());
        }
        self.rearm_idle();
        self.ctx.ui.info("waiting for the next migration");
        None
    }

    fn idle_over(&mut self) -> Option<Exit> {
        // A migration in progress is bounded by its own timeouts; the idle clock counts
        // again once it is over.
        if self.ctx.idle() {
            self.ctx
                .ui
                .warn("no migration within --idle-timeout; exiting");
            // Nothing came, nothing was restored: the source keeps the service.
            return Some(Exit::RolledBack);
        }
        self.rearm_idle();
        None
    }

    fn signalled(&mut self) -> Option<Exit> {
        if self.ctx.idle() {
            self.ctx.ui.info("stopped by signal");
            return Some(Exit::Interrupted);
        }
        self.ctx
            .ui
            .warn("signal received: finishing the migration in progress first");
        self.stopping = true;
        None
    }

    fn rearm_idle(&mut self) {
        self.idle_deadline = self.idle.map(|d| Instant::now() + d);
    }
}

/// Options of `migrate receive`.
#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// Address and port of the control connection to listen on.
    #[arg(
        long,
        value_name = "ADDR:PORT",
        default_value = "0.0.0.0:12345",
        env = "MIGRATE_LISTEN"
    )]
    pub listen: SocketAddr,

    /// Folder for incoming archives (one sub-folder per migration, root-only).
    #[arg(
        long,
        value_name = "DIR",
        default_value = crate::rundir::DEFAULT_WORKDIR,
        env = "MIGRATE_WORKDIR",
        value_parser = absolute_path
    )]
    pub workdir: PathBuf,

    /// Keep serving migrations one after another instead of exiting after one.
    #[arg(long)]
    pub serve: bool,

    #[command(flatten)]
    pub output: OutputArgs,

    /// Exit (status 1) when no migration has started within this many seconds.
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,
}

/// A folder flag's value: absolute, because the sender names the same folder from
/// another host (its --target-workdir).
fn absolute_path(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err("must be an absolute path".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_restore_exits_ok() {
        assert_eq!(Done::Restored.exit().code(), 0);
        assert_eq!(Done::NotRestored.exit().code(), 1);
        assert_eq!(Done::Ended.exit().code(), 1);
    }

    #[tokio::test]
    async fn an_unusable_work_folder_is_refused_before_listening() {
        use std::os::unix::fs::PermissionsExt;
        let w = tempfile::tempdir().unwrap();
        let runs = rundir::runs_dir(w.path());
        std::fs::create_dir(&runs).unwrap();
        std::fs::set_permissions(&runs, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = prepare_workdir(w.path()).unwrap_err();
        assert!(format!("{err:#}").contains("is not private"), "{err:#}");
        std::fs::set_permissions(&runs, std::fs::Permissions::from_mode(0o700)).unwrap();
        prepare_workdir(w.path()).unwrap();
    }
}
