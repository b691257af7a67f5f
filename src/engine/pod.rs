//! Pods: what `podman pod inspect` says of one, whether another host can re-create it
//! from that, and the `podman pod create` that does. The members are not re-created:
//! they are restored into the new pod from their checkpoints (`restore --import --pod`).

use serde_json::Value;

use crate::engine::podman::{ContainerInfo, Podman, PodmanError};
use crate::engine::stack::{Finding, Level, Side};
use crate::exec::{self, args, shell_quote};
use crate::protocol::PodSpec;

/// How long one podman pod command may take.
const POD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// A pod as this host's podman describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodInfo {
    pub id: String,
    pub name: String,
    pub infra_id: String,
    /// The names of its containers other than the infra container.
    pub members: Vec<String>,
    /// What re-creates it; `infra_image` is empty until the infra container is read.
    pub spec: PodSpec,
    /// Why another host could not re-create it the same way (empty when it can).
    pub unsupported: Vec<String>,
}

/// `podman pod create` options whose value the spec carries.
const CARRIED: &[&str] = &[
    "--name",
    "-n",
    "--publish",
    "-p",
    "--share",
    "--hostname",
    "--label",
    "-l",
    "--infra-image",
];

/// Parses `podman pod inspect` (an object in podman 4, a list of one in 5).
pub fn parse_pod_inspect(json: &str) -> Result<PodInfo, PodmanError> {
    let v: Value = serde_json::from_str(json).map_err(|e| PodmanError::Parse(e.to_string()))?;
    let v = match v {
        Value::Array(mut a) if a.len() == 1 => a.remove(0),
        v => v,
    };
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let id = text(&v, "Id");
    let name = text(&v, "Name");
    if id.is_empty() || name.is_empty() {
        return Err(PodmanError::Parse("pod inspect without Id or Name".into()));
    }
    let infra_id = text(&v, "InfraContainerID");
    let members = v
        .get("Containers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter(|c| text(c, "Id") != infra_id)
                .map(|c| text(c, "Name"))
                .collect()
        })
        .unwrap_or_default();
    let mut share: Vec<String> = strings(v.get("SharedNamespaces"));
    share.sort();
    let infra = v.get("InfraConfig").cloned().unwrap_or(Value::Null);
    let labels = v
        .get("Labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    let mut hostname = text(&v, "Hostname");
    if hostname == name {
        hostname.clear();
    }
    let spec = PodSpec {
        name: name.clone(),
        share,
        publish: publish(infra.get("PortBindings")),
        hostname,
        labels,
        infra_image: String::new(),
    };
    let mut unsupported = infra_unsupported(&infra);
    if infra_id.is_empty() {
        unsupported.push("it has no infra container (--infra=false)".into());
    }
    unsupported.extend(flags_unsupported(&strings(v.get("CreateCommand"))));
    Ok(PodInfo {
        id,
        name,
        infra_id,
        members,
        spec,
        unsupported,
    })
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `InfraConfig.PortBindings` (`{"80/tcp":[{"HostIp":"","HostPort":"8090"}]}`) as
/// `--publish` values, sorted.
fn publish(v: Option<&Value>) -> Vec<String> {
    let mut out = Vec::new();
    for (inner, binds) in v.and_then(Value::as_object).into_iter().flatten() {
        for b in binds.as_array().into_iter().flatten() {
            let ip = b.get("HostIp").and_then(Value::as_str).unwrap_or("");
            let port = b.get("HostPort").and_then(Value::as_str).unwrap_or("");
            out.push(match ip {
                "" => format!("{port}:{inner}"),
                ip if ip.contains(':') => format!("[{ip}]:{port}:{inner}"),
                ip => format!("{ip}:{port}:{inner}"),
            });
        }
    }
    out.sort();
    out
}

/// What of the infra container's network the spec does not carry, when set.
fn infra_unsupported(infra: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let set = |k: &str| match infra.get(k) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    };
    for (k, what) in [
        ("HostNetwork", "the host's network (--network host)"),
        ("StaticIP", "a static IP address (--ip)"),
        ("StaticMAC", "a static MAC address (--mac-address)"),
        ("DNSServer", "its own DNS servers (--dns)"),
        ("DNSSearch", "its own DNS search domains (--dns-search)"),
        ("DNSOption", "its own DNS options (--dns-option)"),
        ("HostAdd", "extra /etc/hosts entries (--add-host)"),
        ("NetworkOptions", "network options (--network-opt)"),
        (
            "NoManageResolvConf",
            "an unmanaged resolv.conf (--no-hosts/--dns=none)",
        ),
        ("NoManageHosts", "an unmanaged /etc/hosts (--no-hosts)"),
    ] {
        if set(k) {
            out.push(format!("its infra uses {what}"));
        }
    }
    let nets = strings(infra.get("Networks"));
    if nets.iter().any(|n| n != "podman") {
        out.push(format!(
            "it is on network {} (only podman's default network is re-created)",
            nets.join(", ")
        ));
    }
    out
}

