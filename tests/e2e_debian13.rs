//! Debian 13 hosts (podman 5.4) end to end on the lab (issue #21): the thesis pair and
//! the session shop move Debian 13 → Debian 13 (t → u and back), Debian 12 → Debian 13
//! (a → t) and Debian 13 → Debian 12 (t → a), with their state checked as in
//! e2e_send_receive and e2e_balancer; `check` on each pair lists both stacks and what
//! will checkpoint and restore. Hosts t and u have a root filesystem of their own
//! (scripts/lab, docs/design/debian13-host.md).
//!
//! Run: `cargo nextest run --test e2e_debian13` (needs `scripts/lab up`). Uses the
//! containers `db`, `web` and `shop` on a, t and u, and receivers on port 12360 only.
mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Control port of these tests' receivers (the other suites use 12345 and 12350).
const PORT: u16 = 12360;
const PORT_ARG: &str = "12360";
const ROWS: u32 = 100;
/// The hosts these tests use.
const HOSTS: [&str; 3] = ["a", "t", "u"];

fn to(host: &str) -> String {
    format!("root@{}", host_addr(host))
}

/// Kills the receivers of these tests only.
fn kill_own_receivers() {
    let pattern = format!("{} receive --listen 10.77.0.1[0-9]:{PORT}", bin());
    let _ = Command::new("pkill")
        .args(["-KILL", "-f", &pattern])
        .status();
    std::thread::sleep(Duration::from_millis(200));
}

/// The podman version `scripts/lab` put on `host`.
fn podman_version(host: &str) -> String {
    on(
        host,
        &["podman", "version", "--format", "{{.Client.Version}}"],
    )
    .ok()
    .stdout
    .trim()
    .to_string()
}

/// `check --format json` on `from` towards `dest` (a receiver must listen there).
fn check_pair(from: &str, dest: &str, containers: &[&str], data: bool) -> serde_json::Value {
    let mut args = vec!["--control-port", PORT_ARG];
    if data {
        args.extend_from_slice(&["--data", "/srv/app"]);
    }
    args.extend_from_slice(containers);
    let out = check_from(from, dest, &args).ok();
    let v = report(&out);
    // Both stacks, with the versions of each host.
    for (side, host) in [("source", from), ("target", dest)] {
        let stack = &v[side]["stack"];
        assert_eq!(
            stack["podman"].as_str(),
            Some(podman_version(host).as_str()),
            "{side} podman\n{}",
            out.describe()
        );
        assert_eq!(stack["runtime"], "runc", "{}", out.describe());
        assert!(
            stack["runc_version"]
                .as_str()
                .is_some_and(|r| !r.is_empty()),
            "{side} runc version\n{}",
            out.describe()
        );
    }
    // Which runtime checkpoints here and restores there, and what the versions mean.
    let code = |c: &str| {
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["code"] == c)
            .unwrap_or_else(|| panic!("no finding {c}\n{}", out.describe()))
            .clone()
    };
    let names = containers.join(", ");
    let cp = code("runtime_checkpoints");
    assert!(
        cp["text"].as_str().unwrap().starts_with("runc ")
            && cp["text"]
                .as_str()
                .unwrap()
                .ends_with(&format!("checkpoints {names} here")),
        "{cp}"
    );
    let rs = code("runtime_restores");
    assert!(
        rs["text"]
            .as_str()
            .unwrap()
            .ends_with(&format!("restores {names} there")),
        "{rs}"
    );
    let versions = code("podman_versions");
    let (here, there) = (podman_version(from), podman_version(dest));
    let text = versions["text"].as_str().unwrap();
    assert!(
        text.starts_with(&format!("podman {here} here, {there} there")),
        "{versions}"
    );
    if here == there {
        assert!(text.contains("the same release"), "{versions}");
    } else {
        assert!(text.contains("measured"), "{versions}");
    }
    v
}

