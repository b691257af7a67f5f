//! What a drain moves, unit by unit: a pod with all of its members, a group of
//! containers that share namespaces or data folders, or one container. A unit moves with
//! one `send`, so what must stay together stays together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::engine::pod::PodInfo;
use crate::engine::podman::ContainerInfo;
use crate::engine::stack::Level;

/// What kind of unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pod,
    Group,
    Container,
}

/// One unit of a drain.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    /// The pod's name, the container's name, or the group's names joined by `+`.
    pub name: String,
    pub kind: Kind,
    /// What `send` is given: the pod's name, or the containers' names.
    pub send_names: Vec<String>,
    /// The names of its containers (a pod's infra container left out).
    pub containers: Vec<String>,
    /// Resident memory of its processes (KiB): what it takes on the target, and about
    /// the size of its checkpoint archives.
    pub mem_kib: u64,
    /// The images the target needs (ID, name): a restore needs the same ID.
    pub images: Vec<(String, String)>,
    /// A pod's infra image (ID, name): the target re-creates the pod from it, by name or ID.
    pub infra_image: Option<(String, String)>,
    /// Its data folders: the folders its containers bind-mount, synced like `--data`.
    pub data: Vec<PathBuf>,
    /// Their sizes here (KiB), in the order of `data`.
    pub data_kib: Vec<u64>,
    /// Why it cannot move at all, from wherever (found before any target is asked).
    pub refusal: Option<String>,
}

/// Union-find over container indices.
struct Sets(Vec<usize>);

impl Sets {
    fn find(&mut self, i: usize) -> usize {
        let mut r = i;
        while self.0[r] != r {
            r = self.0[r];
        }
        self.0[i] = r;
        r
    }
    fn join(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.0[a.max(b)] = a.min(b);
        }
    }
}

fn refers_to(c: &ContainerInfo, r: &str) -> bool {
    c.name == r || c.id == r || (r.len() >= 12 && c.id.starts_with(r))
}

/// The data folders of a container: its bind-mount sources that `eligible` accepts
/// (a folder `send --data` would take).
fn binds(c: &ContainerInfo, eligible: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    c.mounts
        .iter()
        .filter(|m| m.kind == "bind")
        .map(|m| PathBuf::from(&m.source))
        .filter(|p| eligible(p))
        .collect()
}

