//! Lazy restores on the target: per container, CRIU's images unpacked for the
//! lazy-pages daemon, the relay's target end (the daemon's page server, reached by the
//! source through `migrate relay-attach` tunnels on a Unix socket in the run folder), the
//! daemon itself, and the restore through a wrapper that makes it lazy.
//!
//! After UP the receiver watches the window: the daemon ending well (every page here)
//! ends it. A daemon that fails, or a relay that finds no tunnel for
//! [`TARGET_OUTAGE`], means pages that will never come: the container is killed at once
//! (a process must not run on with missing pages) and the relay aborted, so that the
//! source's page server fails and its tasks, whose memory is whole, run on there.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::engine::lazy::{self as engine_lazy, Daemon};
use crate::engine::podman::{CriuOptions, Podman};
use crate::progress::Ui;
use crate::protocol::{ContainerEntry, LazyEntry, relay_socket_name};
use crate::timing::now_us;
use crate::transport::relay::{AbortHandle, PAGE_RELAY, RelayEnd, RelayError, RelayReport};

/// How long the target's relay waits for a tunnel before it stops the container (the
/// source waits longer, so that it resumes only after the target has stopped).
pub const TARGET_OUTAGE: Duration = Duration::from_secs(30);
/// How long a window may last.
const WINDOW_TIMEOUT: Duration = Duration::from_secs(3600);

/// One lazy container being restored here.
pub(super) struct LazyRestore {
    pub name: String,
    daemon: Option<Daemon>,
    relay: JoinHandle<Result<RelayReport, RelayError>>,
    acceptor: JoinHandle<()>,
    abort: AbortHandle,
    pub wrapper: PathBuf,
    socket: PathBuf,
}

impl Drop for LazyRestore {
    fn drop(&mut self) {
        self.acceptor.abort();
        // A tunnel that comes later finds nothing and ends at once.
        let _ = std::fs::remove_file(&self.socket);
        if !self.relay.is_finished() {
            self.abort.abort("the restore here ended");
        }
    }
}

/// Unpacks the images, opens the relay's socket and end, starts the daemon and writes
/// the restore's wrapper.
pub(super) async fn prepare(
    c: &ContainerEntry,
    lazy: LazyEntry,
    dir: &Path,
) -> Result<LazyRestore, String> {
    let base = dir.join(format!("lazy-{}", c.name));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&base)
        .map_err(|e| format!("creating {}: {e}", base.display()))?;
    engine_lazy::ensure_etc_criu().map_err(|e| e.to_string())?;
    let (archive, images) = (dir.join(&c.archive), base.join("images"));
    let into = images.clone();
    tokio::task::spawn_blocking(move || engine_lazy::extract_images(&archive, &into))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let (port, end) = RelayEnd::target(local, lazy.session, PAGE_RELAY)
        .await
        .map_err(|e| format!("the relay's end cannot listen: {e}"))?;
    let socket = dir.join(relay_socket_name(&c.name));
    // A new socket file: bind fails on anything already there.
    let listener = tokio::net::UnixListener::bind(&socket)
        .map_err(|e| format!("the relay's socket {}: {e}", socket.display()))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let acceptor = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            if tx.send(s).await.is_err() {
                return;
            }
        }
    });
    let abort = end.abort_handle();
    let mut end = end;
    let relay = tokio::spawn(async move { end.run(&mut rx, TARGET_OUTAGE).await });
    let work_dir = base.join("wd");
    let daemon = engine_lazy::start_daemon(&images.join("checkpoint"), &work_dir, port)
        .await
        .map_err(|e| e.to_string())?;
    let opts = CriuOptions {
        file_locks: c.file_locks,
        tcp_established: c.tcp_established,
        tcp_close: c.tcp_close,
        skip_in_flight: false,
    };
    let wrapper = engine_lazy::write_wrapper(&base, &engine_lazy::target_conf(&work_dir, opts))
        .map_err(|e| e.to_string())?;
    Ok(LazyRestore {
        name: c.name.clone(),
        daemon: Some(daemon),
        relay,
        acceptor,
        abort,
        wrapper,
        socket,
    })
}

/// How the window ended here.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Receiver clock when the last daemon had every page here.
    pub end_us: Option<i64>,
    /// Bytes of pages that came through the relays.
    pub bytes: u64,
    /// Why it failed (the containers named were stopped).
    pub error: Option<String>,
}

/// Waits until every lazy container has all its pages; stops the ones that cannot get
/// them.
pub(super) async fn watch(restores: Vec<LazyRestore>, ui: &Ui) -> Window {
    let mut w = Window::default();
    let results = futures::future::join_all(restores.into_iter().map(watch_one)).await;
    for (name, r) in results {
        match r {
            Ok(bytes) => w.bytes += bytes,
            Err(e) => {
                ui.warn(&format!("{name}: {e}; it was stopped and removed here"));
                let error = format!("{name}: {e}");
                w.error = Some(match w.error.take() {
                    Some(prev) => format!("{prev}; {error}"),
                    None => error,
                });
            }
        }
    }
    if w.error.is_none() {
        w.end_us = Some(now_us());
        ui.info("every page is here: the post-copy window is over");
    }
    w
}

/// One container's window: its daemon must end well and its relay close cleanly.
async fn watch_one(mut r: LazyRestore) -> (String, Result<u64, String>) {
    let name = r.name.clone();
    let daemon = r.daemon.take().expect("started in prepare");
    let relay = &mut r.relay;
    let mut daemon_end = std::pin::pin!(daemon.finish(WINDOW_TIMEOUT));
    let mut daemon_result = None;
    let relay_result = tokio::select! {
        d = &mut daemon_end => {
            daemon_result = Some(d);
            None
        }
        rr = &mut *relay => Some(rr),
    };
    let outcome = match (daemon_result, relay_result) {
        (Some(Err(e)), _) => Err(format!("CRIU's lazy-pages daemon failed: {e}")),
        (Some(Ok(())), _) => match relay.await {
            Ok(Ok(rep)) => Ok(rep.delivered),
            Ok(Err(e)) => Err(format!("the page relay failed after the daemon ended: {e}")),
            Err(e) => Err(format!("the page relay task failed: {e}")),
        },
        (None, Some(Ok(Ok(rep)))) => match daemon_end.await {
            Ok(()) => Ok(rep.delivered),
            Err(e) => Err(format!("CRIU's lazy-pages daemon failed: {e}")),
        },
        (None, Some(Ok(Err(e)))) => Err(format!("the page relay failed: {e}")),
        (None, Some(Err(e))) => Err(format!("the page relay task failed: {e}")),
        (None, None) => Err("the window ended without an answer".into()),
    };
    if outcome.is_err() {
        // Before the daemon goes (its end would let missing pages read as zeros): the
        // container stops for good here.
        stop(&name).await;
    }
    (name, outcome)
}

/// Kills and removes a container whose pages will not all come.
async fn stop(name: &str) {
    let _ = Podman.kill(name).await;
    let _ = Podman.remove(name).await;
}
