//! Fleets (issue 20): the Ansible collection in `ansible/` drains host a onto b and c on
//! the lab. The controller is host c (its root key reaches a, b and c, as the lab sets
//! up); the collection is installed from the repository folder with `ansible-galaxy`,
//! and `ansible-playbook migrate.fleet.drain -e source=a` runs with an inventory of the
//! three hosts. Host a holds four units: the thesis pair's `db` and `web` (each with its
//! data folder), the pod `pp` and the session `shop`.
//!
//! Checked: every unit runs on b or c with its state (rows, counters, a login session),
//! nothing is left on a, the controller has one CSV with a row per move, and a second run
//! moves nothing and changes nothing on the hosts.
//!
//! Run: `cargo nextest run -E 'test(fleet)'` (needs `scripts/lab up` and Ansible:
//! `scripts/setup --fleet`).
mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

const TARGETS: [&str; 2] = ["b", "c"];

/// Removes every container and pod on a, b and c (the drain moves all that runs on a).
fn wipe() {
    kill_receivers();
    for h in ["a", "b", "c"] {
        on(
            h,
            &[
                "sh",
                "-c",
                "podman pod rm -af -t 0 >/dev/null 2>&1; podman rm -af -t 0 >/dev/null 2>&1; rm -rf /var/lib/migrate/runs",
            ],
        );
    }
}

struct Wiped;

impl Drop for Wiped {
    fn drop(&mut self) {
        wipe();
    }
}

/// A folder for this test's files, visible from every lab host (the repository's target
/// folder is on the machine's file system, which the hosts share).
fn work_dir() -> PathBuf {
    let d = repo().join("target/e2e-fleet");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn inventory(dir: &std::path::Path) -> PathBuf {
    let p = dir.join("inventory.ini");
    let text = format!(
        "[migrate_sources]\na ansible_host={}\n\n[migrate_targets]\nb ansible_host={}\nc ansible_host={}\n\n[all:vars]\nansible_user=root\nansible_python_interpreter=/usr/bin/python3\n",
        host_addr("a"),
        host_addr("b"),
        host_addr("c")
    );
    std::fs::write(&p, text).unwrap();
    p
}

/// `ansible-playbook migrate.fleet.drain` on c; returns its output.
fn playbook(dir: &std::path::Path, inv: &std::path::Path, csv: &std::path::Path) -> Out {
    let collections = dir.join("collections");
    let env_collections = format!("ANSIBLE_COLLECTIONS_PATH={}", collections.display());
    let binary = format!("migrate_binary={}", bin());
    let csv_var = format!("records_csv={}", csv.display());
    on(
        "c",
        &[
            "env",
            &env_collections,
            "ANSIBLE_HOST_KEY_CHECKING=True",
            "ANSIBLE_NOCOLOR=1",
            "ansible-playbook",
            "-i",
            inv.to_str().unwrap(),
            "migrate.fleet.drain",
            "-e",
            "source=a",
            "-e",
            "targets=migrate_targets",
            "-e",
            &binary,
            "-e",
            "drain_parallel=2",
            "-e",
            &csv_var,
        ],
    )
}

/// Which target runs `name` (a container or a pod), or None.
fn where_is(name: &str) -> Option<&'static str> {
    TARGETS.into_iter().find(|h| {
        on(h, &["podman", "container", "exists", name]).code == Some(0)
            || on(h, &["podman", "pod", "exists", name]).code == Some(0)
    })
}

