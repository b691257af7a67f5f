//! The thesis topology end to end (functional tests LMF_01–04 of
//! shared/docs/seed-method.md) on the lab, with a real nginx and a real `migrate`:
//! a client on host c reaches the session shop (testdata/workloads/session) through an
//! nginx load balancer on c whose upstream lists a and b; the shop moves a → b with
//! `migrate send`; the client keeps its login and a `migrate probe` through the
//! balancer sees one outage, no longer than the migration's downtime plus a switch
//! allowance, and no failed request outside [down_ts, up_ts + allowance].
//!
//! Run: `cargo nextest run -E 'test(balancer)'` (needs `scripts/lab up`). Uses container
//! `shop` (ports 8081/8082), nginx on 10.77.0.13:80, receivers on port 12350: nothing
//! the thesis-pair tests (`db`, `web`, 12345) use.
mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(120);
/// Receiver control port of these tests (the thesis-pair tests use the default 12345).
const CONTROL_PORT: u16 = 12350;
const LB: &str = "http://10.77.0.13";
const SHOP_PORT: u16 = 8081;
/// nginx's fail_timeout in these tests (`scripts/lab lb up --fail-timeout`).
const FAIL_TIMEOUT_S: f64 = 3.0;
/// Probe interval: 20 ms, so its own timeout is 200 ms (the probe caps it at 10 intervals).
const PROBE_INTERVAL: &str = "20ms";
const PROBE_ROUND_S: f64 = 0.02 + 0.2;

/// Switch allowance of passive failover. While the shop is down both backends fail
/// (a frozen or gone, b not restored yet), so nginx marks both unavailable (max_fails=1)
/// and answers 502 "no live upstreams" until fail_timeout has passed since b's last
/// failure, which is at most up_ts. nginx measures fail_timeout with its cached clock
/// in whole seconds (ngx_time()), so "passed" can come up to 1 s late. The outage thus
/// ends by up_ts + fail_timeout + 1 s + one probe round (the first probe after that)
/// + 0.3 s for scheduling. Measured: 3.1-3.5 s after up_ts with fail_timeout=3s.
const PASSIVE_ALLOWANCE_S: f64 = FAIL_TIMEOUT_S + 1.0 + PROBE_ROUND_S + 0.3;
// The switch hook must promise a clearly shorter window than passive failover.
const _: () = assert!(HOOK_ALLOWANCE_S + 1.0 < PASSIVE_ALLOWANCE_S);

/// Switch allowance with a post-up hook running `scripts/lab lb switch b`: `send` runs
/// post-up hooks after it removed the source container (≈0.2-0.5 s); the hook runs on a,
/// where the lab script ssh-es to c (handshake ≈0.3-0.5 s), rewrites the upstream,
/// `nginx -t`, `nginx -s reload`, and waits until the old workers are gone (≈0.1 s);
/// plus one probe round. Measured 0.3-1.0 s after up_ts; 2.0 s leaves room for a loaded
/// machine and stays well under the passive allowance.
const HOOK_ALLOWANCE_S: f64 = 2.0;

fn to(host: &str) -> String {
    format!("root@{}", host_addr(host))
}

fn ts_us(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("bad timestamp {s:?}: {e}"))
        .timestamp_micros()
}

/// Kills the receivers of these tests only (not those of other tests).
fn kill_own_receivers() {
    let pattern = format!("{} receive --listen 10.77.0.1[0-9]:{CONTROL_PORT}", bin());
    let _ = Command::new("pkill")
        .args(["-KILL", "-f", &pattern])
        .status();
    std::thread::sleep(Duration::from_millis(200));
}

/// An HTTP answer seen by the client on c.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    raw: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// GET `url` with curl on host c (the client), with an optional session cookie.
fn get_from_c(url: &str, sid: Option<&str>) -> Answer {
    let cookie = sid.map(|s| format!("Cookie: sid={s}"));
    let mut cmd = vec!["curl", "-sS", "-i", "--max-time", "5"];
    if let Some(c) = &cookie {
        cmd.extend_from_slice(&["-H", c]);
    }
    cmd.push(url);
    let out = on("c", &cmd).ok();
    let raw = out.stdout.replace("\r\n", "\n");
    let (head, body) = raw.split_once("\n\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status from {url}\n{}", out.describe()));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
        raw: raw.clone(),
    }
}

