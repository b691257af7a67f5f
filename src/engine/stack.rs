//! What a host's migration stack is (podman, its OCI runtime, CRIU) and what the checks
//! found, as findings. `check` reports them, `preflight` gathers them for `send`; both
//! take the probe and the finding types from here.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// Prints `key=value` lines about the stack; run locally or over SSH.
pub const STACK_SCRIPT: &str = r#"export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
if command -v podman >/dev/null 2>&1; then
  echo "podman=$(podman version --format '{{.Client.Version}}' 2>/dev/null)"
  echo "runtime=$(podman info --format '{{.Host.OCIRuntime.Name}}' 2>/dev/null)"
  if command -v zstd >/dev/null 2>&1; then echo zstd=yes; else echo zstd=no; fi
  if command -v crun >/dev/null 2>&1 && crun --version 2>/dev/null | grep -q '+CRIU'; then echo crun_criu=yes; else echo crun_criu=no; fi
  # The runtimes' own versions (first line: "runc version 1.1.15+ds1", "crun version 1.21").
  for rt in runc crun; do
    if command -v "$rt" >/dev/null 2>&1; then echo "${rt}_version=$("$rt" --version 2>/dev/null | sed -n "1s/^$rt version *//p")"; fi
  done
  # podman's own CRIU flags, as its --help lists them (podman 5.7 added --tcp-close).
  for sub in checkpoint restore; do
    if podman container "$sub" --help 2>/dev/null | grep -q -- '--tcp-close'; then echo "${sub}_tcp_close=yes"; else echo "${sub}_tcp_close=no"; fi
  done
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
  # Lazy pages: CRIU's page server grows its pipes to ~3.3 MB, beyond fs.pipe-max-size
  # unless it holds CAP_SYS_RESOURCE (bit 24 of the capability set).
  echo "pipe_max_size=$(cat /proc/sys/fs/pipe-max-size 2>/dev/null)"
  echo "cap_eff=$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)"
  for f in mem_dirty_track uffd-noncoop; do
    if criu check --feature "$f" >/dev/null 2>&1; then echo "feature_$f=yes"; else echo "feature_$f=no"; fi
  done
else
  echo criu=missing
fi
"#;

/// Prints `cpu_arch=`, `cpu_model=` and `cpu_flags=` (the first `flags` line, or
/// `Features` on arm64). Part of the probe on both hosts;
/// `engine::cpu` compares them.
pub const CPU_SCRIPT: &str = r#"echo "cpu_arch=$(uname -m)"
echo "cpu_model=$(sed -n 's/^\(model name\|Model\|cpu model\)[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo 2>/dev/null | head -n 1)"
echo "cpu_flags=$(sed -n 's/^\(flags\|Features\)[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo 2>/dev/null | head -n 1)"
"#;

/// What [`probe_script`] found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Facts {
    pub podman: Option<String>,
    pub runtime: Option<String>,
    pub criu: Option<String>,
    pub criu_check: Option<String>,
    /// crun reports `+CRIU` (built with checkpoint support).
    pub crun_criu: bool,
    /// `runc --version` (absent: no runc on PATH).
    pub runc_version: Option<String>,
    /// `crun --version` (absent: no crun on PATH).
    pub crun_version: Option<String>,
    /// podman's `container checkpoint` has its own `--tcp-close` (podman 5.7 and later).
    pub checkpoint_tcp_close: bool,
    /// podman's `container restore` has its own `--tcp-close`.
    pub restore_tcp_close: bool,
    /// The `zstd` command is there (archives can be decompressed as they arrive).
    pub zstd: bool,
    /// `uncached` when CRIU cannot keep its kernel probe (`/run` is not a tmpfs).
    pub criu_kdat: Option<String>,
    /// `/etc/criu/runc.conf` exists: CRIU reads it last, over migrate's options.
    pub runc_conf: bool,
    /// Optional CRIU features (`criu check --feature X`): "yes" or "no".
    pub features: BTreeMap<String, String>,
    /// `uname -m`.
    pub cpu_arch: Option<String>,
    /// The CPU's model name, as `/proc/cpuinfo` gives it.
    pub cpu_model: Option<String>,
    /// Its flags (`/proc/cpuinfo`), compared by `engine::cpu`; left out of the JSON.
    #[serde(skip)]
    pub cpu_flags: Option<String>,
    /// `fs.pipe-max-size` in bytes.
    pub pipe_max_size: Option<u64>,
    /// The probe's effective capabilities hold CAP_SYS_RESOURCE (CRIU runs with the same).
    pub cap_sys_resource: Option<bool>,
}