/// `PLAY RECAP` line of `host`: its changed= count.
fn changed(out: &Out, host: &str) -> u32 {
    let line = out
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("PLAY RECAP"))
        .find(|l| l.split_whitespace().next() == Some(host))
        .unwrap_or_else(|| panic!("no recap line for {host}\n{}", out.describe()));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("changed="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

fn shop_get(host: &str, path: &str, sid: Option<&str>) -> String {
    let url = format!("http://{}:8081{path}", host_addr(host));
    let mut cmd = vec!["curl", "-sS", "-i", "--max-time", "5"];
    let cookie = sid.map(|s| format!("Cookie: sid={s}"));
    if let Some(c) = &cookie {
        cmd.extend(["-H", c.as_str()]);
    }
    cmd.push(&url);
    on("c", &cmd).ok().stdout
}

#[test]
fn fleet_drain_playbook_empties_a_onto_b_and_c_and_a_second_run_changes_nothing() {
    require_lab!();
    let have = on("c", &["sh", "-c", "command -v ansible-playbook"]);
    assert_eq!(
        have.code,
        Some(0),
        "ansible-playbook missing: run scripts/setup --fleet"
    );
    wipe();
    let _wiped = Wiped;
    for h in ["a", "b"] {
        lab(&["pod", "image", h]).ok();
    }
    lab(&["pod", "image", "c"]).ok();
    fresh_workload("a", 100);
    lab(&["pod", "up", "a"]).ok();
    lab(&["session", "up", "a"]).ok();
    let login = shop_get("a", "/login?user=fleet", None);
    let sid = login
        .lines()
        .find_map(|l| l.strip_prefix("Set-Cookie: sid="))
        .map(|v| v.split(';').next().unwrap().trim().to_string())
        .unwrap_or_else(|| panic!("no session cookie: {login}"));
    std::thread::sleep(Duration::from_secs(2));
    let (counter_before, pod_before) = (counter("a"), pod_count("a"));

    let dir = work_dir();
    let inv = inventory(&dir);
    let install = on(
        "c",
        &[
            "ansible-galaxy",
            "collection",
            "install",
            repo().join("ansible").to_str().unwrap(),
            "-p",
            dir.join("collections").to_str().unwrap(),
            "--force",
        ],
    )
    .ok();
    assert!(
        install.stdout.contains("migrate.fleet"),
        "{}",
        install.describe()
    );

    let csv = dir.join("records.csv");
    let first = playbook(&dir, &inv, &csv).ok();
    eprintln!("{}", first.stdout);

    // Nothing left on a; every unit on b or c with its state.
    assert!(
        all_containers("a").is_empty(),
        "left on a: {:?}",
        all_containers("a")
    );
    let db = where_is("db").expect("db on b or c");
    let web = where_is("web").expect("web on b or c");
    let pp = where_is("pp").expect("pod pp on b or c");
    let shop = where_is("shop").expect("shop on b or c");
    eprintln!("placed: db on {db}, web on {web}, pp on {pp}, shop on {shop}");
    assert_eq!(rows(db), 100, "rows of db on {db}");
    let c1 = counter(web);
    assert!(
        c1 >= counter_before,
        "web's counter went back: {c1} < {counter_before}"
    );
    let p1 = pod_count(pp);
    assert!(
        p1 >= pod_before,
        "pp's counter went back: {p1} < {pod_before}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(counter(web) > c1, "web's counter stopped on {web}");
    assert!(pod_count(pp) > p1, "pp's counter stopped on {pp}");
    let page = shop_get(shop, "/", Some(&sid));
    assert!(
        page.contains("logged in as fleet"),
        "session lost on {shop}: {page}"
    );

    // One CSV on the controller: a header, a row per move, the summary.
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let outcome = header.iter().position(|c| *c == "outcome").unwrap();
    let role = header.iter().position(|c| *c == "role").unwrap();
    let rows_: Vec<Vec<String>> = text.lines().skip(1).map(parse_csv_line).collect();
    let moves: Vec<&Vec<String>> = rows_.iter().filter(|r| r[role] == "sender").collect();
    assert_eq!(moves.len(), 4, "rows per move:\n{text}");
    assert!(moves.iter().all(|r| r[outcome] == "ok"), "{text}");

    // Again: nothing to move, nothing changes on the hosts.
    let second = playbook(&dir, &inv, &csv).ok();
    for h in ["a", "b", "c"] {
        assert_eq!(changed(&second, h), 0, "{h} changed:\n{}", second.stdout);
    }
    assert!(all_containers("a").is_empty());
    assert_eq!(where_is("db"), Some(db));
}

/// One CSV line (quoted fields with doubled quotes, as Python's csv module writes them).
fn parse_csv_line(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(ch) = chars.next() {
        match (ch, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    out.push(cur);
    out
}
