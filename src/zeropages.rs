//! Leaves CRIU's zero-filled private anonymous pages out of a checkpoint archive while the
//! sink writes it on the target.
//!
//! A database's buffer pool is mostly pages its process wrote zeros into: CRIU dumps them
//! like any other page (MariaDB with 10 000 rows: 56 of its 78 MiB). On the wire they cost
//! nothing (RLE blocks), but on the target podman unpacks every byte of the archive and
//! CRIU copies every page back into memory, both while the service is down. A private
//! anonymous page that is not in the images is mapped fresh by CRIU's restore, and a fresh
//! anonymous page reads as zeros: leaving such a page out restores the same memory.
//!
//! The archive is podman's plain tar. Entries stream through unchanged except:
//! - `checkpoint/mm-N.img` (the process's memory areas) is read on the way;
//! - `checkpoint/pagemap-N.img` (which pages `pages-K.img` holds) is held back;
//! - `checkpoint/pages-K.img` is written without its all-zero pages that lie in private
//!   anonymous areas, and the held pagemap follows it, rewritten to list the pages kept.
//!
//! Only when it is certainly safe: exactly one process with memory in the dump (a child's
//! private areas may be inherited copy-on-write from its parent at restore, and there a
//! page left out would show the parent's content), page entries that are plainly present
//! (no pre-dump parent images), and images that parse. Anything else goes through as it
//! came. tar orders a folder's entries by name, so every `pagemap-*` comes before every
//! `pages-*` and `mm-*` before both.

use std::io::{self, Seek, SeekFrom, Write};

const BLOCK: usize = 512;
const PAGE: usize = 4096;

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const MM_MAGIC: u32 = 0x5749_2820;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;

/// pagemap_entry flags (CRIU's `PE_*`).
const PE_LAZY: u32 = 1 << 1;
const PE_PRESENT: u32 = 1 << 2;

/// vma_entry status bits (CRIU's `VMA_*`): an area qualifies when it is a regular private
/// anonymous one (stack and heap included) and nothing else.
const VMA_AREA_REGULAR: u32 = 1 << 0;
const VMA_ANON_PRIVATE: u32 = 1 << 9;
const VMA_ALLOWED: u32 = VMA_AREA_REGULAR | (1 << 1) | (1 << 4) | (1 << 5) | VMA_ANON_PRIVATE;

/// What the filter left out, and the size of what it wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Pages left out.
    pub pages: u64,
    /// Bytes written to `out`.
    pub written: u64,
}

impl Summary {
    /// Bytes left out.
    pub fn dropped_bytes(self) -> u64 {
        self.pages * PAGE as u64
    }
}

/// A `Write` that takes a checkpoint archive and writes it to `out` without the zero pages
/// it may leave out (or, not `enabled`, as it comes). `out` must be seekable: the size of the rewritten pages entry is only
/// known once it is written, and its header is patched then.
pub struct ZeroPages<W: Write + Seek> {
    out: W,
    state: State,
    header: Vec<u8>,
    /// Memory areas by process id, from `mm-N.img`.
    areas: Vec<(String, Vec<Area>)>,
    /// Held back `pagemap-N.img` entries: (process id, header, data).
    held: Vec<(String, [u8; BLOCK], Vec<u8>)>,
    /// A `pages-*` entry went through unchanged (held pagemaps are out).
    released: bool,
    /// A memory image went through without being read (too big): with it, this dump may
    /// hold more than one process, and no page is left out.
    unread: bool,
    dropped: Summary,
}

