//! A relay that keeps one local TCP connection open while the tunnel between the hosts
//! breaks and comes back.
//!
//! CRIU's lazy-pages daemon (target) and page server (source) talk over one TCP
//! connection, and both take a closed connection for the end of the transfer: the target
//! then runs with missing pages and the source throws the rest of the memory away
//! (`docs/design/lazy-pages.md`, section 6). So neither CRIU talks to the network. Each
//! talks to a relay end on its own host over loopback, and the two ends carry the byte
//! streams through a *tunnel*, any byte stream (the stdin/stdout of an `ssh` child in
//! production, `tokio::io::join` makes one value of them). When the tunnel breaks, the
//! ends keep their local connection open, keep every byte the other end has not yet
//! delivered, and on the next tunnel resend what the other end lacks: each CRIU sees
//! exactly the bytes the other CRIU sent, once, in order.
//!
//! What each local peer sees:
//! - **Normal flow**: a plain TCP connection. A slow reader slows the writer on the
//!   other host (at most `Limits::buffer` bytes wait in each end, plus socket buffers).
//! - **Clean end**: when a local peer closes (or shuts down) its sending side, the other
//!   local peer reads every byte, then end-of-file. `run` returns `Ok` when both
//!   directions are closed and the other end confirmed it, and the local connection is
//!   then closed.
//! - **Tunnel outage**: nothing. Reads wait, writes wait once the buffer is full. No
//!   end-of-file, no error.
//! - **Outage longer than the limit**: `run` returns `RelayError::Outage`, the local
//!   connection still open. The caller may call `run` again with new tunnels (the
//!   streams resume where they were), or drop the end: dropping an end that did not
//!   finish cleanly **resets** the local connection (RST, `SO_LINGER` 0), so its peer's
//!   next read or write fails with `ECONNRESET`, never a clean end-of-file.
//! - **Abort** (`AbortHandle::abort`, or the local connection failed): the end resets its
//!   local connection at once and tells the other end (`ABORT` frame, best effort when a
//!   tunnel is up), which resets its own local connection. A page server whose
//!   connection is reset fails its transfer instead of finishing it.
//!
//! The frames on the tunnel (integers big-endian; a *position* counts stream bytes, and
//! the end of a stream takes one more position, like TCP's FIN):
//! ```text
//! HELLO  1 | "MRLY" | version u8 (1) | session u64 | buffer u64 | received u64
//! DATA   2 | seq u64 | len u32 (1..=65536) | len bytes     bytes at positions seq..seq+len
//! ACK    3 | pos u64        every position below pos was delivered to the local peer
//! FIN    4 | pos u64        the stream ends at pos (pos = its length)
//! ABORT  5 | len u16 | UTF-8 reason (at most 1024 bytes)
//! BYE    6                  both directions are closed and confirmed here
//! ```
//! Each end sends HELLO first on every tunnel, giving the positions it has received; the
//! other end resends from there. Bytes stay buffered until ACKed (delivered to the local
//! peer, not merely received), which is what holds a fast writer back. Both ends must
//! use the same session and buffer, else the tunnel is refused. An end sends an ACK at
//! least every third of `Limits::silence`; a tunnel silent for `silence` counts as lost.

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OnceCell, mpsc};
use tokio::time::{Instant, sleep, sleep_until, timeout};

const MAGIC: [u8; 4] = *b"MRLY";
const VERSION: u8 = 1;
/// The largest DATA frame, and the size of each local read and write.
pub const CHUNK: usize = 64 * 1024;
const MAX_REASON: usize = 1024;
/// How long an aborting end tries to get its ABORT frame through a tunnel that is stuck.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// How much an end may hold, and when a quiet tunnel counts as lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes read from the local peer and not yet delivered on the other host. The local
    /// reader stops when this is full; the receiving end refuses more than this.
    pub buffer: usize,
    /// A tunnel on which nothing arrived for this long is lost (ACKs flow at least every
    /// third of it), and a new tunnel must say HELLO within it.
    pub silence: Duration,
}

/// The limits of a lazy migration's page relay (both ends must use the same). The buffer
/// is small on purpose: a page a task faults on queues behind whatever pushed pages are
/// already on their way, so every MiB held here is latency added to a page fault.
pub const PAGE_RELAY: Limits = Limits {
    buffer: 4 << 20,
    silence: Duration::from_secs(5),
};

impl Default for Limits {
    fn default() -> Self {
        Limits {
            buffer: 64 << 20,
            silence: Duration::from_secs(5),
        }
    }
}

/// Why `run` stopped without a clean end.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RelayError {
    /// No tunnel was up for `after` (the limit given to `run`, or less when the supply of
    /// tunnels ended). The local connection is still open: run again, or drop (reset).
    #[error(
        "no tunnel to the other relay end for {after:?} (last: {last}); the local connection is held open"
    )]
    Outage { after: Duration, last: String },
    /// The local connection failed (or could not be made); it was reset and the other
    /// end was told.
    #[error("local connection {addr}: {reason}")]
    Local { addr: String, reason: String },
    /// Aborted on purpose here; the local connection was reset and the other end told.
    #[error("relay aborted: {0}")]
    Aborted(String),
    /// The other end aborted; the local connection was reset.
    #[error("the other relay end aborted: {0}")]
    PeerAborted(String),
    /// The other end broke the protocol; the local connection was reset.
    #[error("relay protocol violated by the other end: {0}")]
    Protocol(String),
}

/// What a finished relay carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayReport {
    /// Bytes read from the local peer (each counted once).
    pub sent: u64,
    /// Bytes delivered to the local peer.
    pub delivered: u64,
    /// Bytes sent again on a new tunnel because the old one lost them.
    pub resent: u64,
    /// Bytes received twice and dropped.
    pub duplicates: u64,
    /// Tunnels that completed a HELLO.
    pub tunnels: u32,
    /// Most bytes held at once waiting for the other end's ACK.
    pub peak_unacked: usize,
    /// Most bytes held at once waiting for the local peer to read them.
    pub peak_undelivered: usize,
    /// False when the tunnel was lost after everything was delivered both ways but before
    /// the other end confirmed it (it may report an outage although nothing is missing).
    pub confirmed: bool,
}

