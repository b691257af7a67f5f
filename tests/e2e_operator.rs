//! What operators' hosts hold beyond the thesis pair, checked before the freeze on the
//! lab: the two CPUs compared, and a container whose processes CRIU could not dump with
//! the privileges migrate has.
mod common;

use common::*;

/// The findings with `code`, as (severity, host, text).
fn with_code(v: &serde_json::Value, code: &str) -> Vec<(String, String, String)> {
    v["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["code"] == code)
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap_or_default().to_string();
            (s("severity"), s("host"), s("text"))
        })
        .collect()
}

#[test]
fn check_finds_the_lab_cpus_compatible_and_takes_the_override() {
    require_lab!();
    fresh_workload("a", 100);
    // Serving: the dry run at the end says goodbye to it too.
    let _rx = Receiver::start("b", &["--serve"]);
    for extra in [&[][..], &["--ignore-cpu"][..]] {
        let mut args = extra.to_vec();
        args.extend(["--data", "/srv/app", "db", "web"]);
        let out = check(&args).ok();
        let v = report(&out);
        let cpu = with_code(&v, "cpu_compatible");
        assert_eq!(cpu.len(), 1, "{}", out.describe());
        assert_eq!((cpu[0].0.as_str(), cpu[0].1.as_str()), ("ok", "target"));
        // Both hosts said what they run on, and the model is named in the finding.
        for host in ["source", "target"] {
            let model = v[host]["stack"]["cpu_model"].as_str().unwrap_or_default();
            assert!(!model.is_empty(), "{host}: {}", out.describe());
            assert!(cpu[0].2.contains(model), "{}", cpu[0].2);
            assert!(
                v[host]["stack"]["cpu_arch"].is_string(),
                "{}",
                out.describe()
            );
        }
        assert!(with_code(&v, "cpu_missing_features").is_empty());
    }
    // `send` takes the override too (a dry run: the checks, nothing moved).
    let ids = identity("a", "db");
    let out = send(
        "a",
        &[
            "--to",
            "root@10.77.0.12",
            "--data",
            "/srv/app",
            "--ignore-cpu",
            "--dry-run",
            "db",
            "web",
        ],
    )
    .ok();
    assert_eq!(out.stdout.lines().count(), 2, "{}", out.describe());
    assert_eq!(identity("a", "db"), ids);
    assert!(all_containers("b").is_empty());
}

/// The instruction set the faked target CPU lacks: one every x86-64 CPU of the last
/// fifteen years has, so the lab's source has it.
const FAKED_MISSING: &str = "sse4_2";

