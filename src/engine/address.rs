//! Containers whose own address moves with them: a container on a macvlan or ipvlan
//! network sits on the hosts' shared segment with an address of its own. podman's
//! restore gives it the same IP (and, for macvlan, the same MAC) on the target, so its
//! clients reach it there without any change, and with `--tcp established` their open
//! connections carry on.
//!
//! Two things make that hold, both measured on the lab (docs/design/moving-addresses.md):
//! - **The guard.** CRIU locks a container's connections only at dump, in the source's
//!   network namespace; on the target the new namespace is up (netavark has configured
//!   the interface) tens of milliseconds before CRIU has put the sockets back, and a
//!   client's retransmission arriving then is answered with a reset: 1 move in 4 lost
//!   its connection. The receiver therefore drops TCP to the container's addresses at the
//!   parent interface's ingress (an nft `netdev` table, before macvlan hands the frame
//!   on) from before the restore until it returns. The addresses sit in sets whose
//!   elements expire by themselves, so a receiver killed half-way leaves no address cut
//!   off for longer than the restore could take.
//! - **The announcement.** After the restore the receiver sends a gratuitous ARP from
//!   the container's namespace, so switches and neighbours learn the new port (and a new
//!   MAC, when podman could not keep it).
//!
//! Before the freeze, `send` and `check` make sure the target has the same network (name,
//! driver, subnets, a parent interface that exists), that nothing there holds the address,
//! and that `nft` is there when connections are to be kept.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::engine::podman::{ContainerInfo, Podman};
use crate::engine::stack::{Finding, Level, Side};
use crate::exec::{ExecError, args, shell_quote};
use crate::progress::Ui;
use crate::protocol::AddressEntry;

/// Network drivers that put a container's own address on the hosts' segment.
pub const MOVABLE_DRIVERS: &[&str] = &["macvlan", "ipvlan"];
/// Prefix of the receiver's nft tables.
const TABLE_PREFIX: &str = "migrate_guard_";
const TIMEOUT: Duration = Duration::from_secs(20);
/// How long a guard's addresses stay dropped if nobody removes them: longer than any one
/// restore has taken here (seconds, tens for GiBs of memory), short enough that a
/// migrate killed half-way does not cut an address off for long.
pub const GUARD_EXPIRES: Duration = Duration::from_secs(120);

/// Failures of the guard and the announcement.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("network {0}: {1}")]
    Network(String, String),
}

/// A podman network as `podman network inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Network {
    pub name: String,
    pub driver: String,
    /// The parent interface (macvlan/ipvlan) or the bridge; empty for macvlan means the
    /// host's default route's interface.
    #[serde(default)]
    pub network_interface: String,
    #[serde(default)]
    pub subnets: Option<Vec<Subnet>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Subnet {
    pub subnet: String,
}

impl Network {
    pub fn movable(&self) -> bool {
        MOVABLE_DRIVERS.contains(&self.driver.as_str())
    }

    fn subnet_set(&self) -> BTreeSet<String> {
        self.subnets
            .iter()
            .flatten()
            .map(|s| s.subnet.clone())
            .collect()
    }

    fn describe(&self) -> String {
        let subnets: Vec<String> = self.subnet_set().into_iter().collect();
        format!(
            "{} on {}, {}",
            self.driver,
            if self.network_interface.is_empty() {
                "the default route's interface"
            } else {
                &self.network_interface
            },
            if subnets.is_empty() {
                "no subnet".to_string()
            } else {
                subnets.join(" ")
            }
        )
    }
}

/// Reads `podman network inspect` JSON.
pub fn parse_networks(json: &str) -> Result<Vec<Network>, serde_json::Error> {
    serde_json::from_str(json)
}