enum State {
    Header,
    Copy {
        left: u64,
    },
    Capture {
        kind: Capture,
        /// The process id the image is named after.
        pid: String,
        hdr: Box<[u8; BLOCK]>,
        data: Vec<u8>,
        size: u64,
        left: u64,
    },
    Pages(Box<PagesFilter>),
    Skip {
        left: u64,
    },
    /// After the end-of-archive block: everything as it comes.
    Trailer,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Capture {
    Mm,
    Pagemap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Area {
    start: u64,
    end: u64,
    droppable: bool,
}

/// One page entry of a pagemap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PageRun {
    vaddr: u64,
    pages: u64,
    flags: u32,
}

struct PagesFilter {
    hdr: [u8; BLOCK],
    /// Where the entry's header went in `out`.
    at: u64,
    pagemap_hdr: [u8; BLOCK],
    /// The pagemap's bytes before its first page entry (magics and head).
    pagemap_head: Vec<u8>,
    runs: Vec<PageRun>,
    areas: Vec<Area>,
    /// Position in `runs` and in the current run.
    run: usize,
    page_in_run: u64,
    page: Vec<u8>,
    /// Bytes of the entry's data still to come, then its padding.
    left: u64,
    pad: u64,
    kept_pages: u64,
    /// The kept runs, each with the index of the entry it came from: a run never spans
    /// two of CRIU's entries.
    kept: Vec<(usize, PageRun)>,
}

impl<W: Write + Seek> ZeroPages<W> {
    pub fn new(out: W, enabled: bool) -> Self {
        ZeroPages {
            out,
            state: if enabled {
                State::Header
            } else {
                State::Trailer
            },
            header: Vec::with_capacity(BLOCK),
            areas: Vec::new(),
            held: Vec::new(),
            released: false,
            unread: false,
            dropped: Summary::default(),
        }
    }

    /// Ends the archive: anything still held goes out (a stream cut short stays cut short;
    /// the caller knows from its reader). Returns the writer and what was left out.
    pub fn finish(mut self) -> io::Result<(W, Summary)> {
        self.release()?;
        if !self.header.is_empty() {
            let h = std::mem::take(&mut self.header);
            self.out.write_all(&h)?;
        }
        self.out.flush()?;
        self.dropped.written = self.out.stream_position()?;
        Ok((self.out, self.dropped))
    }

    fn release(&mut self) -> io::Result<()> {
        for (_, hdr, data) in std::mem::take(&mut self.held) {
            self.out.write_all(&hdr)?;
            write_padded(&mut self.out, &data)?;
        }
        Ok(())
    }

    /// A complete header block arrived.
    fn on_header(&mut self) -> io::Result<()> {
        let hdr: [u8; BLOCK] = self.header[..].try_into().expect("one block");
        self.header.clear();
        if hdr.iter().all(|&b| b == 0) {
            self.release()?;
            self.out.write_all(&hdr)?;
            self.state = State::Trailer;
            return Ok(());
        }
        // Extended headers (PAX, GNU long names) may override a size or a name this filter
        // reads from the plain header: from there on, everything goes as it came.
        let extended = matches!(hdr[156], b'x' | b'g' | b'L' | b'K' | b'X' | b'N' | b'S');
        let Some(entry) = Entry::parse(&hdr).filter(|_| !extended) else {
            // Not a header this filter understands: stop interpreting.
            self.release()?;
            self.out.write_all(&hdr)?;
            self.state = State::Trailer;
            return Ok(());
        };
        let padded = entry.size.div_ceil(BLOCK as u64) * BLOCK as u64;
        let image = entry
            .regular
            .then(|| entry.name.strip_prefix("checkpoint/"))
            .flatten()
            .and_then(|n| n.strip_suffix(".img"));
        let numbered = |prefix: &str| {
            image
                .and_then(|n| n.strip_prefix(prefix))
                .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
                .map(str::to_owned)
        };
        // Images of the memory are a few KiB; a huge one is not what this expects.
        let small = entry.size <= 16 << 20;
        let capture = match (numbered("mm-"), numbered("pagemap-")) {
            (Some(pid), _) if small => Some((Capture::Mm, pid)),
            (_, Some(pid)) if small && !self.released => Some((Capture::Pagemap, pid)),
            _ => None,
        };
        if let Some((kind, pid)) = capture {
            self.state = State::Capture {
                kind,
                pid,
                hdr: Box::new(hdr),
                data: Vec::with_capacity(entry.size as usize),
                size: entry.size,
                left: padded,
            };
        } else if numbered("mm-").is_some() || numbered("pagemap-").is_some() {
            self.unread = true;
            self.out.write_all(&hdr)?;
            self.state = State::Copy { left: padded };
        } else if let Some(id) = numbered("pages-") {
            match self.plan_pages(&id, &hdr, entry.size)? {
                Some(f) => self.state = State::Pages(Box::new(f)),
                None => {
                    self.release()?;
                    self.released = true;
                    self.out.write_all(&hdr)?;
                    self.state = State::Copy { left: padded };
                }
            }
        } else {
            self.out.write_all(&hdr)?;
            self.state = State::Copy { left: padded };
        }
        Ok(())
    }