/// Issue 19, a faked CPU mismatch: host b's `/proc/cpuinfo` (in b's own mount namespace
/// only) loses one instruction set. `check` and `send` name it and refuse before the
/// freeze, the pair untouched; with `--ignore-cpu` the pair moves and carries on.
#[test]
fn a_target_cpu_without_an_instruction_set_is_refused_and_the_override_moves() {
    require_lab!();
    fresh_workload("a", 100);
    let flags = on("a", &["grep", "-m1", "^flags", "/proc/cpuinfo"])
        .ok()
        .stdout;
    if !flags.split_whitespace().any(|f| f == FAKED_MISSING) {
        panic!("the source CPU lacks {FAKED_MISSING} itself: {flags}");
    }
    let _fake = OnHost::apply(
        "b",
        &format!(
            "sed -E '/^flags/ s/ {FAKED_MISSING}( |$)/\\1/' /proc/cpuinfo > /tmp/cpuinfo.fake && mount --bind /tmp/cpuinfo.fake /proc/cpuinfo && ! grep -qw {FAKED_MISSING} /proc/cpuinfo"
        ),
        "umount /proc/cpuinfo",
    );
    let args = ["--data", "/srv/app", "db", "web"];
    {
        let _rx = Receiver::start("b", &["--serve"]);
        let out = check(&args).expect_code(2);
        let v = report(&out);
        let cpu = with_code(&v, "cpu_missing_features");
        assert_eq!(cpu.len(), 1, "{}", out.describe());
        assert_eq!((cpu[0].0.as_str(), cpu[0].1.as_str()), ("fail", "target"));
        assert!(cpu[0].2.contains(FAKED_MISSING), "{}", cpu[0].2);
    }
    let ids = (identity("a", "db"), identity("a", "web"));
    let before = counter("a");
    let to = ["--to", "root@10.77.0.12"];
    {
        let _rx = Receiver::start("b", &[]);
        let out = send("a", &[&to[..], &args[..]].concat()).expect_code(2);
        let rec = out.record();
        assert!(
            rec["error"].contains(FAKED_MISSING) && rec["error"].contains("--ignore-cpu"),
            "{}",
            out.describe()
        );
        assert_eq!((identity("a", "db"), identity("a", "web")), ids);
        assert!(all_containers("b").is_empty(), "{:?}", all_containers("b"));
    }
    let rx = Receiver::start("b", &[]);
    let out = send("a", &[&to[..], &["--ignore-cpu"][..], &args[..]].concat()).ok();
    assert!(
        out.stderr.contains(FAKED_MISSING) && out.stderr.contains("--ignore-cpu"),
        "the override warns: {}",
        out.describe()
    );
    assert_eq!(out.record()["outcome"], "ok", "{}", out.describe());
    let (code, _) = rx.wait(std::time::Duration::from_secs(120));
    assert_eq!(code, Some(0));
    assert_pair_alive("b", 100, before);
}

/// Whether processes on `host` (where migrate, and so CRIU, runs) have CAP_SYS_RESOURCE.
fn has_cap_sys_resource(host: &str) -> bool {
    let out = on(
        host,
        &["sh", "-c", "sed -n 's/^CapEff:\\s*//p' /proc/self/status"],
    )
    .ok();
    let caps = u64::from_str_radix(out.stdout.trim(), 16)
        .unwrap_or_else(|e| panic!("CapEff ({e}): {}", out.describe()));
    caps & (1 << 24) != 0
}

/// `{{.State.Pid}} {{.State.StartedAt}} {{.State.Checkpointed}}` of a container on a.
fn state(name: &str) -> String {
    on(
        "a",
        &[
            "podman",
            "inspect",
            "--format",
            "{{.State.Running}} {{.State.Pid}} {{.State.StartedAt}} {{.State.Checkpointed}}",
            name,
        ],
    )
    .ok()
    .stdout
    .trim()
    .to_string()
}

#[test]
fn a_container_running_as_another_user_is_refused_before_the_freeze() {
    require_lab!();
    fresh_workload("a", 100);
    let _rx = Receiver::start("b", &[]);
    let _ctr = OnHost::apply(
        "a",
        "podman rm -f -t0 nonroot >/dev/null 2>&1; podman run -d --name nonroot --user 1000 localhost/migrate-busybox:latest sleep 100000",
        "podman rm -f -t0 nonroot",
    );
    let before = state("nonroot");
    assert!(before.starts_with("true "), "{before}");
    if has_cap_sys_resource("a") {
        // A host where CRIU may read every process's rlimits: nothing to refuse.
        let out = check(&["nonroot"]).ok();
        let v = report(&out);
        assert!(
            with_code(&v, "container_needs_cap_sys_resource").is_empty(),
            "{}",
            out.describe()
        );
        eprintln!("the lab has CAP_SYS_RESOURCE: only the check's silence was tested");
        return;
    }
    // This lab runs without CAP_SYS_RESOURCE: check names the container and what to do.
    let out = check(&["nonroot"]).expect_code(2);
    let v = report(&out);
    let found = with_code(&v, "container_needs_cap_sys_resource");
    assert_eq!(found.len(), 1, "{}", out.describe());
    let (severity, host, text) = &found[0];
    assert_eq!((severity.as_str(), host.as_str()), ("fail", "source"));
    assert!(
        text.starts_with("nonroot has 1 of 1 processes running as another user or group")
            && text.contains("sleep as uid 1000 gid 0"),
        "{text}"
    );
    assert!(
        out.stderr
            .contains("run migrate where it has CAP_SYS_RESOURCE"),
        "{}",
        out.describe()
    );
    // Every other check passes: that finding alone refuses.
    assert_eq!(v["counts"]["fail"], 1, "{}", out.describe());
    // The root pair is not affected.
    let out = check(&["--data", "/srv/app", "db", "web"]).ok();
    assert!(with_code(&report(&out), "container_needs_cap_sys_resource").is_empty());

    // send refuses before the freeze: exit 2, the container untouched.
    let out = send("a", &["--to", "root@10.77.0.12", "nonroot"]).expect_code(2);
    assert!(
        out.stderr.contains("CAP_SYS_RESOURCE"),
        "{}",
        out.describe()
    );
    assert_eq!(state("nonroot"), before, "the container was touched");
    let there = on("b", &["podman", "ps", "-a", "--format", "{{.Names}}"]).ok();
    assert!(
        !there.stdout.lines().any(|n| n == "nonroot"),
        "{}",
        there.describe()
    );
}

