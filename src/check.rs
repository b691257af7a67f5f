//! Health checks of the migration stack on a host (podman, its OCI runtime, CRIU), shared
//! by `send`'s preflight for both ends.

use std::time::Duration;

/// Prints `key=value` lines about the stack; run locally or over SSH.
pub const STACK_SCRIPT: &str = r#"export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
if command -v podman >/dev/null 2>&1; then
  echo "podman=$(podman version --format '{{.Client.Version}}' 2>/dev/null)"
  echo "runtime=$(podman info --format '{{.Host.OCIRuntime.Name}}' 2>/dev/null)"
  if command -v zstd >/dev/null 2>&1; then echo zstd=yes; else echo zstd=no; fi
  if command -v crun >/dev/null 2>&1 && crun --version 2>/dev/null | grep -q '+CRIU'; then echo crun_criu=yes; else echo crun_criu=no; fi
else
  echo podman=missing
fi
if command -v criu >/dev/null 2>&1; then
  echo "criu=$(criu --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n 1)"
  if out=$(criu check 2>&1); then echo criu_check=ok; else echo "criu_check=$(printf '%s' "$out" | tail -n 1)"; fi
  # CRIU keeps its kernel probe in /run/criu.kdat, and only on a tmpfs.
  if [ -s /run/criu.kdat ]; then echo criu_kdat=cached
  elif [ "$(stat -f -c %T /run 2>/dev/null)" = tmpfs ]; then echo criu_kdat=tmpfs
  else echo criu_kdat=uncached; fi
  # A host-wide CRIU file for runc, read last: it overrides migrate's per-command options.
  if [ -e /etc/criu/runc.conf ]; then echo runc_conf=present; fi
  for f in mem_dirty_track uffd-noncoop; do
    if criu check --feature "$f" >/dev/null 2>&1; then echo "feature_$f=yes"; else echo "feature_$f=no"; fi
  done
else
  echo criu=missing
fi
"#;

/// What [`STACK_SCRIPT`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    pub podman: Option<String>,
    pub runtime: Option<String>,
    pub criu: Option<String>,
    pub criu_check: Option<String>,
    /// crun reports `+CRIU` (built with checkpoint support).
    pub crun_criu: bool,
    /// The `zstd` command is there (archives can be decompressed as they arrive).
    pub zstd: bool,
    /// `uncached` when CRIU cannot keep its kernel probe (`/run` is not a tmpfs).
    pub criu_kdat: Option<String>,
    /// `/etc/criu/runc.conf` exists: CRIU reads it last, over migrate's options.
    pub runc_conf: bool,
    /// Optional CRIU features (`criu check --feature X`): "yes" or "no".
    pub features: std::collections::BTreeMap<String, String>,
}

impl Facts {
    pub fn parse(text: &str) -> Facts {
        let mut f = Facts::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let v = Some(v.trim().to_string()).filter(|v| !v.is_empty());
            match k {
                "podman" => f.podman = v,
                "runtime" => f.runtime = v,
                "criu" => f.criu = v,
                "criu_check" => f.criu_check = v,
                "criu_kdat" => f.criu_kdat = v,
                "crun_criu" => f.crun_criu = v.as_deref() == Some("yes"),
                "zstd" => f.zstd = v.as_deref() == Some("yes"),
                "runc_conf" => f.runc_conf = v.as_deref() == Some("present"),
                _ => {
                    if let (Some(feature), Some(v)) = (k.strip_prefix("feature_"), v) {
                        f.features.insert(feature.to_string(), v);
                    }
                }
            }
        }
        f
    }

    /// The first thing that stops a migration, with what to do about it.
    pub fn problem(&self) -> Option<String> {
        match self.podman.as_deref() {
            None | Some("missing") => {
                return Some("podman is not installed or does not run; install podman (see docs/user-guide.md)".into());
            }
            _ => {}
        }
        match self.criu.as_deref() {
            None | Some("missing") => {
                return Some(
                    "CRIU is not installed; install CRIU 4.2 or newer (scripts/setup builds it)"
                        .into(),
                );
            }
            Some(v) if !version_at_least(v, 4, 2) => {
                return Some(format!(
                    "CRIU {v} is too old for this kernel; install CRIU 4.2 or newer"
                ));
            }
            _ => {}
        }
        if self.criu_check.as_deref() != Some("ok") {
            return Some(format!(
                "`criu check` fails ({}); run it there as root to see why",
                self.criu_check.as_deref().unwrap_or("no output")
            ));
        }
        if self.runtime.as_deref() == Some("crun") && !self.crun_criu {
            return Some(
                "podman uses crun, which is built without CRIU here; set runtime = \"runc\" in /etc/containers/containers.conf".into(),
            );
        }
        None
    }
}

