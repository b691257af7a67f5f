//! Command-line definitions. Doc comments are the help text.

use clap::{CommandFactory, Parser, Subcommand};

use crate::check::CheckArgs;
use crate::plan::SendArgs;
use crate::receive::ReceiveArgs;

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
    /// Empty this host onto several targets: every running container (or those named),
    /// unit by unit, each placed where there is room and moved with one `send`.
    #[command(after_help = crate::drain::PLACEMENT_RULE)]
    Drain(crate::drain::DrainArgs),
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
    /// Exit status: 0 nothing needs a human; 2 the journals cannot be read; 3 something
    /// does: a repair failed, or a target's state is unknown and nothing was restored
    /// (each record's `result` and `detail` say which).
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
    /// Internal: one tunnel of a lazy migration's page relay (started by `migrate send`
    /// over SSH).
    #[command(hide = true)]
    RelayAttach(crate::transport::relay::AttachArgs),
    /// Internal: guards a `send` in progress and repairs its run if the sender dies.
    #[command(hide = true)]
    Watchdog(crate::watchdog::WatchdogArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timing::Format;
    use clap::CommandFactory;
    use std::path::PathBuf;

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

    #[test]
    fn drain_help_states_the_placement_rule_and_the_exit() {
        let mut cmd = Cli::command();
        let drain = cmd.find_subcommand_mut("drain").unwrap();
        let help = drain.render_long_help().to_string();
        for want in [
            "largest first",
            "the most memory left",
            "--ship-image",
            "fits nowhere is refused",
            "moved units are no longer here",
            "Exit status: 0",
        ] {
            assert!(help.contains(want), "{want:?} missing:\n{help}");
        }
        let cli =
            Cli::try_parse_from(["migrate", "drain", "--to", "b,c", "--to", "d", "pp"]).unwrap();
        let Command::Drain(d) = cli.command else {
            panic!()
        };
        assert_eq!(d.to, vec!["b", "c", "d"]);
        assert_eq!((d.parallel, d.plan, d.keep_going), (1, false, false));
        assert_eq!(d.names, vec!["pp"]);
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
