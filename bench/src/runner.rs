//! The matrix: profiles x rows x methods x runs (alternating direction), plus the floor.

use std::fs::{self, File};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};

use crate::Plan;
use crate::lab::{self, Bg, Lab};
use crate::parse::{self, ProbeSummary};
use crate::report::{self, RunRow};
use crate::stats;

/// While set, cleanup commands run even after an interrupt.
static CLEANUP: AtomicBool = AtomicBool::new(false);

/// A new workload has just written its data (MariaDB's datadir, the web's files, the
/// hog's memory): let the kernel write the dirty pages back and the database's start-up
/// work end before the service is measured, as on a host where it has been running.
fn settle() {
    let _ = std::process::Command::new("sync").status();
    std::thread::sleep(SETTLE);
}

/// How long a fresh workload runs before it is measured.
const SETTLE: Duration = Duration::from_secs(3);

const STOP_FILE: &str = "/tmp/bench-stop-probe";
/// Port of the memory workload (testdata/workloads/memory/hog.args).
const HOG_PORT: u16 = 8083;
const FILLER_FILES: u32 = 9; // x 4 MiB of random data in /srv/app/www/files: ~40 MB of www
/// Rows of the thesis pair in the data series (the issue's case).
const DATA_ROWS: u64 = 10000;
/// Where the data series puts its extra files (inside the pair's data folder).
const BULK_DIR: &str = "/srv/app/bulk";
/// Size of one extra file of the data series, MiB.
const BULK_FILE_MB: u64 = 16;

/// Address of a lab host (scripts/lab: a=10.77.0.11 ... e=10.77.0.15 on Debian 12;
/// t=10.77.0.16, u=10.77.0.17 on Debian 13).
pub fn host_addr(h: &str) -> Result<String> {
    match h {
        "a" | "b" | "c" | "d" | "e" => Ok(format!("10.77.0.{}", 11 + (h.as_bytes()[0] - b'a'))),
        "t" => Ok("10.77.0.16".into()),
        "u" => Ok("10.77.0.17".into()),
        _ => bail!("unknown lab host '{h}' (a..e, t, u)"),
    }
}

/// Rate-only fallback (tbf) for kernels without netem: same rate, no delay.
pub fn tbf_args(profile: &str) -> Option<&'static str> {
    match profile {
        "cloud" => Some("tbf rate 1750mbit burst 512kb latency 20ms"),
        "wan" => Some("tbf rate 45mbit burst 64kb latency 100ms"),
        _ => None,
    }
}

/// `tc qdisc` arguments for a profile on a host's eth0 egress (None = no shaping).
/// RTT is split evenly: each side delays its egress by half.
pub fn netem_args(profile: &str) -> Result<Option<&'static str>> {
    match profile {
        "lan" => Ok(None),
        "cloud" => Ok(Some("netem delay 1ms rate 1750mbit limit 10000")),
        "wan" => Ok(Some("netem delay 25ms rate 45mbit limit 10000")),
        _ => bail!("unknown profile '{profile}' (lan, cloud, wan)"),
    }
}

struct Progress {
    bar: ProgressBar,
    tty: bool,
    total: u64,
    done: u64,
    t0: Instant,
}

impl Progress {
    fn new(total: u64) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = if tty {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} runs, ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b
        } else {
            ProgressBar::hidden()
        };
        Progress {
            bar,
            tty,
            total,
            done: 0,
            t0: Instant::now(),
        }
    }
    fn eta(&self) -> String {
        if self.done == 0 {
            return "?".into();
        }
        let per = self.t0.elapsed().as_secs_f64() / self.done as f64;
        format!("{:.0}s", per * (self.total - self.done) as f64)
    }
    fn start(&self, case: &str) {
        if self.tty {
            self.bar.set_message(case.to_string());
        } else {
            eprintln!(
                "bench: [{}/{}] {case} (ETA {})",
                self.done + 1,
                self.total,
                self.eta()
            );
        }
    }
    fn println(&self, line: &str) {
        if self.tty {
            self.bar.println(line);
        } else {
            eprintln!("{line}");
        }
    }
    fn inc(&mut self) {
        self.done += 1;
        self.bar.inc(1);
    }
}

struct Bench {
    plan: Plan,
    lab: Lab,
    migrate: String,
    probe_cmd: Vec<String>,
    probe_tool: String,
    logs: PathBuf,
    runs_csv: csv::Writer<File>,
    results: Vec<RunRow>,
    progress: Progress,
    /// Where the workload currently runs, which one ("thesis" pair or "memory" hog) and
    /// its size (rows or MiB); None: it must be created.
    workload: Option<(String, &'static str, u64)>,
    shaped: bool,
    /// Profile -> the qdisc actually used (netem, or the tbf fallback).
    shaping: std::collections::BTreeMap<String, String>,
    /// Profile -> bytes/s that SSH alone carries from A to B (the memory series' link).
    link: std::collections::BTreeMap<String, f64>,
}

fn repo_root() -> Result<PathBuf> {
    if let Ok(r) = std::env::var("BENCH_REPO") {
        return Ok(PathBuf::from(r));
    }
    let exe = std::env::current_exe()?;
    if let Some(r) = exe
        .ancestors()
        .nth(3)
        .filter(|r| r.join("scripts/lab").exists())
    {
        return Ok(r.to_path_buf());
    }
    let cwd = std::env::current_dir()?;
    if cwd.join("scripts/lab").exists() {
        return Ok(cwd);
    }
    bail!("cannot find the repository (scripts/lab); set BENCH_REPO")
}

pub fn run(plan: Plan) -> Result<()> {
    lab::install_signal_handlers();
    let repo = repo_root()?;
    let migrate = repo.join("target/release/migrate");
    if !migrate.exists() {
        bail!(
            "{} missing: run scripts/bench (it builds it)",
            migrate.display()
        );
    }
    let probe_cmd = vec![migrate.display().to_string(), "probe".into()];
    let probe_tool = "migrate-probe";
    fs::create_dir_all(&plan.out).with_context(|| format!("creating {}", plan.out.display()))?;
    let logs = plan.out.join("logs");
    fs::create_dir_all(&logs)?;
    let runs_csv = csv::Writer::from_path(plan.out.join("runs.csv"))?;

    let per_rows = plan.runs as u64
        * (plan.methods.iter().filter(|m| *m != "floor").count() as u64
            * plan.profiles.len() as u64
            + u64::from(plan.methods.iter().any(|m| m == "floor")));
    let total = per_rows * plan.rows.len() as u64
        + plan.runs as u64
            * (plan.memory.len() * plan.memory_methods.len() + plan.data.len()) as u64
            * plan.profiles.len() as u64;
    if !plan.memory.is_empty() && plan.memory_methods.iter().any(|m| m == "lazy") {
        lazy_preflight();
    }
    let mut b = Bench {
        lab: Lab { repo: repo.clone() },
        migrate: migrate.display().to_string(),
        probe_cmd,
        probe_tool: probe_tool.into(),
        logs,
        runs_csv,
        results: Vec::new(),
        progress: Progress::new(total),
        workload: None,
        shaped: false,
        shaping: Default::default(),
        link: Default::default(),
        plan,
    };
    let t0 = Instant::now();
    let started = chrono::Utc::now();
    let res = b.matrix();
    // Cleanup runs whatever happened (also after Ctrl-C).
    CLEANUP.store(true, Ordering::SeqCst);
    b.unshape();
    for h in b.plan.hosts.clone() {
        let _ = b.clean_host(&h);
    }
    b.progress.bar.finish_and_clear();
    let wrote = b.write_outputs(started, t0.elapsed());
    match (res, wrote) {
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => {
            eprintln!(
                "bench: done in {:.0}s: {} runs, results in {}",
                t0.elapsed().as_secs_f64(),
                b.results.len(),
                b.plan.out.display()
            );
            Ok(())
        }
    }
}

fn cleanup_ok() -> bool {
    CLEANUP.load(Ordering::SeqCst)
}

impl Bench {
    fn a(&self) -> &str {
        &self.plan.hosts[0]
    }

