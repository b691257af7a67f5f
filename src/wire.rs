//! The archive stream on the wire: a series of zstd frames, one per chunk podman wrote.
//! A chunk that compresses (CRIU's zero-filled pages, text) goes as a zstd-1 frame; one
//! that does not (random or already compressed memory) goes as a frame of raw blocks,
//! without spending a compression pass on it. Any zstd decoder reads the result
//! (`migrate sink --zstd` or `zstd -d`): concatenated frames are one valid stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::AsyncWrite;

/// Bytes of each chunk compressed to decide whether the chunk is worth compressing.
const SAMPLE: usize = 64 << 10;
/// zstd's largest block.
const MAX_BLOCK: usize = 128 << 10;
const MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();

/// Appends `chunk` to `out` as one zstd frame: compressed at level 1 when a sample of it
/// shrinks by a tenth or more, else stored raw.
pub fn encode_chunk(chunk: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let sample = &chunk[..chunk.len().min(SAMPLE)];
    let squeezed = zstd::bulk::compress(sample, 1)?;
    if squeezed.len() * 10 < sample.len() * 9 {
        out.extend_from_slice(&zstd::bulk::compress(chunk, 1)?);
    } else {
        raw_frame(chunk, out);
    }
    Ok(())
}

/// A single-segment zstd frame of raw blocks holding `data` (RFC 8878, section 3.1.1).
fn raw_frame(data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    // Frame_Content_Size_flag 3 (8-byte size), Single_Segment_flag: no window descriptor,
    // no checksum, no dictionary.
    out.push(0b1110_0000);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    let mut blocks = data.chunks(MAX_BLOCK).peekable();
    if blocks.peek().is_none() {
        // An empty frame still needs its one (last) block.
        out.extend_from_slice(&block_header(true, 0));
    }
    while let Some(b) = blocks.next() {
        out.extend_from_slice(&block_header(blocks.peek().is_none(), b.len()));
        out.extend_from_slice(b);
    }
}

/// Block_Header of a raw block: Last_Block, Block_Type 0 (raw), Block_Size.
fn block_header(last: bool, size: usize) -> [u8; 3] {
    let v = u32::from(last) | ((size as u32) << 3);
    let b = v.to_le_bytes();
    [b[0], b[1], b[2]]
}

/// An [`AsyncWrite`] that frames every write as [`encode_chunk`] does, so each chunk
/// written by the caller becomes one frame.
pub struct FramedZstd<W> {
    inner: W,
    pending: Vec<u8>,
    sent: usize,
}

impl<W> FramedZstd<W> {
    pub fn new(inner: W) -> Self {
        FramedZstd {
            inner,
            pending: Vec::new(),
            sent: 0,
        }
    }
}

impl<W: AsyncWrite + Unpin> FramedZstd<W> {
    /// Writes out what is encoded and not yet sent.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for FramedZstd<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_drain(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // The whole buffer becomes one frame, taken at once and sent on later polls.
        let mut frame = std::mem::take(&mut self.pending);
        encode_chunk(buf, &mut frame)?;
        self.pending = frame;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn raw_and_compressed_frames_decode_to_the_input() {
        let random = pseudo_random(300_000, 7);
        let zeros = vec![0u8; 1 << 20];
        let small = b"tar header".to_vec();
        let mut wire = Vec::new();
        for c in [&random, &zeros, &small, &random[..MAX_BLOCK]] {
            encode_chunk(c, &mut wire).unwrap();
        }
        let plain: Vec<u8> = [&random[..], &zeros, &small, &random[..MAX_BLOCK]].concat();
        assert_eq!(zstd::stream::decode_all(&wire[..]).unwrap(), plain);
        // Random bytes travel raw (a few bytes of framing), zeros compressed.
        let mut r = Vec::new();
        encode_chunk(&random, &mut r).unwrap();
        assert!(
            r.len() > random.len() && r.len() < random.len() + 64,
            "{}",
            r.len()
        );
        let mut z = Vec::new();
        encode_chunk(&zeros, &mut z).unwrap();
        assert!(z.len() < 1024, "{}", z.len());
    }

    #[test]
    fn an_empty_raw_frame_is_valid() {
        let mut wire = Vec::new();
        raw_frame(&[], &mut wire);
        assert!(zstd::stream::decode_all(&wire[..]).unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_writer_frames_each_write() {
        use tokio::io::AsyncWriteExt;
        let (w, mut r) = tokio::io::duplex(1 << 10);
        let data = [pseudo_random(200_000, 3), vec![0u8; 500_000]];
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut r, &mut all)
                .await
                .unwrap();
            all
        });
        let mut f = FramedZstd::new(w);
        for d in &data {
            f.write_all(d).await.unwrap();
        }
        f.shutdown().await.unwrap();
        drop(f);
        let wire = reader.await.unwrap();
        assert_eq!(zstd::stream::decode_all(&wire[..]).unwrap(), data.concat());
    }
}
