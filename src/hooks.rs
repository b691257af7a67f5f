//! Commands the operator wants run at defined points of a migration (switch traffic,
//! drain a balancer, move an address), locally or on the target over the migration's SSH
//! connection, with the migration's facts in `MIGRATE_*` environment variables.

use std::process::Stdio;
use std::time::Duration;

use crate::exec::{StatusText, shell_quote, tail_lines};
use crate::transport::ssh::Ssh;

/// When a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// After the pre-sync, right before the freeze. A failure stops the migration
    /// before anything is frozen.
    PreFreeze,
    /// After the target confirmed UP. A failure is reported; the migration stands.
    PostUp,
    /// After the containers were brought back on the source.
    Rollback,
}

impl When {
    pub fn as_str(self) -> &'static str {
        match self {
            When::PreFreeze => "pre-freeze",
            When::PostUp => "post-up",
            When::Rollback => "rollback",
        }
    }
}

/// Where a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Source,
    Target,
}

/// One `--hook` / `--target-hook`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub when: When,
    pub place: Place,
    pub command: String,
}

/// Parses `WHEN=COMMAND`.
pub fn parse_hook(spec: &str, place: Place) -> Result<Hook, String> {
    let flag = match place {
        Place::Source => "--hook",
        Place::Target => "--target-hook",
    };
    let Some((when, command)) = spec.split_once('=') else {
        return Err(format!(
            "{flag} {spec:?}: write WHEN=COMMAND, WHEN being pre-freeze, post-up or rollback"
        ));
    };
    let when = match when.trim() {
        "pre-freeze" => When::PreFreeze,
        "post-up" => When::PostUp,
        "rollback" => When::Rollback,
        other => {
            return Err(format!(
                "{flag}: unknown point {other:?}; use pre-freeze, post-up or rollback"
            ));
        }
    };
    if command.trim().is_empty() {
        return Err(format!("{flag} {spec:?}: the command is empty"));
    }
    Ok(Hook {
        when,
        place,
        command: command.to_string(),
    })
}

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{when} hook `{command}` {status}{}", if .stderr.is_empty() { String::new() } else { format!(": {}", .stderr) })]
    Failed {
        when: &'static str,
        command: String,
        status: StatusText,
        stderr: String,
    },
    #[error("{when} hook `{command}` ran past {}s and was killed", .after.as_secs())]
    Timeout {
        when: &'static str,
        command: String,
        after: Duration,
    },
    #[error("{when} hook `{command}` could not run: {detail}")]
    Spawn {
        when: &'static str,
        command: String,
        detail: String,
    },
}

/// Runs every hook registered for `when`, in order; stops at the first failure.
pub async fn run_all(
    hooks: &[Hook],
    when: When,
    env: &[(String, String)],
    ssh: Option<&Ssh>,
    timeout: Duration,
) -> Result<(), HookError> {
    for h in hooks.iter().filter(|h| h.when == when) {
        let mut env = env.to_vec();
        env.push(("MIGRATE_PHASE".into(), when.as_str().into()));
        match (h.place, ssh) {
            (Place::Source, _) => run_local(h, &env, timeout).await?,
            (Place::Target, Some(ssh)) => run_remote(h, &env, ssh, timeout).await?,
            (Place::Target, None) => {
                return Err(HookError::Spawn {
                    when: when.as_str(),
                    command: h.command.clone(),
                    detail: "no SSH connection to the target".into(),
                });
            }
        }
    }
    Ok(())
}

async fn run_local(h: &Hook, env: &[(String, String)], timeout: Duration) -> Result<(), HookError> {
    let when = h.when.as_str();
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&h.command)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::inherit_stderr())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout or a cancelled migration stops everything
        // the hook started, not only its shell.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| HookError::Spawn {
            when,
            command: h.command.clone(),
            detail: e.to_string(),
        })?;
    let _group = child.id().map(GroupKiller);
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => Err(HookError::Timeout {
            when,
            command: h.command.clone(),
            after: timeout,
        }),
        Ok(Err(e)) => Err(HookError::Spawn {
            when,
            command: h.command.clone(),
            detail: e.to_string(),
        }),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(HookError::Failed {
            when,
            command: h.command.clone(),
            status: out.status.into(),
            stderr: tail_lines(&String::from_utf8_lossy(&out.stderr), 5),
        }),
    }
}

