//! `migrate check`, `--ship-image` and `--spawn-receiver` on the lab (real stack).
mod common;

use std::time::Duration;

use common::*;

/// The findings of `severity` on `host` with `code` whose text contains `text`.
fn findings<'a>(
    v: &'a serde_json::Value,
    severity: &str,
    host: &str,
    code: &str,
    text: &str,
) -> Vec<&'a serde_json::Value> {
    v["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| {
            f["severity"] == severity
                && f["host"] == host
                && f["code"] == code
                && f["text"].as_str().is_some_and(|t| t.contains(text))
        })
        .collect()
}

/// Asserts one such finding and returns it.
#[track_caller]
fn finding<'a>(
    out: &Out,
    v: &'a serde_json::Value,
    (severity, host, code, text): (&str, &str, &str, &str),
) -> &'a serde_json::Value {
    let found = findings(v, severity, host, code, text);
    assert!(
        !found.is_empty(),
        "no {severity} finding {code} on {host} saying {text:?}:\n{}",
        out.describe()
    );
    found[0]
}

#[test]
fn check_passes_on_a_healthy_pair() {
    require_lab!();
    fresh_workload("a", 100);
    let _rx = Receiver::start("b", &[]);
    let out = check(&["--data", "/srv/app", "db", "web"]).ok();
    let v = report(&out);
    assert_eq!(v["counts"]["fail"], 0, "{}", out.describe());
    assert!(
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["severity"] != "fail"),
        "{}",
        out.describe()
    );
    for what in [
        ("ok", "source", "container_running", "container db runs"),
        ("ok", "target", "ssh_ok", "SSH to root@10.77.0.12 works"),
        (
            "ok",
            "target",
            "receiver_answers",
            "receiver on 10.77.0.12:12345 answers",
        ),
        ("ok", "target", "clock_offset", "clock offset"),
    ] {
        finding(&out, &v, what);
    }
    assert!(
        v["target"]["clock"]["offset_s"].is_f64(),
        "{}",
        out.describe()
    );
    for host in ["source", "target"] {
        assert!(
            v[host]["stack"]["criu"].is_string(),
            "no CRIU version for {host}:\n{}",
            out.describe()
        );
    }
    assert_eq!(
        v["target"]["receiver_version"],
        env!("CARGO_PKG_VERSION"),
        "{}",
        out.describe()
    );
    // The listing for humans went to stderr.
    assert!(
        out.stderr.contains("a migration would start"),
        "{}",
        out.describe()
    );
}

#[test]
fn check_names_each_problem_and_exits_2() {
    require_lab!();
    fresh_workload("a", 100);
    let _rx = Receiver::start("b", &[]);

    let out = check(&["--data", "/srv/app", "db", "nosuch"]).expect_code(2);
    finding(
        &out,
        &report(&out),
        (
            "fail",
            "source",
            "container_missing",
            "container \"nosuch\" does not exist",
        ),
    );

    let out = on(
        "a",
        &[
            "sh",
            "-c",
            &format!(
                "rm -f /tmp/wrong_key*; ssh-keygen -q -t ed25519 -N '' -f /tmp/wrong_key && {} check --format json --to root@10.77.0.12 --identity /tmp/wrong_key --data /srv/app db web",
                bin()
            ),
        ],
    )
    .expect_code(2);
    let v = report(&out);
    finding(
        &out,
        &v,
        ("fail", "target", "ssh_failed", "key was not accepted"),
    );
    // Nothing on the target could be probed.
    assert!(v["target"]["stack"].is_null(), "{}", out.describe());

    let out = check(&["--data", "/srv/app/www", "db", "web"]).expect_code(2);
    let v = report(&out);
    let f = finding(
        &out,
        &v,
        (
            "fail",
            "target",
            "bind_missing",
            "bind-mounts /srv/app/mysql",
        ),
    );
    assert!(
        f["advice"]
            .as_str()
            .is_some_and(|a| a.contains("add --data /srv/app/mysql")),
        "{}",
        out.describe()
    );

    {
        // No CRIU on the target.
        let _gone = OnHost::apply(
            "b",
            "mount -t tmpfs none /usr/local/sbin",
            "umount /usr/local/sbin",
        );
        let out = check(&["--data", "/srv/app", "db", "web"]).expect_code(2);
        let v = report(&out);
        finding(
            &out,
            &v,
            ("fail", "target", "criu_missing", "CRIU is not installed"),
        );
        assert_eq!(
            v["target"]["stack"]["criu"],
            "missing",
            "{}",
            out.describe()
        );
    }
    // ... and the same refusal from send, before anything is frozen.
    let ids = identity("a", "db");
    {
        let _gone = OnHost::apply(
            "b",
            "mount -t tmpfs none /usr/local/sbin",
            "umount /usr/local/sbin",
        );
        let out = send(
            "a",
            &["--to", "root@10.77.0.12", "--data", "/srv/app", "db", "web"],
        )
        .expect_code(2);
        assert!(
            out.stderr.contains("CRIU is not installed"),
            "{}",
            out.describe()
        );
    }
    assert_eq!(identity("a", "db"), ids, "db was touched");
}

