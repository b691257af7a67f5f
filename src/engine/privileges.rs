//! Whether CRIU, with the privileges it inherits from migrate (podman and runc pass them
//! on unchanged), can dump every process of a container.
//!
//! CRIU reads each process's rlimits with `prlimit(pid)`. The kernel allows that only to
//! a caller whose real uid and gid equal the process's real, effective and saved ones,
//! or that has CAP_SYS_RESOURCE (`check_prlimit_permission`, kernel/sys.c). Where migrate
//! runs without CAP_SYS_RESOURCE (a restricted service or container drops it), any
//! process running as another user or group (`podman run --user`, a server that drops
//! to `nobody`, a user-namespaced container) makes the dump fail at the freeze with
//! "Can't get rlimit: Operation not permitted". Found here, the send is refused before.

use std::collections::{BTreeMap, BTreeSet};

use crate::engine::stack::{Finding, Level, Side};

/// The capability bit of CAP_SYS_RESOURCE (linux/capability.h).
pub const CAP_SYS_RESOURCE: u32 = 24;

/// A process's credentials, from `/proc/PID/status`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Creds {
    /// Its command name (`Name:`).
    pub name: String,
    /// Real, effective and saved uid.
    pub uid: [u32; 3],
    /// Real, effective and saved gid.
    pub gid: [u32; 3],
    /// Effective capabilities (`CapEff:`).
    pub cap_eff: u64,
}

impl Creds {
    pub fn parse(status: &str) -> Option<Creds> {
        let mut c = Creds::default();
        let (mut uid, mut gid) = (None, None);
        let ids = |v: &str| -> Option<[u32; 3]> {
            let mut it = v.split_whitespace().map(|x| x.parse::<u32>());
            Some([it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?])
        };
        for line in status.lines() {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            match k {
                "Name" => c.name = v.trim().to_string(),
                "Uid" => uid = ids(v),
                "Gid" => gid = ids(v),
                "CapEff" => c.cap_eff = u64::from_str_radix(v.trim(), 16).ok()?,
                _ => {}
            }
        }
        c.uid = uid?;
        c.gid = gid?;
        Some(c)
    }

    pub fn has_cap(&self, cap: u32) -> bool {
        self.cap_eff & (1u64 << cap) != 0
    }

    /// The kernel's rule for reading another process's rlimits.
    pub fn may_read_rlimits_of(&self, p: &Creds) -> bool {
        self.has_cap(CAP_SYS_RESOURCE)
            || (p.uid.iter().all(|u| *u == self.uid[0]) && p.gid.iter().all(|g| *g == self.gid[0]))
    }
}

/// The processes of `container` whose rlimits `me` (CRIU's credentials) cannot read, as
/// a failure; `None` when CRIU can read them all.
pub fn rlimits_finding(container: &str, me: &Creds, procs: &[(i64, Creds)]) -> Option<Finding> {
    let denied: Vec<&(i64, Creds)> = procs
        .iter()
        .filter(|(_, p)| !me.may_read_rlimits_of(p))
        .collect();
    if denied.is_empty() {
        return None;
    }
    let mut named: Vec<String> = denied
        .iter()
        .take(5)
        .map(|(pid, p)| {
            format!(
                "pid {pid} {} as uid {} gid {}",
                p.name,
                shown(&p.uid),
                shown(&p.gid)
            )
        })
        .collect();
    if denied.len() > named.len() {
        named.push(format!("{} more", denied.len() - named.len()));
    }
    Some(
        Finding::new(
            Level::Fail,
            Side::Source,
            "container_needs_cap_sys_resource",
            format!(
                "{container} has {} of {} processes running as another user or group than migrate (uid {}, gid {}): {}; migrate runs without CAP_SYS_RESOURCE, so CRIU could not read their rlimits and the checkpoint would fail at the freeze (\"Can't get rlimit: Operation not permitted\")",
                denied.len(),
                procs.len(),
                me.uid[0],
                me.gid[0],
                named.join(", ")
            ),
        )
        .fix(format!(
            "run migrate where it has CAP_SYS_RESOURCE (`capsh --print` lists it; a restricted service or container drops it), or run {container}'s processes as root (no --user, no user namespace, no switch to another user inside)"
        )),
    )
}