    // ------------------------------------------------------------ host helpers

    fn sh(&self, host: &str, script: &str, timeout_s: u64) -> Result<String> {
        if cleanup_ok() {
            lab::INTERRUPTED.store(false, Ordering::SeqCst);
        }
        self.lab.sh(host, script, timeout_s)
    }

    fn shape(&mut self, profile: &str) -> Result<()> {
        let args = netem_args(profile)?;
        for h in self.plan.hosts.clone() {
            match args {
                None => {
                    self.sh(&h, "tc qdisc del dev eth0 root 2>/dev/null; true", 20)?;
                }
                Some(a) => {
                    self.shaped = true;
                    let used = match self.sh(&h, &format!("tc qdisc replace dev eth0 root {a}"), 20)
                    {
                        Ok(_) => a.to_string(),
                        // Kernels without sch_netem (CONFIG_NET_SCH_NETEM unset, like this
                        // lab's): shape the rate with tbf, the delay cannot be emulated.
                        Err(e) if format!("{e:#}").contains("qdisc kind is unknown") => {
                            let t = tbf_args(profile).unwrap_or_default();
                            self.sh(&h, &format!("tc qdisc replace dev eth0 root {t}"), 20)?;
                            format!("{t} (no sch_netem in this kernel: rate only, NO added delay)")
                        }
                        Err(e) => return Err(e),
                    };
                    self.shaping.insert(profile.to_string(), used);
                }
            }
        }
        Ok(())
    }

    fn unshape(&mut self) {
        for h in self.plan.hosts.clone() {
            if let Err(e) = self.sh(&h, "tc qdisc del dev eth0 root 2>/dev/null; true", 20) {
                eprintln!("bench: WARNING: could not remove shaping on {h}: {e:#}");
            }
        }
        self.shaped = false;
    }

    /// Remove the workload and anything a run left behind on HOST.
    fn clean_host(&self, h: &str) -> Result<()> {
        self.sh(
            h,
            "podman rm -f -t 1 --ignore web db hog >/dev/null 2>&1; \
             rm -rf /srv/app /srv/thesis /var/tmp/bench-floor; \
             for p in $(ss -ltnpH '( sport = :12345 or sport = :12346 )' | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do \
               kill \"$p\" 2>/dev/null; done; \
             podman ps -a --format '{{.Names}}' | grep -qxE 'web|db|hog' && exit 1; true",
            120,
        )
        .map(|_| ())
    }

    fn workload_up(&mut self, host: &str, rows: u64) -> Result<()> {
        self.workload = None;
        for h in self.plan.hosts.clone() {
            self.clean_host(&h)?;
        }
        self.lab
            .lab(&["workload", "up", host, "--rows", &rows.to_string()], 300)?;
        self.sh(
            host,
            &format!(
                "mkdir -p /srv/app/www/files && for i in $(seq 1 {FILLER_FILES}); do \
                 head -c 4194304 /dev/urandom >/srv/app/www/files/bench-filler-$i.bin || exit 1; done"
            ),
            120,
        )?;
        if self.web_answers(host, Duration::from_secs(20))?.is_none() {
            bail!("web on {host} does not answer after workload up");
        }
        self.workload = Some((host.to_string(), "thesis", rows));
        Ok(())
    }

    fn hog_up(&mut self, host: &str, mb: u64) -> Result<()> {
        self.workload = None;
        for h in self.plan.hosts.clone() {
            self.clean_host(&h)?;
        }
        self.lab
            .lab(&["hog", "up", host, "--mb", &mb.to_string()], 300)?;
        self.workload = Some((host.to_string(), "memory", mb));
        Ok(())
    }

