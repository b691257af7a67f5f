//! `send --memory lazy` on the lab: the hog (a container holding N MiB of random memory,
//! answering its checksum and a tick count) moves from a to b while its pages are still
//! on a, and the failure rules of the post-copy window hold.

mod common;

use std::time::{Duration, Instant};

use common::*;

const HOG_MB: &str = "256";

/// `send` arguments: the hog to b (10.77.0.12) with a receiver started there, lazily.
const LAZY_TO_B: [&str; 7] = [
    "--to",
    "10.77.0.12",
    "--spawn-receiver",
    "--install-receiver",
    "--memory",
    "lazy",
    "hog",
];

/// The hog's checksum of its memory and its tick count on `host`, or `None` when it does
/// not answer.
fn hog_state(host: &str) -> Option<(u64, u64)> {
    let out = lab(&["hog", "http", host, "/state"]);
    if out.code != Some(0) {
        return None;
    }
    let field = |k: &str| {
        out.stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
    };
    Some((field("sum")?, field("ticks")?))
}

/// Removes the hog from a and b when a test ends, passed or not: later suites (drain
/// empties a whole host) must not find it.
struct HogGone;

impl Drop for HogGone {
    fn drop(&mut self) {
        for h in ["a", "b"] {
            lab(&["hog", "down", h]);
        }
    }
}

fn fresh_hog(host: &str, mb: &str) -> (u64, u64) {
    for h in ["a", "b"] {
        lab(&["hog", "down", h]);
    }
    lab(&["hog", "up", host, "--mb", mb]).ok();
    hog_state(host).expect("the hog answers after it came up")
}

fn has_hog(host: &str) -> bool {
    on(host, &["podman", "container", "exists", "hog"]).code == Some(0)
}

/// No CRIU (dump, page server, lazy-pages daemon) and no relay tunnel is left behind.
/// The lab's hosts share one process table, and the lab runs one test at a time.
fn nothing_left() {
    let ps = run(
        "sh",
        &[
            "-c",
            "pgrep -a -x criu; pgrep -a -f 'migrate[-0-9.]* relay-attach'; true",
        ],
    );
    assert!(ps.stdout.trim().is_empty(), "left behind:\n{}", ps.stdout);
}

/// A 1 GiB hog on a whose lazy move to b is in its post-copy window: its checksum and the
/// sender.
fn in_the_window() -> (u64, Sender) {
    let (sum, _) = fresh_hog("a", "1024");
    let mut sender = Sender::start("a", &LAZY_TO_B);
    sender.wait_for("post-copy:", Duration::from_secs(120));
    (sum, sender)
}

