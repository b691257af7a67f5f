//! Command-line definitions. Doc comments are the help text.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::timing::Format;

/// Live-migrate running Podman containers to another host with CRIU, over SSH.
///
/// Start `migrate receive` on the target host, then run `migrate send --to TARGET
/// CONTAINER...` on the source host. Each side prints one record per migration on
/// stdout (CSV with a header, or JSON lines); everything for humans goes to stderr.
#[derive(Debug, Parser)]
#[command(
    name = "migrate",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The arguments of this process, or the end of it: a mistake clap finds is refused like
/// any other, with one line on stderr (`migrate SUB: error: WHAT; see ...`) and
/// [`Exit::Refused`](crate::exit::Exit::Refused); `--help`, `--version` and a bare
/// `migrate` print as clap does.
pub fn parse_or_exit() -> Cli {
    use clap::error::ErrorKind;
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if !e.use_stderr()
                || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        Err(e) => {
            let sub = std::env::args().nth(1);
            let sub = sub.filter(|s| Cli::command().find_subcommand(s).is_some());
            eprintln!("{}", refusal_line(&e.render().to_string(), sub.as_deref()));
            std::process::exit(crate::exit::Exit::Refused.code().into())
        }
    }
}

/// clap's error text (the problem, an indented list or tip, the usage, a pointer to
/// --help) as one line that names the problem and where the help is.
fn refusal_line(clap_text: &str, sub: Option<&str>) -> String {
    let mut parts: Vec<String> = Vec::new();
    for para in clap_text.split("\n\n") {
        let para = para.trim_end();
        if para.is_empty() || para.starts_with("Usage:") || para.starts_with("For more information")
        {
            continue;
        }
        let mut line = String::new();
        for l in para.lines() {
            let t = l.trim();
            if line.is_empty() {
                line.push_str(t.strip_prefix("error: ").unwrap_or(t));
            } else if l.starts_with("  ") && !line.ends_with(':') && !t.starts_with('[') {
                line.push_str(", ");
                line.push_str(t);
            } else {
                line.push(' ');
                line.push_str(t);
            }
        }
        parts.push(line);
    }
    let cmd = match sub {
        Some(s) => format!("migrate {s}"),
        None => "migrate".to_string(),
    };
    format!("{cmd}: error: {}; see `{cmd} --help`", parts.join("; "))
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Wait for migrations on this (target) host and restore what arrives.
    ///
    /// Exit status: 0 it restored the migration; 1 the migration ended without a restore
    /// here (failed, aborted or dropped by the sender: the source keeps the service), or
    /// none came within --idle-timeout; 2 it could not start (work folder, port): nothing
    /// was touched; 130 stopped by a signal while no migration was in progress (one in
    /// progress is finished first). With --serve it exits only on a signal or
    /// --idle-timeout, with the status of the last migration when one was in progress.
    Receive(ReceiveArgs),
    /// Move running containers from this host to the target host.
    Send(SendArgs),
    /// Check both hosts for everything a migration needs, without touching anything.
    Check(CheckArgs),
    /// Read a service like a client would, every interval, and report every outage.
    Probe(crate::probe::ProbeArgs),
    /// Show and repair what a `send` that died left on this (source) host.
    ///
    /// Every `send` keeps a run journal in WORKDIR/source-runs/RUN_ID.json from before the
    /// freeze until it ends: its phase, its containers, their cgroups and the target. A
    /// sender that ends (migrated, rolled back or refused) removes it. A sender that is
    /// killed leaves it, and the watchdog it started (a `migrate watchdog` in a session of
    /// its own) repairs the run at once: it thaws the containers, lets a checkpoint podman
    /// is still writing finish, and restores them here from their kept checkpoints, or,
    /// after "OK" was sent, asks the target over SSH first.
    ///
    /// `recover` lists every journal left (one record per run on stdout, CSV or JSON; what
    /// it does on stderr) and repairs what is still wrong, by the rule of `send`: the
    /// service ends up running on exactly one host. Before "OK" the target never restores,
    /// so the containers come back here (thawed, or `podman container restore --keep`).
    /// After "OK" the target's state decides: all running there → the containers here are
    /// removed; otherwise the partial ones there are removed and the containers come back
    /// here. When the target cannot be reached, nothing is restored: the record says what
    /// runs where, and the exit status is 3. Runs whose sender or watchdog still runs are
    /// reported as `in_progress` and not touched. A settled run's journal is removed once
    /// reported.
    ///
    /// Exit status: 0 nothing needs a human; 1 a repair failed (see `detail`); 2 the
    /// journals cannot be read; 3 a target's state is unknown, nothing was restored.
    Recover(crate::recover::RecoverArgs),
    /// Print a shell completion script to stdout.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout.
    Man,
    /// Internal: the target end of an archive upload (started by `migrate send`).
    #[command(hide = true)]
    Sink(crate::sink::SinkArgs),
    /// Internal: guards a `send` in progress and repairs its run if the sender dies.
    #[command(hide = true)]
    Watchdog(crate::watchdog::WatchdogArgs),
}