/// The networks the containers are attached to, as this host's podman defines them. A
/// name podman does not know as a network (a container on the host's network may show
/// `host`) is left out: such a container has no address of its own to move.
pub async fn networks_of(infos: &[ContainerInfo]) -> Result<Vec<Network>, AddressError> {
    let names: BTreeSet<&str> = infos
        .iter()
        .flat_map(|c| c.networks.iter().map(|n| n.network.as_str()))
        .collect();
    let mut out = Vec::new();
    for name in names {
        let Ok(found) =
            crate::exec::run("podman", &args(["network", "inspect", name]), TIMEOUT).await
        else {
            continue;
        };
        let nets = parse_networks(&found.stdout)
            .map_err(|e| AddressError::Network(name.into(), e.to_string()))?;
        out.extend(nets);
    }
    Ok(out)
}

/// One container's address that moves with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moving {
    pub container: String,
    pub network: Network,
    pub ips: Vec<IpAddr>,
    pub mac: String,
}

/// The addresses of `infos` on macvlan/ipvlan networks.
pub fn moving(infos: &[ContainerInfo], networks: &[Network]) -> Vec<Moving> {
    let mut out = Vec::new();
    for c in infos {
        for a in &c.networks {
            let Some(net) = networks.iter().find(|n| n.name == a.network) else {
                continue;
            };
            if net.movable() && !a.ips.is_empty() {
                out.push(Moving {
                    container: c.name.clone(),
                    network: net.clone(),
                    ips: a.ips.clone(),
                    mac: a.mac.clone(),
                });
            }
        }
    }
    out
}

