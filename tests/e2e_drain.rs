//! `migrate drain` on the lab: host a holding the thesis pair (db and web, each a unit of
//! its own), the pod pp and the session shop is emptied onto b and c two moves at a time,
//! every unit carrying on with its state there; a second drain changes nothing; and
//! `drain --plan` against a target too small for one unit refuses that unit, saying
//! why, and places the others.
mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

const ROWS: u32 = 1000;
const UNITS: [&str; 4] = ["db", "web", "pp", "shop"];

fn targets() -> String {
    format!("root@{B},root@{C}")
}

/// `migrate drain` on a.
fn drain(args: &[&str]) -> Out {
    let b = bin();
    let mut cmd = vec![b.as_str(), "drain"];
    cmd.extend_from_slice(args);
    on("a", &cmd)
}

/// The lab's workloads off a, b and c, no receiver, no run folder.
fn clean() {
    kill_receivers();
    for h in ["a", "b", "c"] {
        lab(&["workload", "down", h]).ok();
        lab(&["pod", "down", h]).ok();
        lab(&["session", "down", h]).ok();
        on(h, &["sh", "-c", "rm -rf /var/lib/migrate/runs"]).ok();
    }
}

/// The thesis pair, the pod and the shop on a; the pod's infra image on every host.
fn fresh() {
    assert_lab();
    clean();
    for h in ["a", "b", "c"] {
        lab(&["pod", "image", h]).ok();
    }
    lab(&["workload", "up", "a", "--rows", &ROWS.to_string()]).ok();
    lab(&["pod", "up", "a"]).ok();
    lab(&["session", "up", "a"]).ok();
}

/// The names podman runs on `host`, of this test's containers.
fn ours(host: &str) -> Vec<String> {
    let out = on(host, &["podman", "ps", "-a", "--format", "{{.Names}}"]).ok();
    let mut v: Vec<String> = out
        .stdout
        .lines()
        .filter(|n| ["db", "web", "shop", "pp-counter", "pp-front"].contains(n))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn host_of(addr: &str) -> &'static str {
    match addr {
        B => "b",
        C => "c",
        _ => panic!("not a target: {addr}"),
    }
}

/// Logs in at the shop on `host` from c; returns the session id.
fn login(host: &str) -> String {
    let url = format!("http://{}:8081/login?user=drainer", host_addr(host));
    let out = on("c", &["curl", "-sS", "-i", "--max-time", "5", &url]).ok();
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("Set-Cookie: sid="))
        .and_then(|s| s.split(';').next())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no session: {}", out.describe()))
}

fn who(host: &str, sid: &str) -> String {
    let url = format!("http://{}:8081/", host_addr(host));
    let cookie = format!("Cookie: sid={sid}");
    let out = on(
        "c",
        &["curl", "-sS", "--max-time", "5", "-H", &cookie, &url],
    )
    .ok();
    out.stdout.trim().to_string()
}

