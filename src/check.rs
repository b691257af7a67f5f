//! `migrate check`: runs the preflight checks of `send` on both hosts, touching nothing,
//! and reports every finding: a listing for humans on stderr and, with `--format json`,
//! one JSON document on stdout (its fields are documented in docs/user-guide.md).

use std::time::Duration;

use serde::Serialize;

use crate::engine::stack::{Facts, Finding, Level, Side};
use crate::exit::Exit;
use crate::plan::TargetArgs;
use crate::preflight::{self, Report, Want};
use crate::progress::say;
use clap::{Args, ValueEnum};

/// The version of the JSON document's layout; a field is never renamed or reused
/// without a new one.
pub const JSON_VERSION: u32 = 1;

/// A clock offset beyond this (µs) is a warning.
const CLOCK_WARN_US: i64 = 500_000;

/// `migrate check`: every finding on both hosts; exit 0 when a migration would start,
/// 2 when not.
pub async fn run(args: CheckArgs) -> u8 {
    let plan = match crate::plan::TargetPlan::resolve(&args.target, &args.containers) {
        Ok(p) => p,
        Err(e) => {
            say!("migrate check: error: {e}");
            return Exit::Refused.code();
        }
    };
    let ui = crate::progress::Ui::new("check");
    let run_id = format!("check-{}", crate::secret::random_hex(4));
    let want = Want::new(&plan, &run_id, "", false);
    let mut report = preflight::run(&want, &ui).await;
    let mut clock = None;
    if let Some(ssh) = report.ssh.take() {
        let (finding, offset) = clock_finding(clock_over_ssh(&ssh).await);
        report.findings.push(finding);
        clock = offset;
        ssh.close().await;
    }
    ui.finish();
    let record = CheckRecord::new(&plan, &report, clock);
    print_listing(&report.findings);
    if args.format == CheckFormat::Json {
        // A reader gone (`check --format json | head -c 0`) ends the output, not the command.
        let mut line = serde_json::to_string(&record).expect("the record serialises");
        line.push('\n');
        let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), line.as_bytes());
    }
    if record.verdict == Verdict::Ready {
        Exit::Ok.code()
    } else {
        Exit::Refused.code()
    }
}

/// The listing for humans, on stderr: one finding a line, its advice under it.
fn print_listing(findings: &[Finding]) {
    use std::io::IsTerminal;
    let fancy = std::io::stderr().is_terminal();
    for f in findings {
        let mark = match (f.level, fancy) {
            (Level::Ok, true) => "✔",
            (Level::Info, true) => "ℹ",
            (Level::Warn, true) => "⚠",
            (Level::Fail, true) => "✖",
            (Level::Ok, false) => "ok  ",
            (Level::Info, false) => "info",
            (Level::Warn, false) => "warn",
            (Level::Fail, false) => "FAIL",
        };
        say!("{mark} {}: {}", f.side, f.text);
        if let Some(fix) = &f.fix {
            say!("    → {fix}");
        }
    }
    if findings.iter().any(|f| f.level == Level::Fail) {
        say!(
            "a migration would be refused: fix the lines marked {}",
            if fancy { "✖" } else { "FAIL" }
        );
    } else {
        say!("a migration would start");
    }
}

/// The clock finding, and the offset when it could be read.
fn clock_finding(measured: anyhow::Result<(i64, i64)>) -> (Finding, Option<Clock>) {
    match measured {
        Ok((offset, err)) => {
            let level = if offset.abs() > CLOCK_WARN_US {
                Level::Warn
            } else {
                Level::Ok
            };
            let clock = Clock {
                offset_s: offset as f64 / 1e6,
                uncertainty_s: err as f64 / 1e6,
            };
            let text = format!(
                "clock offset target−source {:+.3}s (±{:.3}s); migrate measures and corrects it, but keep clocks in sync (NTP) for readable logs",
                clock.offset_s, clock.uncertainty_s
            );
            (
                Finding::new(level, Side::Target, "clock_offset", text),
                Some(clock),
            )
        }
        Err(e) => (
            Finding::new(
                Level::Warn,
                Side::Target,
                "clock_unreadable",
                format!("cannot read the target's clock: {e}"),
            ),
            None,
        ),
    }
}