/// True when a dotted version is at least major.minor.
pub fn version_at_least(v: &str, major: u64, minor: u64) -> bool {
    let mut parts = v.split('.').map(|p| p.trim().parse::<u64>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

/// Runs the stack checks on this host.
pub async fn stack_local() -> Facts {
    let out = crate::exec::run(
        "sh",
        &["-c".to_string(), STACK_SCRIPT.to_string()],
        Duration::from_secs(60),
    )
    .await;
    match out {
        Ok(o) => Facts::parse(&o.stdout),
        Err(e) => Facts {
            podman: Some(format!("check failed: {e}")),
            ..Default::default()
        },
    }
}

/// `migrate check`: every finding on both hosts, one per line; exit 0 when a migration
/// would start, 2 when not.
pub async fn run(args: crate::cli::CheckArgs) -> u8 {
    use crate::preflight::{self, Level, Want};
    use crate::progress::say;
    use std::io::{IsTerminal, Write};

    let plan = match crate::plan::TargetPlan::resolve(&args.target, &args.containers) {
        Ok(p) => p,
        Err(e) => {
            say!("migrate check: error: {e}");
            return 2;
        }
    };
    let ui = crate::progress::Ui::new("check");
    let run_id = format!("check-{}", crate::secret::random_hex(4));
    let want = Want::new(&plan, &run_id, "", false);
    let mut report = preflight::run(&want, &ui).await;
    if let Some(ssh) = report.ssh.take() {
        match clock_over_ssh(&ssh).await {
            Ok((offset, err)) => {
                let level = if offset.abs() > 500_000 {
                    Level::Warn
                } else {
                    Level::Ok
                };
                report.findings.push(preflight::Finding {
                    level,
                    side: "target",
                    text: format!(
                        "clock offset target−source {:+.3}s (±{:.3}s); migrate measures and corrects it, but keep clocks in sync (NTP) for readable logs",
                        offset as f64 / 1e6,
                        err as f64 / 1e6
                    ),
                    fix: None,
                });
            }
            Err(e) => report.findings.push(preflight::Finding {
                level: Level::Warn,
                side: "target",
                text: format!("cannot read the target's clock: {e}"),
                fix: None,
            }),
        }
        ssh.close().await;
    }
    ui.finish();
    let fancy = std::io::stdout().is_terminal();
    // A reader gone (`check | head`) ends the listing, not the command.
    let mut out = std::io::stdout().lock();
    let mut failed = false;
    for f in &report.findings {
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
        failed |= f.level == Level::Fail;
        let _ = writeln!(out, "{mark} {}: {}", f.side, f.text);
        if let Some(fix) = &f.fix {
            let _ = writeln!(out, "    → {fix}");
        }
    }
    if failed {
        let _ = writeln!(
            out,
            "a migration would be refused: fix the lines marked {}",
            if fancy { "✖" } else { "FAIL" }
        );
        2
    } else {
        let _ = writeln!(out, "a migration would start");
        0
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_stack_has_no_problem() {
        let f = Facts::parse("podman=4.3.1\nruntime=runc\ncriu=4.2\ncriu_check=ok\n");
        assert_eq!(f.problem(), None);
    }

    #[test]
    fn each_missing_piece_is_named() {
        let p = Facts::parse("podman=missing\n").problem().unwrap();
        assert!(p.contains("podman"), "{p}");
        let p = Facts::parse("podman=4.3.1\nruntime=runc\ncriu=missing\n")
            .problem()
            .unwrap();
        assert!(p.contains("CRIU is not installed"), "{p}");
        let p = Facts::parse("podman=4.3.1\nruntime=runc\ncriu=3.17.1\ncriu_check=ok\n")
            .problem()
            .unwrap();
        assert!(p.contains("too old"), "{p}");
        let p = Facts::parse(
            "podman=4.3.1\nruntime=runc\ncriu=4.2\ncriu_check=Error (criu/cr-check.c:1): boom\n",
        )
        .problem()
        .unwrap();
        assert!(p.contains("boom"), "{p}");
        let p = Facts::parse("podman=4.3.1\nruntime=crun\ncriu=4.2\ncriu_check=ok\n")
            .problem()
            .unwrap();
        assert!(p.contains("runc"), "{p}");
        // A crun built with CRIU is fine.
        let f =
            Facts::parse("podman=4.3.1\nruntime=crun\ncrun_criu=yes\ncriu=4.2\ncriu_check=ok\n");
        assert_eq!(f.problem(), None);
    }

    #[test]
    fn versions() {
        assert!(version_at_least("4.2", 4, 2));
        assert!(version_at_least("4.2.1", 4, 2));
        assert!(version_at_least("5.0", 4, 2));
        assert!(!version_at_least("4.1.1", 4, 2));
        assert!(!version_at_least("3.17", 4, 2));
    }
}