#[derive(Debug, Clone)]
enum Stop {
    Local(String),
    Aborted(String),
    PeerAborted(String),
    Protocol(String),
}

#[derive(Debug, PartialEq, Eq)]
enum Frame {
    Hello {
        session: u64,
        buffer: u64,
        received: u64,
    },
    Data {
        seq: u64,
        bytes: Vec<u8>,
    },
    Ack(u64),
    Fin(u64),
    Abort(String),
    Bye,
}

impl Frame {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        match self {
            Frame::Hello {
                session,
                buffer,
                received,
            } => {
                out.push(1);
                out.extend_from_slice(&MAGIC);
                out.push(VERSION);
                for v in [session, buffer, received] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Frame::Data { seq, bytes } => {
                out.reserve(bytes.len() + 12);
                out.push(2);
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
                out.extend_from_slice(bytes);
            }
            Frame::Ack(pos) | Frame::Fin(pos) => {
                out.push(if matches!(self, Frame::Ack(_)) { 3 } else { 4 });
                out.extend_from_slice(&pos.to_be_bytes());
            }
            Frame::Abort(reason) => {
                let mut end = reason.len().min(MAX_REASON);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                out.push(5);
                out.extend_from_slice(&(end as u16).to_be_bytes());
                out.extend_from_slice(&reason.as_bytes()[..end]);
            }
            Frame::Bye => out.push(6),
        }
        out
    }

    async fn read<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Frame> {
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        Ok(match r.read_u8().await? {
            1 => {
                let mut magic = [0u8; 5];
                r.read_exact(&mut magic).await?;
                if magic[..4] != MAGIC || magic[4] != VERSION {
                    return Err(bad(format!(
                        "not a relay HELLO of version {VERSION}: {magic:?}"
                    )));
                }
                Frame::Hello {
                    session: r.read_u64().await?,
                    buffer: r.read_u64().await?,
                    received: r.read_u64().await?,
                }
            }
            2 => {
                let seq = r.read_u64().await?;
                let len = r.read_u32().await? as usize;
                if len == 0 || len > CHUNK {
                    return Err(bad(format!("DATA of {len} bytes (1..={CHUNK})")));
                }
                let mut bytes = vec![0u8; len];
                r.read_exact(&mut bytes).await?;
                Frame::Data { seq, bytes }
            }
            3 => Frame::Ack(r.read_u64().await?),
            4 => Frame::Fin(r.read_u64().await?),
            5 => {
                let len = r.read_u16().await? as usize;
                if len > MAX_REASON {
                    return Err(bad(format!("ABORT reason of {len} bytes")));
                }
                let mut text = vec![0u8; len];
                r.read_exact(&mut text).await?;
                Frame::Abort(String::from_utf8_lossy(&text).into_owned())
            }
            6 => Frame::Bye,
            other => return Err(bad(format!("unknown frame type {other}"))),
        })
    }
}

/// Both directions of one end. Positions as in the module's frame table.
#[derive(Default)]
struct State {
    // Local peer → tunnel.
    /// Bytes at positions `out_base()..read_total`, waiting for the other end's ACK.
    out: VecDeque<u8>,
    read_total: u64,
    local_eof: bool,
    /// The next position to send on the current tunnel.
    next_send: u64,
    /// The highest position sent on any tunnel (to count resent bytes).
    sent_max: u64,
    acked: u64,
    // Tunnel → local peer.
    /// Bytes at positions `delivered..received`, waiting to be written to the local peer.
    inbox: VecDeque<u8>,
    delivered: u64,
    received: u64,
    peer_fin: bool,
    local_shut: bool,
    ack_sent: Option<u64>,
    bye_sent: bool,
    bye_received: bool,
    stop: Option<Stop>,
    report: RelayReport,
}

impl State {
    fn out_base(&self) -> u64 {
        self.acked.min(self.read_total)
    }
    fn out_end(&self) -> u64 {
        self.read_total + u64::from(self.local_eof)
    }
    fn in_pos(&self) -> u64 {
        self.received + u64::from(self.peer_fin)
    }
    fn delivered_pos(&self) -> u64 {
        self.delivered + u64::from(self.local_shut)
    }
    /// Both directions closed, every byte delivered here and confirmed there.
    fn complete(&self) -> bool {
        self.local_eof && self.acked == self.out_end() && self.local_shut
    }

    /// The next frame for the tunnel, if any (its bookkeeping done as if sent).
    fn next_frame(&mut self, force_ack: bool) -> Option<Frame> {
        match &self.stop {
            Some(Stop::PeerAborted(_)) => return None,
            Some(Stop::Local(r) | Stop::Aborted(r) | Stop::Protocol(r)) => {
                return Some(Frame::Abort(r.clone()));
            }
            None => {}
        }
        let delivered = self.delivered_pos();
        if force_ack || self.ack_sent != Some(delivered) {
            self.ack_sent = Some(delivered);
            return Some(Frame::Ack(delivered));
        }
        if self.next_send < self.read_total {
            let start = self.next_send;
            let len = (self.read_total - start).min(CHUNK as u64);
            let off = (start - self.out_base()) as usize;
            let bytes: Vec<u8> = self.out.range(off..off + len as usize).copied().collect();
            self.next_send += len;
            if start < self.sent_max {
                self.report.resent += self.sent_max.min(start + len) - start;
            }
            self.sent_max = self.sent_max.max(self.next_send);
            return Some(Frame::Data { seq: start, bytes });
        }
        if self.local_eof && self.next_send == self.read_total {
            self.next_send += 1;
            return Some(Frame::Fin(self.read_total));
        }
        if self.complete() && !self.bye_sent {
            self.bye_sent = true;
            return Some(Frame::Bye);
        }
        None
    }