/// The pipe size CRIU's page server asks for (819 pages); without CAP_SYS_RESOURCE,
/// `fs.pipe-max-size` must allow it, rounded up to a power of two.
pub const LAZY_PIPE_BYTES: u64 = 4 << 20;
const CAP_SYS_RESOURCE: u32 = 24;

/// Something that stops a migration on one host's stack, with what to do about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub code: &'static str,
    pub text: String,
    pub fix: String,
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
                "runc_version" => f.runc_version = v,
                "crun_version" => f.crun_version = v,
                "checkpoint_tcp_close" => f.checkpoint_tcp_close = v.as_deref() == Some("yes"),
                "restore_tcp_close" => f.restore_tcp_close = v.as_deref() == Some("yes"),
                "zstd" => f.zstd = v.as_deref() == Some("yes"),
                "runc_conf" => f.runc_conf = v.as_deref() == Some("present"),
                "cpu_arch" => f.cpu_arch = v,
                "cpu_model" => f.cpu_model = v,
                "cpu_flags" => f.cpu_flags = v,
                "pipe_max_size" => f.pipe_max_size = v.and_then(|v| v.parse().ok()),
                "cap_eff" => {
                    f.cap_sys_resource = v
                        .and_then(|v| u64::from_str_radix(&v, 16).ok())
                        .map(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
                }
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
    pub fn problem(&self) -> Option<Problem> {
        let problem = |code, text: String, fix: &str| {
            Some(Problem {
                code,
                text,
                fix: fix.to_string(),
            })
        };
        if let None | Some("missing") = self.podman.as_deref() {
            return problem(
                "podman_missing",
                "podman is not installed or does not run".into(),
                "install podman (see docs/user-guide.md)",
            );
        }
        match self.criu.as_deref() {
            None | Some("missing") => {
                return problem(
                    "criu_missing",
                    "CRIU is not installed".into(),
                    "install CRIU 4.2 or newer (scripts/setup builds it)",
                );
            }
            Some(v) if !version_at_least(v, 4, 2) => {
                return problem(
                    "criu_too_old",
                    format!("CRIU {v} is too old for this kernel"),
                    "install CRIU 4.2 or newer",
                );
            }
            _ => {}
        }
        if self.criu_check.as_deref() != Some("ok") {
            return problem(
                "criu_check_fails",
                format!(
                    "`criu check` fails ({})",
                    self.criu_check.as_deref().unwrap_or("no output")
                ),
                "run it there as root to see why",
            );
        }
        if self.runtime.as_deref() == Some("crun") && !self.crun_criu {
            return problem(
                "crun_without_criu",
                "podman uses crun, which is built without CRIU here".into(),
                "set runtime = \"runc\" in /etc/containers/containers.conf",
            );
        }
        None
    }
}

impl Facts {
    /// The version of OCI runtime `name` here (`runc`, `crun`), when it is on PATH.
    pub fn runtime_version(&self, name: &str) -> Option<&str> {
        match name {
            "runc" => self.runc_version.as_deref(),
            "crun" => self.crun_version.as_deref(),
            _ => None,
        }
    }

    /// Whether runtime `name` is here and can checkpoint and restore (runc always drives
    /// CRIU; crun only when built with it, `+CRIU`). Unknown runtimes: no.
    pub fn runtime_has_criu(&self, name: &str) -> bool {
        match name {
            "runc" => self.runc_version.is_some(),
            "crun" => self.crun_version.is_some() && self.crun_criu,
            _ => false,
        }
    }