/// Logs in through the balancer; returns the session id from Set-Cookie.
fn login_via_lb(user: &str) -> String {
    let a = get_from_c(&format!("{LB}/login?user={user}"), None);
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(a.body.trim(), format!("logged in as {user}"), "{}", a.raw);
    let cookie = a
        .header("Set-Cookie")
        .unwrap_or_else(|| panic!("no Set-Cookie\n{}", a.raw));
    let sid = cookie
        .strip_prefix("sid=")
        .and_then(|s| s.split(';').next())
        .unwrap_or_else(|| panic!("bad cookie {cookie:?}"));
    assert_eq!(sid.len(), 32, "128-bit hex session id: {cookie:?}");
    sid.to_string()
}

/// Shop on `host` only, balancer up in front of a and b (both listed, equal).
fn fresh_setup(host: &str) {
    assert_lab();
    kill_own_receivers();
    for h in ["a", "b"] {
        lab(&["session", "down", h]).ok();
    }
    lab(&["session", "up", host]).ok();
    lab(&[
        "lb",
        "up",
        "--backends",
        "a,b",
        "--port",
        "80",
        "--fail-timeout",
        &format!("{}s", FAIL_TIMEOUT_S as u32),
    ])
    .ok();
}

/// Whether a container named `shop` runs (or, with `any_state`, exists) on `host`.
fn has_shop(host: &str, any_state: bool) -> bool {
    let mut cmd = vec!["podman", "ps", "--format", "{{.Names}}"];
    if any_state {
        cmd.insert(2, "-a");
    }
    on(host, &cmd)
        .ok()
        .stdout
        .lines()
        .any(|l| l.trim() == "shop")
}

/// LMF_01 + LMF_02: through the balancer the client reaches the shop, and the server
/// that has it (`host`) is the one that answers (nginx names the upstream it used).
fn assert_served_by(host: &str) {
    // Only `shop` matters here: the thesis-pair tests may have `db`/`web` on the hosts.
    assert!(has_shop(host, false), "shop does not run on {host}");
    let other = if host == "a" { "b" } else { "a" };
    assert!(!has_shop(other, true), "shop also runs on {other}");
    let want = format!("{}:{SHOP_PORT}", host_addr(host));
    // Several requests: round robin would also try the other backend; whatever it
    // tried, the answer must come from `host` (last upstream named).
    for _ in 0..4 {
        let a = get_from_c(&format!("{LB}/health"), None);
        assert_eq!(a.status, 200, "{}", a.raw);
        assert_eq!(a.body.trim(), "ok");
        let used = a.header("X-Lab-Backend").unwrap_or("");
        assert_eq!(
            used.rsplit(", ").next(),
            Some(want.as_str()),
            "answered by {host}? {}",
            a.raw
        );
    }
}

/// LMF_04: the session cookie from before still logs `user` in.
fn assert_logged_in(sid: &str, user: &str) {
    let a = get_from_c(&format!("{LB}/"), Some(sid));
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(
        a.body.trim(),
        format!("logged in as {user}"),
        "session lost?\n{}",
        a.raw
    );
    let anon = get_from_c(&format!("{LB}/"), None);
    assert_eq!(anon.body.trim(), "not logged in", "{}", anon.raw);
}

/// A `migrate probe` against the balancer, run from c, stopped by a file on c.
struct Probe {
    child: Child,
    stop_file: String,
}

