//! `bench`: reproduces the thesis evaluation on the lab (scripts/lab) and compares
//! `migrate` with the thesis method (scripts/thesis/) and the same-host floor.
//! Writes runs.csv, summary.csv, summary.md and SVG plots into --out.

mod lab;
mod parse;
mod plot;
mod report;
mod runner;
mod stats;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "Benchmark migrate against the thesis method on the lab hosts"
)]
struct Cli {
    #[command(flatten)]
    opts: Opts,
    /// Runs nothing: re-draws the plots of the result set in DIR from its runs.csv (and
    /// the SSH rates its summary.md states).
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    replot: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Quick mode: 1000 rows, 3 runs, profile lan, all methods (a few minutes).
    #[arg(long)]
    pub quick: bool,
    /// Output folder (created).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The two lab hosts A,B (run 1 goes A->B, run 2 B->A, ...): a..e run Debian 12
    /// (podman 4.3), t and u Debian 13 (podman 5.4).
    #[arg(long, default_value = "a,b")]
    pub hosts: String,
    /// Network profiles: lan, cloud, wan [default: all; lan with --quick].
    #[arg(long)]
    pub profiles: Option<String>,
    /// Rows in app.users, comma separated [default: 100,500,1000,5000,10000; 1000 with --quick].
    #[arg(long)]
    pub rows: Option<String>,
    /// Runs per case [default: 10; 3 with --quick].
    #[arg(long)]
    pub runs: Option<u32>,
    /// MiB of touched memory for the memory series (the `hog` moved by migrate), comma
    /// separated, or `none` [default: 64,256,1024; none with --quick].
    #[arg(long)]
    pub memory: Option<String>,
    /// MiB of extra files in the thesis pair's data folder for the data series (migrate
    /// moving the pair with 10000 rows and that much more data), comma separated, or
    /// `none` [default: 0,256,1024; none with --quick].
    #[arg(long)]
    pub data_mb: Option<String>,
    /// How migrate moves the hog's memory in the memory series: `copy` (method `memory`,
    /// `send --memory copy`), `lazy` (method `lazy`, `send --memory lazy`), or both.
    #[arg(long, default_value = "copy,lazy")]
    pub memory_modes: String,
    /// A fresh workload for every run, so that each run moves a container started on its
    /// source (not one restored there by the run before: migrate restores a container
    /// without its untouched zero pages, and the next move of it has less to move).
    #[arg(long)]
    pub fresh: bool,
    /// Methods: migrate (at its defaults, `--memory auto`), migrate-copy (`--memory copy`),
    /// thesis, floor.
    #[arg(long, default_value = "migrate,thesis,floor")]
    pub methods: String,
    /// Lab host that runs the client probe.
    #[arg(long, default_value = "c")]
    pub probe_host: String,
    /// Probe interval.
    #[arg(long, default_value = "20ms")]
    pub probe_interval: String,
    /// Also run the client probe during the thesis and floor methods. They are plain podman
    /// checkpoints (`--tcp-established`, no CRIU `skip-in-flight`: podman 4.3 has no flag for
    /// it), and such a checkpoint fails whenever a probe connection is half-open at the dump;
    /// without this flag those methods run without a client and have no client outage.
    #[arg(long)]
    pub probe_all: bool,
}

/// The resolved plan.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    /// Every run starts from a fresh workload on its source.
    pub fresh: bool,
    pub out: PathBuf,
    pub hosts: [String; 2],
    pub profiles: Vec<String>,
    pub rows: Vec<u64>,
    pub runs: u32,
    pub methods: Vec<String>,
    /// Sizes of the memory series, MiB (empty: none).
    pub memory: Vec<u64>,
    /// The memory series' methods: `memory` (copy) and/or `lazy`.
    pub memory_methods: Vec<String>,
    /// Extra MiB in the data folder for the data series (empty: none).
    pub data: Vec<u64>,
    pub probe_host: String,
    pub probe_interval: String,
    /// The probe also runs during the plain podman methods (thesis, floor).
    pub probe_all: bool,
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