    /// "runc 1.1.15" (or just the name when its version is unknown).
    pub fn runtime_label(&self, name: &str) -> String {
        match self.runtime_version(name) {
            Some(v) => format!("{name} {v}"),
            None => name.to_string(),
        }
    }

    /// podman's major.minor ("5.4"), when known.
    pub fn podman_minor(&self) -> Option<(u64, u64)> {
        let v = self.podman.as_deref().filter(|v| *v != "missing")?;
        let mut parts = v.split('.').map(|p| p.trim().parse::<u64>().ok());
        Some((parts.next()??, parts.next()??))
    }
}

/// True when a dotted version is at least major.minor.
pub fn version_at_least(v: &str, major: u64, minor: u64) -> bool {
    let mut parts = v.split('.').map(|p| p.trim().parse::<u64>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

/// The whole probe of a host: its stack and its CPU.
pub fn probe_script() -> String {
    format!("{STACK_SCRIPT}{}", CPU_SCRIPT)
}

/// Runs the stack checks on this host.
pub async fn stack_local() -> Facts {
    let out = crate::exec::run(
        "sh",
        &["-c".to_string(), probe_script()],
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

/// How bad a finding is; a `Fail` stops a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Info,
    Warn,
    Fail,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Fail => "fail",
        }
    }
}

/// The host a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Source,
    Target,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

/// One result of a check: what was found, and for a failure what to do. `code` is a
/// stable name for scripts (`check --format json`); `text` and `fix` are for humans and
/// may be reworded.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub level: Level,
    pub side: Side,
    pub code: &'static str,
    pub text: String,
    pub fix: Option<String>,
}

impl Finding {
    pub fn new(level: Level, side: Side, code: &'static str, text: impl Into<String>) -> Finding {
        Finding {
            level,
            side,
            code,
            text: text.into(),
            fix: None,
        }
    }
    pub fn fix(mut self, fix: impl Into<String>) -> Finding {
        self.fix = Some(fix.into());
        self
    }
    /// "target: CRIU is not installed; install CRIU 4.2 or newer …"
    pub fn one_line(&self) -> String {
        match &self.fix {
            Some(f) => format!("{}: {}; {f}", self.side, self.text),
            None => format!("{}: {}", self.side, self.text),
        }
    }
}

/// Findings about podman, its runtime and CRIU on one side.
pub fn stack_findings(f: &Facts, side: Side, out: &mut Vec<Finding>) {
    match f.problem() {
        Some(p) => out.push(Finding::new(Level::Fail, side, p.code, p.text).fix(p.fix)),
        None => out.push(Finding::new(
            Level::Ok,
            side,
            "stack_ready",
            format!(
                "podman {} with {}, CRIU {}: `criu check` passes",
                f.podman.as_deref().unwrap_or("?"),
                f.runtime_label(f.runtime.as_deref().unwrap_or("?")),
                f.criu.as_deref().unwrap_or("?")
            ),
        )),
    }
    if f.runc_conf {
        out.push(
            Finding::new(
                Level::Warn,
                side,
                "criu_runc_conf",
                "/etc/criu/runc.conf exists: CRIU reads it last, so its options override what --tcp asks for on every checkpoint and restore here",
            )
            .fix("remove it (migrate gives CRIU its options per command), or make sure it sets nothing --tcp sets"),
        );
    }
    if f.criu_kdat.as_deref() == Some("uncached") {
        out.push(
            Finding::new(
                Level::Warn,
                side,
                "criu_kdat_uncached",
                "CRIU cannot cache its kernel probe here (/run is not a tmpfs): every dump and restore probes the kernel again, ~50 ms more downtime each",
            )
            .fix("mount a tmpfs on /run, as systemd does"),
        );
    }
    let dirty = f.features.get("mem_dirty_track").map(String::as_str);
    if let Some(d) = dirty {
        let text = if d == "yes" {
            "dirty-memory tracking (iterative pre-copy): available"
        } else {
            "dirty-memory tracking (iterative pre-copy): not available on this kernel"
        };
        out.push(Finding::new(Level::Info, side, "criu_dirty_tracking", text));
    }
    if let Some(finding) = lazy_finding(f, side) {
        out.push(finding);
    }
}

