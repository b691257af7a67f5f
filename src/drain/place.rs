//! Where each unit goes. Every target is asked once (one SSH round trip: its stack and
//! CPU as `check` probes them, free memory, free space where the archives and each data
//! folder land, its images, containers and pods); then the units are placed one after
//! the other, largest first, each on the target with the most memory left among those
//! with room for it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::engine::stack::{self, Facts, Level};

use super::units::Unit;

/// Free space on one target file system, as `preflight::space_script` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Space {
    pub avail_kib: u64,
    /// The file system (its device number there).
    pub device: String,
    /// KiB of the folder there already (a data folder synced before).
    pub present_kib: u64,
}

/// One target, as its probe found it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Target {
    /// As given to `--to`.
    pub to: String,
    /// Why nothing can move there (its stack, its CPU, SSH), when so.
    pub broken: Option<String>,
    /// What a move there goes ahead with (`--ignore-cpu`).
    pub warnings: Vec<String>,
    pub mem_kib: u64,
    /// Image IDs there.
    pub images: BTreeSet<String>,
    /// Image names there (`REPOSITORY:TAG`).
    pub image_names: BTreeSet<String>,
    /// Container names there.
    pub containers: BTreeSet<String>,
    /// Pod names there.
    pub pods: BTreeSet<String>,
    /// Where the archives land.
    pub archives: Option<Space>,
    /// Where each data folder lands.
    pub data: BTreeMap<PathBuf, Space>,
}

/// The probe run on every target: `data` are all the units' data folders.
pub fn probe_script(workdir: &str, data: &[PathBuf]) -> String {
    let mut s = stack::probe_script();
    s.push_str(
        "echo \"mem_available_kib=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)\"\n\
         podman image ls --all --no-trunc --format 'image={{.ID}}' 2>/dev/null\n\
         podman image ls --format 'image_name={{.Repository}}:{{.Tag}}' 2>/dev/null\n\
         podman ps --all --format 'container={{.Names}}' 2>/dev/null\n\
         podman pod ps --format 'pod={{.Name}}' 2>/dev/null\n",
    );
    let run_dir = crate::rundir::remote_run_dir(workdir, "drain");
    s.push_str(&crate::preflight::space_script(&run_dir, data));
    s
}

fn space(fields: &str) -> Option<Space> {
    let mut f = fields.split_whitespace();
    Some(Space {
        avail_kib: f.next()?.parse().ok()?,
        device: f.next()?.to_string(),
        present_kib: f.next().and_then(|v| v.parse().ok()).unwrap_or(0),
    })
}

/// Reads a target's probe. `source`: this host's stack, for the CPU comparison.
pub fn parse(to: &str, out: &str, data: &[PathBuf], source: &Facts, ignore_cpu: bool) -> Target {
    let facts = Facts::parse(out);
    let mut t = Target {
        to: to.to_string(),
        ..Default::default()
    };
    if let Some(p) = facts.problem() {
        t.broken = Some(format!("{} ({})", p.text, p.fix));
    }
    let cpu = crate::engine::cpu::cpu_finding(source, &facts, ignore_cpu);
    match cpu.level {
        Level::Fail if t.broken.is_none() => t.broken = Some(cpu.text),
        Level::Warn => t.warnings.push(cpu.text),
        _ => {}
    }
    let mut mem = None;
    for line in out.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "mem_available_kib" => mem = v.trim().parse().ok(),
            "image" => {
                t.images
                    .insert(v.trim().trim_start_matches("sha256:").to_string());
            }
            "image_name" => {
                t.image_names.insert(v.trim().to_string());
            }
            "container" => {
                t.containers.insert(v.trim().to_string());
            }
            "pod" => {
                t.pods.insert(v.trim().to_string());
            }
            "space" => {
                let Some((key, fields)) = v.split_once('=') else {
                    continue;
                };
                if key == "archives" {
                    t.archives = space(fields);
                } else if let Some(d) = key
                    .strip_prefix("data")
                    .and_then(|i| i.parse::<usize>().ok())
                    .and_then(|i| data.get(i))
                    && let Some(s) = space(fields)
                {
                    t.data.insert(d.clone(), s);
                }
            }
            _ => {}
        }
    }
    match mem {
        Some(m) => t.mem_kib = m,
        None if t.broken.is_none() => {
            t.broken = Some("cannot read its free memory (MemAvailable in /proc/meminfo)".into())
        }
        None => {}
    }
    t
}