/// Options of the original `podman pod create` that the spec does not carry.
fn flags_unsupported(create: &[String]) -> Vec<String> {
    let Some(at) = create.iter().position(|a| a == "create") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut it = create[at + 1..].iter();
    while let Some(a) = it.next() {
        if !a.starts_with('-') {
            continue; // the pod's name given as an argument
        }
        let (flag, inline) = match a.split_once('=') {
            Some((f, _)) => (f, true),
            None => (a.as_str(), false),
        };
        if CARRIED.contains(&flag) {
            if !inline {
                it.next();
            }
        } else if flag != "--infra" || a == "--infra=false" {
            out.push(format!(
                "it was created with {a} (not re-created on the target)"
            ));
        }
    }
    out
}

/// `podman pod create` arguments for `spec`; every value is one argument of its own.
pub fn create_args(spec: &PodSpec) -> Vec<String> {
    let mut a = args(["pod", "create", "--name"]);
    a.push(spec.name.clone());
    a.push("--infra-image".into());
    a.push(spec.infra_image.clone());
    if !spec.share.is_empty() {
        a.push("--share".into());
        a.push(spec.share.join(","));
    }
    for p in &spec.publish {
        a.push("--publish".into());
        a.push(p.clone());
    }
    if !spec.hostname.is_empty() {
        a.push("--hostname".into());
        a.push(spec.hostname.clone());
    }
    for (k, v) in &spec.labels {
        a.push("--label".into());
        a.push(format!("{k}={v}"));
    }
    a
}

impl Podman {
    /// The pod of that name or ID, `None` when there is none.
    pub async fn pod(&self, name: &str) -> Result<Option<PodInfo>, PodmanError> {
        let exists = exec::run("podman", &args(["pod", "exists", name]), POD_TIMEOUT).await;
        if exists.is_err() {
            return Ok(None);
        }
        let out = exec::run("podman", &args(["pod", "inspect", name]), POD_TIMEOUT).await?;
        parse_pod_inspect(&out.stdout).map(Some)
    }

    /// Creates the pod; returns its ID.
    pub async fn pod_create(&self, spec: &PodSpec) -> Result<String, PodmanError> {
        let out = exec::run("podman", &create_args(spec), POD_TIMEOUT).await?;
        Ok(out.stdout.trim().to_string())
    }

    /// Starts a pod's infra container (before any member is restored into it, so the
    /// parallel restores do not race to start it).
    pub async fn pod_start(&self, id: &str) -> Result<(), PodmanError> {
        exec::run("podman", &args(["pod", "start", id]), POD_TIMEOUT)
            .await
            .map(drop)
            .map_err(Into::into)
    }

    /// Removes a pod with everything in it (`podman pod rm --force`); one already gone is
    /// no error (a repair may run after the commit did it).
    pub async fn pod_remove(&self, name: &str) -> Result<(), PodmanError> {
        exec::run(
            "podman",
            &args(["pod", "rm", "--force", "--ignore", "--time", "1", name]),
            POD_TIMEOUT,
        )
        .await
        .map(drop)
        .map_err(Into::into)
    }
}

/// The names to move: a name that is no container but a pod stands for its members.
pub async fn expand(podman: &Podman, names: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for name in names {
        if !matches!(podman.exists(name).await, Ok(false)) {
            out.push(name.clone());
            continue;
        }
        match podman.pod(name).await {
            Ok(Some(p)) if !p.members.is_empty() => out.extend(p.members),
            _ => out.push(name.clone()),
        }
    }
    out.dedup();
    out
}