/// "1000", or "1000/0/0" when real, effective and saved ids differ.
fn shown(ids: &[u32; 3]) -> String {
    if ids.iter().all(|i| *i == ids[0]) {
        ids[0].to_string()
    } else {
        format!("{}/{}/{}", ids[0], ids[1], ids[2])
    }
}

/// The processes CRIU dumps with the container whose first process is `pid`: every
/// process of its pid namespace, and every descendant of `pid` (the whole set when the
/// container shares this host's pid namespace).
pub fn container_processes(pid: i64) -> std::io::Result<Vec<(i64, Creds)>> {
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid"))?;
    let own_ns = std::fs::read_link("/proc/self/ns/pid").ok();
    let mut parent: BTreeMap<i64, i64> = BTreeMap::new();
    let mut members = BTreeSet::from([pid]);
    for e in std::fs::read_dir("/proc")?.filter_map(Result::ok) {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<i64>().ok()) else {
            continue;
        };
        if own_ns.as_ref() != Some(&ns)
            && std::fs::read_link(format!("/proc/{p}/ns/pid")).is_ok_and(|n| n == ns)
        {
            members.insert(p);
        }
        if let Some(pp) = std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| ppid_of(&s))
        {
            parent.insert(p, pp);
        }
    }
    for p in parent.keys() {
        let mut q = *p;
        // Walk up; a cycle cannot happen, the bound only guards against a racing /proc.
        for _ in 0..4096 {
            match parent.get(&q) {
                Some(&pp) if pp == pid => {
                    members.insert(*p);
                    break;
                }
                Some(&pp) if pp > 1 => q = pp,
                _ => break,
            }
        }
    }
    Ok(members
        .into_iter()
        .filter_map(|p| {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            Some((p, Creds::parse(&status)?))
        })
        .collect())
}