    /// Applies a frame that arrived after the HELLO; `Err` is a protocol violation.
    fn apply(&mut self, frame: Frame, buffer: usize) -> Result<(), String> {
        match frame {
            Frame::Data { seq, bytes } => {
                let end = seq + bytes.len() as u64;
                if self.peer_fin || seq > self.received {
                    return Err(format!(
                        "DATA at {seq} while {} bytes received (end: {})",
                        self.received, self.peer_fin
                    ));
                }
                if end <= self.received {
                    self.report.duplicates += bytes.len() as u64;
                    return Ok(());
                }
                let skip = (self.received - seq) as usize;
                self.report.duplicates += skip as u64;
                self.inbox.extend(&bytes[skip..]);
                self.received = end;
                if self.inbox.len() > buffer {
                    return Err(format!(
                        "{} bytes undelivered, over the buffer",
                        self.inbox.len()
                    ));
                }
                self.report.peak_undelivered = self.report.peak_undelivered.max(self.inbox.len());
            }
            Frame::Ack(pos) => {
                if pos > self.out_end() {
                    return Err(format!("ACK of {pos}, beyond {}", self.out_end()));
                }
                if pos > self.acked {
                    let drop = (pos.min(self.read_total) - self.out_base()) as usize;
                    self.out.drain(..drop);
                    self.acked = pos;
                }
            }
            Frame::Fin(pos) => {
                if pos != self.received {
                    return Err(format!(
                        "FIN at {pos} while {} bytes received",
                        self.received
                    ));
                }
                self.peer_fin = true;
            }
            Frame::Abort(reason) => self.stop = Some(Stop::PeerAborted(reason)),
            Frame::Bye => {
                if !self.complete() {
                    return Err("BYE before both directions were closed".into());
                }
                self.bye_received = true;
            }
            Frame::Hello { .. } => return Err("a second HELLO on one tunnel".into()),
        }
        Ok(())
    }
}

/// The state shared by the local side, the tunnel side and abort handles.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Room in `out` (the local reader waits on it).
    room: Notify,
    /// Bytes or an end in `inbox` (the local writer waits on it).
    inbox: Notify,
    /// Something to send (the tunnel writer waits on it).
    work: Notify,
    /// A stop (the wait for a tunnel watches it).
    stopped: Notify,
    /// Sees every byte delivered to the local peer, in order (see [`RelayEnd::tap`]).
    tap: Mutex<Option<Tap>>,
    /// Whether the other end's end of stream may reach the local peer as end-of-file
    /// (see [`RelayEnd::guard_end`]).
    end_ok: Mutex<Option<EndGuard>>,
}

/// Says whether an end of stream may be passed on as a clean end-of-file now.
pub type EndGuard = Box<dyn Fn() -> bool + Send>;

/// An observer of the bytes an end delivers to its local peer.
pub type Tap = Box<dyn FnMut(&[u8]) + Send>;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn wake_all(&self) {
        self.room.notify_one();
        self.inbox.notify_one();
        self.work.notify_one();
        self.stopped.notify_one();
    }
    fn stop(&self, why: Stop) {
        let mut st = self.lock();
        if st.stop.is_none() {
            st.stop = Some(why);
        }
        drop(st);
        self.wake_all();
    }
}

/// Stops a running relay end on purpose (see the module's "Abort").
#[derive(Clone)]
pub struct AbortHandle(Arc<Shared>);

impl std::fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AbortHandle")
    }
}

impl AbortHandle {
    pub fn abort(&self, reason: &str) {
        self.0.stop(Stop::Aborted(reason.to_string()));
    }
}

enum Opener {
    Connect(SocketAddr),
    Accept(TcpListener),
}

impl Opener {
    async fn open(&self) -> io::Result<TcpStream> {
        let stream = match self {
            Opener::Connect(addr) => TcpStream::connect(addr).await?,
            Opener::Accept(listener) => listener.accept().await?.0,
        };
        stream.set_nodelay(true)?;
        Ok(stream)
    }
    fn describe(&self) -> String {
        match self {
            Opener::Connect(addr) => format!("to {addr}"),
            Opener::Accept(l) => match l.local_addr() {
                Ok(a) => format!("accepted on {a}"),
                Err(_) => "accepted".into(),
            },
        }
    }
}

/// How one tunnel ended.
enum TunnelEnd {
    Lost { reason: String, greeted: bool },
    Finished,
    Stopped,
}

/// One end of the relay: the source's (connects to the page server) or the target's
/// (accepts the lazy-pages daemon). Dropping it before a clean end resets the local
/// connection.
pub struct RelayEnd {
    shared: Arc<Shared>,
    opener: Opener,
    local: OnceCell<TcpStream>,
    session: u64,
    limits: Limits,
}

impl RelayEnd {
    /// The source's end: `run` connects to `local` (CRIU's page server, already
    /// listening). `session` must be the same number at both ends.
    pub fn source(local: SocketAddr, session: u64, limits: Limits) -> RelayEnd {
        Self::with(Opener::Connect(local), session, limits)
    }

    /// The target's end: listens on `local` now (port 0 picks one), and `run` accepts one
    /// connection (CRIU's lazy-pages daemon). Returns the port.
    pub async fn target(
        local: SocketAddr,
        session: u64,
        limits: Limits,
    ) -> io::Result<(u16, RelayEnd)> {
        let listener = TcpListener::bind(local).await?;
        let port = listener.local_addr()?.port();
        Ok((port, Self::with(Opener::Accept(listener), session, limits)))
    }

    fn with(opener: Opener, session: u64, limits: Limits) -> RelayEnd {
        RelayEnd {
            shared: Arc::default(),
            opener,
            local: OnceCell::new(),
            session,
            limits,
        }
    }

    /// Hands every byte delivered to the local peer to `tap`, in order, as it is
    /// written (e.g. to count the page requests CRIU's daemon sends its page server).
    pub fn tap(&self, tap: Tap) {
        *self.shared.tap.lock().unwrap_or_else(|e| e.into_inner()) = Some(tap);
    }