    /// Bytes per second SSH alone carries from host A to host B in the current profile
    /// (random bytes into `cat >/dev/null`, the cipher migrate prefers, the start-up of
    /// an empty transfer subtracted; best of two): what "the link requires" means for the
    /// memory series.
    fn measure_link(&self, profile: &str) -> Result<f64> {
        let bytes: u64 = match profile {
            "wan" => 32 << 20,
            "cloud" => 256 << 20,
            _ => 512 << 20,
        };
        let to = format!("root@{}", host_addr(&self.plan.hosts[1])?);
        let out = self.sh(
            &self.plan.hosts[0],
            &format!(
                "f=/var/tmp/bench-link.bin; \
                 [ \"$(stat -c %s $f 2>/dev/null)\" = {bytes} ] || head -c {bytes} /dev/urandom >$f || exit 1; \
                 t() {{ s=$(date +%s%N); head -c $1 $f | ssh -o BatchMode=yes \
                   -o 'Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com' {to} 'cat >/dev/null' || exit 1; \
                   e=$(date +%s%N); echo $1 $(( (e - s) / 1000 )); }}; \
                 t 1; t {bytes}; t 1; t {bytes}"
            ),
            300,
        )?;
        let mut empty = f64::INFINITY;
        let mut full = f64::INFINITY;
        for line in out.lines() {
            let mut it = line.split_whitespace().map(str::parse::<u64>);
            if let (Some(Ok(n)), Some(Ok(us))) = (it.next(), it.next()) {
                let s = us as f64 / 1e6;
                if n == 1 {
                    empty = empty.min(s);
                } else {
                    full = full.min(s);
                }
            }
        }
        if !(empty.is_finite() && full.is_finite() && full > empty) {
            bail!("no usable timings: {out:?}");
        }
        Ok(bytes as f64 / (full - empty))
    }

    /// The thesis pair with [`DATA_ROWS`] rows and `mb` MiB more of random files in its
    /// data folder (the data series).
    fn data_up(&mut self, host: &str, mb: u64) -> Result<()> {
        self.workload_up(host, DATA_ROWS)?;
        self.workload = None;
        let (whole, rest) = (mb / BULK_FILE_MB, mb % BULK_FILE_MB);
        self.sh(
            host,
            &format!(
                "mkdir -p {BULK_DIR} && for i in $(seq 1 {whole}); do \
                 head -c {} /dev/urandom >{BULK_DIR}/bulk-$i.bin || exit 1; done; \
                 if [ {rest} -gt 0 ]; then head -c {} /dev/urandom >{BULK_DIR}/bulk-rest.bin; fi",
                BULK_FILE_MB << 20,
                rest << 20
            ),
            600,
        )?;
        let (_, bytes) = self.bulk(host)?;
        if bytes != mb << 20 {
            bail!("{BULK_DIR} on {host} holds {bytes} bytes, not {mb} MiB");
        }
        self.workload = Some((host.to_string(), "data", mb));
        Ok(())
    }

    /// (files, bytes) in HOST's [`BULK_DIR`].
    fn bulk(&self, host: &str) -> Result<(u64, u64)> {
        let out = self.sh(
            host,
            &format!(
                "find {BULK_DIR} -type f -printf '%s\\n' 2>/dev/null | awk '{{n++; s+=$1}} END {{printf \"%d %d\\n\", n, s}}'"
            ),
            60,
        )?;
        let mut it = out.split_whitespace().map(str::parse::<u64>);
        match (it.next(), it.next()) {
            (Some(Ok(n)), Some(Ok(b))) => Ok((n, b)),
            _ => bail!("cannot read the size of {BULK_DIR} on {host}: {out:?}"),
        }
    }

    /// Bytes in HOST's /srv/app (the data folder migrate syncs).
    fn data_bytes(&self, host: &str) -> Result<u64> {
        let out = self.sh(host, "du -sb /srv/app | cut -f1", 60)?;
        out.trim()
            .parse()
            .with_context(|| format!("du of /srv/app on {host}: {out:?}"))
    }