/// The pod the moved containers are the members of, when they are: it moves whole, so
/// every member must be moved, nothing outside it may come along, and the target must be
/// able to re-create it. Returns the findings, the spec (infra image filled in) and the
/// infra image's ID and name.
pub async fn source_pod(
    podman: &Podman,
    moved: &[ContainerInfo],
    all: &[ContainerInfo],
) -> (Vec<Finding>, Option<(PodSpec, String)>) {
    let mut pods: Vec<&str> = moved
        .iter()
        .map(|c| c.pod.as_str())
        .filter(|p| !p.is_empty())
        .collect();
    pods.sort();
    pods.dedup();
    let [pod_id] = pods[..] else {
        if pods.is_empty() {
            return (Vec::new(), None);
        }
        return (
            vec![
                Finding::new(
                    Level::Fail,
                    Side::Source,
                    "pods_several",
                    format!(
                        "the containers belong to {} pods: one migration moves one pod",
                        pods.len()
                    ),
                )
                .fix("move each pod with a migration of its own"),
            ],
            None,
        );
    };
    let fail = |code, text: String| Finding::new(Level::Fail, Side::Source, code, text);
    let pod = match podman.pod(pod_id).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            return (
                vec![fail("pod_missing", format!("pod {pod_id} is gone"))],
                None,
            );
        }
        Err(e) => {
            return (
                vec![fail(
                    "pod_inspect_failed",
                    format!("cannot inspect pod {pod_id}: {e}"),
                )],
                None,
            );
        }
    };
    // A member left behind is refused by the dependency check, naming it.
    if !pod
        .members
        .iter()
        .all(|m| moved.iter().any(|c| &c.name == m))
    {
        return (Vec::new(), None);
    }
    let mut out = Vec::new();
    let outside: Vec<&str> = moved
        .iter()
        .filter(|c| c.pod != pod.id)
        .map(|c| c.name.as_str())
        .collect();
    if !outside.is_empty() {
        out.push(
            fail(
                "pod_mixed",
                format!("{} belong to no pod, yet move with pod {}: the target restores every container of a pod migration into the pod", outside.join(", "), pod.name),
            )
            .fix(format!("move pod {} and {} with separate migrations", pod.name, outside.join(", "))),
        );
    }
    for why in &pod.unsupported {
        out.push(
            fail("pod_not_recreatable", format!("pod {}: {why}", pod.name))
                .fix("re-create the pod here with only --name, --publish, --share, --hostname, --label and --infra-image to move it"),
        );
    }
    let Some(infra) = all.iter().find(|c| c.id == pod.infra_id) else {
        out.push(fail(
            "pod_infra_missing",
            format!(
                "pod {}'s infra container {} is not listed",
                pod.name, &pod.infra_id
            ),
        ));
        return (out, None);
    };
    let mut spec = pod.spec;
    spec.infra_image = if infra.image_name.is_empty() {
        infra.image_id.clone()
    } else {
        infra.image_name.clone()
    };
    if let Err(e) = spec.validate() {
        out.push(fail("pod_not_recreatable", e));
    }
    if out.is_empty() {
        out.push(Finding::new(
            Level::Ok,
            Side::Source,
            "pod_moves",
            format!(
                "pod {} moves whole ({}): re-created on the target (infra image {}, shares {}, ports {}), its members restored into it",
                spec.name,
                pod.members.join(", "),
                spec.infra_image,
                spec.share.join(","),
                if spec.publish.is_empty() { "none".into() } else { spec.publish.join(" ") },
            ),
        ));
    }
    (out, Some((spec, infra.image_id.clone())))
}

/// Lines for the target script: whether a pod of that name exists there, and the infra
/// image (every value single-quoted).
pub fn target_script(spec: &PodSpec, infra_image_id: &str) -> String {
    format!(
        "podman pod exists {n} && printf 'pod_exists=%s\\n' {n}\npodman image exists {i} || podman image exists {id} || printf 'pod_infra_missing=%s\\n' {i}\n",
        n = shell_quote(&spec.name),
        i = shell_quote(&spec.infra_image),
        id = shell_quote(infra_image_id),
    )
}