/// Target clock minus ours, from `date` over SSH bracketed by our clock; returns the
/// offset and its uncertainty (half the round trip), in µs.
async fn clock_over_ssh(ssh: &crate::transport::ssh::Ssh) -> anyhow::Result<(i64, i64)> {
    let mut best: Option<(i64, i64)> = None;
    for _ in 0..3 {
        let t0 = crate::timing::now_us();
        let out = ssh
            .run("date", &["+%s%6N".to_string()], Duration::from_secs(10))
            .await?;
        let t3 = crate::timing::now_us();
        let remote: i64 = out.stdout.trim().parse()?;
        let sample = (remote - (t0 + t3) / 2, (t3 - t0) / 2);
        if best.is_none_or(|b| sample.1 < b.1) {
            best = Some(sample);
        }
    }
    Ok(best.expect("three samples"))
}

/// What `check --format json` prints: one document, on one line.
#[derive(Debug, Serialize)]
pub struct CheckRecord<'a> {
    pub format_version: u32,
    pub migrate_version: &'static str,
    /// `ready` (exit 0): a migration would start; `refused` (exit 2): a finding failed.
    pub verdict: Verdict,
    pub counts: Counts,
    pub containers: &'a [String],
    pub source: SourceHost<'a>,
    pub target: TargetHost<'a>,
    pub findings: Vec<FindingRecord<'a>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ready,
    Refused,
}

/// Findings per severity.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub ok: usize,
    pub info: usize,
    pub warn: usize,
    pub fail: usize,
}

#[derive(Debug, Serialize)]
pub struct SourceHost<'a> {
    /// This host's name.
    pub hostname: String,
    pub stack: Option<&'a Facts>,
}

#[derive(Debug, Serialize)]
pub struct TargetHost<'a> {
    /// `[USER@]HOST` as SSH reaches it.
    pub ssh: String,
    pub control_port: u16,
    /// The target's name, as its receiver says (`null` without an answering receiver).
    pub hostname: Option<&'a str>,
    /// Its stack (`null` when SSH failed before it was probed).
    pub stack: Option<&'a Facts>,
    /// The migrate version of the receiver that answered.
    pub receiver_version: Option<&'a str>,
    pub clock: Option<Clock>,
}

/// Target clock minus the source's, in seconds, and the measure's uncertainty.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Clock {
    pub offset_s: f64,
    pub uncertainty_s: f64,
}

/// One finding. `code` is stable; `text` and `advice` are for humans.
#[derive(Debug, Serialize)]
pub struct FindingRecord<'a> {
    pub severity: Level,
    pub host: Side,
    pub code: &'static str,
    pub text: &'a str,
    pub advice: Option<&'a str>,
}