impl Opts {
    fn plan(&self) -> Result<Plan> {
        let out = self.out.clone().context("--out DIR is required")?;
        let hosts = list(&self.hosts);
        if hosts.len() != 2 || hosts[0] == hosts[1] {
            bail!("--hosts takes two different lab hosts, e.g. d,e");
        }
        for h in &hosts {
            runner::host_addr(h)?;
        }
        runner::host_addr(&self.probe_host)?;
        if hosts.contains(&self.probe_host) {
            bail!("the probe host must not be one of --hosts");
        }
        let profiles = match &self.profiles {
            Some(p) => list(p),
            None if self.quick => vec!["lan".into()],
            None => vec!["lan".into(), "cloud".into(), "wan".into()],
        };
        for p in &profiles {
            runner::netem_args(p)?;
        }
        let rows = match &self.rows {
            Some(r) if r == "none" => Vec::new(),
            Some(r) => list(r)
                .iter()
                .map(|x| {
                    x.parse::<u64>()
                        .with_context(|| format!("bad --rows value '{x}'"))
                })
                .collect::<Result<Vec<_>>>()?,
            None if self.quick => vec![1000],
            None => vec![100, 500, 1000, 5000, 10000],
        };
        let memory = match self.memory.as_deref() {
            Some("none") => Vec::new(),
            Some(m) => list(m)
                .iter()
                .map(|x| match x.parse::<u64>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => bail!("bad --memory value '{x}': MiB, e.g. 64,256,1024, or none"),
                })
                .collect::<Result<Vec<_>>>()?,
            None if self.quick => Vec::new(),
            None => vec![64, 256, 1024],
        };
        let data = match self.data_mb.as_deref() {
            Some("none") => Vec::new(),
            Some(m) => list(m)
                .iter()
                .map(|x| {
                    x.parse::<u64>().map_err(|_| {
                        anyhow::anyhow!("bad --data-mb value '{x}': MiB, e.g. 0,256,1024, or none")
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            None if self.quick => Vec::new(),
            None => vec![0, 256, 1024],
        };
        let methods = list(&self.methods);
        for m in &methods {
            if !["migrate", "migrate-copy", "thesis", "floor"].contains(&m.as_str()) {
                bail!("unknown method '{m}' (migrate, migrate-copy, thesis, floor)");
            }
        }
        let mut memory_methods = Vec::new();
        for m in list(&self.memory_modes) {
            memory_methods.push(match m.as_str() {
                "copy" => "memory".to_string(),
                "lazy" => "lazy".to_string(),
                _ => bail!("unknown memory mode '{m}' (copy, lazy)"),
            });
        }
        if !memory.is_empty() && memory_methods.is_empty() {
            bail!("--memory-modes is empty");
        }
        let runs = self.runs.unwrap_or(if self.quick { 3 } else { 10 });
        if runs == 0
            || (rows.is_empty() && memory.is_empty() && data.is_empty())
            || profiles.is_empty()
        {
            bail!("nothing to run");
        }
        Ok(Plan {
            quick: self.quick,
            out,
            hosts: [hosts[0].clone(), hosts[1].clone()],
            profiles,
            rows,
            runs,
            methods,
            memory,
            memory_methods,
            data,
            probe_host: self.probe_host.clone(),
            probe_interval: self.probe_interval.clone(),
            probe_all: self.probe_all,
            fresh: self.fresh,
        })
    }
}

/// The plots of an existing result set, from its runs.csv: one set per profile that its
/// runs name (the floor's "local" is drawn in each).
fn replot(dir: &std::path::Path) -> Result<()> {
    let runs = report::read_runs(&dir.join("runs.csv"))?;
    let mut profiles: Vec<String> = Vec::new();
    for r in runs.iter().filter(|r| r.profile != "local") {
        if !profiles.contains(&r.profile) {
            profiles.push(r.profile.clone());
        }
    }
    let summary = dir.join("summary.md");
    let links = match std::fs::read_to_string(&summary) {
        Ok(text) => report::links_from_summary(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", summary.display())),
    };
    plot::write_plots(dir, &profiles, &runs, &links)?;
    eprintln!(
        "bench: re-drew the plots of {} from {} runs",
        dir.display(),
        runs.len()
    );
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let res = match &cli.replot {
        Some(dir) => replot(dir),
        None => cli.opts.plan().and_then(runner::run),
    };
    if let Err(e) = res {
        eprintln!("bench: error: {e:#}");
        std::process::exit(if lab::was_interrupted() { 130 } else { 1 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_defaults() {
        let cli =
            Cli::try_parse_from(["bench", "--quick", "--out", "/tmp/x", "--hosts", "d,e"]).unwrap();
        let p = cli.opts.plan().unwrap();
        assert_eq!(p.rows, vec![1000]);
        assert_eq!(p.runs, 3);
        assert_eq!(p.profiles, vec!["lan"]);
        assert_eq!(p.hosts, ["d".to_string(), "e".to_string()]);
        let full = Cli::try_parse_from(["bench", "--out", "/tmp/x"])
            .unwrap()
            .opts
            .plan()
            .unwrap();
        assert_eq!(full.rows.len(), 5);
        assert_eq!(full.runs, 10);
        assert_eq!(full.profiles.len(), 3);
        assert_eq!(full.memory, vec![64, 256, 1024]);
        assert!(p.memory.is_empty());
        let none = Cli::try_parse_from(["bench", "--out", "x", "--memory", "none"])
            .unwrap()
            .opts
            .plan()
            .unwrap();
        assert!(none.memory.is_empty());
        assert_eq!(full.data, vec![0, 256, 1024]);
        assert!(p.data.is_empty());
        let data_only = Cli::try_parse_from([
            "bench",
            "--out",
            "x",
            "--rows",
            "none",
            "--memory",
            "none",
            "--data-mb",
            "0,512",
        ])
        .unwrap()
        .opts
        .plan()
        .unwrap();
        assert!(data_only.rows.is_empty());
        assert_eq!(data_only.data, vec![0, 512]);
        assert!(
            Cli::try_parse_from(["bench", "--out", "x", "--data-mb", "lots"])
                .unwrap()
                .opts
                .plan()
                .is_err()
        );
        assert!(
            Cli::try_parse_from(["bench", "--out", "x", "--memory", "0"])
                .unwrap()
                .opts
                .plan()
                .is_err()
        );
        assert!(Cli::try_parse_from(["bench"]).unwrap().opts.plan().is_err());
        // The memory series' modes: copy is method memory, lazy method lazy.
        assert_eq!(full.memory_methods, vec!["memory", "lazy"]);
        let modes = |m: &str| {
            Cli::try_parse_from(["bench", "--out", "x", "--memory-modes", m])
                .unwrap()
                .opts
                .plan()
        };
        assert_eq!(modes("lazy").unwrap().memory_methods, vec!["lazy"]);
        assert!(modes("auto").is_err());
        assert!(modes("").is_err());
        assert!(
            Cli::try_parse_from(["bench", "--out", "x", "--hosts", "d,c"])
                .unwrap()
                .opts
                .plan()
                .is_err()
        );
    }
}