/// Reads [`target_script`]'s lines. The infra image is shipped like the members' images
/// with `ship`: it is returned then, as (ID, name).
pub fn target_findings(
    out: &str,
    spec: &PodSpec,
    infra_image_id: &str,
    ship: bool,
) -> (Vec<Finding>, Option<(String, String)>) {
    let mut f = Vec::new();
    let mut shipped = None;
    if out
        .lines()
        .any(|l| l.strip_prefix("pod_exists=") == Some(spec.name.as_str()))
    {
        f.push(
            Finding::new(
                Level::Fail,
                Side::Target,
                "pod_name_taken",
                format!("a pod named {} already exists there", spec.name),
            )
            .fix(format!(
                "remove it there first (podman pod rm {})",
                spec.name
            )),
        );
    }
    if out.lines().any(|l| l.starts_with("pod_infra_missing=")) {
        let text = format!(
            "the pod's infra image {} is missing there",
            spec.infra_image
        );
        if ship {
            f.push(Finding::new(
                Level::Info,
                Side::Target,
                "pod_infra_shipped",
                format!("{text}: it will be shipped (--ship-image)"),
            ));
            shipped = Some((infra_image_id.to_string(), spec.infra_image.clone()));
        } else {
            f.push(
                Finding::new(Level::Fail, Side::Target, "pod_infra_missing", text).fix(
                    "pass --ship-image to copy it there, or build or load the same image there",
                ),
            );
        }
    }
    if f.is_empty() {
        f.push(Finding::new(
            Level::Ok,
            Side::Target,
            "pod_recreatable",
            format!("no pod {} there, its infra image is there", spec.name),
        ));
    }
    (f, shipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// podman 4.3.1's `pod inspect` of the lab's pod (`scripts/lab pod up`).
    const INSPECT: &str = include_str!("../../testdata/podman/pod-inspect-4.3.json");

    #[test]
    fn a_lab_pod_is_read_and_recreated_with_the_same_options() {
        let p = parse_pod_inspect(INSPECT).unwrap();
        assert_eq!(p.name, "pp");
        assert!(p.unsupported.is_empty(), "{:?}", p.unsupported);
        let mut members = p.members.clone();
        members.sort();
        assert_eq!(members, ["pp-counter", "pp-front"]);
        assert!(!p.infra_id.is_empty() && !p.members.iter().any(|m| m.ends_with("-infra")));
        assert_eq!(p.spec.share, ["ipc", "net", "uts"]);
        assert_eq!(p.spec.publish, ["8085:80/tcp"]);
        assert_eq!(p.spec.hostname, "pphost");
        assert_eq!(p.spec.labels.get("app").map(String::as_str), Some("pp"));
        let mut spec = p.spec;
        spec.infra_image = "localhost/migrate-pause:latest".into();
        spec.validate().unwrap();
        assert_eq!(
            create_args(&spec),
            [
                "pod",
                "create",
                "--name",
                "pp",
                "--infra-image",
                "localhost/migrate-pause:latest",
                "--share",
                "ipc,net,uts",
                "--publish",
                "8085:80/tcp",
                "--hostname",
                "pphost",
                "--label",
                "app=pp"
            ]
        );
    }

    #[test]
    fn what_the_target_cannot_recreate_is_named() {
        let mut v: Value = serde_json::from_str(INSPECT).unwrap();
        v["InfraConfig"]["StaticIP"] = "10.88.0.5".into();
        v["InfraConfig"]["Networks"] = serde_json::json!(["podman", "backend"]);
        v["CreateCommand"] = serde_json::json!([
            "podman",
            "pod",
            "create",
            "--name",
            "pp",
            "-p",
            "8085:80",
            "--memory=1g",
            "--infra-command",
            "sleep"
        ]);
        let p = parse_pod_inspect(&v.to_string()).unwrap();
        let all = p.unsupported.join("; ");
        assert!(all.contains("static IP"), "{all}");
        assert!(all.contains("network podman, backend"), "{all}");
        assert!(all.contains("--memory=1g"), "{all}");
        assert!(all.contains("--infra-command"), "{all}");
        assert_eq!(p.unsupported.len(), 4, "{all}");
    }

    #[test]
    fn the_target_script_quotes_and_its_lines_are_read() {
        let mut spec = parse_pod_inspect(INSPECT).unwrap().spec;
        spec.name = "p'1".into();
        spec.infra_image = "localhost/x:latest".into();
        let sh = target_script(&spec, "abc");
        assert!(sh.contains("podman pod exists 'p'\\''1'"), "{sh}");
        let (f, ship) =
            target_findings("pod_exists=p'1\npod_infra_missing=x\n", &spec, "abc", false);
        assert_eq!(
            f.iter().map(|f| f.code).collect::<Vec<_>>(),
            ["pod_name_taken", "pod_infra_missing"]
        );
        assert!(ship.is_none());
        let (f, ship) = target_findings("pod_infra_missing=x\n", &spec, "abc", true);
        assert_eq!(f[0].code, "pod_infra_shipped");
        assert_eq!(ship, Some(("abc".into(), "localhost/x:latest".into())));
        let (f, _) = target_findings("", &spec, "abc", false);
        assert_eq!((f.len(), f[0].level), (1, Level::Ok));
    }

    #[test]
    fn ports_keep_their_address_and_protocol() {
        let v = serde_json::json!({
            "53/udp": [{"HostIp": "127.0.0.1", "HostPort": "5353"}],
            "80/tcp": [{"HostIp": "::1", "HostPort": "8080"}, {"HostIp": "", "HostPort": "8081"}]
        });
        assert_eq!(
            publish(Some(&v)),
            ["127.0.0.1:5353:53/udp", "8081:80/tcp", "[::1]:8080:80/tcp"]
        );
    }

    #[test]
    fn a_spec_with_option_like_values_is_refused() {
        let mut spec = parse_pod_inspect(INSPECT).unwrap().spec;
        spec.infra_image = "localhost/migrate-pause:latest".into();
        for bad in [
            |s: &mut PodSpec| s.name = "-x".into(),
            |s: &mut PodSpec| s.hostname = "--privileged".into(),
            |s: &mut PodSpec| s.share.push("user".into()),
            |s: &mut PodSpec| s.publish.push("80;rm".into()),
            |s: &mut PodSpec| s.infra_image = String::new(),
        ] {
            let mut s = spec.clone();
            bad(&mut s);
            assert!(s.validate().is_err(), "{s:?}");
        }
    }
}
