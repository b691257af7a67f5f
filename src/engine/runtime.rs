//! Which OCI runtime checkpoints each container and which restores it, and what a pair
//! of hosts with different podman versions will do. A checkpoint archive names the
//! runtime that made it (the container's, not the host's default), and podman restores
//! it only with that runtime: a crun container needs crun built with CRIU on the target.
//! crun takes no CRIU options per command (no `--criu` flag, no configuration file), so
//! migrate's CRIU wrapper (`--tcp close`, skip-in-flight) cannot reach it.
//! Facts behind the rules: docs/design/debian13-host.md.

use std::time::Duration;

use crate::engine::podman::CriuOptions;
use crate::engine::stack::{Facts, Finding, Level, Side};

/// A moved container and the OCI runtime podman created it with (`{{.OCIRuntime}}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    pub container: String,
    pub runtime: String,
}

/// The runtime of each container, as podman here names it.
pub async fn of_containers(names: &[String]) -> Result<Vec<Runtime>, crate::exec::ExecError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut a: Vec<String> = [
        "container",
        "inspect",
        "--format",
        "{{.Name}} {{.OCIRuntime}}",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    a.extend(names.iter().cloned());
    let out = crate::exec::run("podman", &a, Duration::from_secs(60)).await?;
    Ok(parse(&out.stdout))
}

/// Parses `NAME RUNTIME` lines.
pub fn parse(text: &str) -> Vec<Runtime> {
    text.lines()
        .filter_map(|l| {
            let (c, r) = l.trim().split_once(' ')?;
            Some(Runtime {
                container: c.to_string(),
                runtime: r.trim().to_string(),
            })
        })
        .collect()
}

/// Podman version pairs whose archives were measured to restore both ways (runc, CRIU
/// 4.2.1 on both sides; docs/design/debian13-host.md).
const MEASURED_PAIRS: &[(Release, Release)] = &[((4, 3), (5, 4))];

/// A podman release, major and minor.
type Release = (u64, u64);

fn measured(a: Release, b: Release) -> bool {
    MEASURED_PAIRS
        .iter()
        .any(|&(x, y)| (x, y) == (a, b) || (y, x) == (a, b))
}