/// Moves the thesis pair from `from` to `dest` with `check` first; checks the record,
/// the early freeze, the receiver, and the pair's state there.
fn move_pair(from: &str, dest: &str) {
    kill_own_receivers();
    let rx = Receiver::start_on(dest, PORT, &["--serve"]);
    check_pair(from, dest, &["db", "web"], true);
    let before = counter(from);
    let target = to(dest);
    let out = send(
        from,
        &[
            "--to",
            &target,
            "--control-port",
            PORT_ARG,
            "--data",
            "/srv/app",
            "--label",
            "e2e-deb13",
            "db",
            "web",
        ],
    )
    .ok();
    let rec = out.record();
    assert_eq!(rec["outcome"], "ok", "{}", out.describe());
    assert_eq!(rec["source"], format!("lab-{from}"));
    assert_eq!(rec["target"], host_addr(dest));
    let downtime: f64 = rec["downtime_s"].parse().unwrap();
    assert!(downtime > 0.0, "{}", out.describe());
    // send froze the cgroups itself at the runtime's start (podman 4 and 5 alike).
    for c in ["db", "web"] {
        assert!(
            out.stderr
                .contains(&format!("checkpointed {c}: frozen in ")),
            "no early freeze of {c} on {from}\n{}",
            out.describe()
        );
    }
    // The statistics of podman's --print-stats were read on both sides.
    for col in ["podman_checkpoint_s", "criu_frozen_s", "criu_restore_s"] {
        assert!(
            rec[col].parse::<f64>().is_ok_and(|s| s > 0.0),
            "{col}: {}",
            out.describe()
        );
    }
    eprintln!(
        "{from} -> {dest}: downtime {downtime:.3}s, podman checkpoint {}s, restore {}s",
        rec["podman_checkpoint_s"], rec["restore_s"]
    );
    drop(rx);
    kill_own_receivers();
    assert_pair_alive(dest, ROWS as u64, before);
    assert!(
        all_containers(from).is_empty(),
        "left on {from}: {:?}",
        all_containers(from)
    );
}

#[test]
fn thesis_pair_moves_debian13_to_debian13_and_back() {
    require_lab!();
    fresh_workload_on(&HOSTS, "t", ROWS);
    move_pair("t", "u");
    move_pair("u", "t");
    lab(&["workload", "down", "t"]).ok();
}

#[test]
fn thesis_pair_moves_debian12_to_debian13() {
    require_lab!();
    fresh_workload_on(&HOSTS, "a", ROWS);
    move_pair("a", "t");
    lab(&["workload", "down", "t"]).ok();
}

#[test]
fn thesis_pair_moves_debian13_to_debian12() {
    require_lab!();
    fresh_workload_on(&HOSTS, "t", ROWS);
    move_pair("t", "a");
    lab(&["workload", "down", "a"]).ok();
}

// ------------------------------------------------------------------ the session shop

const SHOP_PORT: u16 = 8081;

/// GET `path` on `host`'s shop from host c; returns (status line, Set-Cookie, body).
fn shop_get(host: &str, path: &str, sid: Option<&str>) -> (String, Option<String>, String) {
    let url = format!("http://{}:{SHOP_PORT}{path}", host_addr(host));
    let cookie = sid.map(|s| format!("Cookie: sid={s}"));
    let mut cmd = vec!["curl", "-sS", "-i", "--max-time", "5"];
    if let Some(c) = &cookie {
        cmd.extend_from_slice(&["-H", c]);
    }
    cmd.push(&url);
    let out = on("c", &cmd).ok();
    let raw = out.stdout.replace("\r\n", "\n");
    let (head, body) = raw.split_once("\n\n").unwrap_or((&raw, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    let set_cookie = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.trim().to_string());
    (status, set_cookie, body.trim().to_string())
}

fn has_shop(host: &str) -> bool {
    on(host, &["podman", "ps", "-a", "--format", "{{.Names}}"])
        .ok()
        .stdout
        .lines()
        .any(|l| l.trim() == "shop")
}

/// Logs `user` in on `from`'s shop, moves the shop to `dest`, and checks that the same
/// cookie is still logged in there (the sessions live only in the server's memory).
fn move_shop(from: &str, dest: &str, user: &str) {
    kill_own_receivers();
    for h in HOSTS {
        lab(&["session", "down", h]).ok();
    }
    lab(&["session", "up", from]).ok();
    let (status, cookie, body) = shop_get(from, &format!("/login?user={user}"), None);
    assert!(status.contains(" 200"), "{status} {body}");
    assert_eq!(body, format!("logged in as {user}"));
    let cookie = cookie.expect("Set-Cookie");
    let sid = cookie
        .strip_prefix("sid=")
        .and_then(|s| s.split(';').next())
        .expect("sid cookie")
        .to_string();
    assert_eq!(sid.len(), 32, "{cookie}");

    let rx = Receiver::start_on(dest, PORT, &["--serve"]);
    check_pair(from, dest, &["shop"], false);
    let target = to(dest);
    let out = send(from, &["--to", &target, "--control-port", PORT_ARG, "shop"]).ok();
    assert_eq!(out.record()["outcome"], "ok", "{}", out.describe());
    rx.wait_for_line("UP: shop running", Duration::from_secs(10));
    drop(rx);
    kill_own_receivers();
    assert!(!has_shop(from), "shop left on {from}");
    assert!(has_shop(dest), "shop not on {dest}");
    let (status, _, body) = shop_get(dest, "/", Some(&sid));
    assert!(status.contains(" 200"), "{status} {body}");
    assert_eq!(
        body,
        format!("logged in as {user}"),
        "session lost on {dest}"
    );
    // And a request without the cookie is not logged in: the state is the session's.
    let (_, _, anon) = shop_get(dest, "/", None);
    assert_ne!(anon, format!("logged in as {user}"));
    lab(&["session", "down", dest]).ok();
}

#[test]
fn session_moves_debian13_to_debian13() {
    require_lab!();
    move_shop("t", "u", "alice");
}

#[test]
fn session_moves_debian12_to_debian13() {
    require_lab!();
    move_shop("a", "t", "bob");
}

#[test]
fn session_moves_debian13_to_debian12() {
    require_lab!();
    move_shop("t", "a", "carol");
}

// ------------------------------------------------------------------ crun

const CRUN_CTR: &str = "d13-crun";

/// The number a crun container on `host` counts in memory (written to /tmp/n).
fn crun_count(host: &str) -> u64 {
    let out = on(host, &["podman", "exec", CRUN_CTR, "cat", "/tmp/n"]).ok();
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("count: {}", out.describe()))
}