    /// The filter for `pages-ID.img` when it is safe to leave pages out of it.
    fn plan_pages(
        &mut self,
        id: &str,
        hdr: &[u8; BLOCK],
        size: u64,
    ) -> io::Result<Option<PagesFilter>> {
        // The header's size field must be able to hold the new size (octal, under 8 GiB).
        let octal_size = hdr[124] & 0x80 == 0 && size < 1 << 33;
        if self.released || self.unread || !octal_size {
            return Ok(None);
        }
        if self.held.len() != 1 || self.areas.len() != 1 {
            return Ok(None);
        }
        let (pid, pagemap_hdr, pagemap) = &self.held[0];
        let Some(map) = parse_pagemap(pagemap) else {
            return Ok(None);
        };
        let (mm_pid, areas) = &self.areas[0];
        if map.pages_id.to_string() != id || mm_pid != pid || !areas.iter().any(|a| a.droppable) {
            return Ok(None);
        }
        let total = map
            .runs
            .iter()
            .try_fold(0u64, |acc, r| acc.checked_add(r.pages));
        // Plainly present pages, and runs whose addresses stay in range.
        let plain = map.runs.iter().all(|r| {
            r.flags & !PE_LAZY == PE_PRESENT
                && r.pages > 0
                && r.pages
                    .checked_mul(PAGE as u64)
                    .and_then(|b| r.vaddr.checked_add(b))
                    .is_some()
        });
        let total = total.filter(|&t| t > 0);
        if !plain || total.and_then(|t| t.checked_mul(PAGE as u64)) != Some(size) {
            return Ok(None);
        }
        let at = self.out.stream_position()?;
        // Placeholder; the real header is written once the kept size is known.
        self.out.write_all(&[0u8; BLOCK])?;
        let pagemap_hdr = *pagemap_hdr;
        let head = pagemap[..map.head_len].to_vec();
        self.held.clear();
        Ok(Some(PagesFilter {
            hdr: *hdr,
            at,
            pagemap_hdr,
            pagemap_head: head,
            runs: map.runs,
            areas: areas.clone(),
            run: 0,
            page_in_run: 0,
            page: Vec::with_capacity(PAGE),
            left: size,
            pad: size.div_ceil(BLOCK as u64) * BLOCK as u64 - size,
            kept_pages: 0,
            kept: Vec::new(),
        }))
    }

    fn captured(
        &mut self,
        kind: Capture,
        pid: String,
        hdr: [u8; BLOCK],
        data: Vec<u8>,
    ) -> io::Result<()> {
        match kind {
            Capture::Mm => {
                match parse_mm(&data) {
                    Some(areas) => self.areas.push((pid, areas)),
                    // An mm image this does not read: no page of that dump is left out.
                    None => self.areas.push((pid, Vec::new())),
                }
                self.out.write_all(&hdr)?;
                write_padded(&mut self.out, &data)?;
            }
            Capture::Pagemap => self.held.push((pid, hdr, data)),
        }
        Ok(())
    }
}

impl PagesFilter {
    /// Takes one whole page of the entry.
    fn page<W: Write>(&mut self, out: &mut W, dropped: &mut Summary) -> io::Result<()> {
        let r = self.runs[self.run];
        let addr = r.vaddr + self.page_in_run * PAGE as u64;
        let drop = is_zero(&self.page) && droppable(&self.areas, addr);
        if drop {
            dropped.pages += 1;
        } else {
            out.write_all(&self.page)?;
            self.kept_pages += 1;
            match self.kept.last_mut() {
                Some((from, k)) if *from == self.run && k.vaddr + k.pages * PAGE as u64 == addr => {
                    k.pages += 1
                }
                _ => self.kept.push((
                    self.run,
                    PageRun {
                        vaddr: addr,
                        pages: 1,
                        flags: r.flags,
                    },
                )),
            }
        }
        self.page.clear();
        self.page_in_run += 1;
        if self.page_in_run == r.pages {
            self.run += 1;
            self.page_in_run = 0;
        }
        Ok(())
    }