fn names(v: &[&Runtime]) -> String {
    v.iter()
        .map(|r| r.container.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// "web runs" or "db, web run".
fn run_under(v: &[&Runtime]) -> String {
    format!("{} {}", names(v), if v.len() == 1 { "runs" } else { "run" })
}

/// What the source's stack does with these containers: which runtime checkpoints them,
/// and what stops it (a crun without CRIU; CRIU options crun cannot be given).
pub fn source_findings(here: &Facts, runtimes: &[Runtime], opts: CriuOptions) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut by_runtime: std::collections::BTreeMap<&str, Vec<&Runtime>> = Default::default();
    for r in runtimes {
        by_runtime.entry(r.runtime.as_str()).or_default().push(r);
    }
    for (rt, cs) in &by_runtime {
        if !here.runtime_has_criu(rt) {
            let what = match (*rt, here.runtime_version(rt)) {
                ("crun", Some(_)) => {
                    "crun is built without CRIU here (`crun --version` lacks +CRIU)".to_string()
                }
                (_, None) if *rt == "runc" || *rt == "crun" => {
                    format!("{rt} is not installed here")
                }
                _ => {
                    format!("migrate checkpoints only with runc, or crun built with CRIU, not {rt}")
                }
            };
            out.push(
                Finding::new(
                    Level::Fail,
                    Side::Source,
                    "runtime_cannot_checkpoint",
                    format!("{} under {rt}: {what}", run_under(cs)),
                )
                .fix("re-create the container with runc (`podman run --runtime runc …`), or install a crun built with CRIU"),
            );
            continue;
        }
        out.push(Finding::new(
            Level::Info,
            Side::Source,
            "runtime_checkpoints",
            format!("{} checkpoints {} here", here.runtime_label(rt), names(cs)),
        ));
        if *rt == "crun" && opts.wrapper().is_some() {
            out.push(
                Finding::new(
                    Level::Fail,
                    Side::Source,
                    "runtime_lacks_criu_options",
                    format!(
                        "{} under crun, which cannot be given CRIU's {} for one command (crun has no --criu flag and reads no CRIU configuration file; podman {} has no flag for it)",
                        run_under(cs),
                        opts.criu_config_lines().join(" and "),
                        here.podman.as_deref().unwrap_or("?"),
                    ),
                )
                .fix("pass --tcp refuse (the container moves when it has no TCP connection open at the freeze), or re-create it with runc (`podman run --runtime runc …`)"),
            );
        }
    }
    out
}

/// What the target does with the archives, and what the pair of podman versions means:
/// every container's runtime must be there with CRIU (its archive restores with no
/// other), and versions not measured together are named.
pub fn pair_findings(here: &Facts, there: &Facts, runtimes: &[Runtime]) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut by_runtime: std::collections::BTreeMap<&str, Vec<&Runtime>> = Default::default();
    for r in runtimes {
        by_runtime.entry(r.runtime.as_str()).or_default().push(r);
    }
    for (rt, cs) in &by_runtime {
        if there.runtime_has_criu(rt) {
            out.push(Finding::new(
                Level::Info,
                Side::Target,
                "runtime_restores",
                format!("{} restores {} there", there.runtime_label(rt), names(cs)),
            ));
            continue;
        }
        let why = match there.runtime_version(rt) {
            Some(_) => format!("{rt} there is built without CRIU (`crun --version` lacks +CRIU)"),
            None => format!("{rt} is not installed there"),
        };
        out.push(
            Finding::new(
                Level::Fail,
                Side::Target,
                "runtime_unavailable",
                format!(
                    "{} under {rt}, and podman restores a checkpoint only with the runtime that made it: {why}",
                    run_under(cs)
                ),
            )
            .fix(format!(
                "install {rt}{} on the target, or re-create the containers here with a runtime the target has",
                if *rt == "crun" { " built with CRIU" } else { "" }
            )),
        );
    }
    if let Some(f) = version_finding(here, there) {
        out.push(f);
    }
    out
}