impl Probe {
    fn start(name: &str) -> Probe {
        let stop_file = format!("/tmp/{name}.stop");
        on("c", &["rm", "-f", &stop_file]).ok();
        let b = bin();
        let url = format!("{LB}/health");
        let child = Command::new(repo().join("scripts/lab"))
            .args([
                "exec",
                "c",
                b.as_str(),
                "probe",
                &url,
                "--interval",
                PROBE_INTERVAL,
                // One request at a time, the client the allowances below are worked out
                // for: with a request every 20 ms whatever the ones before are doing,
                // nginx's passive failover (max_fails=1) came back 1-2 s later.
                "--sequential",
                "--duration",
                "90s",
                "--until-file",
                &stop_file,
                "--format",
                "json",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start probe");
        Probe { child, stop_file }
    }

    /// Stops the probe and returns its JSON summary and its stderr (the down/up lines).
    fn stop(mut self) -> (serde_json::Value, String) {
        on("c", &["touch", &self.stop_file]).ok();
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if self.child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(Instant::now() < end, "probe did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = String::new();
        let mut err = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        on("c", &["rm", "-f", &self.stop_file]).ok();
        let v = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("probe JSON: {e}\nstdout:\n{out}\nstderr:\n{err}"));
        (v, err)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one migration looked like from the client.
#[derive(Debug)]
struct Seen {
    downtime_s: f64,
    longest_outage_s: f64,
    lost: u64,
    sent: u64,
    /// Seconds from up_ts to the end of the last outage (≤ allowance).
    recovered_after_up_s: f64,
}

/// Moves the shop `from` → `dest` with a probe running through the balancer and checks
/// the client's view against the record: every lost probe lies in
/// [down_ts, up_ts + allowance]; the outage is no longer than downtime + allowance.
fn move_and_watch(from: &str, dest: &str, extra: &[&str], allowance_s: f64, label: &str) -> Seen {
    let rx = Receiver::start_on(dest, CONTROL_PORT, &[]);
    let probe = Probe::start(&format!("balancer-probe-{label}"));
    // A second of normal traffic first: the probe must see the service up before.
    std::thread::sleep(Duration::from_millis(1000));
    let target = to(dest);
    let port = CONTROL_PORT.to_string();
    let mut args = vec![
        "--to",
        target.as_str(),
        "--control-port",
        port.as_str(),
        "--label",
        label,
    ];
    args.extend_from_slice(extra);
    args.push("shop");
    let send_started = chrono::Utc::now().timestamp_micros();
    let out = send(from, &args).ok();
    let rec = out.record();
    eprintln!("[{label}] send stderr:\n{}", out.stderr);
    assert_eq!(rec["outcome"], "ok", "{}", out.describe());
    assert!(rec["error"].is_empty(), "{}", out.describe());
    let (code, rx_out) = rx.wait(T);
    assert_eq!(code, Some(0), "receiver exit; stdout:\n{rx_out}");
    let down = ts_us(&rec["down_ts"]);
    let up = ts_us(&rec["up_ts"]);
    let downtime: f64 = rec["downtime_s"].parse().unwrap();
    // Let the switch happen and the client see the service again, then some more.
    let until = up + ((allowance_s + 1.5) * 1e6) as i64;
    while chrono::Utc::now().timestamp_micros() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (p, p_err) = probe.stop();
    eprintln!(
        "[{label}] record: down_ts {} up_ts {} downtime_s {downtime}",
        rec["down_ts"], rec["up_ts"]
    );
    eprintln!("[{label}] probe: {p}\n{p_err}");

    let sent = p["sent"].as_u64().unwrap();
    let lost = p["lost"].as_u64().unwrap();
    let outages = p["outages"].as_array().unwrap();
    assert!(sent >= 100, "probe sent only {sent}: {p}");
    assert!(
        !outages.is_empty() && lost > 0,
        "no outage seen at all: the probe did not watch the move? {p}"
    );
    let ts = |v: &serde_json::Value| ts_us(v.as_str().unwrap());
    // DOWN is the moment before the freeze: a probe sent less than one answer time
    // before it (the probe's slowest answer, at most 20 ms) was in flight when the
    // service froze and counts as lost from its send time.
    let in_flight_us = (p["rtt_max_ms"].as_f64().unwrap_or(0.0).min(20.0) * 1000.0) as i64;
    let mut last_end = down;
    let mut longest = 0.0f64;
    let mut watched = 0;
    for o in outages {
        let (s, e) = (ts(&o["start"]), ts(&o["end"]));
        // An outage that began before `send` was even started is none of migrate's doing
        // (on this 2-core machine nginx's 200 ms connect timeout is now and then missed,
        // and max_fails=1 then disables the backend for fail_timeout): reported, not
        // held against the migration.
        if s < send_started {
            eprintln!(
                "[{label}] lab hiccup: an outage began {:.3}s before send started: {o}",
                (send_started - s) as f64 / 1e6
            );
            continue;
        }
        watched += 1;
        longest = longest.max(o["length_s"].as_f64().unwrap());
        assert!(
            !o["ongoing"].as_bool().unwrap(),
            "[{label}] still down at the end: {p}\n{}",
            lb_diagnostics()
        );
        // `start` is the first lost probe, `end` the first probe answered again.
        assert!(
            s >= down - in_flight_us,
            "[{label}] a probe failed {:.3}s BEFORE down_ts (more than an answer's time, {in_flight_us} µs): {o}\nrecord: {}",
            (down - s) as f64 / 1e6,
            out.stdout
        );
        assert!(
            e as f64 <= up as f64 + allowance_s * 1e6,
            "[{label}] a probe failed {:.3}s after up_ts, more than the allowance {allowance_s}s: {o}\nrecord: {}\n{}",
            (e - up) as f64 / 1e6,
            out.stdout,
            lb_diagnostics()
        );
        last_end = last_end.max(e);
    }
    assert!(
        watched > 0,
        "[{label}] no outage began after send started: the probe did not watch the move? {p}"
    );
    assert!(
        longest <= downtime + allowance_s,
        "[{label}] longest outage {longest}s > downtime {downtime}s + allowance {allowance_s}s"
    );
    Seen {
        downtime_s: downtime,
        longest_outage_s: longest,
        lost,
        sent,
        recovered_after_up_s: (last_end - up) as f64 / 1e6,
    }
}

/// What nginx on c says, for a failure's message: its upstream, and the ends of its
/// error and access logs (which backend each request went to, and how it ended).
fn lb_diagnostics() -> String {
    let tail = |file: &str, n: usize| {
        let text = std::fs::read_to_string(format!("/var/lib/migrate-lab/lb/{file}"))
            .unwrap_or_else(|e| format!("({e})"));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    };
    format!(
        "--- lb status\n{}\n--- error.log\n{}\n--- access.log\n{}",
        lab(&["lb", "status"]).stdout,
        tail("error.log", 20),
        tail("access.log", 40)
    )
}

fn hook_switch_to(host: &str) -> String {
    format!(
        "post-up={} lb switch {host}",
        repo().join("scripts/lab").display()
    )
}

/// LMF_01–04 with passive failover only: nothing tells nginx about the move.
#[test]
fn balancer_passive_failover_keeps_session_a_to_b() {
    require_lab!();
    fresh_setup("a");
    assert_served_by("a");
    let sid = login_via_lb("alice");
    assert_logged_in(&sid, "alice");
    let seen = move_and_watch("a", "b", &[], PASSIVE_ALLOWANCE_S, "balancer-passive");
    eprintln!("[balancer-passive] {seen:?}");
    assert_served_by("b");
    assert_logged_in(&sid, "alice");
    assert!(!has_shop("a", true), "shop left on a");
}

/// The same with a post-up hook on the source that switches nginx to b at once.
#[test]
fn balancer_switch_hook_keeps_session_a_to_b() {
    require_lab!();
    fresh_setup("a");
    assert_served_by("a");
    let sid = login_via_lb("bob");
    let hook = hook_switch_to("b");
    let seen = move_and_watch(
        "a",
        "b",
        &["--hook", &hook],
        HOOK_ALLOWANCE_S,
        "balancer-hook",
    );
    eprintln!("[balancer-hook] {seen:?}");
    assert_served_by("b");
    assert_logged_in(&sid, "bob");
    let up = lab(&["lb", "status"]).ok();
    assert!(
        up.stdout
            .contains("10.77.0.12:8081 max_fails=1 fail_timeout=3s;")
            && up
                .stdout
                .contains("10.77.0.11:8081 max_fails=1 fail_timeout=3s backup;"),
        "the hook did not switch nginx to b\n{}",
        up.describe()
    );
}

/// Passive a → b, then b → a with the switch hook, in one run on one machine, both
/// printed side by side. Not asserted: "hook shorter than passive" run by run. With
/// passive failover nginx retries a failed backend once per fail_timeout (its clock in
/// whole seconds), so the client sees the target between 0 and fail_timeout + 1 s after
/// up_ts depending on where that retry cycle stands (measured 1.1-3.5 s); the hook's
/// switch lands 0.3-1.0 s after up_ts. The two overlap now and then. Asserted instead:
/// the weaker bound, i.e. the hook's worst case (HOOK_ALLOWANCE_S, checked inside
/// move_and_watch) is below passive failover's worst case (PASSIVE_ALLOWANCE_S).
#[test]
fn balancer_round_trip_passive_then_hook() {
    require_lab!();
    fresh_setup("a");
    let sid = login_via_lb("carol");
    let passive = move_and_watch("a", "b", &[], PASSIVE_ALLOWANCE_S, "balancer-cmp-passive");
    assert_logged_in(&sid, "carol");
    let hook = hook_switch_to("a");
    let hooked = move_and_watch(
        "b",
        "a",
        &["--hook", &hook],
        HOOK_ALLOWANCE_S,
        "balancer-cmp-hook",
    );
    assert_served_by("a");
    assert_logged_in(&sid, "carol");
    eprintln!(
        "passive: downtime {:.3}s, client outage {:.3}s ({} of {} probes lost), recovered {:.3}s after up_ts\n\
         hook:    downtime {:.3}s, client outage {:.3}s ({} of {} probes lost), recovered {:.3}s after up_ts",
        passive.downtime_s,
        passive.longest_outage_s,
        passive.lost,
        passive.sent,
        passive.recovered_after_up_s,
        hooked.downtime_s,
        hooked.longest_outage_s,
        hooked.lost,
        hooked.sent,
        hooked.recovered_after_up_s
    );
    assert!(
        hooked.recovered_after_up_s <= HOOK_ALLOWANCE_S,
        "the switch hook took {:.3}s after up_ts",
        hooked.recovered_after_up_s
    );
}