    /// The entry's data is all in: pad it, patch its header, append the new pagemap.
    fn close<W: Write + Seek>(self, out: &mut W) -> io::Result<()> {
        let size = self.kept_pages * PAGE as u64;
        // Pages are whole blocks: no padding needed.
        let end = out.stream_position()?;
        let mut hdr = self.hdr;
        set_size(&mut hdr, size);
        out.seek(SeekFrom::Start(self.at))?;
        out.write_all(&hdr)?;
        out.seek(SeekFrom::Start(end))?;
        let mut map = self.pagemap_head;
        for (_, k) in &self.kept {
            push_entry(&mut map, &encode_run(k));
        }
        let mut mhdr = self.pagemap_hdr;
        set_size(&mut mhdr, map.len() as u64);
        out.write_all(&mhdr)?;
        write_padded(out, &map)
    }
}

impl<W: Write + Seek> Write for ZeroPages<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            match &mut self.state {
                State::Trailer => {
                    self.out.write_all(rest)?;
                    rest = &[];
                }
                State::Header => {
                    let n = (BLOCK - self.header.len()).min(rest.len());
                    self.header.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    if self.header.len() == BLOCK {
                        self.on_header()?;
                    }
                }
                State::Copy { left } => {
                    let n = (*left).min(rest.len() as u64) as usize;
                    self.out.write_all(&rest[..n])?;
                    *left -= n as u64;
                    rest = &rest[n..];
                    if *left == 0 {
                        self.state = State::Header;
                    }
                }
                State::Skip { left } => {
                    let n = (*left).min(rest.len() as u64) as usize;
                    *left -= n as u64;
                    rest = &rest[n..];
                    if *left == 0 {
                        self.state = State::Header;
                    }
                }
                State::Capture {
                    data, size, left, ..
                } => {
                    let n = (*left).min(rest.len() as u64) as usize;
                    let want = (*size - data.len() as u64).min(n as u64) as usize;
                    data.extend_from_slice(&rest[..want]);
                    *left -= n as u64;
                    rest = &rest[n..];
                    if *left == 0 {
                        let State::Capture {
                            kind,
                            pid,
                            hdr,
                            data,
                            ..
                        } = std::mem::replace(&mut self.state, State::Header)
                        else {
                            unreachable!()
                        };
                        self.captured(kind, pid, *hdr, data)?;
                    }
                }
                State::Pages(f) => {
                    if f.left > 0 {
                        let n = (PAGE - f.page.len()).min(rest.len());
                        f.page.extend_from_slice(&rest[..n]);
                        f.left -= n as u64;
                        rest = &rest[n..];
                        if f.page.len() == PAGE {
                            f.page(&mut self.out, &mut self.dropped)?;
                        }
                    }
                    if f.left == 0 {
                        let State::Pages(f) = std::mem::replace(&mut self.state, State::Header)
                        else {
                            unreachable!()
                        };
                        if f.pad > 0 {
                            self.state = State::Skip { left: f.pad };
                        }
                        f.close(&mut self.out)?;
                    }
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn write_padded<W: Write>(out: &mut W, data: &[u8]) -> io::Result<()> {
    out.write_all(data)?;
    let pad = data.len().div_ceil(BLOCK) * BLOCK - data.len();
    out.write_all(&[0u8; BLOCK][..pad])
}

fn is_zero(page: &[u8]) -> bool {
    // OR-folding vectorises.
    page.iter().fold(0u8, |acc, &b| acc | b) == 0
}

fn droppable(areas: &[Area], addr: u64) -> bool {
    let i = areas.partition_point(|a| a.end <= addr);
    areas
        .get(i)
        .is_some_and(|a| a.start <= addr && addr < a.end && a.droppable)
}

/// The fields of a tar header this needs.
struct Entry {
    name: String,
    size: u64,
    regular: bool,
}

impl Entry {
    fn parse(h: &[u8; BLOCK]) -> Option<Entry> {
        let stored: u64 = h.iter().map(|&b| b as u64).sum::<u64>()
            - h[148..156].iter().map(|&b| b as u64).sum::<u64>()
            + 8 * b' ' as u64;
        if octal(&h[148..156])? != stored {
            return None;
        }
        let field = |r: std::ops::Range<usize>| {
            let f = &h[r];
            let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
            std::str::from_utf8(&f[..end]).ok().map(str::to_owned)
        };
        let mut name = field(0..100)?;
        // POSIX ustar (GNU's "ustar  " magic has no name prefix there).
        if &h[257..263] == b"ustar\0" {
            let prefix = field(345..500)?;
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        let size = if h[124] & 0x80 != 0 {
            // GNU base-256.
            h[125..136]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | b as u64)
        } else {
            octal(&h[124..136])?
        };
        let regular = matches!(h[156], b'0' | 0);
        Some(Entry {
            name,
            size,
            regular,
        })
    }
}

fn octal(f: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(f).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// Writes `size` into a header and recomputes its checksum.
fn set_size(h: &mut [u8; BLOCK], size: u64) {
    let s = format!("{size:011o}\0");
    h[124..136].copy_from_slice(s.as_bytes());
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| b as u64).sum();
    let c = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(c.as_bytes());
}

// ---------------------------------------------------------------- CRIU images

/// A minimal protobuf reader: (field number, value) pairs, where a varint is its value and
/// a length-delimited field its bytes.
enum Value<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let x = *b.get(*i)?;
        *i += 1;
        v |= ((x & 0x7f) as u64) << shift;
        if x < 0x80 {
            return Some(v);
        }
    }
    None
}

fn fields(b: &[u8]) -> Option<Vec<(u64, Value<'_>)>> {
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let key = varint(b, &mut i)?;
        let v = match key & 7 {
            0 => Value::Int(varint(b, &mut i)?),
            1 => {
                i = i.checked_add(8).filter(|&e| e <= b.len())?;
                continue;
            }
            2 => {
                let len = varint(b, &mut i)? as usize;
                let end = i.checked_add(len).filter(|&e| e <= b.len())?;
                let v = Value::Bytes(&b[i..end]);
                i = end;
                v
            }
            5 => {
                i = i.checked_add(4).filter(|&e| e <= b.len())?;
                continue;
            }
            _ => return None,
        };
        out.push((key >> 3, v));
    }
    Some(out)
}