/// The parent pid from `/proc/PID/stat` (after the command name, which may hold spaces
/// and parentheses).
fn ppid_of(stat: &str) -> Option<i64> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The check `preflight` runs for one running container: a failure when CRIU, with this
/// process's privileges, could not dump it.
pub fn dump_finding(container: &str, pid: i64) -> Option<Finding> {
    let read = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| Creds::parse(&s));
    let Some(me) = read else {
        return Some(Finding::new(
            Level::Warn,
            Side::Source,
            "own_privileges_unreadable",
            "cannot read this process's credentials (/proc/self/status): whether CRIU may read the containers' rlimits is not checked",
        ));
    };
    if me.has_cap(CAP_SYS_RESOURCE) {
        return None;
    }
    match container_processes(pid) {
        Ok(procs) => rlimits_finding(container, &me, &procs),
        Err(e) => Some(Finding::new(
            Level::Warn,
            Side::Source,
            "container_processes_unreadable",
            format!(
                "cannot list {container}'s processes (pid {pid}): {e}; whether CRIU may read their rlimits is not checked"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The credential lines of real `/proc/PID/status` files on the lab: migrate (root
    /// without CAP_SYS_RESOURCE), a container's `sleep` under `podman run --user 1000`,
    /// and one under `--user 0:1000`.
    const MIGRATE: &str = "Name:\tmigrate\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t0 \nCapInh:\t0000000000000000\nCapPrm:\t000001fffeffffff\nCapEff:\t000001fffeffffff\nCapBnd:\t000001fffeffffff\n";
    const USER_1000: &str =
        "Name:\tsleep\nUid:\t1000\t1000\t1000\t1000\nGid:\t0\t0\t0\t0\nCapEff:\t0000000000000000\n";
    const GROUP_1000: &str =
        "Name:\tsleep\nUid:\t0\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\nCapEff:\t00000000a80425fb\n";
    const ROOT: &str =
        "Name:\tmariadbd\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nCapEff:\t00000000a80425fb\n";

    fn creds(s: &str) -> Creds {
        Creds::parse(s).expect("parses")
    }

    #[test]
    fn parses_ids_and_capabilities() {
        let me = creds(MIGRATE);
        assert_eq!((me.uid, me.gid), ([0, 0, 0], [0, 0, 0]));
        assert!(!me.has_cap(CAP_SYS_RESOURCE));
        assert!(me.has_cap(21)); // CAP_SYS_ADMIN
        let mut full = me.clone();
        full.cap_eff = 0x1ffffffffff;
        assert!(full.has_cap(CAP_SYS_RESOURCE));
        assert_eq!(Creds::parse("Name:\tx\n"), None);
        let setuid = creds("Name:\tsu\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\nCapEff:\t0\n");
        assert_eq!(setuid.uid, [1000, 0, 0]);
        assert_eq!(shown(&setuid.uid), "1000/0/0");
    }

    #[test]
    fn another_uid_or_gid_needs_cap_sys_resource() {
        let me = creds(MIGRATE);
        let procs = vec![
            (3070, creds(ROOT)),
            (3074, creds(USER_1000)),
            (3080, creds(GROUP_1000)),
        ];
        let f = rlimits_finding("web", &me, &procs).expect("a failure");
        assert_eq!(
            (f.level, f.side, f.code),
            (
                Level::Fail,
                Side::Source,
                "container_needs_cap_sys_resource"
            )
        );
        assert!(
            f.text.starts_with("web has 2 of 3 processes running as another user or group than migrate (uid 0, gid 0): pid 3074 sleep as uid 1000 gid 0, pid 3080 sleep as uid 0 gid 1000; "),
            "{}",
            f.text
        );
        assert!(f.text.contains("Can't get rlimit"), "{}", f.text);
        let fix = f.fix.unwrap();
        assert!(
            fix.contains("CAP_SYS_RESOURCE") && fix.contains("as root"),
            "{fix}"
        );
        // Root processes alone: nothing to say.
        assert_eq!(rlimits_finding("db", &me, &procs[..1]), None);
        // With CAP_SYS_RESOURCE CRIU reads them all.
        let mut full = me;
        full.cap_eff |= 1 << CAP_SYS_RESOURCE;
        assert_eq!(rlimits_finding("web", &full, &procs), None);
    }

    #[test]
    fn many_processes_are_counted_not_all_listed() {
        let me = creds(MIGRATE);
        let procs: Vec<_> = (100..120).map(|p| (p, creds(USER_1000))).collect();
        let f = rlimits_finding("workers", &me, &procs).unwrap();
        assert!(f.text.contains("20 of 20 processes"), "{}", f.text);
        assert!(
            f.text.contains("pid 104 sleep as uid 1000 gid 0, 15 more;"),
            "{}",
            f.text
        );
    }

    #[test]
    fn the_parent_pid_survives_odd_command_names() {
        assert_eq!(ppid_of("42 (a) b) c) S 7 42 42 0"), Some(7));
        assert_eq!(ppid_of("1 (systemd) S 0 1 1 0"), Some(0));
        assert_eq!(ppid_of("garbage"), None);
    }

    #[test]
    fn this_process_and_its_children_are_found() {
        let me = std::process::id() as i64;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let procs = container_processes(me).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let pids: Vec<i64> = procs.iter().map(|(p, _)| *p).collect();
        assert!(pids.contains(&me), "{pids:?}");
        assert!(pids.contains(&(child.id() as i64)), "{pids:?}");
        // Nothing that is not ours: pid 1 is nobody's descendant.
        assert!(!pids.contains(&1) || me == 1, "{pids:?}");
    }
}