/// A target that could not be probed.
pub fn unreachable(to: &str, why: String) -> Target {
    Target {
        to: to.to_string(),
        broken: Some(why),
        ..Default::default()
    }
}

/// Where one unit goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// To the target of this index in `--to`.
    To(usize),
    /// Nowhere, and why.
    Refused(String),
}

/// What is left on a target while units are placed on it.
struct Room {
    mem_kib: u64,
    /// Free KiB per file system.
    free: BTreeMap<String, u64>,
    /// Names taken there, by units placed before too.
    names: BTreeSet<String>,
}

impl Room {
    fn of(t: &Target) -> Room {
        let mut free = BTreeMap::new();
        for s in t.archives.iter().chain(t.data.values()) {
            free.insert(s.device.clone(), s.avail_kib);
        }
        Room {
            mem_kib: t.mem_kib,
            free,
            names: t.containers.union(&t.pods).cloned().collect(),
        }
    }
}

/// With a margin: file systems, archives and a restored process take a little more.
fn with_margin(kib: u64) -> u64 {
    kib + kib / 10
}

fn mib(kib: u64) -> u64 {
    kib.div_ceil(1024)
}

/// Why `u` does not fit on `t` as it is now, or the data KiB it takes per file system.
fn fits(u: &Unit, t: &Target, room: &Room, ship: bool) -> Result<BTreeMap<String, u64>, String> {
    if let Some(why) = &t.broken {
        return Err(why.clone());
    }
    let mut taken: Vec<&str> = u
        .containers
        .iter()
        .chain(std::iter::once(&u.name).filter(|_| u.kind == super::units::Kind::Pod))
        .filter(|n| room.names.contains(*n))
        .map(String::as_str)
        .collect();
    taken.dedup();
    if !taken.is_empty() {
        return Err(format!("{} exists there already", taken.join(", ")));
    }
    if !ship && let Some((id, name)) = u.images.iter().find(|(id, _)| !t.images.contains(id)) {
        let shown = if name.is_empty() { id } else { name };
        return Err(format!(
            "image {shown} is not there (--ship-image copies it)"
        ));
    }
    if !ship
        && let Some((id, name)) = &u.infra_image
        && !t.images.contains(id)
        && !t.image_names.contains(name)
    {
        return Err(format!(
            "pod {}'s infra image {name} is not there (--ship-image copies it)",
            u.name
        ));
    }
    if with_margin(u.mem_kib) > room.mem_kib {
        return Err(format!(
            "not enough free memory: {} MiB available, about {} MiB needed",
            mib(room.mem_kib),
            mib(with_margin(u.mem_kib))
        ));
    }
    // Archives are removed once restored: they need room only during the move.
    let mut need: BTreeMap<String, (u64, u64, Vec<String>)> = BTreeMap::new();
    if let Some(a) = &t.archives {
        need.entry(a.device.clone()).or_default().0 += u.mem_kib;
        need.entry(a.device.clone())
            .or_default()
            .2
            .push("the archives".into());
    }
    for (d, kib) in u.data.iter().zip(&u.data_kib) {
        if let Some(s) = t.data.get(d) {
            let e = need.entry(s.device.clone()).or_default();
            e.1 += kib.saturating_sub(s.present_kib);
            e.2.push(d.display().to_string());
        }
    }
    let mut keeps = BTreeMap::new();
    for (dev, (archives, data, whats)) in need {
        let free = room.free.get(&dev).copied().unwrap_or(0);
        let want = with_margin(archives + data);
        if want > free {
            return Err(format!(
                "not enough free space for {}: {} MiB free, about {} MiB needed",
                whats.join(" and "),
                mib(free),
                mib(want)
            ));
        }
        keeps.insert(dev, data);
    }
    Ok(keeps)
}