/// The entries of an image: after the two magics, each a 32-bit size and a message.
/// Returns the messages and the offset where each begins (its size field).
fn messages(img: &[u8], magic: u32) -> Option<Vec<(usize, &[u8])>> {
    let word = |i: usize| Some(u32::from_le_bytes(img.get(i..i + 4)?.try_into().ok()?));
    if word(0)? != IMG_COMMON_MAGIC || word(4)? != magic {
        return None;
    }
    let mut i = 8;
    let mut out = Vec::new();
    while i < img.len() {
        let len = word(i)? as usize;
        let end = (i + 4).checked_add(len).filter(|&e| e <= img.len())?;
        out.push((i, &img[i + 4..end]));
        i = end;
    }
    Some(out)
}

/// The memory areas of `mm-N.img`, by start address.
fn parse_mm(img: &[u8]) -> Option<Vec<Area>> {
    let msgs = messages(img, MM_MAGIC)?;
    let [(_, mm)] = msgs[..] else { return None };
    let mut areas = Vec::new();
    for (f, v) in fields(mm)? {
        // mm_entry.vmas = 14
        if let (14, Value::Bytes(vma)) = (f, v) {
            let (mut start, mut end, mut flags, mut status) = (None, None, None, None);
            for (f, v) in fields(vma)? {
                match (f, v) {
                    (1, Value::Int(x)) => start = Some(x),
                    (2, Value::Int(x)) => end = Some(x),
                    (6, Value::Int(x)) => flags = Some(x as u32),
                    (7, Value::Int(x)) => status = Some(x as u32),
                    _ => {}
                }
            }
            let (start, end, flags, status) = (start?, end?, flags?, status?);
            let droppable = status & VMA_AREA_REGULAR != 0
                && status & VMA_ANON_PRIVATE != 0
                && status & !VMA_ALLOWED == 0
                && flags & (libc::MAP_SHARED | libc::MAP_HUGETLB) as u32 == 0;
            areas.push(Area {
                start,
                end,
                droppable,
            });
        }
    }
    areas.sort_by_key(|a| a.start);
    // Overlapping areas would make the lookup ambiguous.
    areas
        .windows(2)
        .all(|w| w[0].end <= w[1].start)
        .then_some(areas)
}