impl<'a> CheckRecord<'a> {
    pub fn new(
        plan: &'a crate::plan::TargetPlan,
        report: &'a Report,
        clock: Option<Clock>,
    ) -> CheckRecord<'a> {
        let mut counts = Counts::default();
        for f in &report.findings {
            *match f.level {
                Level::Ok => &mut counts.ok,
                Level::Info => &mut counts.info,
                Level::Warn => &mut counts.warn,
                Level::Fail => &mut counts.fail,
            } += 1;
        }
        let welcome = report.receiver.as_ref();
        CheckRecord {
            format_version: JSON_VERSION,
            migrate_version: env!("CARGO_PKG_VERSION"),
            verdict: if counts.fail == 0 {
                Verdict::Ready
            } else {
                Verdict::Refused
            },
            counts,
            containers: &plan.containers,
            source: SourceHost {
                hostname: crate::host::hostname(),
                stack: report.source_stack.as_ref(),
            },
            target: TargetHost {
                ssh: plan.dest.ssh_target(),
                control_port: plan.control_port,
                hostname: welcome.map(|w| w.hostname.as_str()),
                stack: report.target_stack.as_ref(),
                receiver_version: welcome.map(|w| w.receiver_version.as_str()),
                clock,
            },
            findings: report
                .findings
                .iter()
                .map(|f| FindingRecord {
                    severity: f.level,
                    host: f.side,
                    code: f.code,
                    text: &f.text,
                    advice: f.fix.as_deref(),
                })
                .collect(),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> crate::plan::TargetPlan {
        let args = crate::plan::TargetArgs {
            to: "root@10.0.0.2".into(),
            ssh_port: None,
            identity: None,
            control_port: 12345,
            target_workdir: crate::rundir::DEFAULT_WORKDIR.into(),
            data: vec![],
            spawn_receiver: false,
            install_receiver: false,
            ship_image: false,
            tcp: crate::plan::TcpPolicy::Close,
            tcp_established: false,
            ignore_cpu: false,
            ignore_systemd_unit: false,
        };
        crate::plan::TargetPlan::resolve(&args, &["db".into(), "web".into()]).unwrap()
    }

    #[test]
    fn the_json_document_carries_hosts_stacks_findings_and_verdict() {
        let plan = plan();
        let stack = Facts::parse("podman=4.3.1\nruntime=runc\ncriu=4.2\ncriu_check=ok\n");
        let mut report = Report {
            source_stack: Some(stack.clone()),
            ..Default::default()
        };
        report.findings.push(Finding::new(
            Level::Ok,
            Side::Source,
            "container_running",
            "container db runs",
        ));
        report.findings.push(
            Finding::new(
                Level::Fail,
                Side::Target,
                "criu_missing",
                "CRIU is not installed",
            )
            .fix("install CRIU 4.2 or newer"),
        );
        let clock = Some(Clock {
            offset_s: 0.25,
            uncertainty_s: 0.001,
        });
        let text = serde_json::to_string(&CheckRecord::new(&plan, &report, clock)).unwrap();
        assert!(!text.contains('\n'), "one line: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["format_version"], 1);
        assert_eq!(v["verdict"], "refused");
        assert_eq!(
            v["counts"],
            serde_json::json!({"ok": 1, "info": 0, "warn": 0, "fail": 1})
        );
        assert_eq!(v["containers"], serde_json::json!(["db", "web"]));
        assert_eq!(v["source"]["stack"]["criu"], "4.2");
        assert_eq!(v["source"]["stack"]["runtime"], "runc");
        assert_eq!(v["target"]["ssh"], "root@10.0.0.2");
        assert_eq!(v["target"]["control_port"], 12345);
        assert!(v["target"]["stack"].is_null());
        assert!(v["target"]["hostname"].is_null());
        assert_eq!(v["target"]["clock"]["offset_s"], 0.25);
        assert_eq!(
            v["findings"][1],
            serde_json::json!({
                "severity": "fail",
                "host": "target",
                "code": "criu_missing",
                "text": "CRIU is not installed",
                "advice": "install CRIU 4.2 or newer",
            })
        );
        assert!(v["findings"][0]["advice"].is_null());
        // Without a failure the verdict is ready.
        report.findings.pop();
        let v = serde_json::to_value(CheckRecord::new(&plan, &report, None)).unwrap();
        assert_eq!(v["verdict"], "ready");
        assert!(v["target"]["clock"].is_null());
    }

    #[test]
    fn a_far_clock_is_a_warning_and_an_unreadable_one_too() {
        let (f, c) = clock_finding(Ok((200_000, 1_000)));
        assert_eq!((f.level, f.code), (Level::Ok, "clock_offset"));
        assert_eq!(c.unwrap().offset_s, 0.2);
        assert!(f.text.contains("+0.200s (±0.001s)"), "{}", f.text);
        let (f, _) = clock_finding(Ok((-900_000, 1_000)));
        assert_eq!(f.level, Level::Warn);
        let (f, c) = clock_finding(Err(anyhow::anyhow!("date: not found")));
        assert_eq!((f.level, f.code), (Level::Warn, "clock_unreadable"));
        assert!(c.is_none());
    }
}