/// Forms the units of this host's running containers. `all`: every container here (in
/// any state); `pods`: the pods of the running ones; `mem_kib`: a container's resident
/// memory; `eligible`: whether a bind-mount source can travel as a data folder.
pub fn form(
    all: &[ContainerInfo],
    pods: &[PodInfo],
    mem_kib: &dyn Fn(&ContainerInfo) -> u64,
    eligible: &dyn Fn(&Path) -> bool,
) -> Vec<Unit> {
    let running: Vec<&ContainerInfo> = all
        .iter()
        .filter(|c| c.running && !pods.iter().any(|p| p.infra_id == c.id))
        .collect();
    let mut sets = Sets((0..running.len()).collect());
    let folders: Vec<Vec<PathBuf>> = running.iter().map(|c| binds(c, eligible)).collect();
    for (i, c) in running.iter().enumerate() {
        for (j, o) in running.iter().enumerate().skip(i + 1) {
            let same_pod = !c.pod.is_empty() && c.pod == o.pod;
            let depends = c.dependencies.iter().any(|d| refers_to(o, d))
                || o.dependencies.iter().any(|d| refers_to(c, d))
                || c.shares.iter().any(|(_, r)| refers_to(o, r))
                || o.shares.iter().any(|(_, r)| refers_to(c, r));
            let share_data = folders[i].iter().any(|a| {
                folders[j]
                    .iter()
                    .any(|b| a.starts_with(b) || b.starts_with(a))
            });
            if same_pod || depends || share_data {
                sets.join(i, j);
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in 0..running.len() {
        groups.entry(sets.find(i)).or_default().push(i);
    }
    groups
        .into_values()
        .map(|members| {
            let cs: Vec<ContainerInfo> = members.iter().map(|&i| running[i].clone()).collect();
            let data = outermost(members.iter().flat_map(|&i| folders[i].clone()));
            unit_of(cs, data, all, pods, mem_kib)
        })
        .collect()
}

/// Folders with those inside another left out, sorted.
fn outermost(folders: impl Iterator<Item = PathBuf>) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = folders.collect();
    all.sort();
    all.dedup();
    let keep: Vec<PathBuf> = all
        .iter()
        .filter(|p| !all.iter().any(|o| o != *p && p.starts_with(o)))
        .cloned()
        .collect();
    keep
}

fn unit_of(
    cs: Vec<ContainerInfo>,
    data: Vec<PathBuf>,
    all: &[ContainerInfo],
    pods: &[PodInfo],
    mem_kib: &dyn Fn(&ContainerInfo) -> u64,
) -> Unit {
    let containers: Vec<String> = cs.iter().map(|c| c.name.clone()).collect();
    let mut in_pods: Vec<&PodInfo> = pods
        .iter()
        .filter(|p| cs.iter().any(|c| c.pod == p.id))
        .collect();
    in_pods.dedup_by(|a, b| a.id == b.id);
    let whole_pod = match in_pods[..] {
        [p] if cs.iter().all(|c| c.pod == p.id) => Some(p),
        _ => None,
    };
    let (name, kind, send_names) = match (whole_pod, &containers[..]) {
        (Some(p), _) => (p.name.clone(), Kind::Pod, vec![p.name.clone()]),
        (None, [one]) => (one.clone(), Kind::Container, containers.clone()),
        (None, _) => (containers.join("+"), Kind::Group, containers.clone()),
    };
    let mut images: Vec<(String, String)> = cs
        .iter()
        .map(|c| (c.image_id.clone(), c.image_name.clone()))
        .collect();
    let infra_image = whole_pod
        .and_then(|p| all.iter().find(|c| c.id == p.infra_id))
        .map(|infra| (infra.image_id.clone(), infra.image_name.clone()));
    images.sort();
    images.dedup();
    // The checks `send` would refuse this unit on, whichever the target.
    let refusal = crate::preflight::dependency_findings(&cs, all)
        .into_iter()
        .find(|f| f.level == Level::Fail)
        .map(|f| f.text)
        .or_else(|| {
            (in_pods.len() > 1 || (!in_pods.is_empty() && whole_pod.is_none())).then(|| {
                format!(
                    "{} share namespaces or data folders across pods or with a container outside its pod: one migration moves one pod",
                    containers.join(", ")
                )
            })
        });
    Unit {
        name,
        kind,
        send_names,
        mem_kib: cs.iter().map(mem_kib).sum(),
        containers,
        images,
        infra_image,
        data_kib: vec![0; data.len()],
        data,
        refusal,
    }
}

/// The units the operator named (a pod, a container, or one of a group), whole; all of
/// them when none is named. Also returns the names found in no unit here.
pub fn select(units: Vec<Unit>, named: &[String]) -> (Vec<Unit>, Vec<String>) {
    if named.is_empty() {
        return (units, Vec::new());
    }
    let unknown = named
        .iter()
        .filter(|n| !units.iter().any(|u| names_it(u, n)))
        .cloned()
        .collect();
    let chosen = units
        .into_iter()
        .filter(|u| named.iter().any(|n| names_it(u, n)))
        .collect();
    (chosen, unknown)
}

fn names_it(u: &Unit, n: &str) -> bool {
    u.name == n || u.send_names.iter().any(|s| s == n) || u.containers.iter().any(|c| c == n)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::engine::podman::Mount;
    use crate::protocol::PodSpec;

    pub fn ctr(name: &str, id: &str) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            name: name.into(),
            image_id: format!("img-{name}"),
            image_name: format!("localhost/{name}:latest"),
            status: "running".into(),
            running: true,
            pid: 1,
            ..Default::default()
        }
    }

    pub fn bind(mut c: ContainerInfo, source: &str) -> ContainerInfo {
        c.mounts.push(Mount {
            kind: "bind".into(),
            source: source.into(),
            destination: "/data".into(),
        });
        c
    }

    pub fn pod(name: &str, id: &str, infra: &str, members: &[&str]) -> PodInfo {
        PodInfo {
            id: id.into(),
            name: name.into(),
            infra_id: infra.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
            spec: PodSpec {
                name: name.into(),
                share: vec![],
                publish: vec![],
                hostname: String::new(),
                labels: Default::default(),
                infra_image: String::new(),
            },
            unsupported: vec![],
        }
    }

    /// db and web (thesis pair, their own folders), shop, and pod pp with its infra.
    pub fn host() -> (Vec<ContainerInfo>, Vec<PodInfo>) {
        let db = bind(ctr("db", "d0d0d0d0d0d0d0d0"), "/srv/app/mysql");
        let web = bind(ctr("web", "e0e0e0e0e0e0e0e0"), "/srv/app/www");
        let shop = ctr("shop", "50505050505050");
        let mut infra = ctr("pp-infra", "1f1f1f1f1f1f1f1f");
        infra.pod = "pp00".into();
        infra.image_id = "img-pause".into();
        let mut counter = ctr("pp-counter", "c1c1c1c1c1c1c1c1");
        counter.pod = "pp00".into();
        counter.dependencies = vec![infra.id.clone()];
        let mut front = ctr("pp-front", "f1f1f1f1f1f1f1f1");
        front.pod = "pp00".into();
        front.dependencies = vec![infra.id.clone()];
        let mut stopped = ctr("old", "0101010101010101");
        stopped.running = false;
        let pods = vec![pod(
            "pp",
            "pp00",
            "1f1f1f1f1f1f1f1f",
            &["pp-counter", "pp-front"],
        )];
        (vec![db, web, shop, infra, counter, front, stopped], pods)
    }

    fn units() -> Vec<Unit> {
        let (all, pods) = host();
        form(
            &all,
            &pods,
            &|c| if c.name == "db" { 100_000 } else { 10_000 },
            &|p| p.starts_with("/srv"),
        )
    }

    fn named<'a>(us: &'a [Unit], n: &str) -> &'a Unit {
        us.iter().find(|u| u.name == n).unwrap()
    }

    #[test]
    fn a_pod_is_one_unit_with_its_infra_image_and_stopped_containers_stay() {
        let us = units();
        let names: Vec<&str> = us.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        for n in ["db", "web", "shop", "pp"] {
            assert!(names.contains(&n), "{names:?}");
        }
        let pp = named(&us, "pp");
        assert_eq!(pp.kind, Kind::Pod);
        assert_eq!(pp.send_names, vec!["pp"]);
        assert_eq!(pp.containers, vec!["pp-counter", "pp-front"]);
        assert_eq!(pp.infra_image.as_ref().unwrap().0, "img-pause");
        assert_eq!(pp.mem_kib, 20_000);
        assert_eq!(pp.refusal, None);
        let db = named(&us, "db");
        assert_eq!(db.data, vec![PathBuf::from("/srv/app/mysql")]);
        assert_eq!(db.kind, Kind::Container);
    }

    #[test]
    fn containers_sharing_namespaces_or_data_are_one_unit() {
        let (mut all, pods) = host();
        // web joins db's network namespace.
        all[1].shares = vec![("network", "db".into())];
        all[1].dependencies = vec!["d0d0d0d0d0d0d0d0".into()];
        let us = form(&all, &pods, &|_| 1, &|_| true);
        let g = named(&us, "db+web");
        assert_eq!(g.kind, Kind::Group);
        assert_eq!(g.send_names, vec!["db", "web"]);
        // podman cannot export it: refused before any target is asked, saying why.
        assert!(
            g.refusal.as_deref().unwrap().contains("shares the network"),
            "{g:?}"
        );
        // shop and a new container sharing a data folder (one inside the other's).
        let (mut all, pods) = host();
        all[2] = bind(all[2].clone(), "/srv/shared");
        all.push(bind(ctr("cart", "ca1ca1ca1ca1ca1"), "/srv/shared/cart"));
        let us = form(&all, &pods, &|_| 1, &|_| true);
        let g = named(&us, "shop+cart");
        assert_eq!(g.data, vec![PathBuf::from("/srv/shared")]);
        assert_eq!(g.refusal, None);
    }

    #[test]
    fn named_units_are_taken_whole_and_unknown_names_returned() {
        let (us, unknown) = select(units(), &["pp-front".into(), "db".into(), "gone".into()]);
        let names: Vec<&str> = us.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, vec!["db", "pp"]);
        assert_eq!(unknown, vec!["gone"]);
        assert_eq!(select(units(), &[]).0.len(), 4);
    }
}