    /// Make sure the workload of `kind` and `size` runs on HOST (fresh if it does not;
    /// then settled, see [`settle`]).
    fn ensure_workload(&mut self, host: &str, kind: &'static str, size: u64) -> Result<()> {
        if self.workload.as_ref() == Some(&(host.to_string(), kind, size)) {
            return Ok(());
        }
        let mut last = None;
        for attempt in 1..=2 {
            let up = if kind == "memory" {
                self.hog_up(host, size)
            } else if kind == "data" {
                self.data_up(host, size)
            } else {
                self.workload_up(host, size)
            };
            match up {
                Ok(()) => {
                    settle();
                    return Ok(());
                }
                Err(e) => {
                    self.progress.println(&format!(
                        "bench: workload up on {host} failed (attempt {attempt}): {e:#}"
                    ));
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("workload up failed")))
    }

    /// The counter served by HOST's web, asked from the probe host (None if it never answers).
    fn web_answers(&self, host: &str, limit: Duration) -> Result<Option<u64>> {
        let url = format!("http://{}:8080/cgi-bin/counter", host_addr(host)?);
        let end = Instant::now() + limit;
        loop {
            if let Ok(out) = self.sh(
                &self.plan.probe_host,
                &format!("curl -sS -f --max-time 2 {url}"),
                10,
            ) && let Ok(v) = out.trim().parse::<u64>()
            {
                return Ok(Some(v));
            }
            if Instant::now() > end {
                return Ok(None);
            }
            lab::sleep(Duration::from_millis(200))?;
        }
    }

    fn counter(&self, h: &str) -> Result<u64> {
        let s = self.sh(h, "podman exec web cat /tmp/counter", 20)?;
        s.trim()
            .parse()
            .with_context(|| format!("counter on {h}: '{s}'"))
    }

    fn db_rows(&self, h: &str) -> Result<u64> {
        let s = self.sh(
            h,
            "podman exec db mariadb -uroot -N -B -e 'SELECT COUNT(*) FROM app.users'",
            60,
        )?;
        s.trim()
            .parse()
            .with_context(|| format!("rows on {h}: '{s}'"))
    }

    fn leftovers(&self, h: &str) -> Result<Vec<String>> {
        let s = self.sh(h, "podman ps -a --format '{{.Names}}'", 30)?;
        Ok(s.lines()
            .filter(|l| ["web", "db", "hog"].contains(l))
            .map(String::from)
            .collect())
    }

    /// The hog's (checksum of its memory, ticks lived), asked from the probe host; None
    /// while it does not answer within `limit`.
    fn hog_state(&self, host: &str, limit: Duration) -> Result<Option<(u64, u64)>> {
        let url = format!("http://{}:{HOG_PORT}/state", host_addr(host)?);
        let end = Instant::now() + limit;
        loop {
            if let Ok(out) = self.sh(
                &self.plan.probe_host,
                &format!("curl -sS -f --max-time 30 {url}"),
                60,
            ) {
                let kv = |k: &str| {
                    out.split_whitespace()
                        .find_map(|w| w.strip_prefix(k))
                        .and_then(|v| v.parse::<u64>().ok())
                };
                if let (Some(sum), Some(ticks)) = (kv("sum="), kv("ticks=")) {
                    return Ok(Some((sum, ticks)));
                }
            }
            if Instant::now() > end {
                return Ok(None);
            }
            lab::sleep(Duration::from_millis(200))?;
        }
    }

    // ------------------------------------------------------------ probe

    /// Whether the client probe runs during METHOD's runs.
    fn probes(&self, method: &str) -> bool {
        self.plan.probe_all || !matches!(method, "thesis" | "floor")
    }

    /// Seconds one run's `migrate send` (and its probe) may take: [`send_budget_s`] for
    /// the memory series, 900 for the rest.
    fn budget_s(&self, row: &RunRow) -> u64 {
        match row.method.as_str() {
            "memory" | "lazy" => send_budget_s(row.rows, self.link.get(&row.profile).copied()),
            _ => 900,
        }
    }

    fn start_probe(&self, prefix: &Path, memory: bool, budget_s: u64) -> Result<Bg> {
        let ph = &self.plan.probe_host;
        self.sh(ph, &format!("rm -f {STOP_FILE}"), 10)?;
        let mut args: Vec<String> = self.probe_cmd.clone();
        for h in &self.plan.hosts {
            args.push(if memory {
                format!("http://{}:{HOG_PORT}/health", host_addr(h)?)
            } else {
                format!("http://{}:8080/cgi-bin/counter", host_addr(h)?)
            });
        }
        for a in [
            "--interval",
            &self.plan.probe_interval,
            "--duration",
            &format!("{budget_s}s"),
            "--until-file",
            STOP_FILE,
        ] {
            args.push(a.into());
        }
        args.extend(["--format".into(), "json".into()]);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut bg = self.lab.spawn(
            ph,
            &argv,
            budget_s + 60,
            &prefix.with_extension("probe.json"),
            &prefix.with_extension("probe.err"),
        )?;
        // Let it establish a baseline (a few successful rounds).
        lab::sleep(Duration::from_millis(400))?;
        if !bg.running() {
            bail!(
                "probe exited at once: {}",
                fs::read_to_string(&bg.stderr).unwrap_or_default().trim()
            );
        }
        Ok(bg)
    }

    /// Stops the probe and puts what it saw into the run's row.
    fn finish_probe(&self, probe: Bg, row: &mut RunRow) {
        match self.stop_probe(probe) {
            Ok(p) => {
                row.client_outage_s = p.longest_outage_s;
                row.probe_outages = Some(p.outages.len() as u64);
                row.probe_sent = p.sent;
                row.probe_received = p.received;
                row.probe_lost = p.lost;
                row.probe_rtt_min_ms = p.rtt_min_ms;
                row.probe_rtt_mdev_ms = p.rtt_mdev_ms;
                row.probe_loss_pct = p.loss_pct;
                row.probe_rtt_avg_ms = p.rtt_avg_ms;
                row.probe_rtt_max_ms = p.rtt_max_ms;
            }
            Err(e) => self.progress.println(&format!("bench:   probe: {e:#}")),
        }
    }

    fn stop_probe(&self, mut bg: Bg) -> Result<ProbeSummary> {
        self.sh(&self.plan.probe_host, &format!("touch {STOP_FILE}"), 10)?;
        let code = bg.wait(Duration::from_secs(30))?;
        let out = fs::read_to_string(&bg.stdout).unwrap_or_default();
        if code != 0 {
            bail!(
                "probe exited with {code}: {}",
                fs::read_to_string(&bg.stderr).unwrap_or_default().trim()
            );
        }
        parse::parse_probe(&out)
    }

    // ------------------------------------------------------------ matrix

    fn matrix(&mut self) -> Result<()> {
        let rows_list = self.plan.rows.clone();
        if self.plan.methods.iter().any(|m| m == "floor") {
            self.shape("lan")?;
            for &rows in &rows_list {
                for run in 1..=self.plan.runs {
                    self.one("floor", "local", rows, run)?;
                }
            }
        }
        for profile in self.plan.profiles.clone() {
            self.shape(&profile)?;
            for &rows in &rows_list {
                for method in self.plan.methods.clone() {
                    if method == "floor" {
                        continue;
                    }
                    // A fresh workload on A for each (method, rows): run 1 goes A->B.
                    self.workload = None;
                    for run in 1..=self.plan.runs {
                        self.one(&method, &profile, rows, run)?;
                    }
                }
            }
            if !self.plan.memory.is_empty() {
                match self.measure_link(&profile) {
                    Ok(rate) => {
                        self.progress.println(&format!(
                            "bench: {profile}: SSH carries {:.0} MiB/s from {} to {}",
                            rate / 1048576.0,
                            self.plan.hosts[0],
                            self.plan.hosts[1]
                        ));
                        self.link.insert(profile.clone(), rate);
                    }
                    Err(e) => self.progress.println(&format!(
                        "bench: WARNING: could not measure the link of {profile}: {e:#}"
                    )),
                }
            }
            for mb in self.plan.memory.clone() {
                for method in self.plan.memory_methods.clone() {
                    self.workload = None;
                    for run in 1..=self.plan.runs {
                        self.one(&method, &profile, mb, run)?;
                    }
                }
            }
            for mb in self.plan.data.clone() {
                self.workload = None;
                for run in 1..=self.plan.runs {
                    self.one("data", &profile, mb, run)?;
                }
            }
        }
        Ok(())
    }

    /// One run, recorded whatever happens; a failure leads to clean hosts and a fresh
    /// workload for the next run. Only an interrupt or a lab that cannot recover aborts.
    fn one(&mut self, method: &str, profile: &str, rows: u64, run: u32) -> Result<()> {
        let (src, dst) = if method == "floor" {
            (self.a().to_string(), self.a().to_string())
        } else if run % 2 == 1 {
            (self.plan.hosts[0].clone(), self.plan.hosts[1].clone())
        } else {
            (self.plan.hosts[1].clone(), self.plan.hosts[0].clone())
        };
        let direction = format!("{src}->{dst}");
        let kind = match method {
            "memory" | "lazy" => "memory",
            "data" => "data",
            _ => "thesis",
        };
        let size = if kind == "thesis" { "rows" } else { "MiB" };
        let case = format!(
            "{method} {profile} {size}={rows} run {run}/{} {direction}",
            self.plan.runs
        );
        self.progress.start(&case);
        let prefix = self
            .logs
            .join(format!("{method}-{profile}-{rows}-r{run:02}"));
        let mut row = RunRow {
            method: method.into(),
            profile: profile.into(),
            rows,
            run,
            direction,
            source: src.clone(),
            target: dst.clone(),
            probe_tool: self.probe_tool.clone(),
            log_prefix: prefix
                .strip_prefix(&self.plan.out)
                .unwrap_or(&prefix)
                .display()
                .to_string(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let res = self
            .ensure_workload(&src, kind, rows)
            .and_then(|()| self.measure(method, &src, &dst, rows, &prefix, &mut row));
        row.wall_s = t0.elapsed().as_secs_f64();
        if let Err(e) = &res {
            row.outcome = if lab::interrupted() {
                "interrupted".into()
            } else {
                "error".into()
            };
            if row.error.is_empty() {
                row.error = format!("{e:#}");
            }
        }
        row.probe_exceeds_reported = stats::probe_exceeds(row.client_outage_s, row.downtime_s);
        row.probe_minus_reported_s = match (row.client_outage_s, row.downtime_s) {
            (Some(c), Some(d)) => Some(c - d),
            _ => None,
        };
        self.progress.println(&format!(
            "bench: {case}: {} downtime {} migration {} client outage {}{}",
            row.outcome,
            fmt(row.downtime_s),
            fmt(row.migration_time_s),
            fmt(row.client_outage_s),
            if row.probe_exceeds_reported {
                "  ** client outage > reported downtime **"
            } else {
                ""
            }
        ));
        if !row.error.is_empty() {
            self.progress.println(&format!("bench:   {}", row.error));
        }
        let ok = row.valid();
        self.runs_csv.serialize(&row)?;
        self.runs_csv.flush()?;
        self.results.push(row);
        self.progress.inc();
        lab::check_interrupt()?;
        if ok && !self.plan.fresh {
            self.workload = Some((dst, kind, rows));
        } else if ok {
            // --fresh: the next run starts a new workload on its own source.
            self.workload = None;
        } else {
            // Recover: next run starts from clean hosts and a fresh workload.
            self.workload = None;
            for h in self.plan.hosts.clone() {
                self.clean_host(&h)
                    .with_context(|| format!("cleaning {h} after a failed run"))?;
            }
        }
        Ok(())
    }

    fn measure(
        &mut self,
        method: &str,
        src: &str,
        dst: &str,
        rows: u64,
        prefix: &Path,
        row: &mut RunRow,
    ) -> Result<()> {
        // A cold target, as the thesis receiver's prepare() leaves it (no data, no dumps).
        if method != "floor" {
            self.clean_host(dst)?;
        }
        if method == "memory" || method == "lazy" {
            return self.measure_memory(src, dst, prefix, row);
        }
        // The data series: the pair with DATA_ROWS rows, its extra files must all arrive.
        let (rows, bulk) = if method == "data" {
            row.data_bytes = Some(self.data_bytes(src)? as f64);
            (DATA_ROWS, Some(self.bulk(src)?))
        } else {
            (rows, None)
        };
        let before = self.counter(src)?;
        row.counter_before = Some(before);
        // The plain podman methods (thesis, floor) fail on a probe connection half-open at
        // the dump (no skip-in-flight for them): they run without a client unless --probe-all.
        let probe = if self.probes(method) {
            Some(self.start_probe(prefix, false, 900)?)
        } else {
            row.probe_tool = "none".into();
            None
        };
        let sent = match method {
            "migrate" | "migrate-copy" | "data" => {
                self.run_migrate(src, dst, prefix, row, &["db", "web"])
            }
            "thesis" => self.run_thesis(src, dst, prefix, row),
            "floor" => self.run_floor(src, prefix, row),
            _ => unreachable!(),
        };
        // The service must answer on the target before the probe stops.
        let served =
            self.web_answers(dst, Duration::from_secs(if sent.is_ok() { 20 } else { 3 }))?;
        if let Some(probe) = probe {
            lab::sleep(Duration::from_millis(200))?;
            self.finish_probe(probe, row);
        }
        if let Err(e) = sent {
            row.failed(&e);
            return Ok(());
        }
        // Verify that the state arrived.
        row.rows_after = self.db_rows(dst).ok();
        row.counter_after = self.counter(dst).ok();
        let left = if method == "floor" {
            Vec::new()
        } else {
            self.leftovers(src).unwrap_or_default()
        };
        let mut problems = Vec::new();
        if row.rows_after != Some(rows) {
            problems.push(format!(
                "rows on {dst}: {:?}, expected {rows}",
                row.rows_after
            ));
        }
        if row.counter_after.is_none_or(|c| c < before) {
            problems.push(format!(
                "counter on {dst}: {:?} < {before} before",
                row.counter_after
            ));
        }
        if let Some((files, bytes)) = bulk {
            let got = self.bulk(dst).ok();
            if got != Some((files, bytes)) {
                problems.push(format!(
                    "{BULK_DIR} on {dst}: {got:?} (files, bytes), expected ({files}, {bytes})"
                ));
            }
        }
        row.outcome = if !problems.is_empty() {
            "state_lost".into()
        } else if served.is_none() {
            problems.push(format!("web on {dst} does not answer"));
            "not_serving".into()
        } else if !left.is_empty() {
            problems.push(format!("left on {src}: {}", left.join(" ")));
            "source_leftover".into()
        } else {
            "ok".into()
        };
        row.error = problems.join("; ");
        Ok(())
    }

    /// One move of the hog: its memory checksum must be the same on the target and its
    /// tick count must have gone on.
    fn measure_memory(
        &mut self,
        src: &str,
        dst: &str,
        prefix: &Path,
        row: &mut RunRow,
    ) -> Result<()> {
        let (sum, ticks) = self
            .hog_state(src, Duration::from_secs(30))?
            .ok_or_else(|| anyhow!("hog on {src} does not answer"))?;
        row.counter_before = Some(ticks);
        // With lazy, `send` returns only when the post-copy window is over (every page on
        // the target, the source released): the checks below see the whole memory, and
        // the probe runs through the window (an outage the client sees while the pages
        // come counts against the reported downtime like any other).
        let probe = self.start_probe(prefix, true, self.budget_s(row))?;
        let sent = self.run_migrate(src, dst, prefix, row, &["hog"]);
        let after = self.hog_state(dst, Duration::from_secs(if sent.is_ok() { 30 } else { 3 }))?;
        lab::sleep(Duration::from_millis(200))?;
        self.finish_probe(probe, row);
        if let Err(e) = sent {
            row.failed(&e);
            return Ok(());
        }
        row.counter_after = after.map(|a| a.1);
        let left = self.leftovers(src).unwrap_or_default();
        let mut problems = Vec::new();
        row.outcome = match after {
            None => {
                problems.push(format!("hog on {dst} does not answer"));
                "not_serving"
            }
            Some((s, t)) if s != sum || t < ticks => {
                problems.push(format!(
                    "hog on {dst}: sum {s} ticks {t}, before: sum {sum} ticks {ticks}"
                ));
                "state_lost"
            }
            Some(_) if !left.is_empty() => {
                problems.push(format!("left on {src}: {}", left.join(" ")));
                "source_leftover"
            }
            Some(_) if row.memory != memory_asked(&row.method) => {
                problems.push(format!(
                    "migrate's record says memory '{}', the run asked --memory {}",
                    row.memory,
                    memory_asked(&row.method)
                ));
                "wrong_memory"
            }
            Some(_) => "ok",
        }
        .into();
        row.error = problems.join("; ");
        Ok(())
    }

    fn run_migrate(
        &self,
        src: &str,
        dst: &str,
        prefix: &Path,
        row: &mut RunRow,
        containers: &[&str],
    ) -> Result<()> {
        let mut recv = self.lab.spawn(
            dst,
            &[&self.migrate, "receive"],
            self.budget_s(row),
            &prefix.with_extension("receive.out"),
            &prefix.with_extension("receive.err"),
        )?;
        recv.wait_for_text("listening", Duration::from_secs(30))
            .context("migrate receive did not start")?;
        let to = format!("root@{}", host_addr(dst)?);
        let label = format!("{}-{}-{}-r{}", row.method, row.profile, row.rows, row.run);
        let mut argv = vec![
            self.migrate.as_str(),
            "send",
            "--to",
            &to,
            "--label",
            &label,
        ];
        // How the memory moves: the memory series names it; `migrate` is the default.
        match row.method.as_str() {
            "memory" | "migrate-copy" => argv.extend(["--memory", "copy"]),
            "lazy" => argv.extend(["--memory", "lazy"]),
            _ => {}
        }
        // The thesis pair's data folder; the hog has none.
        if containers.contains(&"db") {
            argv.extend(["--data", "/srv/app"]);
        }
        argv.extend(containers);
        let out = self.lab.run(src, &argv, self.budget_s(row))?;
        fs::write(prefix.with_extension("send.out"), &out.stdout)?;
        fs::write(prefix.with_extension("send.err"), &out.stderr)?;
        let code = out.status.code().unwrap_or(-1);
        row.exit_code = Some(code);
        let rc = recv.wait(Duration::from_secs(if code == 0 { 120 } else { 30 }));
        let text = String::from_utf8_lossy(&out.stdout);
        if let Ok(rec) = parse::parse_record(&text) {
            parse::apply_record(&rec, row)?;
        }
        if code != 0 {
            row.outcome = match code {
                1 => "rolled_back",
                2 => "refused",
                _ => "failed",
            }
            .into();
            bail!("migrate send exited {code}: {}", last_line(&out.stderr));
        }
        match rc {
            Ok(0) => Ok(()),
            Ok(c) => bail!("migrate receive exited {c}"),
            Err(e) => Err(e.context("waiting for migrate receive")),
        }
    }

    fn run_thesis(&self, src: &str, dst: &str, prefix: &Path, row: &mut RunRow) -> Result<()> {
        let recv_script = self
            .lab
            .repo
            .join("scripts/thesis/receive")
            .display()
            .to_string();
        let send_script = self
            .lab
            .repo
            .join("scripts/thesis/send")
            .display()
            .to_string();
        let mut recv = self.lab.spawn(
            dst,
            &[&recv_script, "--wait", "900"],
            960,
            &prefix.with_extension("receive.out"),
            &prefix.with_extension("receive.err"),
        )?;
        recv.wait_for_text("READY=", Duration::from_secs(30))
            .context("thesis receive did not start")?;
        let to = format!("root@{}", host_addr(dst)?);
        let out = self.lab.run(src, &[&send_script, "--to", &to], 900)?;
        fs::write(prefix.with_extension("send.out"), &out.stdout)?;
        fs::write(prefix.with_extension("send.err"), &out.stderr)?;
        let code = out.status.code().unwrap_or(-1);
        row.exit_code = Some(code);
        let rc = recv.wait(Duration::from_secs(if code == 0 { 120 } else { 10 }));
        let recv_out = fs::read_to_string(&recv.stdout).unwrap_or_default();
        let send_out = String::from_utf8_lossy(&out.stdout);
        if code != 0 {
            bail!("thesis send exited {code}: {}", last_line(&out.stderr));
        }
        match rc {
            Ok(0) => {}
            Ok(c) => bail!(
                "thesis receive exited {c}: {}",
                last_line(
                    fs::read_to_string(&recv.stderr)
                        .unwrap_or_default()
                        .as_bytes()
                )
            ),
            Err(e) => return Err(e.context("waiting for thesis receive")),
        }
        let t = parse::thesis_times(&send_out, &recv_out)?;
        row.start_ts = t.start_ts;
        row.down_ts = t.down_ts;
        row.up_ts = t.up_ts;
        row.downtime_s = Some(t.downtime_s);
        row.migration_time_s = Some(t.migration_time_s);
        row.source_total_s = Some(t.source_total_s);
        row.target_total_s = Some(t.target_total_s);
        row.presync_s = t.presync_s;
        row.checkpoint_s = t.checkpoint_s;
        row.transfer_s = t.transfer_s;
        row.restore_s = t.restore_s;
        Ok(())
    }

    /// Checkpoint and restore on the same host, no transfer, no compression.
    fn run_floor(&self, host: &str, prefix: &Path, row: &mut RunRow) -> Result<()> {
        let script = r#"set -euo pipefail
ts() { date -u +%Y-%m-%dT%H:%M:%S.%6NZ; }
us() { echo "${EPOCHREALTIME/./}"; }
s() { local d=$(( $2 - $1 )); printf '%d.%06d' $((d / 1000000)) $((d % 1000000)); }
f=/var/tmp/bench-floor; rm -rf "$f"; mkdir -p "$f"
echo "DOWN_TIMESTAMP=$(ts)"; t0=$(us)
podman container checkpoint --export "$f/db.tar" --compress none --tcp-established --file-locks db >/dev/null
podman container checkpoint --export "$f/web.tar" --compress none --tcp-established web >/dev/null
t1=$(us)
podman rm -f -t 0 db web >/dev/null
t2=$(us)
podman container restore --import "$f/db.tar" --tcp-established --file-locks >/dev/null
podman container restore --import "$f/web.tar" --tcp-established >/dev/null
t3=$(us); echo "UP_TIMESTAMP=$(ts)"
echo "CHECKPOINT_S=$(s $t0 $t1)"; echo "REMOVE_S=$(s $t1 $t2)"; echo "RESTORE_S=$(s $t2 $t3)"
echo "DOWNTIME_S=$(s $t0 $t3)"; rm -rf "$f"; echo RESULT=ok
"#;
        let out = self.lab.run(host, &["bash", "-c", script], 600)?;
        fs::write(prefix.with_extension("floor.out"), &out.stdout)?;
        fs::write(prefix.with_extension("floor.err"), &out.stderr)?;
        row.exit_code = out.status.code();
        let kv = parse::parse_kv(&String::from_utf8_lossy(&out.stdout));
        let n = |k: &str| kv.get(k).and_then(|v| v.parse::<f64>().ok());
        row.down_ts = kv.get("DOWN_TIMESTAMP").cloned().unwrap_or_default();
        row.start_ts = row.down_ts.clone();
        row.up_ts = kv.get("UP_TIMESTAMP").cloned().unwrap_or_default();
        row.checkpoint_s = n("CHECKPOINT_S");
        row.restore_s = n("RESTORE_S");
        row.downtime_s = n("DOWNTIME_S");
        if !out.status.success() || kv.get("RESULT").map(String::as_str) != Some("ok") {
            bail!("floor failed ({}): {}", out.status, last_line(&out.stderr));
        }
        Ok(())
    }

    // ------------------------------------------------------------ outputs

    fn write_outputs(&self, started: chrono::DateTime<chrono::Utc>, took: Duration) -> Result<()> {
        let summary = report::summarize(&self.results);
        report::write_summary_csv(&self.plan.out.join("summary.csv"), &summary)?;
        let header = self.header(started, took);
        fs::write(
            self.plan.out.join("summary.md"),
            report::summary_markdown(&summary, &self.results, &header, &self.link),
        )?;
        crate::plot::write_plots(
            &self.plan.out,
            &self.plan.profiles,
            &self.results,
            &self.link,
        )
    }

    fn header(&self, started: chrono::DateTime<chrono::Utc>, took: Duration) -> String {
        let p = &self.plan;
        let mut s = format!(
            "# migrate vs the thesis method: benchmark results\n\n\
             - started: {} (UTC), took {:.0} s\n- mode: {}\n- hosts: {} <-> {} (runs alternate: odd {}->{}, even back), probe on {} every {} ({})\n\
             - profiles: {}\n- rows: {}\n- memory series (MiB held by the hog): {}, methods {}\n- data series (extra MiB in the data folder, 10000 rows): {}\n- runs per case: {}{}\n- methods: {}\n\n\
             Profiles (tc netem on each host's eth0 egress): lan = none; cloud = `{}`; wan = `{}`.\n\n\
             Definitions: migrate's downtime and migration time are those of its own record; thesis: \
             downtime = UP_TIMESTAMP - DOWN_TIMESTAMP, migration time = sending script total + receiving \
             script total (its work, without waiting for \"OK\"); floor: checkpoint + restore on the same host, \
             no transfer, `--compress none` (wall time from start of checkpoint to restored; no migration time). \
             Client outage = the probe's longest outage (any of the two hosts' web answering counts as up). \
             Only runs whose state arrived (rows, counter, web answering on the target, nothing left on the \
             source) enter the statistics. Memory series (method memory): one container, `hog` \
             (testdata/workloads/memory), a Perl process holding N MiB of random bytes read from \
             /dev/urandom (touched, incompressible), moved by `migrate send` with no data folder; the \
             run is valid when the checksum of its memory on the target equals the one before and its \
             tick count went on; the probe asks its /health. Method memory passes `--memory copy` \
             (the memory in the archive, moved while the hog is frozen), method lazy `--memory \
             lazy` (post-copy: the hog runs on the target from UP, its pages follow, and `send` \
             returns when the last page is there); a run counts only when migrate's record names \
             the mode asked.\n\n",
            started.format("%Y-%m-%d %H:%M:%S"),
            took.as_secs_f64(),
            if p.quick { "quick" } else { "full" },
            p.hosts[0],
            p.hosts[1],
            p.hosts[0],
            p.hosts[1],
            p.probe_host,
            p.probe_interval,
            self.probe_tool,
            p.profiles.join(", "),
            p.rows
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            sizes(&p.memory),
            p.memory_methods.join(", "),
            sizes(&p.data),
            p.runs,
            if p.fresh {
                ", each from a fresh workload on its source (--fresh)"
            } else {
                ", each moving the container the run before left (run 1 a fresh one)"
            },
            p.methods.join(", "),
            netem_args("cloud").ok().flatten().unwrap_or(""),
            netem_args("wan").ok().flatten().unwrap_or(""),
        );
        s.push_str(&format!(
            "Flags: migrate send runs with its defaults (`--data /srv/app` and the containers, \
             nothing else besides `--memory` in the memory series and for migrate-copy: `--tcp close`, so CRIU gets tcp-close and skip-in-flight from migrate \
             itself for that command); the bench sets no CRIU configuration of its own. The thesis \
             and floor methods are plain podman commands, as the thesis ran them: checkpoint and \
             restore with `--tcp-established`, CRIU without skip-in-flight (podman 4.3 has no flag \
             for it). {} Each run starts with a cold target (no /srv/app there), as the thesis's \
             prepare() leaves it.\n\n",
            if p.probe_all {
                "The client probe runs during every method (--probe-all): a thesis or floor \
                 checkpoint fails whenever a probe connection is half-open at the dump, and such \
                 runs are listed below as excluded."
            } else {
                "Those two run without the client probe (no client outage for them): a plain \
                 podman checkpoint fails whenever a probe connection is half-open at the dump \
                 (`--probe-all` runs the probe for them too)."
            }
        ));
        for (p, q) in &self.shaping {
            s.push_str(&format!("Shaping used for {p}: `{q}`.\n\n"));
        }
        s.push_str("## Machine\n\n");
        for (k, v) in machine_info() {
            s.push_str(&format!("- {k}: {v}\n"));
        }
        s
    }
}

/// The `--memory` a memory-series method passes to `migrate send`.
fn memory_asked(method: &str) -> &'static str {
    if method == "lazy" { "lazy" } else { "copy" }
}

/// Seconds one memory run's `migrate send` may take: 900, or more when moving MIB over
/// the link at `rate` (bytes/s, if measured) takes a fair share of that (wan carries
/// 1 GiB in about 3 minutes; copy moves it while down, lazy after UP).
fn send_budget_s(mib: u64, rate: Option<f64>) -> u64 {
    let need = rate
        .filter(|r| *r > 0.0)
        .map_or(0.0, |r| (mib << 20) as f64 / r);
    900.max((4.0 * need).ceil() as u64 + 300)
}

/// Lazy memory needs page-server pipes of 4 MiB: CAP_SYS_RESOURCE, which the lab's hosts
/// lack, or the machine-wide `fs.pipe-max-size` at least that (scripts/lab up raises it).
/// Warns when it is lower: `migrate send --memory lazy` then refuses every run (exit 2).
fn lazy_preflight() {
    const NEED: u64 = 4 << 20;
    match fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        Some(v) if v >= NEED => {}
        v => eprintln!(
            "bench: WARNING: fs.pipe-max-size is {}, lazy memory needs {NEED} \
             (`sysctl -w fs.pipe-max-size={NEED}`); the lazy runs will be refused",
            v.map_or_else(|| "unreadable".to_string(), |v| v.to_string())
        ),
    }
}

/// `64, 256, 1024`, or `none`.
fn sizes(v: &[u64]) -> String {
    if v.is_empty() {
        return "none".into();
    }
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

fn fmt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}s")).unwrap_or_else(|| "-".into())
}

fn last_line(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

fn cmd_line(prog: &str, args: &[&str]) -> String {
    std::process::Command::new(prog)
        .args(args)
        .output()
        .map(|o| {
            let t = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&t)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|_| "?".into())
}

/// The commit the binaries were built from, `+dirty` when tracked files had changes.
fn git_rev() -> String {
    let Ok(repo) = repo_root() else {
        return "?".into();
    };
    let r = repo.display().to_string();
    let rev = cmd_line("git", &["-C", &r, "rev-parse", "--short", "HEAD"]);
    let dirty = std::process::Command::new("git")
        .args(["-C", &r, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    format!(
        "{rev}{}",
        if dirty {
            " +dirty (uncommitted changes in the working tree)"
        } else {
            ""
        }
    )
}

fn machine_info() -> Vec<(&'static str, String)> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_default();
    let mem = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    vec![
        ("CPU", cpu),
        ("cores", cores),
        ("RAM", mem),
        ("kernel", cmd_line("uname", &["-sr"])),
        ("podman", cmd_line("podman", &["--version"])),
        ("runc", cmd_line("runc", &["--version"])),
        ("criu", cmd_line("criu", &["--version"])),
        ("rsync", cmd_line("rsync", &["--version"])),
        ("ssh", cmd_line("ssh", &["-V"])),
        ("date", chrono::Utc::now().format("%Y-%m-%d").to_string()),
        ("migrate built from", git_rev()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_profiles() {
        assert_eq!(host_addr("a").unwrap(), "10.77.0.11");
        assert_eq!(host_addr("e").unwrap(), "10.77.0.15");
        assert!(host_addr("f").is_err());
        assert_eq!(netem_args("lan").unwrap(), None);
        assert!(
            netem_args("wan")
                .unwrap()
                .unwrap()
                .contains("delay 25ms rate 45mbit")
        );
        assert!(
            netem_args("cloud")
                .unwrap()
                .unwrap()
                .contains("delay 1ms rate 1750mbit")
        );
        assert!(netem_args("mars").is_err());
        assert!(tbf_args("wan").unwrap().contains("rate 45mbit"));
    }

    #[test]
    fn a_memory_run_gets_time_for_its_bytes_on_the_link() {
        assert_eq!(send_budget_s(1024, None), 900);
        // lan: 1 GiB at 300 MiB/s, 3.4 s: the 900 s floor.
        assert_eq!(send_budget_s(1024, Some(300.0 * 1048576.0)), 900);
        // wan: 2 GiB at 5.625 MB/s, 381.8 s: 4 × that + 300 s.
        assert_eq!(send_budget_s(2048, Some(5.625e6)), 1828);
        assert_eq!(
            (memory_asked("memory"), memory_asked("lazy")),
            ("copy", "lazy")
        );
    }
}