    /// Passes the other end's end of stream on to the local peer only when `guard` says
    /// so; otherwise the relay stops as if the other end had aborted (the local connection
    /// is reset). A page server takes an end-of-file for a finished transfer: only the
    /// daemon's own goodbye makes one safe.
    pub fn guard_end(&self, guard: EndGuard) {
        *self.shared.end_ok.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
    }

    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle(self.shared.clone())
    }

    /// Carries the local connection through the tunnels that arrive on `tunnels` until
    /// both directions closed cleanly (`Ok`), no tunnel was up for `outage` (the local
    /// connection stays open), or an abort (the local connection is reset). May be called
    /// again after an outage; the streams resume where they stopped.
    pub async fn run<T>(
        &mut self,
        tunnels: &mut mpsc::Receiver<T>,
        outage: Duration,
    ) -> Result<RelayReport, RelayError>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let result = tokio::select! {
            never = local_side(&self.shared, &self.opener, &self.local, self.limits.buffer) => match never {},
            r = self.tunnel_side(tunnels, outage) => r,
        };
        if let Err(e) = &result
            && !matches!(e, RelayError::Outage { .. })
            && let Some(stream) = self.local.take()
        {
            reset(&stream);
        }
        result
    }

    /// Waits for tunnels and serves each until the relay ends.
    async fn tunnel_side<T>(
        &self,
        tunnels: &mut mpsc::Receiver<T>,
        outage: Duration,
    ) -> Result<RelayReport, RelayError>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let mut since = Instant::now();
        let mut last = "no tunnel yet".to_string();
        loop {
            if let Some(err) = self.stop_error() {
                return Err(err);
            }
            let next = tokio::select! {
                t = tunnels.recv() => t,
                _ = sleep_until(since + outage) => None,
                _ = self.shared.stopped.notified() => continue,
            };
            let Some(tunnel) = next else {
                let st = self.shared.lock();
                if st.complete() {
                    return Ok(RelayReport {
                        confirmed: false,
                        ..st.report.clone()
                    });
                }
                if tunnels.is_closed() && since.elapsed() < outage {
                    last = format!("{last}; no more tunnels will come");
                }
                return Err(RelayError::Outage {
                    after: since.elapsed(),
                    last,
                });
            };
            match self.serve(tunnel).await {
                TunnelEnd::Finished => {
                    return Ok(RelayReport {
                        confirmed: true,
                        ..self.shared.lock().report.clone()
                    });
                }
                TunnelEnd::Stopped => {}
                TunnelEnd::Lost { reason, greeted } => {
                    if greeted {
                        since = Instant::now();
                    }
                    last = reason;
                }
            }
        }
    }

    fn stop_error(&self) -> Option<RelayError> {
        Some(match self.shared.lock().stop.clone()? {
            Stop::Local(reason) => RelayError::Local {
                addr: self.opener.describe(),
                reason,
            },
            Stop::Aborted(r) => RelayError::Aborted(r),
            Stop::PeerAborted(r) => RelayError::PeerAborted(r),
            Stop::Protocol(r) => RelayError::Protocol(r),
        })
    }

    /// One tunnel: HELLO both ways, then frames both ways until it breaks or the relay ends.
    async fn serve<T>(&self, tunnel: T) -> TunnelEnd
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let (r, mut w) = tokio::io::split(tunnel);
        let mut r = BufReader::with_capacity(CHUNK + 64, r);
        if let Err(reason) = self.greet(&mut r, &mut w).await {
            return TunnelEnd::Lost {
                reason,
                greeted: false,
            };
        }
        // The reader is never dropped mid-frame: after the writer failed it goes on alone,
        // for what the other end sent before the tunnel broke may still wait to be read
        // (an ABORT among it).
        let reader = self.read_frames(&mut r);
        let grace = self.abort_grace();
        tokio::pin!(reader, grace);
        tokio::select! {
            end = &mut reader => end,
            _ = &mut grace => TunnelEnd::Stopped,
            end = self.write_frames(&mut w) => match end {
                TunnelEnd::Lost { .. } => match timeout(self.limits.silence, &mut reader).await {
                    Ok(last) if !matches!(last, TunnelEnd::Lost { .. }) => last,
                    _ => end,
                },
                end => end,
            },
        }
    }

    async fn greet<R, W>(&self, r: &mut R, w: &mut W) -> Result<(), String>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let received = self.shared.lock().in_pos();
        let hello = Frame::Hello {
            session: self.session,
            buffer: self.limits.buffer as u64,
            received,
        };
        write_frame(w, &hello).await?;
        let frame = match timeout(self.limits.silence, Frame::read(r)).await {
            Err(_) => return Err(format!("no HELLO within {:?}", self.limits.silence)),
            Ok(Err(e)) => return Err(format!("reading HELLO: {e}")),
            Ok(Ok(f)) => f,
        };
        let Frame::Hello {
            session,
            buffer,
            received,
        } = frame
        else {
            return Err(format!("expected HELLO, got {frame:?}"));
        };
        if session != self.session || buffer != self.limits.buffer as u64 {
            return Err(format!(
                "tunnel refused: session {session:#x} buffer {buffer}, expected {:#x} and {}",
                self.session, self.limits.buffer
            ));
        }
        let mut st = self.shared.lock();
        if received < st.acked || received > st.out_end() {
            drop(st);
            let why = format!(
                "HELLO says {received} received; acked {}",
                self.shared.lock().acked
            );
            self.shared.stop(Stop::Protocol(why.clone()));
            return Err(why);
        }
        st.next_send = received;
        st.ack_sent = None;
        st.bye_sent = false;
        st.report.tunnels += 1;
        drop(st);
        self.shared.work.notify_one();
        Ok(())
    }

    async fn read_frames<R: AsyncRead + Unpin>(&self, r: &mut R) -> TunnelEnd {
        loop {
            let frame = match timeout(self.limits.silence, Frame::read(r)).await {
                Err(_) => return lost(format!("tunnel silent for {:?}", self.limits.silence)),
                Ok(Err(e)) => return lost(format!("tunnel read: {e}")),
                Ok(Ok(f)) => f,
            };
            let (applied, peer_aborted, finished) = self.take(frame);
            if let Err(why) = applied {
                self.shared.stop(Stop::Protocol(why));
                return std::future::pending().await;
            }
            self.shared.wake_all();
            if peer_aborted {
                return TunnelEnd::Stopped;
            }
            if finished {
                return TunnelEnd::Finished;
            }
        }
    }

    /// Applies a frame; says whether the other end aborted and whether the relay is done.
    fn take(&self, frame: Frame) -> (Result<(), String>, bool, bool) {
        let mut st = self.shared.lock();
        let applied = st.apply(frame, self.limits.buffer);
        let peer_aborted = matches!(st.stop, Some(Stop::PeerAborted(_)));
        (applied, peer_aborted, st.bye_received && st.bye_sent)
    }

    async fn write_frames<W: AsyncWrite + Unpin>(&self, w: &mut W) -> TunnelEnd {
        let keepalive = self.limits.silence / 3;
        let mut force_ack = false;
        loop {
            let frame = self
                .shared
                .lock()
                .next_frame(std::mem::take(&mut force_ack));
            let Some(frame) = frame else {
                tokio::select! {
                    _ = self.shared.work.notified() => {}
                    _ = sleep(keepalive) => force_ack = true,
                }
                continue;
            };
            if let Err(reason) = write_frame(w, &frame).await {
                return lost(reason);
            }
            match frame {
                Frame::Abort(_) => {
                    // Closing the tunnel at once could lose the ABORT on its way (a socket
                    // closed with unread bytes is reset); the other end closes it instead.
                    let _ = w.shutdown().await;
                    sleep(ABORT_GRACE).await;
                    return TunnelEnd::Stopped;
                }
                Frame::Bye if self.shared.lock().bye_received => return TunnelEnd::Finished,
                _ => {}
            }
        }
    }

    /// Ends once a stop has been set here for `ABORT_GRACE`, for a writer stuck on a full tunnel.
    async fn abort_grace(&self) {
        loop {
            let stopped = self.shared.lock().stop.is_some();
            if stopped {
                sleep(ABORT_GRACE).await;
                return;
            }
            self.shared.stopped.notified().await;
        }
    }
}