/// Kills a hook's whole process group when the hook is over, however it ended (a no-op
/// when everything in it already exited).
struct GroupKiller(u32);

impl Drop for GroupKiller {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

async fn run_remote(
    h: &Hook,
    env: &[(String, String)],
    ssh: &Ssh,
    timeout: Duration,
) -> Result<(), HookError> {
    let when = h.when.as_str();
    let mut script = String::new();
    for (k, v) in env {
        script.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    script.push_str(&h.command);
    match ssh.sh(&script, timeout).await {
        Ok(_) => Ok(()),
        Err(crate::transport::ssh::SshError::Timeout { .. }) => Err(HookError::Timeout {
            when,
            command: h.command.clone(),
            after: timeout,
        }),
        Err(crate::transport::ssh::SshError::Remote { status, stderr, .. }) => {
            Err(HookError::Failed {
                when,
                command: h.command.clone(),
                status,
                stderr,
            })
        }
        Err(e) => Err(HookError::Spawn {
            when,
            command: h.command.clone(),
            detail: e.to_string(),
        }),
    }
}

/// Lets a hook's stdout reach the operator without touching our stdout (records only).
trait InheritStderr {
    fn inherit_stderr() -> Stdio;
}

impl InheritStderr for Stdio {
    fn inherit_stderr() -> Stdio {
        Stdio::from(std::io::stderr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let h = parse_hook("post-up=nginx -s reload", Place::Target).unwrap();
        assert_eq!(h.when, When::PostUp);
        assert_eq!(h.command, "nginx -s reload");
        assert_eq!(
            parse_hook("pre-freeze=a=b", Place::Source).unwrap().command,
            "a=b"
        );
        assert!(
            parse_hook("later=x", Place::Source)
                .unwrap_err()
                .contains("unknown point")
        );
        assert!(parse_hook("nothing", Place::Source).is_err());
        assert!(parse_hook("rollback= ", Place::Source).is_err());
    }

    #[tokio::test]
    async fn runs_with_env_reports_failure_and_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let hooks = vec![Hook {
            when: When::PreFreeze,
            place: Place::Source,
            command: format!(
                "echo \"$MIGRATE_PHASE $MIGRATE_TARGET\" > {}",
                out.display()
            ),
        }];
        let env = vec![("MIGRATE_TARGET".to_string(), "b".to_string())];
        run_all(&hooks, When::PreFreeze, &env, None, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().trim(),
            "pre-freeze b"
        );
        // Hooks of another point do not run.
        std::fs::remove_file(&out).unwrap();
        run_all(&hooks, When::PostUp, &env, None, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!out.exists());

        let failing = vec![Hook {
            when: When::PostUp,
            place: Place::Source,
            command: "echo nope >&2; exit 4".into(),
        }];
        let e = run_all(&failing, When::PostUp, &[], None, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("status 4") && e.to_string().contains("nope"),
            "{e}"
        );

        let slow = vec![Hook {
            when: When::Rollback,
            place: Place::Source,
            command: "sleep 5".into(),
        }];
        let e = run_all(&slow, When::Rollback, &[], None, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, HookError::Timeout { .. }), "{e}");

        // Everything the hook started goes with it.
        let pidfile = dir.path().join("child.pid");
        let spawner = vec![Hook {
            when: When::Rollback,
            place: Place::Source,
            command: format!("sleep 30 & echo $! > {}; wait", pidfile.display()),
        }];
        run_all(
            &spawner,
            When::Rollback,
            &[],
            None,
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z"),
            "hook child {pid} still alive: {state}"
        );
    }
}