/// Places every unit: largest (memory) first; each on the target with the most memory
/// left among those where it fits (the earlier in `--to` on a tie); a unit that fits
/// nowhere is refused with every target's reason. `ship`: `--ship-image`.
pub fn place(units: &[Unit], targets: &[Target], ship: bool) -> Vec<Decision> {
    let mut rooms: Vec<Room> = targets.iter().map(Room::of).collect();
    let mut out: Vec<Decision> = vec![Decision::Refused(String::new()); units.len()];
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by(|&a, &b| {
        units[b]
            .mem_kib
            .cmp(&units[a].mem_kib)
            .then_with(|| units[a].name.cmp(&units[b].name))
    });
    for i in order {
        let u = &units[i];
        if let Some(why) = &u.refusal {
            out[i] = Decision::Refused(why.clone());
            continue;
        }
        let mut best: Option<(usize, BTreeMap<String, u64>)> = None;
        let mut whys = Vec::new();
        for (ti, t) in targets.iter().enumerate() {
            match fits(u, t, &rooms[ti], ship) {
                Ok(keeps) => {
                    if best
                        .as_ref()
                        .is_none_or(|(bi, _)| rooms[ti].mem_kib > rooms[*bi].mem_kib)
                    {
                        best = Some((ti, keeps));
                    }
                }
                Err(why) => whys.push(format!("{}: {why}", t.to)),
            }
        }
        out[i] = match best {
            Some((ti, keeps)) => {
                let room = &mut rooms[ti];
                room.mem_kib -= u.mem_kib;
                for (dev, kib) in keeps {
                    if let Some(f) = room.free.get_mut(&dev) {
                        *f = f.saturating_sub(kib);
                    }
                }
                room.names.extend(u.containers.iter().cloned());
                room.names.insert(u.name.clone());
                Decision::To(ti)
            }
            None => Decision::Refused(format!("no target has room: {}", whys.join("; "))),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::units::{self, tests::host};
    use super::*;

    const GIB: u64 = 1 << 20;

    fn target(to: &str, mem_kib: u64, free_kib: u64) -> Target {
        let (all, _) = host();
        let mut t = Target {
            to: to.into(),
            mem_kib,
            images: all.iter().map(|c| c.image_id.clone()).collect(),
            archives: Some(Space {
                avail_kib: free_kib,
                device: "64768".into(),
                present_kib: 0,
            }),
            ..Default::default()
        };
        for d in ["/srv/app/mysql", "/srv/app/www"] {
            t.data.insert(
                d.into(),
                Space {
                    avail_kib: free_kib,
                    device: "64768".into(),
                    present_kib: 0,
                },
            );
        }
        t
    }

    fn units() -> Vec<Unit> {
        let (all, pods) = host();
        let mut us = units::form(
            &all,
            &pods,
            &|c| if c.name == "db" { 400 << 10 } else { 20 << 10 },
            &|p| p.starts_with("/srv"),
        );
        for u in &mut us {
            u.data_kib = u
                .data
                .iter()
                .map(|d| {
                    if d.ends_with("www") {
                        900 << 10
                    } else {
                        50 << 10
                    }
                })
                .collect();
        }
        us
    }

    fn decision<'a>(us: &[Unit], ds: &'a [Decision], name: &str) -> &'a Decision {
        &ds[us.iter().position(|u| u.name == name).unwrap()]
    }

    #[test]
    fn a_unit_no_target_has_room_for_is_refused_with_the_reasons_and_the_others_placed() {
        let us = units();
        // b: memory plenty, 600 MiB of disk (550 once db's folder is counted): web's 900 MiB folder does not fit; c: full.
        let ts = [
            target("root@b", 4 * GIB, 600 << 10),
            target("root@c", 4 * GIB, 1 << 10),
        ];
        let ds = place(&us, &ts, false);
        let Decision::Refused(why) = decision(&us, &ds, "web") else {
            panic!("{ds:?}")
        };
        assert!(
            why.contains("root@b: not enough free space for the archives and /srv/app/www: 550 MiB free, about 1012 MiB needed"),
            "{why}"
        );
        assert!(why.contains("root@c: not enough free space"), "{why}");
        for n in ["db", "shop", "pp"] {
            assert_eq!(decision(&us, &ds, n), &Decision::To(0), "{n}: {ds:?}");
        }
    }

    #[test]
    fn units_spread_by_memory_left_and_a_pod_goes_whole_to_one_target() {
        let us = units();
        let ts = [
            target("b", 2 * GIB, 100 * GIB),
            target("c", 2 * GIB, 100 * GIB),
        ];
        let ds = place(&us, &ts, false);
        // db (the largest) first to b; then c has the most left; and so on.
        assert_eq!(decision(&us, &ds, "db"), &Decision::To(0));
        let placed: Vec<_> = ds.iter().filter(|d| matches!(d, Decision::To(_))).collect();
        assert_eq!(placed.len(), 4, "{ds:?}");
        assert!(ds.iter().any(|d| d == &Decision::To(1)), "{ds:?}");
        let pp = us.iter().find(|u| u.name == "pp").unwrap();
        assert_eq!(pp.send_names, vec!["pp"], "one send moves the pod whole");
    }

    #[test]
    fn memory_names_images_and_broken_targets_refuse_with_their_reason() {
        let us = units();
        let mut small = target("b", 300 << 10, 100 * GIB);
        small.containers.insert("shop".into());
        let mut no_images = target("c", 4 * GIB, 100 * GIB);
        no_images.images.clear();
        let broken = unreachable("d", "SSH failed: connection refused".into());
        let ts = [small, no_images, broken];
        let ds = place(&us, &ts, false);
        let Decision::Refused(why) = decision(&us, &ds, "db") else {
            panic!("{ds:?}")
        };
        assert!(
            why.contains("b: not enough free memory: 300 MiB available, about 440 MiB needed"),
            "{why}"
        );
        assert!(
            why.contains("c: image localhost/db:latest is not there (--ship-image copies it)"),
            "{why}"
        );
        assert!(why.contains("d: SSH failed: connection refused"), "{why}");
        let Decision::Refused(why) = decision(&us, &ds, "shop") else {
            panic!("{ds:?}")
        };
        assert!(why.contains("b: shop exists there already"), "{why}");
        // With --ship-image c takes everything.
        let ds = place(&us, &ts, true);
        assert!(ds.iter().all(|d| d == &Decision::To(1)), "{ds:?}");
    }

    #[test]
    fn a_pods_infra_image_counts_by_name_too() {
        let us = units();
        let mut t = target("b", 4 * GIB, 100 * GIB);
        t.images.remove("img-pause");
        let ds = place(&us, std::slice::from_ref(&t), false);
        let Decision::Refused(why) = decision(&us, &ds, "pp") else {
            panic!("{ds:?}")
        };
        assert!(
            why.contains("pod pp's infra image localhost/pp-infra:latest is not there"),
            "{why}"
        );
        t.image_names.insert("localhost/pp-infra:latest".into());
        let ds = place(&us, &[t], false);
        assert_eq!(decision(&us, &ds, "pp"), &Decision::To(0));
    }

    #[test]
    fn the_probe_is_read_into_a_target() {
        let data = vec![PathBuf::from("/srv/app/www")];
        let src = Facts::parse("cpu_arch=x86_64\ncpu_flags=sse2 avx\n");
        let out = "podman=4.3.1\nruntime=runc\ncriu=4.2\ncriu_check=ok\ncpu_arch=x86_64\ncpu_flags=sse2 avx\n\
mem_available_kib=2048000\nimage=sha256:abc\ncontainer=other\npod=pp\n\
space=archives=5000 2049 0\nspace=data0=6000 2049 100\n";
        let t = parse("root@b", out, &data, &src, false);
        assert_eq!(t.broken, None);
        assert_eq!(t.mem_kib, 2_048_000);
        assert!(t.images.contains("abc"));
        assert!(t.containers.contains("other") && t.pods.contains("pp"));
        assert_eq!(t.archives.as_ref().unwrap().avail_kib, 5000);
        assert_eq!(t.data[&data[0]].present_kib, 100);
        // A CPU without the source's AVX: the target takes nothing, saying why.
        let t = parse(
            "root@b",
            &out.replace("sse2 avx", "sse2"),
            &data,
            &src,
            false,
        );
        assert!(t.broken.as_deref().unwrap().contains("avx"), "{t:?}");
        let t = parse(
            "root@b",
            &out.replace("criu=4.2", "criu=missing"),
            &data,
            &src,
            false,
        );
        assert!(t.broken.as_deref().unwrap().contains("CRIU"), "{t:?}");
    }
}