/// CRIU's page server can make its pipes as large as it wants.
fn lazy_pipes_ok(f: &Facts) -> bool {
    f.cap_sys_resource == Some(true) || f.pipe_max_size.is_some_and(|m| m >= LAZY_PIPE_BYTES)
}

/// This host can take part in a lazy migration (see [`lazy_finding`]).
pub fn lazy_possible(f: &Facts) -> bool {
    f.features.get("uffd-noncoop").is_some_and(|v| v == "yes") && lazy_pipes_ok(f)
}

/// Whether this host can take part in a lazy (post-copy) migration: userfaultfd for the
/// restore, and pipes as large as CRIU's page server makes them for the dump.
pub fn lazy_finding(f: &Facts, side: Side) -> Option<Finding> {
    let uffd = f.features.get("uffd-noncoop")?.as_str() == "yes";
    let pipes_ok = lazy_pipes_ok(f);
    let mut missing = Vec::new();
    if !uffd {
        missing.push("userfaultfd (non-cooperative) on this kernel".to_string());
    }
    if !pipes_ok {
        missing.push(format!(
            "pipes of {} MiB for CRIU's page server (fs.pipe-max-size is {}, and CRIU lacks CAP_SYS_RESOURCE)",
            LAZY_PIPE_BYTES >> 20,
            f.pipe_max_size
                .map_or("unknown".to_string(), |m| format!("{m}"))
        ));
    }
    if missing.is_empty() {
        let text = "lazy (post-copy) migration: possible (userfaultfd, page-server pipes)";
        return Some(Finding::new(Level::Info, side, "criu_lazy_pages", text));
    }
    let text = format!(
        "lazy (post-copy) migration: not possible here: {}",
        missing.join("; ")
    );
    let mut finding = Finding::new(Level::Info, side, "criu_lazy_pages", text);
    if uffd {
        finding = finding.fix(format!(
            "`sysctl -w fs.pipe-max-size={LAZY_PIPE_BYTES}` (as root) allows it"
        ));
    }
    Some(finding)
}
#[cfg(test)]
mod tests {
    use super::*;

    fn problem(facts: &str) -> Problem {
        Facts::parse(facts).problem().expect("a problem")
    }

    #[test]
    fn healthy_stack_has_no_problem() {
        let f = Facts::parse("podman=4.3.1\nruntime=runc\ncriu=4.2\ncriu_check=ok\n");
        assert_eq!(f.problem(), None);
        let mut out = Vec::new();
        stack_findings(&f, Side::Target, &mut out);
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!((out[0].level, out[0].code), (Level::Ok, "stack_ready"));
        assert_eq!(
            out[0].one_line(),
            "target: podman 4.3.1 with runc, CRIU 4.2: `criu check` passes"
        );
    }

    #[test]
    fn each_missing_piece_is_named() {
        let p = problem("podman=missing\n");
        assert_eq!(p.code, "podman_missing");
        assert!(p.text.contains("podman"), "{p:?}");
        let p = problem("podman=4.3.1\nruntime=runc\ncriu=missing\n");
        assert_eq!(p.code, "criu_missing");
        assert_eq!(p.text, "CRIU is not installed");
        let p = problem("podman=4.3.1\nruntime=runc\ncriu=3.17.1\ncriu_check=ok\n");
        assert_eq!(p.code, "criu_too_old");
        assert!(p.text.contains("too old"), "{p:?}");
        let p = problem(
            "podman=4.3.1\nruntime=runc\ncriu=4.2\ncriu_check=Error (criu/cr-check.c:1): boom\n",
        );
        assert_eq!(p.code, "criu_check_fails");
        assert!(p.text.contains("boom"), "{p:?}");
        let p = problem("podman=4.3.1\nruntime=crun\ncriu=4.2\ncriu_check=ok\n");
        assert_eq!(p.code, "crun_without_criu");
        assert!(p.fix.contains("runc"), "{p:?}");
        // A crun built with CRIU is fine.
        let f =
            Facts::parse("podman=4.3.1\nruntime=crun\ncrun_criu=yes\ncriu=4.2\ncriu_check=ok\n");
        assert_eq!(f.problem(), None);
    }