fn ip_list(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the source can say: which addresses move, and which containers' established
/// connections cannot be kept because they are reached through this host's own address.
pub fn source_findings(infos: &[ContainerInfo], moving: &[Moving], keep_tcp: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    for m in moving {
        let tcp = if keep_tcp {
            "its established connections are kept (the target holds TCP to it back until the restore is done, then announces it)"
        } else {
            "its clients reach it there at the same address (add --tcp established to keep their open connections)"
        };
        out.push(Finding::new(
            Level::Info,
            Side::Source,
            "address_moves",
            format!(
                "{}'s address {} on network {} ({}) moves with it; {tcp}",
                m.container,
                ip_list(&m.ips),
                m.network.name,
                m.network.describe()
            ),
        ));
    }
    if keep_tcp {
        for c in infos.iter().filter(|c| c.published) {
            if moving.iter().any(|m| m.container == c.name) {
                continue;
            }
            out.push(
                Finding::new(
                    Level::Warn,
                    Side::Source,
                    "address_stays",
                    format!(
                        "{} is reached through ports published on this host's address: connections through them end at the move whatever --tcp says (the address stays here); its clients must connect to the target",
                        c.name
                    ),
                )
                .fix("give it an address of its own on a macvlan network that both hosts have, to keep such connections"),
            );
        }
    }
    out
}

/// Lines the target prints about the networks, their addresses and the tools needed.
pub fn target_script(moving: &[Moving]) -> String {
    if moving.is_empty() {
        return String::new();
    }
    let nets: BTreeSet<&str> = moving.iter().map(|m| m.network.name.as_str()).collect();
    let mut s = String::new();
    for n in nets {
        s.push_str(&format!(
            "printf 'address_net=%s\\n' \"$(podman network inspect {} 2>/dev/null | tr -d '\\n')\"\n",
            shell_quote(n)
        ));
    }
    s.push_str("ip -o link show 2>/dev/null | awk -F': ' '{sub(/@.*/, \"\", $2); print \"address_link=\" $2}'\n");
    s.push_str(
        "ids=$(podman ps -q 2>/dev/null); [ -z \"$ids\" ] || podman inspect --format 'address_held={{.Name}}{{range .NetworkSettings.Networks}} {{.IPAddress}} {{.GlobalIPv6Address}}{{end}}' $ids 2>/dev/null\n",
    );
    s.push_str("command -v nft >/dev/null && echo address_nft=ok\n");
    s.push_str(
        "{ command -v arping >/dev/null || busybox --list 2>/dev/null | grep -qx arping; } && echo address_arping=ok\n",
    );
    s
}

/// What the target said, read from the lines of [`target_script`].
#[derive(Default)]
struct Seen {
    nets: BTreeMap<String, Network>,
    links: BTreeSet<String>,
    held: Vec<(String, IpAddr)>,
    nft: bool,
    arping: bool,
}

impl Seen {
    fn parse(out: &str) -> Seen {
        let mut s = Seen::default();
        for line in out.lines() {
            if let Some(json) = line.strip_prefix("address_net=") {
                for n in parse_networks(json).unwrap_or_default() {
                    s.nets.insert(n.name.clone(), n);
                }
            } else if let Some(l) = line.strip_prefix("address_link=") {
                s.links.insert(l.trim().to_string());
            } else if let Some(rest) = line.strip_prefix("address_held=") {
                let mut words = rest.split_whitespace();
                if let Some(name) = words.next() {
                    let ips = words.filter_map(|w| w.parse().ok());
                    s.held.extend(ips.map(|ip| (name.to_string(), ip)));
                }
            }
            s.nft |= line == "address_nft=ok";
            s.arping |= line == "address_arping=ok";
        }
        s
    }

    /// What is wrong with the target's copy of the source's network `src`, if anything.
    fn network_problem(&self, src: &Network, user: &str) -> Option<Finding> {
        let fail = |code, text: String, fix: String| {
            Some(Finding::new(Level::Fail, Side::Target, code, text).fix(fix))
        };
        match self.nets.get(&src.name) {
            None => fail(
                "address_network_missing",
                format!(
                    "network {} ({}), which {user}'s address is on, does not exist there",
                    src.name,
                    src.describe()
                ),
                format!(
                    "create it there with the same driver and subnets: podman network create -d {} -o parent=<that host's interface on the segment> {} {}",
                    src.driver,
                    src.subnet_set()
                        .iter()
                        .map(|s| format!("--subnet {s}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    src.name
                ),
            ),
            Some(t) if t.driver != src.driver || t.subnet_set() != src.subnet_set() => fail(
                "address_network_differs",
                format!(
                    "network {} is {} there but {} here",
                    src.name,
                    t.describe(),
                    src.describe()
                ),
                "give the network the same driver and subnets on both hosts".into(),
            ),
            Some(t)
                if !t.network_interface.is_empty()
                    && !self.links.is_empty()
                    && !self.links.contains(&t.network_interface) =>
            {
                fail(
                    "address_parent_missing",
                    format!(
                        "network {}'s parent interface {} does not exist there",
                        src.name, t.network_interface
                    ),
                    "re-create the network there on the interface that reaches the segment".into(),
                )
            }
            Some(_) => None,
        }
    }
}

/// What the target's answers to [`target_script`] mean for the move.
pub fn target_findings(
    out: &str,
    moving: &[Moving],
    keep_tcp: bool,
    receiver_knows: bool,
) -> Vec<Finding> {
    if moving.is_empty() {
        return Vec::new();
    }
    let seen = Seen::parse(out);
    let mut f = Vec::new();
    let mut nets = BTreeSet::new();
    for m in moving {
        if nets.insert(m.network.name.clone()) {
            f.extend(seen.network_problem(&m.network, &m.container));
        }
        for ip in &m.ips {
            if let Some((other, _)) = seen.held.iter().find(|(_, h)| h == ip) {
                f.push(
                    Finding::new(
                        Level::Fail,
                        Side::Target,
                        "address_taken",
                        format!(
                            "{ip}, {}'s address, is held there by container {other}",
                            m.container
                        ),
                    )
                    .fix(format!("stop or re-address {other} there first")),
                );
            }
        }
    }
    if keep_tcp && !seen.nft {
        f.push(
            Finding::new(
                Level::Fail,
                Side::Target,
                "address_guard_unavailable",
                "nft is missing there: without it the target answers a client's packets with a reset while the restore is under way, and the connections kept with --tcp established can end",
            )
            .fix("install nftables there (apt-get install nftables)"),
        );
    }
    if !receiver_knows {
        f.push(
            Finding::new(
                Level::Fail,
                Side::Target,
                "receiver_without_addresses",
                "the receiver's migrate on the target does not guard and announce moving addresses (an older build)",
            )
            .fix("install this build there (`--install-receiver`) and start its receiver again"),
        );
    }
    if f.is_empty() {
        f.push(Finding::new(
            Level::Ok,
            Side::Target,
            "address_network_ready",
            format!(
                "the target has network{} {} as here, and nothing there holds {}",
                if nets.len() == 1 { "" } else { "s" },
                nets.into_iter().collect::<Vec<_>>().join(", "),
                moving
                    .iter()
                    .map(|m| ip_list(&m.ips))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        ));
    }
    if !seen.arping {
        f.push(
            Finding::new(
                Level::Warn,
                Side::Target,
                "address_unannounced",
                "no arping there (neither iputils' nor busybox's): the moved address is not announced, and neighbours that cached the old port or MAC reach it only when their entry expires",
            )
            .fix("install iputils-arping or busybox there"),
        );
    }
    f
}

/// The nft table that drops TCP to `addrs` arriving on each parent interface. Its
/// addresses expire after `expire`, whatever happens to the receiver.
pub fn guard_ruleset(
    table: &str,
    by_parent: &BTreeMap<String, Vec<IpAddr>>,
    expire: Duration,
) -> String {
    let secs = expire.as_secs().max(1);
    let set = |kind: &str, ips: Vec<String>| {
        let elements = if ips.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", ips.join(", "))
        };
        format!("  set {kind} {{ type {kind}_addr; flags timeout; timeout {secs}s;{elements} }}\n")
    };
    let all: Vec<&IpAddr> = by_parent.values().flatten().collect();
    let mut s = format!("table netdev {table} {{\n");
    s.push_str(&set(
        "ipv4",
        all.iter()
            .filter(|ip| ip.is_ipv4())
            .map(|ip| ip.to_string())
            .collect(),
    ));
    s.push_str(&set(
        "ipv6",
        all.iter()
            .filter(|ip| ip.is_ipv6())
            .map(|ip| ip.to_string())
            .collect(),
    ));
    for (i, parent) in by_parent.keys().enumerate() {
        s.push_str(&format!(
            "  chain in_{i} {{\n    type filter hook ingress device {} priority -500; policy accept;\n    ip daddr @ipv4 meta l4proto tcp drop\n    ip6 daddr @ipv6 meta l4proto tcp drop\n  }}\n",
            serde_json::Value::String(parent.clone())
        ));
    }
    s.push_str("}\n");
    s
}

/// The nft table name for a run (letters, digits and `_` only).
pub fn guard_table(run_id: &str) -> String {
    let tag: String = run_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{TABLE_PREFIX}{tag}")
}

/// The parent interface of a movable network here (its default route's interface when
/// the network names none).
pub async fn parent_here(network: &str) -> Result<String, AddressError> {
    let out = crate::exec::run("podman", &args(["network", "inspect", network]), TIMEOUT).await?;
    let net = parse_networks(&out.stdout)
        .map_err(|e| AddressError::Network(network.into(), e.to_string()))?
        .into_iter()
        .next()
        .ok_or_else(|| AddressError::Network(network.into(), "podman shows nothing".into()))?;
    if !net.movable() {
        return Err(AddressError::Network(
            network.into(),
            format!("is a {} network here, not macvlan or ipvlan", net.driver),
        ));
    }
    if !net.network_interface.is_empty() {
        return Ok(net.network_interface);
    }
    let out = crate::exec::run("ip", &args(["-o", "route", "show", "default"]), TIMEOUT).await?;
    out.stdout
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| {
            AddressError::Network(network.into(), "no parent and no default route".into())
        })
}

/// An installed guard; [`Guard::remove`] takes it away (its addresses expire anyway).
#[derive(Debug)]
pub struct Guard {
    table: String,
}

impl Guard {
    pub async fn install(
        run_id: &str,
        by_parent: &BTreeMap<String, Vec<IpAddr>>,
        expire: Duration,
    ) -> Result<Guard, AddressError> {
        let table = guard_table(run_id);
        // A table of an earlier try of this run (its addresses expired) goes first.
        let _ =
            crate::exec::run("nft", &args(["delete", "table", "netdev", &table]), TIMEOUT).await;
        let rules = guard_ruleset(&table, by_parent, expire);
        crate::exec::run_with_input("nft", &args(["-f", "-"]), rules.as_bytes(), TIMEOUT).await?;
        Ok(Guard { table })
    }

    pub async fn remove(self) -> Result<(), AddressError> {
        crate::exec::run(
            "nft",
            &args(["delete", "table", "netdev", &self.table]),
            TIMEOUT,
        )
        .await?;
        Ok(())
    }
}

/// Installs a guard for `addresses` (of containers whose connections are kept) before
/// they are restored here; `None` when there are none. A guard that cannot be set up is
/// reported and the restore goes on: connections may then be reset, the service is not
/// held back for them.
pub async fn guard_for(tag: &str, addresses: &[&AddressEntry], ui: &Ui) -> Option<Guard> {
    let mut by_parent: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for a in addresses {
        match parent_here(&a.network).await {
            Ok(parent) => by_parent.entry(parent).or_default().extend(&a.ips),
            Err(e) => ui.warn(&format!("cannot guard {}: {e:#}", ip_list(&a.ips))),
        }
    }
    if by_parent.is_empty() {
        return None;
    }
    match Guard::install(tag, &by_parent, GUARD_EXPIRES).await {
        Ok(g) => Some(g),
        Err(e) => {
            ui.warn(&format!(
                "cannot hold TCP to the moving addresses back during the restore ({e:#}): their connections may be reset"
            ));
            None
        }
    }
}

/// Takes a guard away after the restore returned (its addresses would expire anyway).
pub async fn unguard(guard: Option<Guard>, ui: &Ui) {
    if let Some(g) = guard
        && let Err(e) = g.remove().await
    {
        ui.warn(&format!(
            "cannot remove the guard of the moving addresses ({e:#}); its addresses expire within {}s",
            GUARD_EXPIRES.as_secs()
        ));
    }
}

/// Announces the addresses of container `name`, restored here.
pub async fn announce_container(name: &str, addresses: &[AddressEntry], ui: &Ui) {
    if addresses.is_empty() {
        return;
    }
    let pid = match Podman.inspect(&[name.to_string()]).await {
        Ok(v) if !v.is_empty() => v[0].pid,
        Ok(_) => return,
        Err(e) => {
            ui.warn(&format!("cannot announce {name}'s address: {e}"));
            return;
        }
    };
    for ip in addresses.iter().flat_map(|a| &a.ips) {
        match announce(pid, *ip).await {
            Ok(()) => ui.info(&format!("announced {ip} ({name})")),
            Err(e) => ui.warn(&format!("cannot announce {ip} ({name}): {e:#}")),
        }
    }
}

/// Tells the segment where `ip` is now: a gratuitous ARP from the interface that holds it
/// in the namespace of process `pid` (IPv4 only; IPv6 neighbours learn it from the
/// restored socket's own traffic).
pub async fn announce(pid: i64, ip: IpAddr) -> Result<(), AddressError> {
    let IpAddr::V4(v4) = ip else {
        return Ok(());
    };
    let target = pid.to_string();
    let ns = |rest: &[&str]| -> Vec<String> {
        args(
            ["-t", target.as_str(), "-n"]
                .into_iter()
                .chain(rest.iter().copied()),
        )
    };
    let ip_text = v4.to_string();
    let out = crate::exec::run(
        "nsenter",
        &ns(&["ip", "-o", "-4", "addr", "show", "to", &ip_text]),
        TIMEOUT,
    )
    .await?;
    let iface = out
        .stdout
        .split_whitespace()
        .nth(1)
        .map(|i| i.split('@').next().unwrap_or(i).to_string())
        .ok_or_else(|| {
            AddressError::Network(
                ip_text.clone(),
                "no interface holds it in the container".into(),
            )
        })?;
    let arping: &[&str] = if crate::exec::run("sh", &args(["-c", "command -v arping"]), TIMEOUT)
        .await
        .is_ok()
    {
        &["arping"]
    } else {
        &["busybox", "arping"]
    };
    let mut cmd: Vec<&str> = arping.to_vec();
    cmd.extend(["-U", "-c", "1", "-I", &iface, &ip_text]);
    crate::exec::run("nsenter", &ns(&cmd), TIMEOUT).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::podman::Attachment;

    const MACVLAN: &str = r#"[{"name":"mv","id":"15aa","driver":"macvlan","network_interface":"eth0",
        "subnets":[{"subnet":"10.77.0.0/24","gateway":"10.77.0.1","lease_range":{"start_ip":"10.77.0.193","end_ip":"10.77.0.223"}}],
        "ipv6_enabled":false,"internal":false,"dns_enabled":true,"ipam_options":{"driver":"host-local"}}]"#;
    const BRIDGE: &str = r#"[{"name":"podman","id":"2f25","driver":"bridge","network_interface":"podman0",
        "subnets":[{"subnet":"10.88.0.0/16","gateway":"10.88.0.1"}]}]"#;

    fn ctr(name: &str, net: &str, ip: &str, published: bool) -> ContainerInfo {
        ContainerInfo {
            name: name.into(),
            running: true,
            networks: vec![Attachment {
                network: net.into(),
                ips: vec![ip.parse().unwrap()],
                mac: "02:77:00:00:00:c8".into(),
            }],
            published,
            ..Default::default()
        }
    }

    fn nets() -> Vec<Network> {
        let mut v = parse_networks(MACVLAN).unwrap();
        v.extend(parse_networks(BRIDGE).unwrap());
        v
    }

    fn target_out(net_json: &str, extra: &str) -> String {
        format!(
            "address_net={}\naddress_link=lo\naddress_link=eth0\n{extra}",
            net_json.replace('\n', "")
        )
    }

    #[test]
    fn only_macvlan_and_ipvlan_addresses_move() {
        let infos = [
            ctr("echo", "mv", "10.77.0.200", false),
            ctr("web", "podman", "10.88.0.5", true),
        ];
        let m = moving(&infos, &nets());
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].container, "echo");
        assert_eq!(m[0].ips, vec!["10.77.0.200".parse::<IpAddr>().unwrap()]);
        let f = source_findings(&infos, &m, true);
        assert_eq!(f.len(), 2, "{f:#?}");
        assert_eq!(f[0].code, "address_moves");
        assert!(
            f[0].text.contains("10.77.0.200") && f[0].text.contains("kept"),
            "{}",
            f[0].text
        );
        // A published container's connections go with this host's address.
        assert_eq!(f[1].code, "address_stays");
        assert_eq!(f[1].level, Level::Warn);
        assert!(f[1].text.contains("web"));
        // Without --tcp established nothing is promised about connections.
        let f = source_findings(&infos, &m, false);
        assert_eq!(f.len(), 1);
        assert!(f[0].text.contains("--tcp established"));
    }

    #[test]
    fn a_ready_target_is_ok_and_each_problem_is_named() {
        let infos = [ctr("echo", "mv", "10.77.0.200", false)];
        let m = moving(&infos, &nets());
        let tools = "address_nft=ok\naddress_arping=ok\n";
        let ok = target_findings(&target_out(MACVLAN, tools), &m, true, true);
        assert_eq!(ok.len(), 1, "{ok:#?}");
        assert_eq!(ok[0].level, Level::Ok);
        assert_eq!(ok[0].code, "address_network_ready");

        let codes = |out: &str, keep: bool, knows: bool| -> Vec<&'static str> {
            target_findings(out, &m, keep, knows)
                .into_iter()
                .filter(|f| f.level != Level::Ok)
                .map(|f| f.code)
                .collect()
        };
        // No such network there: the fix says how to make it.
        let missing = target_findings(
            "address_link=eth0\naddress_nft=ok\naddress_arping=ok\n",
            &m,
            true,
            true,
        );
        assert_eq!(missing[0].code, "address_network_missing");
        assert!(
            missing[0]
                .fix
                .as_deref()
                .unwrap()
                .contains("--subnet 10.77.0.0/24 mv"),
            "{missing:#?}"
        );
        assert_eq!(
            codes(
                &target_out(&MACVLAN.replace("10.77.0.0/24", "10.78.0.0/24"), tools),
                true,
                true
            ),
            ["address_network_differs"]
        );
        assert_eq!(
            codes(
                &target_out(&MACVLAN.replace("\"eth0\"", "\"eth9\""), tools),
                true,
                true
            ),
            ["address_parent_missing"]
        );
        let taken = format!("{tools}address_held=squatter 10.77.0.200 \n");
        assert_eq!(
            codes(&target_out(MACVLAN, &taken), true, true),
            ["address_taken"]
        );
        // nft only matters when connections are kept.
        assert_eq!(
            codes(&target_out(MACVLAN, "address_arping=ok\n"), true, true),
            ["address_guard_unavailable"]
        );
        assert!(codes(&target_out(MACVLAN, "address_arping=ok\n"), false, true).is_empty());
        assert_eq!(
            codes(&target_out(MACVLAN, tools), true, false),
            ["receiver_without_addresses"]
        );
        // No arping: a warning, the move can go on.
        let f = target_findings(&target_out(MACVLAN, "address_nft=ok\n"), &m, true, true);
        assert!(
            f.iter()
                .any(|f| f.code == "address_unannounced" && f.level == Level::Warn)
        );
        assert!(f.iter().all(|f| f.level != Level::Fail), "{f:#?}");
    }

    #[test]
    fn the_guard_drops_only_tcp_to_the_addresses_and_expires() {
        let mut by_parent = BTreeMap::new();
        by_parent.insert(
            "eth0".to_string(),
            vec!["10.77.0.200".parse().unwrap(), "fd00::c8".parse().unwrap()],
        );
        let table = guard_table("20261203T070000Z-ab12cd34");
        assert_eq!(table, "migrate_guard_20261203T070000Z_ab12cd34");
        let r = guard_ruleset(&table, &by_parent, Duration::from_secs(90));
        assert!(r.starts_with(&format!("table netdev {table} {{")), "{r}");
        assert!(r.contains("set ipv4 { type ipv4_addr; flags timeout; timeout 90s; elements = { 10.77.0.200 }; }"), "{r}");
        assert!(r.contains("elements = { fd00::c8 }"), "{r}");
        assert!(
            r.contains("hook ingress device \"eth0\" priority -500"),
            "{r}"
        );
        assert!(r.contains("ip daddr @ipv4 meta l4proto tcp drop"), "{r}");
        // No IPv6 address: an empty set, still valid for nft.
        by_parent.insert("eth0".to_string(), vec!["10.77.0.200".parse().unwrap()]);
        let r = guard_ruleset(&table, &by_parent, Duration::from_secs(90));
        assert!(
            r.contains("set ipv6 { type ipv6_addr; flags timeout; timeout 90s; }"),
            "{r}"
        );
    }
}