#[test]
fn a_restart_policy_moves_with_the_container_and_nothing_restarts_it_here() {
    require_lab!();
    fresh_workload("a", 100);
    let _rx = Receiver::start("b", &["--serve"]);
    // Labelled the way `podman generate systemd` units label their containers; the lab
    // runs no systemd, so the label names a unit nothing can start. The count is replaced
    // whole (written aside, then renamed), so a reader never finds the file empty.
    let _ctr = OnHost::apply(
        "a",
        "podman rm -f -t0 keeper >/dev/null 2>&1; podman run -d --name keeper --restart=always --label PODMAN_SYSTEMD_UNIT=container-keeper.service localhost/migrate-busybox:latest sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done'",
        "podman rm -f -t0 keeper",
    );
    let _there = OnHost::apply("b", "true", "podman rm -f -t0 keeper >/dev/null 2>&1; true");
    let out = check(&["keeper"]).ok();
    let v = report(&out);
    let policy = with_code(&v, "container_restart_policy");
    assert_eq!(policy.len(), 1, "{}", out.describe());
    assert!(
        policy[0].2.contains("restart policy always"),
        "{}",
        policy[0].2
    );
    let idle = with_code(&v, "container_systemd_unit_idle");
    assert_eq!(idle.len(), 1, "{}", out.describe());
    assert!(
        idle[0].2.contains("container-keeper.service")
            && idle[0].2.contains("systemd does not run on this host"),
        "{}",
        idle[0].2
    );
    let count = |host: &str| -> u64 {
        let o = on(host, &["podman", "exec", "keeper", "cat", "/tmp/n"]).ok();
        o.stdout
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{}", o.describe()))
    };
    let before = count("a");
    send("a", &["--to", "root@10.77.0.12", "keeper"]).ok();
    // The counter went on on b, and b's podman keeps the restart policy.
    assert!(count("b") >= before, "the counter started over");
    let policy = on(
        "b",
        &[
            "podman",
            "inspect",
            "--format",
            "{{.HostConfig.RestartPolicy.Name}}",
            "keeper",
        ],
    )
    .ok();
    assert_eq!(policy.stdout.trim(), "always", "{}", policy.describe());
    // What podman-restart.service runs at boot finds nothing of it on a.
    on(
        "a",
        &[
            "podman",
            "start",
            "--all",
            "--filter",
            "restart-policy=always",
        ],
    )
    .ok();
    let here = on("a", &["podman", "ps", "-a", "--format", "{{.Names}}"]).ok();
    assert!(
        !here.stdout.lines().any(|n| n == "keeper"),
        "{}",
        here.describe()
    );
}