/// How records are printed on stdout (`send` and `receive`).
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Record format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Csv)]
    pub format: Format,

    /// Leave out the CSV header line (for appending to a file).
    #[arg(long)]
    pub no_header: bool,
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

/// `send --tcp`: what happens to the containers' TCP connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TcpPolicy {
    /// Skip handshakes, restore established connections closed (clients reconnect).
    Close,
    /// Carry established connections over; skip handshakes.
    Established,
    /// Fail on any connection CRIU cannot take as it is (the behaviour of podman alone).
    Refuse,
}

impl TcpPolicy {
    /// The CRIU options of this policy, for both the dump and the restore.
    pub fn criu(self, file_locks: bool) -> crate::engine::podman::CriuOptions {
        crate::engine::podman::CriuOptions {
            file_locks,
            tcp_established: self == TcpPolicy::Established,
            tcp_close: self == TcpPolicy::Close,
            skip_in_flight: self != TcpPolicy::Refuse,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TcpPolicy::Close => "close",
            TcpPolicy::Established => "established",
            TcpPolicy::Refuse => "refuse",
        }
    }
}

/// Archive compression: `auto` picks from the measured link rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressChoice {
    Auto,
    None,
    Zstd,
    Gzip,
}

/// Where the target is and what must be true there: shared by `send` and `check`.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Target host, reached over SSH as root (or a user allowed to run podman).
    #[arg(long, value_name = "[USER@]HOST")]
    pub to: String,

    /// SSH port on the target.
    #[arg(long, value_name = "N")]
    pub ssh_port: Option<u16>,

    /// SSH private key to use, and only that one (default: ssh's own choice, e.g.
    /// ~/.ssh/id_ed25519).
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,

    /// TCP port of the receiver's control connection on the target.
    #[arg(long, value_name = "N", default_value_t = 12345)]
    pub control_port: u16,

    /// The receiver's work folder on the target (its --workdir). The run folder and the
    /// migration's secret are placed there over SSH before anything is said on the control
    /// port, and the receiver must prove it read them.
    #[arg(
        long,
        value_name = "DIR",
        default_value = crate::rundir::DEFAULT_WORKDIR,
        env = "MIGRATE_TARGET_WORKDIR"
    )]
    pub target_workdir: PathBuf,

    /// Data folder to sync to the same path on the target (repeatable): synced while the
    /// containers run, then again (only what changed) after the freeze.
    #[arg(long, value_name = "PATH")]
    pub data: Vec<PathBuf>,

    /// Start the receiver on the target over the SSH connection (one command instead of
    /// two terminals); uses the target's `migrate` of the same version.
    #[arg(long)]
    pub spawn_receiver: bool,

    /// Copy this very binary to the target (/var/lib/migrate/bin) and start it there as the
    /// receiver, so both ends are the same build. Implies --spawn-receiver.
    #[arg(long)]
    pub install_receiver: bool,

    /// When a container's image is missing on the target, copy it there first (podman
    /// save | podman load over SSH); without it, a missing image is refused.
    #[arg(long)]
    pub ship_image: bool,

    /// What happens to the containers' TCP connections. `close` (default): connections
    /// still in their handshake are left out (the client retries its SYN) and established
    /// ones are dumped and restored closed, so their clients see a reset and reconnect at
    /// once to wherever the service now is (right with published ports).
    /// `established`: established connections are carried over (only where the
    /// container's address moves with it); handshakes are left out. `refuse`: any
    /// connection that CRIU cannot take as it is fails the checkpoint, and `check`/`send`
    /// refuse established connections before the freeze. Set per migration: no CRIU
    /// configuration file is written.
    #[arg(long, value_enum, default_value_t = TcpPolicy::Close, value_name = "POLICY")]
    pub tcp: TcpPolicy,

    /// The same as `--tcp established`.
    #[arg(long, hide = true, conflicts_with = "tcp")]
    pub tcp_established: bool,
}

/// Options of `migrate check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// What goes to stdout. `text`: nothing; the findings are listed on stderr, and the
    /// exit status says whether a migration would start (0) or be refused (2). `json`:
    /// also one JSON document on one line (format_version, migrate_version, verdict
    /// `ready`/`refused`, counts, containers, source and target with their stacks, and
    /// findings with severity, host, a stable code, text and advice; see
    /// docs/user-guide.md).
    #[arg(long, value_enum, default_value_t = CheckFormat::Text)]
    pub format: CheckFormat,

    /// Containers that would move.
    #[arg(value_name = "CONTAINER")]
    pub containers: Vec<String>,
}

/// What `check` prints on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckFormat {
    Text,
    Json,
}

