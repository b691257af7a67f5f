//! Trust on the lab: only what SSH vouches for decides anything on the target. Real
//! podman, runc, CRIU, rsync and OpenSSH between network-namespace hosts.
mod common;

use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(120);

fn to(host: &str) -> String {
    format!("root@{}", host_addr(host))
}

/// Identity (container ID, start time) of the thesis pair on `host`.
fn identities(host: &str) -> Vec<(String, String)> {
    ["db", "web"]
        .iter()
        .map(|c| (c.to_string(), identity(host, c)))
        .collect()
}

/// A program of an unprivileged user on `host` listening on `port`, writing whatever it
/// receives to a file; stopped when dropped.
struct Stranger {
    host: &'static str,
    file: String,
    port: u16,
}

impl Stranger {
    fn start(host: &'static str, port: u16) -> Stranger {
        let file = format!("/tmp/stranger-{port}-{}.bin", std::process::id());
        let _ = std::fs::remove_file(&file);
        // nobody (uid 65534) runs a listener that keeps every byte it is sent.
        let py = format!(
            "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('0.0.0.0',{port}))\ns.listen(8)\ns.settimeout(120)\nout=open('{file}','ab',0)\nwhile True:\n  c,_=s.accept()\n  c.settimeout(5)\n  try:\n    while True:\n      b=c.recv(65536)\n      if not b: break\n      out.write(b)\n  except Exception: pass\n  c.close()\n"
        );
        let script = format!(
            "touch {file} && chown 65534 {file} && (setpriv --reuid=65534 --regid=65534 --clear-groups timeout 180 python3 -c \"$0\" </dev/null >/dev/null 2>&1 &) ",
        );
        on(host, &["sh", "-c", &script, &py]).ok();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            let out = on(host, &["ss", "-Htln", &format!("sport = :{port}")]);
            if !out.stdout.trim().is_empty() {
                return Stranger { host, file, port };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the stranger never listened on {host}:{port}");
    }

    fn received(&self) -> Vec<u8> {
        std::fs::read(&self.file).unwrap_or_default()
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        on(
            self.host,
            &[
                "pkill",
                "-KILL",
                "-u",
                "65534",
                "-f",
                &format!("bind..'0.0.0.0',{}", self.port),
            ],
        );
        let _ = std::fs::remove_file(&self.file);
    }
}

/// How many run folders `host` has.
fn run_folders(host: &str) -> usize {
    let out = on(
        host,
        &[
            "sh",
            "-c",
            "ls -A /var/lib/migrate/runs 2>/dev/null | wc -l",
        ],
    );
    out.stdout.trim().parse().unwrap()
}

#[test]
fn a_stranger_on_the_control_port_gets_nothing_and_send_refuses() {
    require_lab!();
    kill_receivers();
    fresh_workload("a", 100);
    let ids = identities("a");
    let runs = run_folders("b");
    let stranger = Stranger::start("b", 12345);
    let target = to("b");
    for extra in [&[][..], &["--spawn-receiver"][..]] {
        let mut args = vec!["--to", target.as_str(), "--data", "/srv/app"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["db", "web"]);
        let t0 = Instant::now();
        let out = send("a", &args).expect_code(2);
        assert!(
            out.stderr.contains("port 12345 there is held by pid")
                && out.stderr.contains("uid 65534")
                && out.stderr.contains("nothing was sent to it"),
            "{}",
            out.describe()
        );
        assert!(t0.elapsed() < Duration::from_secs(60));
        // Not a byte: no hello, no secret, no archive, no path.
        assert!(
            stranger.received().is_empty(),
            "the stranger got {:?}",
            String::from_utf8_lossy(&stranger.received())
        );
        assert_eq!(identities("a"), ids, "the service was touched");
        assert!(all_containers("b").is_empty());
    }
    // `check` names it too.
    let out = on(
        "a",
        &[
            &bin(),
            "check",
            "--format",
            "json",
            "--to",
            &to("b"),
            "db",
            "web",
        ],
    )
    .expect_code(2);
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", out.describe()));
    assert!(
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["severity"] == "fail"
                && f["code"] == "port_held_by_stranger"
                && f["text"].as_str().unwrap().contains("uid 65534")),
        "{}",
        out.describe()
    );
    assert!(stranger.received().is_empty());
    drop(stranger);
    assert_eq!(run_folders("b"), runs, "a run folder was left on b");
}

#[test]
fn a_receiver_without_the_secret_is_refused_before_the_freeze() {
    require_lab!();
    // A real receiver of root, but not the one SSH set the run up for (another work
    // folder): it cannot prove it holds the secret, so nothing moves.
    kill_receivers();
    fresh_workload("a", 100);
    let ids = identities("a");
    on("b", &["mkdir", "-p", "-m", "700", "/var/lib/migrate/runs"]).ok();
    let runs = run_folders("b");
    let rx = Receiver::start("b", &["--workdir", "/var/lib/migrate-other"]);
    let out = send("a", &["--to", &to("b"), "--data", "/srv/app", "db", "web"]).expect_code(2);
    assert!(
        out.stderr.contains("no usable secret") && out.stderr.contains("--target-workdir"),
        "{}",
        out.describe()
    );
    assert_eq!(identities("a"), ids);
    assert!(all_containers("b").is_empty());
    // The run folder made for the refused run is gone again.
    assert_eq!(run_folders("b"), runs, "a run folder was left on b");
    drop(rx);
    // With the right --target-workdir the same receiver takes it.
    let rx = Receiver::start("b", &["--workdir", "/var/lib/migrate-other"]);
    let before = counter("a");
    send(
        "a",
        &[
            "--to",
            &to("b"),
            "--target-workdir",
            "/var/lib/migrate-other",
            "--data",
            "/srv/app",
            "db",
            "web",
        ],
    )
    .ok();
    let (code, _) = rx.wait(T);
    assert_eq!(code, Some(0));
    assert_pair_alive("b", 100, before);
}

