//! Who starts a container again: podman's restart policy, or a systemd unit. Units made
//! by `podman generate systemd` (and quadlet) set `PODMAN_SYSTEMD_UNIT`, which podman keeps
//! as a label on the container. After a move, an active or enabled unit would start the
//! service on the source again (a `--new` unit creates a fresh container), and the target
//! has no unit: so `send` refuses such a container unless told to go ahead. A restart
//! policy travels with the checkpoint (podman restores it on the target), and the copy
//! here is removed once the target confirms, so `podman-restart.service` cannot start it
//! twice.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::engine::stack::{Finding, Level, Side};
use crate::exec::ExecError;

/// What restarts one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keeper {
    pub name: String,
    /// podman's restart policy (`no`, `always`, `on-failure`, `unless-stopped`), empty
    /// when none is set.
    pub restart_policy: String,
    /// The systemd unit podman recorded for it, if any.
    pub unit: Option<String>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "HostConfig")]
    host_config: RawHost,
    #[serde(rename = "Config")]
    config: RawConfig,
}

#[derive(Deserialize)]
struct RawHost {
    #[serde(rename = "RestartPolicy", default)]
    restart_policy: RawPolicy,
}

#[derive(Deserialize, Default)]
struct RawPolicy {
    #[serde(rename = "Name", default)]
    name: String,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(rename = "Labels", default)]
    labels: Option<std::collections::BTreeMap<String, String>>,
}

/// Reads `podman container inspect` JSON.
pub fn parse(json: &str) -> Result<Vec<Keeper>, serde_json::Error> {
    let raw: Vec<Raw> = serde_json::from_str(json)?;
    Ok(raw
        .into_iter()
        .map(|r| Keeper {
            name: r.name,
            restart_policy: r.host_config.restart_policy.name,
            unit: r
                .config
                .labels
                .and_then(|mut l| l.remove("PODMAN_SYSTEMD_UNIT"))
                .filter(|u| !u.is_empty()),
        })
        .collect())
}

/// The keepers of the named containers here.
pub async fn keepers(names: &[String]) -> Result<Vec<Keeper>, ExecError> {
    let mut args = vec!["container".to_string(), "inspect".to_string()];
    args.extend(names.iter().cloned());
    let out = crate::exec::run("podman", &args, Duration::from_secs(30)).await?;
    Ok(parse(&out.stdout).unwrap_or_default())
}

/// What systemd says of a unit on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitState {
    /// systemd does not run here (sd_booted: no /run/systemd/system): nothing can start
    /// the unit.
    NoSystemd,
    /// `systemctl is-active` / `is-enabled` answers.
    Known { active: String, enabled: String },
}

impl UnitState {
    /// Whether the unit could start the container again here.
    pub fn can_restart(&self) -> bool {
        match self {
            UnitState::NoSystemd => false,
            UnitState::Known { active, enabled } => {
                active != "inactive" && active != "failed" || enabled.starts_with("enabled")
            }
        }
    }
}

/// Asks systemd about `unit`.
pub async fn unit_state(unit: &str) -> UnitState {
    if !Path::new("/run/systemd/system").is_dir() {
        return UnitState::NoSystemd;
    }
    let ask = |verb: &'static str| {
        // Both verbs print their answer and exit non-zero for "inactive" or "disabled";
        // the unit's name is an argument, never part of the script.
        let args = [
            "-c".to_string(),
            format!("systemctl {verb} -- \"$1\" || true"),
            "sh".to_string(),
            unit.to_string(),
        ];
        async move {
            match crate::exec::run("sh", &args, Duration::from_secs(10)).await {
                Ok(out) => out.stdout.trim().to_string(),
                Err(e) => format!("unknown ({e})"),
            }
        }
    };
    UnitState::Known {
        active: ask("is-active").await,
        enabled: ask("is-enabled").await,
    }
}