/// Options of `migrate send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// Local folder for checkpoint archives (kept until the target confirms).
    #[arg(
        long,
        value_name = "DIR",
        default_value = crate::rundir::DEFAULT_WORKDIR,
        env = "MIGRATE_WORKDIR"
    )]
    pub workdir: PathBuf,

    /// Check everything, measure the link, print the plan with an estimated downtime, and
    /// exit without freezing anything.
    #[arg(long)]
    pub dry_run: bool,

    /// Restore the containers one after the other in the order given, instead of all at
    /// once (containers that join another's namespaces always wait for it).
    #[arg(long)]
    pub sequential_restore: bool,

    /// Checkpoint archive compression.
    #[arg(long, value_enum, default_value_t = CompressChoice::Auto)]
    pub compress: CompressChoice,

    /// Keep the zero-filled memory pages CRIU dumped in the archives written on the
    /// target. By default the target leaves out the all-zero pages of a single-process
    /// container's private anonymous memory (they read as zeros after the restore
    /// anyway), so podman unpacks and CRIU restores less while the service is down.
    #[arg(long)]
    pub keep_zero_pages: bool,

    #[command(flatten)]
    pub output: OutputArgs,

    /// Run a shell command at a point of the migration: WHEN is `pre-freeze` (after the
    /// pre-sync, before the freeze; a failure stops the migration before anything is
    /// frozen), `post-up` (after the target confirmed UP; a failure is only reported) or
    /// `rollback` (after the containers run on this host again). The command sees
    /// MIGRATE_PHASE, MIGRATE_RUN_ID, MIGRATE_SOURCE, MIGRATE_TARGET, MIGRATE_CONTAINERS.
    /// Repeatable; hooks of one point run in order.
    #[arg(long = "hook", value_name = "WHEN=CMD")]
    pub hooks: Vec<String>,

    /// Like --hook, but the command runs on the target over the migration's SSH connection.
    #[arg(long = "target-hook", value_name = "WHEN=CMD")]
    pub target_hooks: Vec<String>,

    /// Seconds a hook may run before it is killed (and counts as failed).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub hook_timeout: u64,

    /// Free text copied into the record's label column.
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub label: String,

    /// Containers to move. They are restored in parallel (a container that joins another's
    /// namespaces waits for it); with --sequential-restore, in this order.
    #[arg(value_name = "CONTAINER", required = true)]
    pub containers: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn completions_and_man_page_cover_every_subcommand() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "migrate", &mut out);
            let text = String::from_utf8(out).unwrap();
            for sub in ["send", "receive", "check", "probe"] {
                assert!(text.contains(sub), "{shell:?} completion lacks {sub}");
            }
        }
        let mut man = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut man)
            .unwrap();
        let text = String::from_utf8(man).unwrap();
        assert!(text.contains(".TH migrate"), "{text}");
        assert!(text.contains("receive"));
    }

    /// The one line a mistake clap finds becomes, from clap's own text for it.
    fn refusal(args: &[&str]) -> String {
        let e = Cli::try_parse_from(args).unwrap_err();
        assert!(e.use_stderr(), "{args:?}");
        refusal_line(&e.render().to_string(), Some(args[1]))
    }

    #[test]
    fn clap_mistakes_become_one_line_naming_the_flag_and_the_help() {
        let cases: [(&[&str], &[&str]); 4] = [
            (
                &["migrate", "send", "db"],
                &["--to <[USER@]HOST>", "not provided"],
            ),
            (
                &["migrate", "send", "--to", "b", "--tcp", "bogus", "db"],
                &[
                    "'bogus'",
                    "--tcp",
                    "possible values: close, established, refuse",
                ],
            ),
            (
                &[
                    "migrate",
                    "send",
                    "--to",
                    "b",
                    "--tcp",
                    "close",
                    "--tcp-established",
                    "db",
                ],
                &["--tcp-established", "--tcp"],
            ),
            (
                &["migrate", "check", "--to", "b", "--bogus"],
                &["'--bogus'"],
            ),
        ];
        for (args, wants) in cases {
            let line = refusal(args);
            let cmd = format!("migrate {}", args[1]);
            assert!(line.starts_with(&format!("{cmd}: error: ")), "{line}");
            assert!(line.ends_with(&format!("; see `{cmd} --help`")), "{line}");
            assert!(!line.contains('\n') && !line.contains("Usage"), "{line}");
            for want in wants {
                assert!(line.contains(want), "{args:?} lacks {want:?}: {line}");
            }
        }
    }

    #[test]
    fn defaults_match_the_contract() {
        let cli = Cli::try_parse_from(["migrate", "send", "--to", "root@b", "db", "web"]).unwrap();
        let Command::Send(s) = cli.command else {
            panic!()
        };
        assert_eq!(s.target.control_port, 12345);
        assert_eq!(s.workdir, PathBuf::from("/var/lib/migrate"));
        assert_eq!(s.output.format, Format::Csv);
        assert_eq!(s.containers, vec!["db", "web"]);
        let cli = Cli::try_parse_from(["migrate", "receive"]).unwrap();
        let Command::Receive(r) = cli.command else {
            panic!()
        };
        assert_eq!(r.listen.to_string(), "0.0.0.0:12345");
        assert!(!r.serve);
    }
}