#[test]
fn a_run_folder_others_could_reach_is_refused_and_nothing_is_written_through_it() {
    require_lab!();
    kill_receivers();
    fresh_workload("a", 100);
    let ids = identities("a");
    let rx = Receiver::start("b", &[]);
    // Somebody replaced the receiver's runs folder with a symlink to a folder of theirs.
    let evil = "/tmp/evil-runs";
    let _undo = OnHost::apply(
        "b",
        &format!(
            "rm -rf {evil} && mkdir -m 1777 {evil} && mv /var/lib/migrate/runs /var/lib/migrate/runs.real && ln -s {evil} /var/lib/migrate/runs"
        ),
        "rm -f /var/lib/migrate/runs && mv /var/lib/migrate/runs.real /var/lib/migrate/runs; rm -rf /tmp/evil-runs",
    );
    let out = send("a", &["--to", &to("b"), "--data", "/srv/app", "db", "web"]).expect_code(2);
    assert!(
        out.stderr
            .contains("is not a folder (a symbolic link or missing)"),
        "{}",
        out.describe()
    );
    let inside = on("b", &["sh", "-c", &format!("ls -A {evil} | wc -l")]);
    assert_eq!(inside.stdout.trim(), "0", "written through the symlink");
    assert_eq!(identities("a"), ids);
    drop(_undo);

    // A runs folder anybody may write to: refused the same way.
    let _undo = OnHost::apply(
        "b",
        "chmod 1777 /var/lib/migrate/runs",
        "chmod 700 /var/lib/migrate/runs",
    );
    let out = send("a", &["--to", &to("b"), "--data", "/srv/app", "db", "web"]).expect_code(2);
    assert!(
        out.stderr.contains("writable by others"),
        "{}",
        out.describe()
    );
    assert_eq!(identities("a"), ids);
    drop(rx);
}

#[test]
fn hostile_data_paths_are_handled_literally() {
    require_lab!();
    kill_receivers();
    fresh_workload("a", 100);
    let marker = format!("/tmp/pwned-{}", std::process::id());
    let hostile = format!("/srv/odd $(touch {marker}) `touch {marker}` \"q' x");
    on(
        "a",
        &[
            "sh",
            "-c",
            "rm -rf /srv/odd* && mkdir -p \"$0\" && echo kept > \"$0/file\"",
            &hostile,
        ],
    )
    .ok();
    on("b", &["sh", "-c", "rm -rf /srv/odd*"]);
    let rx = Receiver::start("b", &[]);
    let target = to("b");
    let args = [
        "--to",
        target.as_str(),
        "--data",
        "/srv/app",
        "--data",
        hostile.as_str(),
        "db",
        "web",
    ];
    let b = bin();
    let mut check = vec![b.as_str(), "check", "--format", "json"];
    check.extend_from_slice(&args);
    let out = on("a", &check);
    assert!(out.code == Some(0), "{}", out.describe());
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", out.describe()));
    let codes: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["code"].as_str())
        .collect();
    assert!(
        codes.contains(&"space_enough") && !codes.contains(&"space_short"),
        "{}",
        out.describe()
    );
    let before = counter("a");
    send("a", &args).ok();
    assert_eq!(rx.wait(T).0, Some(0));
    assert_pair_alive("b", 100, before);
    let got = on("b", &["sh", "-c", "cat \"$0/file\"", &hostile]).ok();
    assert_eq!(got.stdout.trim(), "kept");
    for h in ["a", "b"] {
        let seen = on(h, &["sh", "-c", "ls /tmp/pwned-* 2>/dev/null | wc -l"]);
        assert_eq!(seen.stdout.trim(), "0", "a command ran on {h}");
    }
    on("a", &["sh", "-c", "rm -rf /srv/odd*"]);
    on("b", &["sh", "-c", "rm -rf /srv/odd*"]);
}

#[test]
fn data_folders_that_would_wipe_the_system_are_refused_before_anything_runs() {
    require_lab!();
    fresh_workload("a", 100);
    let ids = identities("a");
    for d in [
        "/etc",
        "/var",
        "/var/lib/containers",
        "/var/lib/migrate",
        "/",
    ] {
        let out = send("a", &["--to", &to("b"), "--data", d, "db", "web"]).expect_code(2);
        assert!(
            out.stderr.lines().filter(|l| l.contains("error")).count() == 1
                && out.stderr.contains(&format!("--data {d}")),
            "{}",
            out.describe()
        );
    }
    assert_eq!(identities("a"), ids);
}

#[test]
fn a_spawned_receiver_leaves_after_an_aborted_migration() {
    require_lab!();
    kill_receivers();
    fresh_workload("a", 100);
    let ids = identities("a");
    let out = send(
        "a",
        &[
            "--to",
            &to("b"),
            "--install-receiver",
            "--hook",
            "pre-freeze=exit 1",
            "--data",
            "/srv/app",
            "db",
            "web",
        ],
    )
    .expect_code(2);
    assert!(out.stderr.contains("pre-freeze"), "{}", out.describe());
    assert_eq!(identities("a"), ids);
    // The receiver it started is gone soon after (it exits with the aborted migration),
    // and nobody listens on the control port any more.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let ss = on("b", &["ss", "-Htln", "sport = :12345"]);
        if ss.stdout.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < end,
            "a receiver still listens on b: {}",
            ss.stdout
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = on(
        "b",
        &[
            "sh",
            "-c",
            "pgrep -f '/var/lib/migrate/bin/migrate-.* rec[e]ive' | wc -l",
        ],
    );
    assert_eq!(left.stdout.trim(), "0");
}