    #[test]
    fn a_failure_carries_its_fix_and_warnings_follow() {
        let f = Facts::parse(
            "podman=4.3.1\nruntime=runc\ncriu=missing\nruntime_conf=x\nrunc_conf=present\ncriu_kdat=uncached\nfeature_mem_dirty_track=no\n",
        );
        let mut out = Vec::new();
        stack_findings(&f, Side::Source, &mut out);
        let got: Vec<_> = out.iter().map(|f| (f.level, f.code)).collect();
        assert_eq!(
            got,
            [
                (Level::Fail, "criu_missing"),
                (Level::Warn, "criu_runc_conf"),
                (Level::Warn, "criu_kdat_uncached"),
                (Level::Info, "criu_dirty_tracking"),
            ]
        );
        assert_eq!(
            out[0].one_line(),
            "source: CRIU is not installed; install CRIU 4.2 or newer (scripts/setup builds it)"
        );
    }

    #[test]
    fn lazy_migration_needs_userfaultfd_and_large_pipes() {
        let base = "podman=4.3.1\nruntime=runc\ncriu=4.2.1\ncriu_check=ok\n";
        // This sandbox: userfaultfd, no CAP_SYS_RESOURCE (CapEff 000001fffeffffff), 1 MiB pipes.
        let sandbox = format!(
            "{base}feature_uffd-noncoop=yes\npipe_max_size=1048576\ncap_eff=000001fffeffffff\n"
        );
        let f = Facts::parse(&sandbox);
        assert_eq!(f.cap_sys_resource, Some(false));
        let no = lazy_finding(&f, Side::Source).unwrap();
        assert!(no.text.contains("not possible here"), "{}", no.text);
        assert!(
            no.text.contains("fs.pipe-max-size is 1048576"),
            "{}",
            no.text
        );
        assert!(
            no.fix
                .as_deref()
                .unwrap()
                .contains("fs.pipe-max-size=4194304")
        );
        // Raised pipes, or the capability: possible.
        let raised = sandbox.replace("pipe_max_size=1048576", "pipe_max_size=4194304");
        let yes = lazy_finding(&Facts::parse(&raised), Side::Target).unwrap();
        assert!(yes.text.contains("possible (userfaultfd"), "{}", yes.text);
        let capable = sandbox.replace("cap_eff=000001fffeffffff", "cap_eff=000001ffffffffff");
        let yes = lazy_finding(&Facts::parse(&capable), Side::Target).unwrap();
        assert!(yes.text.contains(": possible"), "{}", yes.text);
        // No userfaultfd: nothing to raise.
        let old = capable.replace("uffd-noncoop=yes", "uffd-noncoop=no");
        let no = lazy_finding(&Facts::parse(&old), Side::Target).unwrap();
        assert!(no.text.contains("userfaultfd"), "{}", no.text);
        assert!(no.fix.is_none());
        // A probe that did not ask CRIU says nothing.
        assert!(lazy_finding(&Facts::parse(base), Side::Source).is_none());
    }

    #[test]
    fn an_uncached_criu_probe_is_a_warning_only() {
        let healthy = "podman=4.3.1\nruntime=runc\ncriu=4.2.1\ncriu_check=ok\n";
        for (kdat, warned) in [("cached", false), ("tmpfs", false), ("uncached", true)] {
            let mut out = Vec::new();
            let f = Facts::parse(&format!("{healthy}criu_kdat={kdat}\n"));
            assert_eq!(f.problem(), None);
            stack_findings(&f, Side::Source, &mut out);
            let warn = out.iter().find(|x| x.level == Level::Warn);
            assert_eq!(warn.is_some(), warned, "{kdat}: {out:?}");
            if let Some(w) = warn {
                assert!(w.text.contains("/run is not a tmpfs"), "{}", w.text);
                assert!(w.fix.as_deref().unwrap().contains("tmpfs on /run"));
            }
        }
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