impl Drop for RelayEnd {
    fn drop(&mut self) {
        let clean = self.shared.lock().complete();
        if !clean && let Some(stream) = self.local.get() {
            reset(stream);
        }
    }
}

fn lost(reason: String) -> TunnelEnd {
    TunnelEnd::Lost {
        reason,
        greeted: true,
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), String> {
    w.write_all(&frame.encode())
        .await
        .map_err(|e| format!("tunnel write: {e}"))?;
    w.flush().await.map_err(|e| format!("tunnel flush: {e}"))
}

/// Makes the close of `stream` a reset (RST): its peer sees an error, never end-of-file.
fn reset(stream: &TcpStream) {
    let sock = socket2::SockRef::from(stream);
    // Without linger 0 the close would be an orderly FIN; nothing else to do if it fails.
    let _ = sock.set_linger(Some(Duration::ZERO));
}

/// The local connection: opened once, then read and written until the relay ends. Never
/// returns; a failure is recorded as a stop.
async fn local_side(
    shared: &Shared,
    opener: &Opener,
    cell: &OnceCell<TcpStream>,
    buffer: usize,
) -> std::convert::Infallible {
    let failure = match cell.get_or_try_init(|| opener.open()).await {
        Err(e) => e,
        Ok(stream) => tokio::select! {
            Err(e) = read_local(shared, stream, buffer) => e,
            Err(e) = write_local(shared, stream) => e,
            else => io::Error::other("local side ended"),
        },
    };
    shared.stop(Stop::Local(failure.to_string()));
    std::future::pending().await
}

/// Local peer → `out`, while there is room. Returns `Ok` only after end-of-file.
async fn read_local(shared: &Shared, stream: &TcpStream, buffer: usize) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let (eof, room) = {
            let st = shared.lock();
            (st.local_eof, buffer.saturating_sub(st.out.len()).min(CHUNK))
        };
        if eof {
            return std::future::pending().await;
        }
        if room == 0 {
            shared.room.notified().await;
            continue;
        }
        stream.readable().await?;
        let n = match stream.try_read(&mut buf[..room]) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => other?,
        };
        let mut st = shared.lock();
        if n == 0 {
            st.local_eof = true;
        } else {
            st.out.extend(&buf[..n]);
            st.read_total += n as u64;
            st.report.sent = st.read_total;
            st.report.peak_unacked = st.report.peak_unacked.max(st.out.len());
        }
        drop(st);
        shared.work.notify_one();
    }
}

/// `inbox` → local peer; after the other end's FIN and the last byte, shuts down writing.
async fn write_local(shared: &Shared, stream: &TcpStream) -> io::Result<()> {
    let mut buf = Vec::with_capacity(CHUNK);
    loop {
        let (done, shut) = {
            let st = shared.lock();
            buf.clear();
            let (a, b) = st.inbox.as_slices();
            let front = if a.is_empty() { b } else { a };
            buf.extend_from_slice(&front[..front.len().min(CHUNK)]);
            (st.local_shut, buf.is_empty() && st.peer_fin)
        };
        if done {
            return std::future::pending().await;
        }
        if shut {
            let allowed = shared
                .end_ok
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_none_or(|ok| ok());
            if !allowed {
                shared.stop(Stop::PeerAborted(
                    "the other end closed before its transfer was complete".into(),
                ));
                return std::future::pending().await;
            }
            socket2::SockRef::from(stream).shutdown(Shutdown::Write)?;
            shared.lock().local_shut = true;
            shared.work.notify_one();
            continue;
        }
        if buf.is_empty() {
            shared.inbox.notified().await;
            continue;
        }
        stream.writable().await?;
        let n = match stream.try_write(&buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => other?,
        };
        if let Some(tap) = shared
            .tap
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            tap(&buf[..n]);
        }
        let mut st = shared.lock();
        st.inbox.drain(..n);
        st.delivered += n as u64;
        st.report.delivered = st.delivered;
        drop(st);
        shared.work.notify_one();
    }
}