fn remove_crun_ctr() {
    for h in HOSTS {
        on(h, &["podman", "rm", "-f", "-t", "0", "--ignore", CRUN_CTR]).ok();
    }
}

/// A container created with crun (built with CRIU on Debian 13): refused before the
/// freeze towards Debian 12 (no crun there) and with `--tcp close` (crun takes no
/// per-command CRIU options), left running as it was; moved t → u with `--tcp refuse`,
/// restored there by crun, its count going on.
#[test]
fn a_crun_container_moves_only_where_crun_can_restore_it() {
    require_lab!();
    kill_own_receivers();
    remove_crun_ctr();
    on(
        "t",
        &[
            "podman",
            "--runtime",
            "crun",
            "run",
            "-d",
            "--name",
            CRUN_CTR,
            "localhost/migrate-busybox:latest",
            "sh",
            "-c",
            "i=0; while :; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done",
        ],
    )
    .ok();
    std::thread::sleep(Duration::from_millis(500));
    let before = identity("t", CRUN_CTR);

    // Towards a: whatever the --tcp policy, crun is not there.
    let rx = Receiver::start_on("a", PORT, &["--serve"]);
    let b = bin();
    for tcp in ["close", "refuse"] {
        let out = on(
            "t",
            &[
                &b,
                "check",
                "--format",
                "json",
                "--to",
                &to("a"),
                "--control-port",
                PORT_ARG,
                "--tcp",
                tcp,
                CRUN_CTR,
            ],
        )
        .expect_code(2);
        let v = report(&out);
        let fails: Vec<&str> = v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["severity"] == "fail")
            .map(|f| f["code"].as_str().unwrap())
            .collect();
        assert!(fails.contains(&"runtime_unavailable"), "{}", out.describe());
        assert_eq!(
            fails.contains(&"runtime_lacks_criu_options"),
            tcp == "close",
            "{}",
            out.describe()
        );
        let out = send(
            "t",
            &[
                "--to",
                &to("a"),
                "--control-port",
                PORT_ARG,
                "--tcp",
                tcp,
                CRUN_CTR,
            ],
        )
        .expect_code(2);
        assert!(out.stderr.contains("runs under crun"), "{}", out.describe());
    }
    drop(rx);
    kill_own_receivers();
    assert_eq!(identity("t", CRUN_CTR), before, "touched by a refusal");

    // Towards u (Debian 13, crun with CRIU): --tcp close is refused, --tcp refuse moves.
    let rx = Receiver::start_on("u", PORT, &["--serve"]);
    let out = send(
        "t",
        &["--to", &to("u"), "--control-port", PORT_ARG, CRUN_CTR],
    )
    .expect_code(2);
    assert!(
        out.stderr.contains("cannot be given CRIU's tcp-close"),
        "{}",
        out.describe()
    );
    assert_eq!(identity("t", CRUN_CTR), before, "touched by a refusal");
    let count = crun_count("t");
    let out = send(
        "t",
        &[
            "--to",
            &to("u"),
            "--control-port",
            PORT_ARG,
            "--tcp",
            "refuse",
            CRUN_CTR,
        ],
    )
    .ok();
    assert_eq!(out.record()["outcome"], "ok", "{}", out.describe());
    assert!(
        out.stderr
            .contains(&format!("checkpointed {CRUN_CTR}: frozen in ")),
        "{}",
        out.describe()
    );
    drop(rx);
    kill_own_receivers();
    let runtime = on(
        "u",
        &["podman", "inspect", "--format", "{{.OCIRuntime}}", CRUN_CTR],
    )
    .ok();
    assert_eq!(runtime.stdout.trim(), "crun");
    let c1 = crun_count("u");
    assert!(c1 >= count, "count went back: {c1} < {count}");
    std::thread::sleep(Duration::from_millis(400));
    assert!(crun_count("u") > c1, "count stopped on u");
    let left = on("t", &["podman", "ps", "-a", "--format", "{{.Names}}"]).ok();
    assert!(!left.stdout.lines().any(|l| l == CRUN_CTR), "left on t");
    remove_crun_ctr();
}