/// The CSV records of a drain's stdout, each as column → value.
fn records(stdout: &str) -> Vec<HashMap<String, String>> {
    let mut rdr = csv::Reader::from_reader(stdout.as_bytes());
    let headers = rdr.headers().unwrap().clone();
    rdr.records()
        .map(|r| {
            let r = r.unwrap();
            headers
                .iter()
                .zip(r.iter())
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

#[test]
fn drain_empties_a_onto_b_and_c_with_every_units_state_and_a_second_run_changes_nothing() {
    require_lab!();
    fresh();
    let web_before = counter("a");
    let pod_before = pod_count("a");
    let sid = login("a");
    assert_eq!(who("a", &sid), "logged in as drainer");

    let out = drain(&["--to", &targets(), "--parallel", "2", "--install-receiver"]);
    eprintln!("{}", out.stderr);
    let out = out.expect_code(0);
    let recs = records(&out.stdout);
    let moves: Vec<_> = recs.iter().filter(|r| r["role"] == "sender").collect();
    assert_eq!(moves.len(), 4, "one record per move: {}", out.stdout);
    let mut placed = HashMap::new();
    for r in &moves {
        assert_eq!(r["outcome"], "ok", "{r:?}");
        assert!(!r["downtime_s"].is_empty(), "{r:?}");
        placed.insert(r["containers"].clone(), host_of(&r["target"]));
    }
    for u in UNITS {
        assert!(placed.contains_key(u), "{u} moved: {placed:?}");
    }
    let summary = recs.last().unwrap();
    assert_eq!(summary["role"], "drain");
    assert_eq!(summary["outcome"], "ok");
    assert!(summary["error"].starts_with("moved 4 of 4"), "{summary:?}");
    // Both targets took units, two moves at a time.
    let used: std::collections::BTreeSet<_> = placed.values().collect();
    assert_eq!(used.len(), 2, "{placed:?}");

    // Nothing of it is left on a; each unit runs where its record says, with its state.
    assert_eq!(ours("a"), Vec::<String>::new());
    assert_eq!(rows(placed["db"]), u64::from(ROWS));
    let w = placed["web"];
    let c1 = counter(w);
    assert!(
        c1 >= web_before,
        "web's counter went back on {w}: {c1} < {web_before}"
    );
    std::thread::sleep(Duration::from_millis(400));
    assert!(counter(w) > c1, "web's counter stopped on {w}");
    let p = placed["pp"];
    let n = pod_count(p);
    assert!(
        n > pod_before,
        "the pod's count went back on {p}: {n} <= {pod_before}"
    );
    assert_eq!(
        who(placed["shop"], &sid),
        "logged in as drainer",
        "the session survived"
    );

    // Again: nothing is left to move, nothing changes.
    let there: Vec<Vec<String>> = ["b", "c"].iter().map(|h| ours(h)).collect();
    let out = drain(&["--to", &targets(), "--parallel", "2", "--install-receiver"]).expect_code(0);
    let recs = records(&out.stdout);
    assert_eq!(recs.len(), 1, "only the summary: {}", out.stdout);
    assert_eq!(
        recs[0]["error"],
        "nothing to move: no running container here"
    );
    let again: Vec<Vec<String>> = ["b", "c"].iter().map(|h| ours(h)).collect();
    assert_eq!(there, again);
    // Named units that are gone already are skipped too.
    let out = drain(&["--to", &targets(), "db", "pp"]).expect_code(0);
    assert!(
        out.stderr.contains("db is not here but on"),
        "{}",
        out.stderr
    );
    clean();
}

#[test]
fn drain_plan_refuses_the_unit_a_full_target_has_no_room_for_and_places_the_others() {
    require_lab!();
    fresh();
    // web's data folder (4 MiB of filler) lands on a 1 MiB file system on b.
    let _small = OnHost::apply(
        "b",
        "mkdir -p /srv/app/www && mount -t tmpfs -o size=1m drain-test /srv/app/www",
        "umount /srv/app/www; rmdir /srv/app/www /srv/app 2>/dev/null; true",
    );
    let before = ours("a");
    let out = drain(&["--plan", "--to", &format!("root@{B}")]).expect_code(2);
    let recs = records(&out.stdout);
    assert_eq!(recs.len(), 5, "four units and the summary: {}", out.stdout);
    for r in &recs[..4] {
        assert_eq!(r["role"], "plan", "{r:?}");
        if r["containers"] == "web" {
            assert_eq!(r["outcome"], "refused", "{r:?}");
            assert!(
                r["error"].contains("not enough free space for /srv/app/www: 1 MiB free"),
                "{r:?}"
            );
        } else {
            assert_eq!(r["outcome"], "", "{r:?}");
            assert_eq!(r["target"], B, "{r:?}");
        }
    }
    assert!(
        recs[4]["error"].starts_with("placed 3 of 4"),
        "{:?}",
        recs[4]
    );
    // Nothing was touched.
    assert_eq!(ours("a"), before);
    assert_eq!(ours("b"), Vec::<String>::new());
    drop(_small);
    clean();
}
