//! The archive stream on the wire: a series of zstd frames, one per chunk podman wrote.
//! A chunk of zero-filled pages (most of CRIU's pages for a database's buffer pool) goes as
//! RLE blocks, one that compresses (text) as a zstd-1 frame, one that does not (random or
//! already compressed memory) as a frame of raw blocks: neither of those two spends a
//! compression pass on it. Any zstd decoder reads the result
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

/// Appends `chunk` to `out` as one zstd frame. A chunk made only of runs of one byte
/// value per block (CRIU's zero-filled pages) goes as RLE blocks, with no compression
/// pass; else one compressed at level 1 when a sample of it shrinks by a tenth or more;
/// else stored (raw blocks, RLE where a block is uniform).
pub fn encode_chunk(chunk: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let mixed = chunk.chunks(MAX_BLOCK).find(|b| uniform(b).is_none());
    let Some(mixed) = mixed else {
        stored_frame(chunk, out);
        return Ok(());
    };
    let sample = &mixed[..mixed.len().min(SAMPLE)];
    let squeezed = zstd::bulk::compress(sample, 1)?;
    if squeezed.len() * 10 < sample.len() * 9 {
        out.extend_from_slice(&zstd::bulk::compress(chunk, 1)?);
    } else {
        stored_frame(chunk, out);
    }
    Ok(())
}

/// The byte a block is made of, when it is made of one byte value only.
fn uniform(block: &[u8]) -> Option<u8> {
    let first = *block.first()?;
    // OR-folding 4 KiB at a time vectorises; a mixed block usually shows in its first page.
    block
        .chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | (x ^ first)) == 0)
        .then_some(first)
}

/// A single-segment zstd frame of uncompressed blocks holding `data` (RFC 8878, section
/// 3.1.1): an RLE block where a block is one byte value repeated, a raw block elsewhere.
fn stored_frame(data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    // Frame_Content_Size_flag 3 (8-byte size), Single_Segment_flag: no window descriptor,
    // no checksum, no dictionary.
    out.push(0b1110_0000);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    let mut blocks = data.chunks(MAX_BLOCK).peekable();
    if blocks.peek().is_none() {
        // An empty frame still needs its one (last) block.
        out.extend_from_slice(&block_header(true, BlockType::Raw, 0));
    }
    while let Some(b) = blocks.next() {
        let last = blocks.peek().is_none();
        match uniform(b) {
            Some(byte) => {
                out.extend_from_slice(&block_header(last, BlockType::Rle, b.len()));
                out.push(byte);
            }
            None => {
                out.extend_from_slice(&block_header(last, BlockType::Raw, b.len()));
                out.extend_from_slice(b);
            }
        }
    }
}

#[derive(Clone, Copy)]
enum BlockType {
    Raw = 0,
    Rle = 1,
}

/// Block_Header: Last_Block, Block_Type, Block_Size (for RLE: the bytes it stands for).
fn block_header(last: bool, kind: BlockType, size: usize) -> [u8; 3] {
    let v = u32::from(last) | ((kind as u32) << 1) | ((size as u32) << 3);
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
    fn an_empty_stored_frame_is_valid() {
        let mut wire = Vec::new();
        stored_frame(&[], &mut wire);
        assert!(zstd::stream::decode_all(&wire[..]).unwrap().is_empty());
    }

    #[test]
    fn uniform_blocks_go_as_rle_and_mixed_ones_raw() {
        // Zeros, a block of 0xAB, random bytes, a short uniform tail: no compression pass,
        // one RLE block per uniform block.
        let random = pseudo_random(MAX_BLOCK, 11);
        let chunk: Vec<u8> = [
            vec![0u8; 2 * MAX_BLOCK],
            vec![0xAB; MAX_BLOCK],
            random.clone(),
            vec![0u8; 5000],
        ]
        .concat();
        let mut wire = Vec::new();
        encode_chunk(&chunk, &mut wire).unwrap();
        assert_eq!(zstd::stream::decode_all(&wire[..]).unwrap(), chunk);
        // Magic, descriptor, size; 4 RLE blocks of 3+1 bytes; one raw block.
        assert_eq!(wire.len(), 4 + 1 + 8 + 4 * 4 + 3 + MAX_BLOCK);
        // A chunk of zeros only is a handful of RLE blocks.
        let mut z = Vec::new();
        encode_chunk(&vec![0u8; 1 << 20], &mut z).unwrap();
        assert_eq!(z.len(), 4 + 1 + 8 + 8 * 4);
        assert_eq!(
            zstd::stream::decode_all(&z[..]).unwrap(),
            vec![0u8; 1 << 20]
        );
        assert_eq!(uniform(&[]), None);
        assert_eq!(uniform(&[7, 7, 7]), Some(7));
        assert_eq!(uniform(&[7, 7, 8]), None);
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