#[test]
fn missing_image_is_refused_then_shipped_with_ship_image() {
    require_lab!();
    fresh_workload("a", 100);
    on(
        "b",
        &[
            "podman",
            "rmi",
            "--force",
            "localhost/migrate-busybox:latest",
        ],
    )
    .ok();
    let rx = Receiver::start("b", &[]);
    let out = check(&["--data", "/srv/app", "db", "web"]).expect_code(2);
    let v = report(&out);
    let f = finding(
        &out,
        &v,
        (
            "fail",
            "target",
            "image_missing",
            "image localhost/migrate-busybox:latest",
        ),
    );
    assert!(
        f["advice"]
            .as_str()
            .is_some_and(|a| a.contains("--ship-image")),
        "{}",
        out.describe()
    );
    let out = send(
        "a",
        &["--to", "root@10.77.0.12", "--data", "/srv/app", "db", "web"],
    )
    .expect_code(2);
    assert!(out.stderr.contains("--ship-image"), "{}", out.describe());
    let before = counter("a");
    let out = send(
        "a",
        &[
            "--to",
            "root@10.77.0.12",
            "--data",
            "/srv/app",
            "--ship-image",
            "db",
            "web",
        ],
    )
    .ok();
    assert_eq!(out.record()["outcome"], "ok", "{}", out.describe());
    rx.wait(Duration::from_secs(60));
    assert_pair_alive("b", 100, before);
    let id_a = on(
        "a",
        &[
            "podman",
            "image",
            "inspect",
            "--format",
            "{{.Id}}",
            "localhost/migrate-busybox:latest",
        ],
    )
    .ok();
    let id_b = on(
        "b",
        &[
            "podman",
            "image",
            "inspect",
            "--format",
            "{{.Id}}",
            "localhost/migrate-busybox:latest",
        ],
    )
    .ok();
    assert_eq!(id_a.stdout, id_b.stdout, "shipped image keeps its ID");
}

#[test]
fn spawn_receiver_migrates_with_one_command() {
    require_lab!();
    fresh_workload("a", 100);
    for h in ["a", "b"] {
        on(h, &["rm", "-rf", "/var/lib/migrate/bin"]).ok();
    }
    // Without the same migrate on the target, --spawn-receiver alone is refused...
    let out = send(
        "a",
        &[
            "--to",
            "root@10.77.0.12",
            "--data",
            "/srv/app",
            "--spawn-receiver",
            "db",
            "web",
        ],
    )
    .expect_code(2);
    assert!(
        out.stderr.contains("--install-receiver"),
        "{}",
        out.describe()
    );
    // ... --install-receiver copies this binary there, starts it, and migrates.
    let install_send = |from: &str, to: &str| {
        let b = bin();
        let dest = format!("root@{}", host_addr(to));
        on(
            from,
            &[
                &b,
                "send",
                "--to",
                &dest,
                "--data",
                "/srv/app",
                "--install-receiver",
                "db",
                "web",
            ],
        )
        .ok()
    };
    let before = counter("a");
    let out = install_send("a", "b");
    assert_eq!(out.record()["outcome"], "ok", "{}", out.describe());
    assert_pair_alive("b", 100, before);
    // The spawned receiver handled its one migration and is gone.
    std::thread::sleep(Duration::from_millis(500));
    let left = run("pgrep", &["-f", "/var/lib/migrate/bin/migrate-.* receive"]);
    assert_ne!(
        left.code,
        Some(0),
        "spawned receiver still running: {}",
        left.stdout
    );
    // And the way back, installing on a this time.
    let before = counter("b");
    let out = install_send("b", "a");
    assert_eq!(out.record()["outcome"], "ok", "{}", out.describe());
    assert_pair_alive("a", 100, before);
}

#[test]
fn dry_run_prints_the_plan_and_touches_nothing() {
    require_lab!();
    fresh_workload("a", 100);
    // Serving: each dry run says goodbye to it, and a second one follows.
    let _rx = Receiver::start("b", &["--serve"]);
    let ids = identity("a", "db");
    let out = send(
        "a",
        &[
            "--to",
            "root@10.77.0.12",
            "--data",
            "/srv/app",
            "--dry-run",
            "--format",
            "json",
            "db",
            "web",
        ],
    )
    .ok();
    // stdout is the plan as one JSON record; the words go to stderr.
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.describe());
    let plan: serde_json::Value = serde_json::from_str(lines[0]).expect("the plan is JSON");
    let names: Vec<&str> = plan["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db", "web"], "{plan}");
    assert!(
        plan["containers"][0]["resident_bytes"].as_u64().unwrap() > 1 << 20,
        "MariaDB holds more than a MiB: {plan}"
    );
    assert_eq!(plan["data"][0]["path"], "/srv/app", "{plan}");
    assert!(plan["data"][0]["files"].as_u64().unwrap() > 0, "{plan}");
    assert!(plan["link_bytes_per_s"].as_f64().unwrap() > 0.0, "{plan}");
    let e = &plan["estimate"];
    let sum = ["checkpoint_s", "transfer_s", "restore_s"]
        .iter()
        .map(|k| e[k].as_f64().unwrap())
        .sum::<f64>();
    assert!(
        sum > 0.0 && (e["downtime_s"].as_f64().unwrap() - sum).abs() < 1e-9,
        "{plan}"
    );
    for what in [
        "pre-sync /srv/app",
        "estimated downtime",
        "restores db, web",
    ] {
        assert!(
            out.stderr.contains(what),
            "missing {what:?}: {}",
            out.describe()
        );
    }
    // CSV, the default, is a header and one row.
    let csv = send(
        "a",
        &[
            "--to",
            "root@10.77.0.12",
            "--data",
            "/srv/app",
            "--dry-run",
            "db",
            "web",
        ],
    )
    .ok();
    let rows: Vec<&str> = csv.stdout.lines().collect();
    assert_eq!(rows.len(), 2, "{}", csv.describe());
    assert!(
        rows[0].starts_with("run_id,source,target,containers,"),
        "{}",
        rows[0]
    );
    assert!(rows[1].contains(",db web,"), "{}", rows[1]);
    assert_eq!(identity("a", "db"), ids);
    assert!(all_containers("b").is_empty());
}
