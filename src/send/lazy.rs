//! `--memory lazy` on the source: which mode a run takes, and each lazy container's page
//! server, relay and window.
//!
//! Per container: a CRIU wrapper of this run (written before the freeze), the lazy dump
//! (podman's checkpoint in the background, its page server on loopback), the relay's
//! source end connected to that page server, and the tunnels that carry it to the
//! target's end: `migrate relay-attach` over SSH, started again while the relay waits
//! out an outage. The window ends when the page server has served every page (podman's
//! checkpoint returns) and the relay closed cleanly; only then is the source released.
//! Before UP, a rollback makes the page server fail: CRIU then lets the tasks run on
//! here, and migrate removes the network lock it leaves behind.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use tokio::task::JoinHandle;

use crate::engine::lazy::{self as engine_lazy, Dump, PageRequests, SourceFacts};
use crate::plan::{LAZY_AUTO_BYTES, MemoryChoice, SendPlan};
use crate::preflight::Report;
use crate::progress::Ui;
use crate::timing::Stopwatch;
use crate::transport::relay::{PAGE_RELAY, RelayEnd, RelayError, RelayReport};
use crate::transport::ssh::{Destination, Ssh};

/// How long the source's relay waits for a tunnel before it gives the pages up (the
/// target's end gives up sooner, see `receive::lazy`, and stops its copy first).
pub const SOURCE_OUTAGE: Duration = Duration::from_secs(45);
/// How long a page server may take to serve all pages once the target restored.
const WINDOW_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long podman's failed checkpoint may take to give the container back.
const RESUME_TIMEOUT: Duration = Duration::from_secs(120);

/// Decides `--memory` for this run: `Ok(true)` for lazy. `lazy` asked for where it
/// cannot work is refused before the freeze; `auto` says why it copies.
pub(super) fn choose(plan: &SendPlan, report: &Report, ui: &Ui) -> anyhow::Result<bool> {
    let blocker = lazy_blocker(report);
    match plan.memory {
        MemoryChoice::Copy => Ok(false),
        MemoryChoice::Lazy => match blocker {
            Some(why) => Err(anyhow!("--memory lazy: {why}; use --memory copy (or auto)")),
            None => Ok(true),
        },
        MemoryChoice::Auto => {
            if let Some(why) = blocker {
                ui.info(&format!("memory: copy ({why})"));
                return Ok(false);
            }
            let resident: u64 = report
                .infos
                .iter()
                .map(|c| crate::engine::podman::resident_bytes(c.pid))
                .sum();
            let lazy = resident >= LAZY_AUTO_BYTES;
            ui.info(&format!(
                "memory: {} ({} MiB resident, lazy from {} MiB)",
                if lazy { "lazy" } else { "copy" },
                resident >> 20,
                LAZY_AUTO_BYTES >> 20
            ));
            Ok(lazy)
        }
    }
}

/// Why this run cannot move its memory lazily, if it cannot.
fn lazy_blocker(report: &Report) -> Option<String> {
    for (side, facts) in [
        ("this host", &report.source_stack),
        ("the target", &report.target_stack),
    ] {
        match facts {
            Some(f) if crate::engine::stack::lazy_possible(f) => {}
            Some(_) => {
                return Some(format!(
                    "lazy migration is not possible on {side} (`migrate check` says why)"
                ));
            }
            None => return Some(format!("{side}'s stack is unknown")),
        }
    }
    if report.pod.is_some() {
        return Some("containers of a pod move with their memory copied".into());
    }
    if report.target_sink.is_none() || !report.target_lazy {
        return Some("the target's migrate cannot restore lazily (an older build)".into());
    }
    if let Some(r) = report.runtimes.iter().find(|r| r.runtime != "runc") {
        return Some(format!(
            "{} runs with {}, and lazy dumps go through runc's CRIU",
            r.container, r.runtime
        ));
    }
    None
}

/// One lazy container: its page server's port, the relay session, and what runs for it.
#[derive(Debug)]
pub(super) struct LazyItem {
    pub port: u16,
    pub session: u64,
    /// This run's folder for the container's CRIU wrapper.
    pub dir: PathBuf,
    pub state: Mutex<LazyState>,
}

#[derive(Debug, Default)]
pub(super) struct LazyState {
    pub facts: Option<SourceFacts>,
    pub wrapper: Option<PathBuf>,
    pub dump: Option<Dump>,
    pub relay: Option<Relay>,
}

/// The relay's source end at work.
#[derive(Debug)]
pub(super) struct Relay {
    task: JoinHandle<Result<RelayReport, RelayError>>,
    tunnels: JoinHandle<()>,
    abort: crate::transport::relay::AbortHandle,
    pages: Arc<Mutex<PageRequests>>,
}