/// `migrate relay-attach SOCKET`: one tunnel of a relay, run by the source over SSH on
/// the target. Its stdin and stdout are joined to the relay's target end, which listens
/// on the Unix socket `SOCKET` in the run folder (the receiver opens it when the manifest
/// arrives, so the attach waits for it a while).
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// The relay's socket in the run folder on this host.
    pub socket: std::path::PathBuf,
}

/// How long `relay-attach` waits for the receiver's socket to appear.
const ATTACH_WAIT: Duration = Duration::from_secs(60);

/// Runs `migrate relay-attach`; returns the exit code. Waits for the socket while the
/// source is there (what it sends meanwhile is kept and passed on); ends when the socket
/// refuses (the receiver is done with it), when the source goes, or when either direction
/// ends.
pub async fn attach(args: AttachArgs) -> u8 {
    let deadline = Instant::now() + ATTACH_WAIT;
    let mut stdin = tokio::io::stdin();
    let mut early = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    let stream = loop {
        match tokio::net::UnixStream::connect(&args.socket).await {
            Ok(s) => break s,
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                tokio::select! {
                    r = stdin.read(&mut buf), if early.len() < (4 << 20) => match r {
                        Ok(0) | Err(_) => return 0,
                        Ok(n) => early.extend_from_slice(&buf[..n]),
                    },
                    _ = sleep(Duration::from_millis(5)) => {}
                }
            }
            Err(e) => {
                eprintln!("migrate relay-attach: {}: {e}", args.socket.display());
                return 1;
            }
        }
    };
    // Either direction ending ends the tunnel: the relay ends resume on the next one.
    let (mut from, mut to) = stream.into_split();
    let mut stdout = tokio::io::stdout();
    let up = async {
        to.write_all(&early).await?;
        tokio::io::copy(&mut stdin, &mut to).await
    };
    let down = tokio::io::copy(&mut from, &mut stdout);
    let ended = tokio::select! {
        r = up => r,
        r = down => r,
    };
    match ended {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("migrate relay-attach: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;
    use tokio::task::JoinHandle;

    const SESSION: u64 = 0x5eed_7e1a_u64;

    /// Deterministic bytes that differ at every offset and between seeds.
    fn payload(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn limits(buffer: usize) -> Limits {
        Limits {
            buffer,
            silence: Duration::from_secs(2),
        }
    }

    /// The two ends, CRIU's page server's listener (source) and the port the target end
    /// listens on (for the lazy-pages daemon).
    async fn ends(buffer: usize) -> (RelayEnd, RelayEnd, TcpListener, u16) {
        let page_server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = page_server.local_addr().unwrap();
        let source = RelayEnd::source(at, SESSION, limits(buffer));
        let local = "127.0.0.1:0".parse().unwrap();
        let (port, target) = RelayEnd::target(local, SESSION, limits(buffer))
            .await
            .unwrap();
        (source, target, page_server, port)
    }

    /// Copies one way; after `budget` bytes it forwards part of a read and stops.
    async fn pump<R, W>(mut r: R, mut w: W, budget: Option<u64>)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut left = budget.unwrap_or(u64::MAX);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let m = (n as u64).min(left) as usize;
            if w.write_all(&buf[..m]).await.is_err() {
                return;
            }
            left -= m as u64;
            if left == 0 {
                return;
            }
        }
    }

    /// A tunnel through a middle that, after `budget` bytes in either direction, drops
    /// everything: frames are cut in half and whatever was in flight is lost.
    fn link(budget: Option<u64>) -> (DuplexStream, DuplexStream, JoinHandle<()>) {
        let (a, a_mid) = tokio::io::duplex(256 * 1024);
        let (b, b_mid) = tokio::io::duplex(256 * 1024);
        let task = tokio::spawn(async move {
            let (ar, aw) = tokio::io::split(a_mid);
            let (br, bw) = tokio::io::split(b_mid);
            tokio::select! {
                _ = pump(ar, bw, budget) => {}
                _ = pump(br, aw, budget) => {}
            }
        });
        (a, b, task)
    }

    type Tunnels = (mpsc::Sender<DuplexStream>, mpsc::Receiver<DuplexStream>);

    /// Gives both ends one tunnel per budget, each after the previous one broke and `gap`
    /// passed. Holds the senders until `hold` ends, so no end sees the supply close.
    fn supply(
        budgets: Vec<Option<u64>>,
        gap: Duration,
        hold: Duration,
    ) -> (mpsc::Receiver<DuplexStream>, mpsc::Receiver<DuplexStream>) {
        let (s_tx, s_rx): Tunnels = mpsc::channel(1);
        let (t_tx, t_rx): Tunnels = mpsc::channel(1);
        tokio::spawn(async move {
            for budget in budgets {
                sleep(gap).await;
                let (a, b, task) = link(budget);
                if s_tx.send(a).await.is_err() || t_tx.send(b).await.is_err() {
                    return;
                }
                let _ = task.await;
            }
            sleep(hold).await;
        });
        (s_rx, t_rx)
    }

    /// What a local peer saw: its read until end-of-file, and its write.
    #[derive(Debug)]
    struct Seen {
        read: Result<Vec<u8>, io::ErrorKind>,
        write: Result<(), io::ErrorKind>,
    }

    impl Seen {
        fn got(self) -> Vec<u8> {
            self.write.expect("write failed");
            self.read.expect("read failed")
        }
        /// Linux reports a reset once, to whichever call comes first; a later read on
        /// the reset connection returns 0.
        fn reset(&self) -> bool {
            self.read == Err(io::ErrorKind::ConnectionReset)
                || self.write == Err(io::ErrorKind::ConnectionReset)
        }
    }

    /// A local peer: writes `send` and closes its sending side while reading until
    /// end-of-file. With nothing to send it keeps its sending side open, like CRIU.
    async fn exchange(stream: TcpStream, send: Vec<u8>) -> Seen {
        let (mut r, mut w) = stream.into_split();
        let writer = tokio::spawn(async move {
            if send.is_empty() {
                return (w, Ok(()));
            }
            let wrote = w.write_all(&send).await;
            let wrote = match wrote {
                Ok(()) => w.shutdown().await,
                e => e,
            };
            (w, wrote.map_err(|e| e.kind()))
        });
        let mut got = Vec::new();
        let read = r.read_to_end(&mut got).await;
        let (_w, write) = writer.await.unwrap();
        Seen {
            read: read.map(|_| got).map_err(|e| e.kind()),
            write,
        }
    }

    fn local_peers(
        page_server: TcpListener,
        port: u16,
        to_target: Vec<u8>,
        to_source: Vec<u8>,
    ) -> (JoinHandle<Seen>, JoinHandle<Seen>) {
        let server = tokio::spawn(async move {
            let (s, _) = page_server.accept().await.unwrap();
            exchange(s, to_target).await
        });
        let daemon = tokio::spawn(async move {
            let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            exchange(s, to_source).await
        });
        (server, daemon)
    }

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_refused() {
        let frames = [
            Frame::Hello {
                session: 7,
                buffer: 1 << 26,
                received: 12,
            },
            Frame::Data {
                seq: 1 << 40,
                bytes: payload(3, CHUNK),
            },
            Frame::Ack(9),
            Frame::Fin(10),
            Frame::Abort("é".repeat(600)),
            Frame::Bye,
        ];
        for f in frames {
            let bytes = f.encode();
            let back = Frame::read(&mut &bytes[..]).await.unwrap();
            if let Frame::Abort(r) = &back {
                assert_eq!(r.len(), 1024, "reason cut at a char boundary");
            } else {
                assert_eq!(back, f);
            }
        }
        let mut too_long = Frame::Data {
            seq: 0,
            bytes: vec![1],
        }
        .encode();
        too_long[9..13].copy_from_slice(&((CHUNK as u32) + 1).to_be_bytes());
        assert!(Frame::read(&mut &too_long[..]).await.is_err());
        let mut wrong_version = Frame::Hello {
            session: 1,
            buffer: 1,
            received: 0,
        }
        .encode();
        wrong_version[5] = 2;
        assert!(Frame::read(&mut &wrong_version[..]).await.is_err());
        assert!(Frame::read(&mut &[9u8][..]).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_payloads_cross_both_ways_at_once() {
        let (mut source, mut target, page_server, port) = ends(4 << 20).await;
        let (down, up) = (payload(1, 24 << 20), payload(2, 24 << 20));
        let (server, daemon) = local_peers(page_server, port, down.clone(), up.clone());
        let (mut s_rx, mut t_rx) = supply(vec![None], Duration::ZERO, Duration::from_secs(30));
        let outage = Duration::from_secs(5);
        let started = Instant::now();
        let (s, t) = tokio::join!(source.run(&mut s_rx, outage), target.run(&mut t_rx, outage));
        let (s, t) = (s.unwrap(), t.unwrap());
        eprintln!("24 MiB each way in {:?}: {s:?} {t:?}", started.elapsed());
        assert!(
            server.await.unwrap().got() == up,
            "page server got the daemon's bytes"
        );
        assert!(
            daemon.await.unwrap().got() == down,
            "daemon got the page server's bytes"
        );
        assert_eq!((s.sent, s.delivered, s.tunnels), (24 << 20, 24 << 20, 1));
        assert!(s.confirmed && t.confirmed);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cuts_mid_stream_lose_and_repeat_nothing() {
        let (mut source, mut target, page_server, port) = ends(2 << 20).await;
        let (down, up) = (payload(3, 12 << 20), payload(4, 9 << 20));
        let (server, daemon) = local_peers(page_server, port, down.clone(), up.clone());
        let mut budgets: Vec<Option<u64>> = (0..6u64)
            .map(|i| Some(300_001 + i * 211_007 % 1_200_000))
            .collect();
        budgets.push(None);
        let (mut s_rx, mut t_rx) = supply(budgets, Duration::from_millis(30), Duration::ZERO);
        let outage = Duration::from_secs(5);
        let (s, t) = tokio::join!(source.run(&mut s_rx, outage), target.run(&mut t_rx, outage));
        let (s, t) = (s.unwrap(), t.unwrap());
        eprintln!("after 6 cuts: {s:?} {t:?}");
        assert!(
            server.await.unwrap().got() == up,
            "page server's stream changed"
        );
        assert!(
            daemon.await.unwrap().got() == down,
            "daemon's stream changed"
        );
        assert_eq!((s.tunnels, t.tunnels), (7, 7));
        assert!(
            s.resent + t.resent > 0,
            "the cuts lost nothing in flight: a weak test"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outage_over_the_limit_keeps_then_resets_the_local_peers() {
        let (mut source, mut target, page_server, port) = ends(1 << 20).await;
        let (server, daemon) = local_peers(page_server, port, payload(5, 8 << 20), vec![]);
        let (mut s_rx, mut t_rx) =
            supply(vec![Some(700_000)], Duration::ZERO, Duration::from_secs(30));
        let outage = Duration::from_millis(400);
        let (s, t) = tokio::join!(source.run(&mut s_rx, outage), target.run(&mut t_rx, outage));
        for r in [s, t] {
            match r {
                Err(RelayError::Outage { after, .. }) => assert!(after >= outage),
                other => panic!("expected an outage, got {other:?}"),
            }
        }
        // The daemon only reads, so its relay end holds no unread bytes: only SO_LINGER 0
        // makes the close a reset there.
        sleep(Duration::from_millis(200)).await;
        assert!(
            !server.is_finished() && !daemon.is_finished(),
            "a local peer saw its connection end during the outage"
        );
        drop(source);
        drop(target);
        let (server, daemon) = (server.await.unwrap(), daemon.await.unwrap());
        assert!(
            server.reset(),
            "page server: {:?}",
            (server.read.map(|b| b.len()), server.write)
        );
        assert!(
            daemon.reset(),
            "daemon: {:?}",
            (daemon.read.map(|b| b.len()), daemon.write)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_again_after_an_outage_and_loses_nothing() {
        let (mut source, mut target, page_server, port) = ends(1 << 20).await;
        let (down, up) = (payload(7, 6 << 20), payload(8, 6 << 20));
        let (server, daemon) = local_peers(page_server, port, down.clone(), up.clone());
        let hold = Duration::from_secs(30);
        let (mut s_rx, mut t_rx) = supply(vec![Some(900_000)], Duration::ZERO, hold);
        let short = Duration::from_millis(300);
        let (s, t) = tokio::join!(source.run(&mut s_rx, short), target.run(&mut t_rx, short));
        assert!(matches!(s, Err(RelayError::Outage { .. })), "{s:?}");
        assert!(matches!(t, Err(RelayError::Outage { .. })), "{t:?}");
        let (mut s_rx, mut t_rx) = supply(vec![None], Duration::ZERO, hold);
        let long = Duration::from_secs(5);
        let (s, t) = tokio::join!(source.run(&mut s_rx, long), target.run(&mut t_rx, long));
        let (s, t) = (s.unwrap(), t.unwrap());
        assert!(server.await.unwrap().got() == up);
        assert!(daemon.await.unwrap().got() == down);
        assert_eq!((s.tunnels, t.tunnels), (2, 2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clean_end_reaches_the_other_side_only_after_every_byte() {
        let (mut source, mut target, page_server, port) = ends(1 << 20).await;
        let sent = payload(9, 5 << 20);
        let wrote = sent.clone();
        // The page server writes everything and closes at once, long before any tunnel.
        let server = tokio::spawn(async move {
            let (mut s, _) = page_server.accept().await.unwrap();
            s.write_all(&wrote).await.unwrap();
            s.shutdown().await.unwrap();
            let mut reply = Vec::new();
            s.read_to_end(&mut reply).await.map(|_| reply)
        });
        let daemon = tokio::spawn(async move {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(b"done").await.unwrap();
            s.shutdown().await.unwrap();
            got
        });
        let budgets = vec![Some(2_000_003), None];
        let (mut s_rx, mut t_rx) = supply(budgets, Duration::from_millis(300), Duration::ZERO);
        let outage = Duration::from_secs(5);
        let (s, t) = tokio::join!(source.run(&mut s_rx, outage), target.run(&mut t_rx, outage));
        let (s, t) = (s.unwrap(), t.unwrap());
        assert!(
            daemon.await.unwrap() == sent,
            "the daemon's end-of-file came early"
        );
        assert_eq!(server.await.unwrap().unwrap(), b"done");
        assert!(s.confirmed && t.confirmed, "{s:?} {t:?}");
        assert_eq!(
            (s.sent, t.delivered, t.sent, s.delivered),
            (5 << 20, 5 << 20, 4, 4)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abort_resets_both_local_peers() {
        let (mut source, mut target, page_server, port) = ends(1 << 20).await;
        let (server, daemon) = local_peers(
            page_server,
            port,
            payload(10, 32 << 20),
            payload(12, 32 << 20),
        );
        let (mut s_rx, mut t_rx) = supply(vec![None], Duration::ZERO, Duration::from_secs(30));
        let handle = source.abort_handle();
        tokio::spawn(async move {
            sleep(Duration::from_millis(200)).await;
            handle.abort("the target was killed");
        });
        let outage = Duration::from_secs(5);
        let (s, t) = tokio::join!(source.run(&mut s_rx, outage), target.run(&mut t_rx, outage));
        assert_eq!(s, Err(RelayError::Aborted("the target was killed".into())));
        assert_eq!(
            t,
            Err(RelayError::PeerAborted("the target was killed".into()))
        );
        let (server, daemon) = (server.await.unwrap(), daemon.await.unwrap());
        assert!(
            server.reset(),
            "page server: {:?}",
            (server.read.map(|b| b.len()), server.write)
        );
        assert!(
            daemon.reset(),
            "daemon: {:?}",
            (daemon.read.map(|b| b.len()), daemon.write)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_local_reader_holds_the_writer_back() {
        let buffer = 1 << 20;
        let (mut source, mut target, page_server, port) = ends(buffer).await;
        let sent = payload(11, 48 << 20);
        let (accepted_tx, accepted) = tokio::sync::watch::channel(0usize);
        let wrote = sent.clone();
        let server = tokio::spawn(async move {
            let (mut s, _) = page_server.accept().await.unwrap();
            for chunk in wrote.chunks(CHUNK) {
                s.write_all(chunk).await.unwrap();
                accepted_tx.send_modify(|n| *n += chunk.len());
            }
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
        });
        let daemon = tokio::spawn(async move {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_recv_buffer_size(64 * 1024).unwrap();
            let s = tokio::net::TcpSocket::from_std_stream(s.into());
            let mut s = s.connect(([127, 0, 0, 1], port).into()).await.unwrap();
            sleep(Duration::from_millis(1500)).await;
            let held = *accepted.borrow();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.shutdown().await.unwrap();
            (held, got)
        });
        let (mut s_rx, mut t_rx) = supply(vec![None], Duration::ZERO, Duration::ZERO);
        let outage = Duration::from_secs(5);
        let (s, t) = tokio::join!(source.run(&mut s_rx, outage), target.run(&mut t_rx, outage));
        let (s, t) = (s.unwrap(), t.unwrap());
        server.await.unwrap();
        let (held, got) = daemon.await.unwrap();
        eprintln!("writer got {held} bytes out while the reader slept; {s:?} {t:?}");
        assert!(got == sent);
        assert!(
            s.peak_unacked <= buffer && t.peak_undelivered <= buffer,
            "{s:?} {t:?}"
        );
        assert!(
            held < sent.len() / 2,
            "the writer was not held back: {held} bytes"
        );
    }
}
