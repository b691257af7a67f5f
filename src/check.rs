//! Health checks of the migration stack on a host (podman, its OCI runtime, CRIU), shared
//! by `send`'s preflight for both ends.

use std::time::Duration;

/// Prints `key=value` lines about the stack; run locally or over SSH.
pub const STACK_SCRIPT: &str = r#"export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
if command -v podman >/dev/null 2>&1; then
  echo "podman=$(podman version --format '{{.Client.Version}}' 2>/dev/null)"
  echo "runtime=$(podman info --format '{{.Host.OCIRuntime.Name}}' 2>/dev/null)"
else
  echo podman=missing
fi
if command -v criu >/dev/null 2>&1; then
  echo "criu=$(criu --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n 1)"
  if out=$(criu check 2>&1); then echo criu_check=ok; else echo "criu_check=$(printf '%s' "$out" | tail -n 1)"; fi
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
                _ => {}
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
        if self.runtime.as_deref() == Some("crun") {
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