#[test]
fn lazy_moves_the_hog_and_its_pages_follow_until_the_source_is_released() {
    require_lab!();
    let _gone = HogGone;
    let (sum, ticks) = fresh_hog("a", HOG_MB);
    let out = send("a", &LAZY_TO_B).ok();
    let r = out.record();
    assert_eq!(r["outcome"], "ok", "{}", out.describe());
    assert_eq!(r["memory"], "lazy", "{}", out.describe());
    let num = |k: &str| -> f64 {
        r[k].parse()
            .unwrap_or_else(|_| panic!("{k} = {:?}\n{}", r[k], out.describe()))
    };
    let held = 256.0 * 1048576.0;
    // The archive held no memory: every page crossed after UP, through the relay.
    assert!(
        num("archive_bytes") < 16.0 * 1048576.0,
        "{}",
        out.describe()
    );
    assert!(num("bytes_after_up") >= 0.95 * held, "{}", out.describe());
    assert!(num("postcopy_s") > 0.0, "{}", out.describe());
    let pages = num("demand_pages") + num("pushed_pages");
    assert!(
        pages >= 0.95 * held / 4096.0,
        "{pages} pages\n{}",
        out.describe()
    );
    assert!(num("demand_pages") >= 1.0, "{}", out.describe());
    // Same memory on b, the process goes on ticking; nothing of it on a any more.
    let (sum_b, ticks_b) = hog_state("b").expect("the hog answers on b");
    assert_eq!(sum_b, sum, "memory checksum on b");
    assert!(ticks_b > ticks, "ticks {ticks} → {ticks_b}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(hog_state("b").unwrap().1 > ticks_b, "the hog ticks on b");
    assert!(!has_hog("a"), "the hog is gone from a");
    nothing_left();
}

#[test]
fn lazy_failing_before_up_gives_the_hog_back_whole_and_reachable() {
    require_lab!();
    let _gone = HogGone;
    let (sum, ticks) = fresh_hog("a", "64");
    let id = identity("a", "hog");
    let out = {
        let _broken = BrokenCriu::install("b");
        send("a", &LAZY_TO_B)
    };
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert_eq!(out.record()["outcome"], "rolled_back", "{}", out.describe());
    // The same container and process, its memory whole, its network lock gone.
    assert_eq!(identity("a", "hog"), id, "the very same container runs on");
    let (sum_a, ticks_a) = hog_state("a").expect("the hog answers on a (no network lock left)");
    assert_eq!(sum_a, sum);
    assert!(ticks_a > ticks, "ticks {ticks} → {ticks_a}");
    assert!(!has_hog("b"), "nothing on b");
    nothing_left();
}

#[test]
fn lazy_target_dying_in_the_window_stops_there_and_the_source_runs_on() {
    require_lab!();
    let _gone = HogGone;
    let (sum, mut sender) = in_the_window();
    // The target host dies: its receiver, CRIU's daemon, the relay's tunnel end and the
    // container's processes, all at once.
    let died = Instant::now();
    on(
        "b",
        &[
            "sh",
            "-c",
            "pkill -KILL -f 'migrate (receive|relay-attach)'; pkill -KILL -f 'criu lazy-pages'; podman kill hog",
        ],
    );
    let code = sender.wait_end(Duration::from_secs(180));
    let waited = died.elapsed();
    assert_eq!(code, Some(1), "{}", sender.log.join("\n"));
    assert!(
        sender
            .log
            .iter()
            .any(|l| l.contains("post-copy window failed")),
        "{}",
        sender.log.join("\n")
    );
    // The source had the whole memory: the hog runs on a as it was at DOWN.
    let (sum_a, _) = hog_state("a").expect("the hog answers on a");
    assert_eq!(sum_a, sum);
    assert!(!running("b").iter().any(|c| c == "hog"), "no hog runs on b");
    eprintln!(
        "source resumed {:.1}s after the target died",
        waited.as_secs_f64()
    );
    nothing_left();
}

#[test]
fn lazy_link_cut_in_the_window_is_waited_out_and_every_page_arrives() {
    require_lab!();
    let _gone = HogGone;
    let (sum, mut sender) = in_the_window();
    std::thread::sleep(Duration::from_millis(500));
    // Nothing passes between a and b for 8 s, in the middle of the window.
    let cut = format!(
        "nft add table inet lazycut && nft add chain inet lazycut o '{{ type filter hook output priority 0; }}' && nft add rule inet lazycut o ip daddr {b} drop && nft add chain inet lazycut i '{{ type filter hook input priority 0; }}' && nft add rule inet lazycut i ip saddr {b} drop",
        b = host_addr("b")
    );
    let link = OnHost::apply("a", &cut, "nft delete table inet lazycut 2>/dev/null; true");
    std::thread::sleep(Duration::from_secs(8));
    drop(link);
    let code = sender.wait_end(Duration::from_secs(300));
    assert_eq!(code, Some(0), "{}", sender.log.join("\n"));
    assert!(
        sender.log.iter().any(|l| l.contains("tunnels")),
        "the relay went through more than one tunnel:\n{}",
        sender.log.join("\n")
    );
    let (sum_b, _) = hog_state("b").expect("the hog answers on b");
    assert_eq!(sum_b, sum, "every page arrived: the memory on b is whole");
    assert!(!has_hog("a"), "the hog is gone from a");
    nothing_left();
}