/// What `check` and `send` say about one container's keepers.
pub fn findings(k: &Keeper, unit: Option<&UnitState>, ignore_unit: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    if matches!(
        k.restart_policy.as_str(),
        "always" | "on-failure" | "unless-stopped"
    ) {
        out.push(Finding::new(
            Level::Info,
            Side::Source,
            "container_restart_policy",
            format!(
                "{} has restart policy {}: it goes with it (podman restores it on the target), and the copy here is removed once the target confirms, so nothing starts it here again",
                k.name, k.restart_policy
            ),
        ));
    }
    let (Some(name), Some(state)) = (&k.unit, unit) else {
        return out;
    };
    if !state.can_restart() {
        let why = match state {
            UnitState::NoSystemd => "systemd does not run on this host".to_string(),
            UnitState::Known { active, enabled } => format!("it is {active} and {enabled}"),
        };
        out.push(Finding::new(
            Level::Info,
            Side::Source,
            "container_systemd_unit_idle",
            format!("{} is labelled as run by systemd unit {name}, but {why}: nothing will start it here again", k.name),
        ));
        return out;
    }
    let level = if ignore_unit {
        Level::Warn
    } else {
        Level::Fail
    };
    let mut text = format!(
        "{} is run by systemd unit {name} here: after the move that unit would start it on this host again (the service twice), and the target has no unit",
        k.name
    );
    if ignore_unit {
        text.push_str("; moving anyway (--ignore-systemd-unit)");
    }
    out.push(
        Finding::new(level, Side::Source, "container_systemd_unit", text).fix(format!(
            "before the move: `systemctl disable {name}` and set Restart=no for it (`systemctl edit --runtime {name}`), or pass --ignore-systemd-unit if something else takes care of it; on the target, `podman generate systemd --new --name {}` makes a unit for the restored container",
            k.name
        )),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSPECT: &str = r#"[
      {"Name": "db", "HostConfig": {"RestartPolicy": {"Name": "always", "MaximumRetryCount": 0}},
       "Config": {"Labels": {"PODMAN_SYSTEMD_UNIT": "container-db.service", "x": "y"}}},
      {"Name": "web", "HostConfig": {"RestartPolicy": {"Name": "", "MaximumRetryCount": 0}},
       "Config": {"Labels": null}}
    ]"#;

    #[test]
    fn policy_and_unit_are_read_from_inspect() {
        let k = parse(INSPECT).unwrap();
        assert_eq!(k[0].restart_policy, "always");
        assert_eq!(k[0].unit.as_deref(), Some("container-db.service"));
        assert_eq!(k[1].restart_policy, "");
        assert_eq!(k[1].unit, None);
    }

    #[test]
    fn an_active_or_enabled_unit_refuses_unless_told() {
        let k = &parse(INSPECT).unwrap()[0];
        let live = UnitState::Known {
            active: "active".into(),
            enabled: "enabled".into(),
        };
        let f = findings(k, Some(&live), false);
        let unit = f
            .iter()
            .find(|f| f.code == "container_systemd_unit")
            .unwrap();
        assert_eq!(unit.level, Level::Fail);
        assert!(unit.text.contains("container-db.service"), "{}", unit.text);
        assert!(
            unit.fix
                .as_deref()
                .unwrap()
                .contains("systemctl disable container-db.service")
        );
        let policy = f
            .iter()
            .find(|f| f.code == "container_restart_policy")
            .unwrap();
        assert_eq!(policy.level, Level::Info);
        // Told: a warning.
        let f = findings(k, Some(&live), true);
        assert!(
            f.iter()
                .any(|f| f.code == "container_systemd_unit" && f.level == Level::Warn)
        );
        // Enabled but stopped: it would start at the next boot.
        let enabled = UnitState::Known {
            active: "inactive".into(),
            enabled: "enabled".into(),
        };
        assert!(enabled.can_restart());
        // Disabled and stopped, or no systemd at all: nothing starts it.
        for idle in [
            UnitState::Known {
                active: "inactive".into(),
                enabled: "disabled".into(),
            },
            UnitState::NoSystemd,
        ] {
            let f = findings(k, Some(&idle), false);
            assert!(f.iter().all(|f| f.level != Level::Fail), "{idle:?}: {f:?}");
            assert!(f.iter().any(|f| f.code == "container_systemd_unit_idle"));
        }
    }

    #[test]
    fn no_policy_no_unit_says_nothing() {
        let k = &parse(INSPECT).unwrap()[1];
        assert!(findings(k, None, false).is_empty());
    }
}