struct Pagemap {
    pages_id: u64,
    /// Bytes of the image before its first page entry.
    head_len: usize,
    runs: Vec<PageRun>,
}

fn parse_pagemap(img: &[u8]) -> Option<Pagemap> {
    let msgs = messages(img, PAGEMAP_MAGIC)?;
    let ((_, head), rest) = msgs.split_first()?;
    let pages_id = fields(head)?.into_iter().find_map(|(f, v)| match (f, v) {
        (1, Value::Int(x)) => Some(x),
        _ => None,
    })?;
    let head_len = rest.first().map_or(img.len(), |(at, _)| *at);
    let mut runs = Vec::new();
    for (_, m) in rest {
        let (mut vaddr, mut compat, mut pages, mut flags) = (None, 0, None, None);
        for (f, v) in fields(m)? {
            match (f, v) {
                (1, Value::Int(x)) => vaddr = Some(x),
                (2, Value::Int(x)) => compat = x,
                // in_parent: pages in a pre-dump's images; not handled here.
                (3, Value::Int(x)) if x != 0 => return None,
                (4, Value::Int(x)) => flags = Some(x as u32),
                (5, Value::Int(x)) => pages = Some(x),
                (3, _) => {}
                _ => return None,
            }
        }
        if vaddr? % PAGE as u64 != 0 {
            return None;
        }
        runs.push(PageRun {
            vaddr: vaddr?,
            pages: pages.unwrap_or(compat),
            // Old images without flags: present.
            flags: flags.unwrap_or(PE_PRESENT),
        });
    }
    Some(Pagemap {
        pages_id,
        head_len,
        runs,
    })
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A pagemap_entry as CRIU 4 writes it: vaddr, compat_nr_pages 0, flags, nr_pages.
fn encode_run(r: &PageRun) -> Vec<u8> {
    let mut m = Vec::with_capacity(24);
    for (field, v) in [(1, r.vaddr), (2, 0), (4, r.flags as u64), (5, r.pages)] {
        put_varint(&mut m, field << 3);
        put_varint(&mut m, v);
    }
    m
}

fn push_entry(img: &mut Vec<u8>, msg: &[u8]) {
    img.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    img.extend_from_slice(msg);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read};

    const ANON: u32 = VMA_AREA_REGULAR | VMA_ANON_PRIVATE;
    const FILE_PRIVATE: u32 = VMA_AREA_REGULAR | (1 << 6);

    fn image(magic: u32, msgs: &[Vec<u8>]) -> Vec<u8> {
        let mut img = IMG_COMMON_MAGIC.to_le_bytes().to_vec();
        img.extend_from_slice(&magic.to_le_bytes());
        for m in msgs {
            push_entry(&mut img, m);
        }
        img
    }

    fn message(fields: &[(u64, u64)]) -> Vec<u8> {
        let mut m = Vec::new();
        for &(f, v) in fields {
            put_varint(&mut m, f << 3);
            put_varint(&mut m, v);
        }
        m
    }

    fn mm(areas: &[(u64, u64, u32)]) -> Vec<u8> {
        // A few scalar fields first, as CRIU writes them, then the areas.
        let mut mm = message(&[(1, 0x40_0000), (2, 0x40_1000), (12, 3)]);
        for &(start, end, status) in areas {
            let vma = message(&[
                (1, start),
                (2, end),
                (3, 0),
                (4, 0),
                (5, 3),
                (6, 0x22),
                (7, status as u64),
                (8, 1),
            ]);
            put_varint(&mut mm, (14 << 3) | 2);
            put_varint(&mut mm, vma.len() as u64);
            mm.extend_from_slice(&vma);
        }
        image(MM_MAGIC, &[mm])
    }

    fn pagemap(pages_id: u64, runs: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut msgs = vec![message(&[(1, pages_id)])];
        for &(vaddr, n, flags) in runs {
            msgs.push(encode_run(&PageRun {
                vaddr,
                pages: n,
                flags,
            }));
        }
        image(PAGEMAP_MAGIC, &msgs)
    }

    fn tar_of(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn untar(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut a = tar::Archive::new(bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().display().to_string();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (name, data)
            })
            .collect()
    }

    /// Runs `input` through the filter, in pieces of `step` bytes.
    fn filter(input: &[u8], step: usize) -> (Vec<u8>, Summary) {
        let mut z = ZeroPages::new(Cursor::new(Vec::new()), true);
        for piece in input.chunks(step) {
            z.write_all(piece).unwrap();
        }
        let (out, d) = z.finish().unwrap();
        (out.into_inner(), d)
    }

    fn page(byte: u8) -> Vec<u8> {
        vec![byte; PAGE]
    }

    const A: u64 = 0x7f00_0000_0000;
    const F: u64 = 0x5555_0000_0000;

    /// A dump of one process: 2 pages of a file-backed private area (zero, 2), then 4
    /// anonymous pages (zero, 1, zero, zero).
    fn one_process() -> Vec<(&'static str, Vec<u8>)> {
        let pages = [page(0), page(2), page(0), page(1), page(0), page(0)].concat();
        vec![
            ("config.dump", b"{}".to_vec()),
            ("checkpoint/core-1.img", vec![9; 700]),
            (
                "checkpoint/mm-1.img",
                mm(&[(F, F + 2 * 4096, FILE_PRIVATE), (A, A + 8 * 4096, ANON)]),
            ),
            (
                "checkpoint/pagemap-1.img",
                pagemap(1, &[(F, 2, PE_PRESENT), (A, 4, PE_PRESENT | PE_LAZY)]),
            ),
            ("checkpoint/pages-1.img", pages),
            ("checkpoint/pstree.img", vec![5; 48]),
            ("rootfs-diff.tar", vec![7; 1024]),
        ]
    }

    #[test]
    fn zero_anonymous_pages_are_left_out_and_the_pagemap_lists_the_rest() {
        let input = tar_of(&one_process());
        for step in [1, 511, 4096, 1 << 20] {
            let (out, dropped) = filter(&input, step);
            assert_eq!(dropped.pages, 3, "step {step}");
            assert_eq!(dropped.written, out.len() as u64);
            let got = untar(&out);
            let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(
                names,
                [
                    "config.dump",
                    "checkpoint/core-1.img",
                    "checkpoint/mm-1.img",
                    "checkpoint/pages-1.img",
                    "checkpoint/pagemap-1.img",
                    "checkpoint/pstree.img",
                    "rootfs-diff.tar"
                ]
            );
            let by = |n: &str| &got.iter().find(|(m, _)| m == n).unwrap().1;
            // The file-backed zero page stays (its file would show through), the
            // anonymous non-zero page stays.
            assert!(by("checkpoint/pages-1.img") == &[page(0), page(2), page(1)].concat());
            let map = parse_pagemap(by("checkpoint/pagemap-1.img")).unwrap();
            assert_eq!(map.pages_id, 1);
            assert_eq!(
                map.runs,
                [
                    PageRun {
                        vaddr: F,
                        pages: 2,
                        flags: PE_PRESENT
                    },
                    PageRun {
                        vaddr: A + 4096,
                        pages: 1,
                        flags: PE_PRESENT | PE_LAZY
                    },
                ]
            );
            let orig = one_process();
            for (n, d) in &orig {
                if !n.starts_with("checkpoint/pag") {
                    assert!(by(n) == d, "{n} unchanged");
                }
            }
        }
    }

    #[test]
    fn two_processes_or_odd_pagemaps_go_through_unchanged() {
        // Two processes: a child may inherit its parent's pages at restore.
        let mut two = one_process();
        two.insert(3, ("checkpoint/mm-7.img", mm(&[(A, A + 4096, ANON)])));
        two.insert(
            5,
            (
                "checkpoint/pagemap-7.img",
                pagemap(2, &[(A, 1, PE_PRESENT)]),
            ),
        );
        two.insert(7, ("checkpoint/pages-2.img", page(0)));
        // Pages in a parent image (pre-dump).
        let mut parent = one_process();
        parent[3].1 = pagemap(1, &[(F, 2, PE_PRESENT), (A, 4, 1)]);
        // A pagemap that does not add up to the pages file.
        let mut short = one_process();
        short[3].1 = pagemap(1, &[(F, 2, PE_PRESENT), (A, 3, PE_PRESENT)]);
        // An mm image that does not parse.
        let mut bad_mm = one_process();
        bad_mm[2].1 = vec![1, 2, 3];
        // A second process whose memory image is too big to be read: still two processes.
        let mut unread = one_process();
        unread.insert(2, ("checkpoint/mm-0.img", vec![0; (16 << 20) + 1]));
        for (what, entries) in [
            ("unread", unread),
            ("two", two),
            ("parent", parent),
            ("short", short),
            ("mm", bad_mm),
        ] {
            let input = tar_of(&entries);
            let (out, dropped) = filter(&input, 1000);
            assert_eq!(dropped.pages, 0, "{what}");
            let mut got = untar(&out);
            let mut want: Vec<(String, Vec<u8>)> = entries
                .into_iter()
                .map(|(n, d)| (n.to_owned(), d))
                .collect();
            got.sort();
            want.sort();
            assert!(got == want, "{what}");
        }
    }

    #[test]
    fn not_a_tar_goes_through_as_it_came() {
        let junk: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        assert!(filter(&junk, 333).0 == junk);
        // Cut off in the middle of the pages: what came is written, nothing more.
        let input = tar_of(&one_process());
        let cut = &input[..input.len() / 2];
        let (out, _) = filter(cut, 4096);
        assert!(out.len() <= cut.len());
    }

    #[test]
    fn an_extended_header_stops_the_filter() {
        // A PAX header before the pagemap: everything from there on as it came.
        let mut b = tar::Builder::new(Vec::new());
        let entries = one_process();
        for (i, (name, data)) in entries.iter().enumerate() {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            if i == 3 {
                b.append_pax_extensions([("comment", &b"x"[..])]).unwrap();
            }
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        let input = b.into_inner().unwrap();
        let (out, dropped) = filter(&input, 777);
        assert_eq!(dropped.pages, 0);
        assert!(out == input);
    }

    #[test]
    fn disabled_copies_everything() {
        let input = tar_of(&one_process());
        let mut z = ZeroPages::new(Cursor::new(Vec::new()), false);
        z.write_all(&input).unwrap();
        let (out, d) = z.finish().unwrap();
        assert_eq!(d.pages, 0);
        assert!(out.into_inner() == input);
    }

    #[test]
    fn area_lookup() {
        let areas = [
            Area {
                start: 0x1000,
                end: 0x3000,
                droppable: true,
            },
            Area {
                start: 0x5000,
                end: 0x6000,
                droppable: false,
            },
        ];
        assert!(droppable(&areas, 0x1000));
        assert!(droppable(&areas, 0x2fff));
        assert!(!droppable(&areas, 0x3000));
        assert!(!droppable(&areas, 0x5000));
        assert!(!droppable(&areas, 0x0));
        assert!(!droppable(&areas, 0x9000));
    }
}