impl LazyItem {
    pub fn new(dir: PathBuf) -> std::io::Result<LazyItem> {
        // A free loopback port for the page server (CRIU binds it a moment later).
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let mut b = [0u8; 8];
        std::fs::File::open("/dev/urandom").and_then(|mut f| {
            use std::io::Read;
            f.read_exact(&mut b)
        })?;
        Ok(LazyItem {
            port,
            session: u64::from_ne_bytes(b),
            dir,
            state: Mutex::new(LazyState::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LazyState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Before the freeze: what the archive needs from podman, and the CRIU wrapper.
    pub async fn prepare(
        &self,
        name: &str,
        opts: crate::engine::podman::CriuOptions,
    ) -> anyhow::Result<()> {
        engine_lazy::ensure_etc_criu()?;
        let facts = engine_lazy::source_facts(name).await?;
        let wrapper =
            engine_lazy::write_wrapper(&self.dir, &engine_lazy::source_conf(self.port, opts))?;
        let mut st = self.state();
        st.facts = Some(facts);
        st.wrapper = Some(wrapper);
        Ok(())
    }

    /// The freeze: the dump up to its page server, then the archive of everything else.
    pub async fn dump(
        &self,
        opts: crate::engine::podman::CriuOptions,
    ) -> anyhow::Result<(SourceFacts, Vec<u8>)> {
        let (facts, wrapper) = {
            let st = self.state();
            (
                st.facts.clone().expect("prepared before the freeze"),
                st.wrapper.clone().expect("prepared before the freeze"),
            )
        };
        let dump = engine_lazy::start_dump(&facts, opts, &wrapper, self.port).await?;
        self.state().dump = Some(dump);
        let archive = engine_lazy::build_archive(&facts).await?;
        Ok((facts, archive))
    }

    /// Connects the relay's source end to the page server and keeps tunnels coming:
    /// `relay-attach` on the target (through `program`, the receiver's binary) to the
    /// socket `remote_socket`, again after each one ends, until the relay ends.
    pub fn start_relay(
        &self,
        dest: Destination,
        program: String,
        remote_socket: String,
        ui: Arc<Ui>,
    ) {
        let local = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let mut end = RelayEnd::source(local, self.session, PAGE_RELAY);
        let pages = Arc::new(Mutex::new(PageRequests::default()));
        let counter = pages.clone();
        end.tap(Box::new(move |b| {
            counter.lock().unwrap_or_else(|e| e.into_inner()).feed(b)
        }));
        // The target's daemon dying closes its connection as cleanly as a finished one;
        // the page server must not take that end for a finished transfer.
        let said_goodbye = pages.clone();
        end.guard_end(Box::new(move || {
            said_goodbye
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .closed
        }));
        let abort = end.abort_handle();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move { end.run(&mut rx, SOURCE_OUTAGE).await });
        let tunnels = tokio::spawn(supply_tunnels(dest, program, remote_socket, tx, ui));
        self.state().relay = Some(Relay {
            task,
            tunnels,
            abort,
            pages,
        });
    }

    /// After UP: waits until every page is on the target. Returns what the relay
    /// carried and the page counts, or why the window failed.
    pub async fn window(&self) -> anyhow::Result<(RelayReport, PageRequests, Option<String>)> {
        let (relay, dump) = {
            let mut st = self.state();
            (st.relay.take(), st.dump.take())
        };
        let relay = relay.ok_or_else(|| anyhow!("no relay was started"))?;
        let report = relay
            .task
            .await
            .map_err(|e| anyhow!("the relay task failed: {e}"))?;
        relay.tunnels.abort();
        let pages = relay
            .pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                // Put the dump back: the container's tasks run on here from it.
                self.state().dump = dump;
                return Err(anyhow!(e).context("the pages did not all reach the target"));
            }
        };
        // Every page was delivered there: the target is whole, whatever podman says of
        // its own cleanup here (the commit removes the container anyway).
        if let Some(d) = dump
            && let Err(e) = d.finish(WINDOW_TIMEOUT).await
        {
            return Ok((report, pages, Some(e.to_string())));
        }
        Ok((report, pages, None))
    }

    /// Gives the container back to this host before UP: the page server fails (the
    /// relay resets its connection, or nobody connected yet and a bad request does it),
    /// podman's checkpoint ends in error with the tasks running on, and CRIU's network
    /// lock goes. Returns what was done.
    pub async fn resume(&self, pid: i64, ui: &Ui) -> Result<(), String> {
        let (relay, dump) = {
            let mut st = self.state();
            (st.relay.take(), st.dump.take())
        };
        match &relay {
            Some(r) => r.abort.abort("the migration rolls back"),
            None => {
                if let Err(e) = engine_lazy::fail_page_server(self.port).await {
                    ui.warn(&format!("cannot reach the page server to stop it: {e}"));
                }
            }
        }
        if let Some(r) = relay {
            let _ = r.task.await;
            r.tunnels.abort();
        }
        let Some(dump) = dump else {
            return Ok(());
        };
        match dump.finish(RESUME_TIMEOUT).await {
            Err(_) => {}
            Ok(()) => {
                return Err(
                    "its page server ended as if every page had been served; the memory it held is gone (podman checkpoint returned 0)"
                        .into(),
                );
            }
        }
        match engine_lazy::remove_network_lock(pid).await {
            Ok(0) => {}
            Ok(n) => ui.info(&format!("removed CRIU's network lock ({n} tables)")),
            Err(e) => return Err(format!("CRIU's network lock stays in its namespace: {e}")),
        }
        Ok(())
    }
}

/// Tunnels for the relay: one `relay-attach` after the other while the relay runs.
async fn supply_tunnels(
    dest: Destination,
    program: String,
    socket: String,
    tx: tokio::sync::mpsc::Sender<
        tokio::io::Join<tokio::process::ChildStdout, tokio::process::ChildStdin>,
    >,
    ui: Arc<Ui>,
) {
    let mut tries = 0u32;
    loop {
        let started = Stopwatch::start();
        match Ssh::connect(&dest, Duration::from_secs(10)).await {
            Ok(ssh) => match ssh.tunnel(&program, &["relay-attach".into(), socket.clone()]) {
                Ok(mut child) => {
                    let out = child.stdout.take().expect("piped");
                    let inp = child.stdin.take().expect("piped");
                    if tx.send(tokio::io::join(out, inp)).await.is_err() {
                        return;
                    }
                    let _ = child.wait().await;
                    ssh.close().await;
                }
                Err(e) => ui.warn(&format!("relay tunnel: {e}")),
            },
            Err(e) => {
                if tries == 0 {
                    ui.warn(&format!("relay tunnel: {e}; trying again"));
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        tries += 1;
        if started.secs() < 1.0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl<E: super::seams::Engine, T: super::seams::Target, C: super::seams::Clock>
    super::finish::End<'_, E, T, C>
{
    /// After UP: waits until every lazy container's pages are on the target, and puts the
    /// window's figures in the record.
    pub(super) async fn lazy_window(
        &mut self,
        rec: &mut crate::timing::Record,
    ) -> anyhow::Result<()> {
        self.ui
            .phase("post-copy: the service runs on the target, its pages follow");
        let mut after = 0u64;
        let mut demand = 0u64;
        let mut pushed = 0u64;
        let mut counted = true;
        for it in self.items {
            let Some(l) = &it.lazy else { continue };
            let (report, pages, podman_error) = l.window().await?;
            if let Some(e) = podman_error {
                self.ui.warn(&format!(
                    "{}: every page reached the target, but podman's checkpoint here ended in error: {e}",
                    it.info.name
                ));
            }
            after += report.sent;
            demand += pages.demand_pages;
            pushed += pages.pushed_pages;
            counted &= !pages.unreadable;
            if report.tunnels > 1 {
                self.ui.info(&format!(
                    "{}: the pages' relay came through {} tunnels ({} bytes sent again)",
                    it.info.name, report.tunnels, report.resent
                ));
            }
        }
        let end_us = self.clock.now_us();
        rec.postcopy_s = rec.up_us.map(|up| ((end_us - up) as f64 / 1e6).max(0.0));
        rec.bytes_before_up = rec.bytes_sent;
        rec.bytes_after_up = Some(after);
        if counted {
            rec.demand_pages = Some(demand);
            rec.pushed_pages = Some(pushed);
        }
        rec.bytes_sent = Some(rec.bytes_sent.unwrap_or(0) + after);
        self.ui.info(&format!(
            "every page on the target {:.3}s after UP: {} after UP ({demand} pages on demand, {pushed} pushed)",
            rec.postcopy_s.unwrap_or_default(),
            super::human_bytes(after)
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::stack::Facts;

    const CAN: &str = "podman=4.3.1\nruntime=runc\ncriu=4.2.1\ncriu_check=ok\nfeature_uffd-noncoop=yes\npipe_max_size=4194304\ncap_eff=000001fffeffffff\n";

    fn ready() -> Report {
        Report {
            source_stack: Some(Facts::parse(CAN)),
            target_stack: Some(Facts::parse(CAN)),
            target_sink: Some("/usr/local/bin/migrate".into()),
            target_lazy: true,
            runtimes: vec![crate::engine::runtime::Runtime {
                container: "hog".into(),
                runtime: "runc".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn lazy_needs_both_hosts_runc_no_pod_and_a_receiver_that_knows() {
        assert_eq!(lazy_blocker(&ready()), None);
        let mut r = ready();
        r.target_stack = Some(Facts::parse(
            &CAN.replace("pipe_max_size=4194304", "pipe_max_size=1048576"),
        ));
        assert!(lazy_blocker(&r).unwrap().contains("on the target"));
        let mut r = ready();
        r.source_stack = Some(Facts::parse(
            &CAN.replace("uffd-noncoop=yes", "uffd-noncoop=no"),
        ));
        assert!(lazy_blocker(&r).unwrap().contains("on this host"));
        let mut r = ready();
        r.target_lazy = false;
        assert!(lazy_blocker(&r).unwrap().contains("older build"));
        let mut r = ready();
        r.runtimes[0].runtime = "crun".into();
        assert!(lazy_blocker(&r).unwrap().contains("hog runs with crun"));
        let mut r = ready();
        r.target_stack = None;
        assert!(lazy_blocker(&r).unwrap().contains("unknown"));
    }
}