/// The podman versions of the pair: the same, measured together, or not measured.
pub fn version_finding(here: &Facts, there: &Facts) -> Option<Finding> {
    let (a, b) = (here.podman_minor()?, there.podman_minor()?);
    let (va, vb) = (here.podman.as_deref()?, there.podman.as_deref()?);
    if a == b {
        return Some(Finding::new(
            Level::Info,
            Side::Target,
            "podman_versions",
            format!("podman {va} here, {vb} there: the same release"),
        ));
    }
    if measured(a, b) {
        return Some(Finding::new(
            Level::Info,
            Side::Target,
            "podman_versions",
            format!(
                "podman {va} here, {vb} there: archives of either restore on the other (measured for podman {}.{} and {}.{}, runc, CRIU 4.2)",
                a.0, a.1, b.0, b.1
            ),
        ));
    }
    Some(
        Finding::new(
            Level::Warn,
            Side::Target,
            "podman_versions_unmeasured",
            format!("podman {va} here, {vb} there: migrate was not measured between these releases"),
        )
        .fix("try it first with a container that does not matter, or use hosts of the same podman release"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB12: &str = "podman=4.3.1\nruntime=runc\nruntime_version=\nrunc_version=1.1.5+ds1\ncrun_criu=no\ncriu=4.2.1\ncriu_check=ok\n";
    const DEB13: &str = "podman=5.4.2\nruntime=runc\nrunc_version=1.1.15+ds1\ncrun_version=1.21\ncrun_criu=yes\ncriu=4.2.1\ncriu_check=ok\ncheckpoint_tcp_close=no\nrestore_tcp_close=no\n";

    fn rt(c: &str, r: &str) -> Runtime {
        Runtime {
            container: c.into(),
            runtime: r.into(),
        }
    }

    fn codes(v: &[Finding]) -> Vec<(Level, &'static str)> {
        v.iter().map(|f| (f.level, f.code)).collect()
    }

    #[test]
    fn parses_names_and_runtimes() {
        assert_eq!(
            parse("db runc\nweb crun\n\n"),
            vec![rt("db", "runc"), rt("web", "crun")]
        );
    }

    #[test]
    fn runc_pairs_of_measured_versions_move_both_ways() {
        let (d12, d13) = (Facts::parse(DEB12), Facts::parse(DEB13));
        let cs = [rt("db", "runc"), rt("web", "runc")];
        let close = CriuOptions {
            tcp_close: true,
            skip_in_flight: true,
            ..Default::default()
        };
        let src = source_findings(&d13, &cs, close);
        assert_eq!(codes(&src), [(Level::Info, "runtime_checkpoints")]);
        assert_eq!(src[0].text, "runc 1.1.15+ds1 checkpoints db, web here");
        let pair = pair_findings(&d13, &d12, &cs);
        assert_eq!(
            codes(&pair),
            [
                (Level::Info, "runtime_restores"),
                (Level::Info, "podman_versions")
            ]
        );
        assert_eq!(pair[0].text, "runc 1.1.5+ds1 restores db, web there");
        assert!(pair[1].text.contains("podman 5.4.2 here, 4.3.1 there"));
        assert!(pair[1].text.contains("measured"), "{}", pair[1].text);
        let back = pair_findings(&d12, &d13, &cs);
        assert!(back[1].text.contains("podman 4.3.1 here, 5.4.2 there"));
        let same = pair_findings(&d13, &d13, &cs);
        assert!(
            same[1].text.contains("the same release"),
            "{}",
            same[1].text
        );
    }

    #[test]
    fn a_crun_container_needs_crun_with_criu_there_and_no_criu_wrapper() {
        let (d12, d13) = (Facts::parse(DEB12), Facts::parse(DEB13));
        let cs = [rt("web", "crun")];
        // Debian 12 has no crun: refused, naming why.
        let pair = pair_findings(&d13, &d12, &cs);
        assert_eq!(pair[0].code, "runtime_unavailable");
        assert_eq!(pair[0].level, Level::Fail);
        assert!(
            pair[0].text.contains("crun is not installed there"),
            "{}",
            pair[0].text
        );
        // A crun without CRIU there.
        let no_criu = Facts::parse(&DEB13.replace("crun_criu=yes", "crun_criu=no"));
        let pair = pair_findings(&d13, &no_criu, &cs);
        assert!(
            pair[0].text.contains("built without CRIU"),
            "{}",
            pair[0].text
        );
        // Debian 13 → Debian 13: restored by crun.
        let pair = pair_findings(&d13, &d13, &cs);
        assert_eq!(pair[0].text, "crun 1.21 restores web there");
        // --tcp close needs the wrapper, which crun cannot use; --tcp refuse does not.
        let close = CriuOptions {
            tcp_close: true,
            skip_in_flight: true,
            ..Default::default()
        };
        let src = source_findings(&d13, &cs, close);
        assert_eq!(
            codes(&src),
            [
                (Level::Info, "runtime_checkpoints"),
                (Level::Fail, "runtime_lacks_criu_options")
            ]
        );
        assert!(
            src[1].text.contains("tcp-close and skip-in-flight"),
            "{}",
            src[1].text
        );
        assert!(src[1].fix.as_deref().unwrap().contains("--tcp refuse"));
        let refuse = CriuOptions::default();
        assert_eq!(
            codes(&source_findings(&d13, &cs, refuse)),
            [(Level::Info, "runtime_checkpoints")]
        );
        // A crun container on a host whose crun lacks CRIU cannot be checkpointed at all.
        let src = source_findings(&no_criu, &cs, refuse);
        assert_eq!(codes(&src), [(Level::Fail, "runtime_cannot_checkpoint")]);
    }

    #[test]
    fn unmeasured_versions_warn() {
        let a = Facts::parse("podman=5.6.0\n");
        let b = Facts::parse("podman=4.9.3\n");
        let f = version_finding(&a, &b).unwrap();
        assert_eq!(
            (f.level, f.code),
            (Level::Warn, "podman_versions_unmeasured")
        );
        assert!(version_finding(&a, &Facts::parse("podman=missing\n")).is_none());
    }
}
