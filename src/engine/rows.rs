//! A sequence's KV rows as llama.cpp writes them out, and a sliding-window model's rows put
//! back in the cells a cold read leaves them in.
//!
//! llama.cpp writes a sequence out without the cells its sliding window no longer attends to,
//! and reads the rest back into the lowest free cells, in order (`state_write` and
//! `state_read_meta` in `llama-kv-cache.cpp`, at the pinned version). Past the window that
//! moves every cell, and attention sums the cells in cell order, so a greedy or seeded
//! answer could change in its last bits; and the cells left out are the ones a turn needs
//! that reads on from before the end. Such a copy could serve only a sampled request that
//! reads on from its very end ([`super::policy::restored_held`]). So the sequence is written
//! out again after cutting it back (each write holds the window before its end), and the
//! writes are put together into one that holds every cell, in the order a cold read leaves
//! them; cells a cold read leaves free go back with stray positions, removed once the rows
//! are in, so that llama.cpp goes on from the cell a cold read goes on from.
//!
//! Hand-rolled: llama.cpp offers no way to say where cells go, so this reads the state layout
//! of the pinned llama.cpp (`state_write_meta` and `state_write_data`). Rows it does not
//! recognise, or cells not where a cold read puts them, go back as llama.cpp wrote them, which
//! costs only the exact reuse.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::context::LlamaContext;

use super::policy::Held;

/// How much of a sequence's rows one `write` call hands the kernel. On the 2-core AMD EPYC
/// VM (Linux 6.18, ext4), an 85 MB conversation went into the page cache in 16 ms in 1 MiB
/// writes and in about 200 ms in one write (or in 4 MiB ones), which made a stop that writes
/// four of them into the cache folder take twice as long as llama.cpp's own writer (one write
/// per layer); 64 KiB pieces were as fast as 1 MiB ones. Why is not settled: outside the
/// server one 85 MB write took 17 ms (a small program) and a 30 MB one 5 ms (`backstop
/// quantize`).
const WRITE_PIECE: usize = 1 << 20;

/// A sequence's rows in llama.cpp's layout, in host memory.
pub(crate) struct SeqRows {
    bytes: Vec<u8>,
}

impl SeqRows {
    /// Sequence `seq`'s rows as llama.cpp writes them out, into `reuse` where it has room
    /// for them (memory already touched, so the copy meets no page faults).
    pub(crate) fn get(
        ctx: &LlamaContext<'_>,
        seq: i32,
        reuse: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, String> {
        let flags = LlamaStateSeqFlags::empty();
        let size = ctx.state_seq_get_size_ext(seq, flags);
        if size == 0 {
            return Err("llama.cpp wrote no rows".to_owned());
        }
        let mut bytes = reuse
            .filter(|b| b.capacity() >= size)
            .unwrap_or_else(|| Vec::with_capacity(size));
        bytes.clear();
        // SAFETY: `bytes` has room for the size llama.cpp just gave for this sequence, and
        // nothing runs on the context between the two calls (the decode thread owns it).
        let written = unsafe { ctx.state_seq_get_data_ext(bytes.as_mut_ptr(), seq, flags) };
        if written != size {
            return Err(format!("llama.cpp wrote {written} bytes of {size}"));
        }
        // SAFETY: llama.cpp wrote every one of the `size` bytes, front to back (it returns
        // how many it wrote, and writes nothing past the size it gave).
        unsafe { bytes.set_len(size) };
        Ok(bytes)
    }

    /// Rows as llama.cpp wrote them ([`SeqRows::get`]), to go back as they are (a file's come
    /// back as [`FileRows`]).
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        Self { bytes }
    }

    pub(crate) fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// The memory the rows are in, for another sequence's ([`SeqRows::get`]).
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Writes the rows into file `path`, as they are, [`WRITE_PIECE`] bytes at a time.
    pub(crate) fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut file = File::create(path)?;
        for piece in self.bytes.chunks(WRITE_PIECE) {
            file.write_all(piece)?;
        }
        Ok(())
    }

    /// One sequence's rows from `parts`, llama.cpp's writes of it as it held positions
    /// `first..end` in cells where a cold read puts them, and then cut back, each write
    /// holding the `span` positions before its end (the first, all of it; the others, the
    /// cells of a sliding window's cache of `cells` a sequence, or the whole context with
    /// `None`); and what the sequence holds once they go back. `None` unless the parts are
    /// laid out as the pinned llama.cpp writes them and together hold every position.
    ///
    /// A cold read puts position p in cell p mod `cells` ([`super::policy::Window::holds`]).
    /// llama.cpp reads cells back from the first cell on, so every cell a cold read filled
    /// goes back in order, and a free one (its position removed) with a stray position past
    /// the sequence's end ([`SeqRows::set`] removes them). That frees those cells, and
    /// llama.cpp goes on from the lowest cell freed, where a cold read goes on. A sequence
    /// that lapped its cells and has none free goes on in the cell its oldest position holds,
    /// which goes back as a stray for that, so the sequence then starts a position later.
    pub(crate) fn assemble(
        parts: &[Vec<u8>],
        (first, end): (usize, usize),
        span: usize,
        cells: Option<usize>,
    ) -> Option<(Self, Held)> {
        if first >= end || end <= span || cells.is_some_and(|c| c <= span) {
            return None;
        }
        // Cells a cold read filled: from the first, one a position, and all of them once it
        // lapped (a position goes only when the window's cache writes over its cell).
        let filled = match cells {
            Some(c) if first > 0 && end - first <= c => c,
            _ if first == 0 && cells.is_none_or(|c| end <= c) => end,
            _ => return None,
        };
        // The cell a cold read puts position `p` in.
        let cell_of = |p: usize| cells.map_or(p, |c| p % c);
        let mut at = vec![None; filled];
        for p in first..end {
            at[cell_of(p)] = Some(p);
        }
        let free: Vec<usize> = (0..filled).filter(|&c| at[c].is_none()).collect();
        if free.windows(2).any(|w| w[1] != w[0] + 1) {
            // Freed on both sides of the last cell: not where a cold read goes on.
            return None;
        }
        if let Some(c) = cells.filter(|&c| free.is_empty() && first > 0 && end % c != 0) {
            at[end % c] = None;
        }
        // The sliding-window cache is the last one written.
        let streams: Vec<Stream> = parts
            .iter()
            .map(|p| parse(p)?.pop())
            .collect::<Option<_>>()?;
        let blocks = |s: &Stream| s.blocks.iter().map(|b| b.1).collect::<Vec<_>>();
        if streams.iter().any(|s| blocks(s) != blocks(&streams[0])) {
            return None;
        }
        // Where each position's rows are: the first part that holds it. Each part holds its
        // cells in cell order, so a position anywhere else is not where a cold read put it.
        let cell = |p: i32| {
            let p = usize::try_from(p)
                .ok()
                .filter(|p| (first..end).contains(p))?;
            Some(cell_of(p))
        };
        let mut found = HashMap::new();
        for (part, s) in streams.iter().enumerate() {
            let laid: Option<Vec<usize>> = s.positions.iter().map(|&p| cell(p)).collect();
            if laid?.windows(2).any(|w| w[0] >= w[1]) {
                return None;
            }
            for (k, &p) in s.positions.iter().enumerate() {
                found.entry(p).or_insert((part, k));
            }
        }
        let mut laid = Vec::with_capacity(filled);
        let mut strays = 0;
        for &p in &at {
            laid.push(match p {
                Some(p) => {
                    let p = i32::try_from(p).ok()?;
                    (p, Some(*found.get(&p)?))
                }
                None => {
                    strays += 1;
                    (i32::try_from(end + strays - 1).ok()?, None)
                }
            });
        }
        let held = Held {
            first: at.iter().flatten().min().copied()?,
            end,
            ordered: true,
        };
        let bytes = lay(parts, &streams, &laid);
        Some((Self { bytes }, held))
    }

    /// The rows, to go back into a sequence ([`set_rows`]).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// A sequence's rows in a file of the cache folder ([`SeqRows::write`]), mapped into memory
/// with every page already mapped in (`MAP_POPULATE`): the rows then go from the page cache
/// straight into the KV cache. Read into fresh memory instead, each page was first faulted
/// in and cleared: a 76 MB file took 46-60 ms to read from the page cache on the 2-core AMD
/// EPYC VM, where mapping it took 6-8 ms and a copy of it about as long.
pub(crate) struct FileRows(memmap2::Mmap);

impl FileRows {
    /// Maps file `path`, which holds `bytes` bytes of rows.
    pub(crate) fn open(path: &Path, bytes: u64) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| e.to_string())?;
        // SAFETY: the folder is backstop's own (made for its user only), and a rows file is
        // written under another name and renamed when whole, then never written again, only
        // removed (which leaves a mapping as it was). Only a file cut short by another
        // process while mapped could fault, as a model file llama.cpp maps could; the
        // mapping lives only until its rows are copied out.
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
            .map_err(|e| e.to_string())?;
        if map.len() as u64 != bytes {
            return Err(format!(
                "the file holds {} bytes, not the {bytes} written",
                map.len()
            ));
        }
        Ok(Self(map))
    }

    /// The rows, to go back into a sequence ([`set_rows`]).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Puts rows `bytes` (a [`SeqRows`] or [`FileRows`]) back into sequence `seq`, which then
/// holds the positions before `end`: stray ones past it ([`SeqRows::assemble`]) are removed.
pub(crate) fn set_rows(
    bytes: &[u8],
    ctx: &mut LlamaContext<'_>,
    seq: i32,
    end: usize,
) -> Result<(), String> {
    // SAFETY: the bytes are llama.cpp's own, or put together from its own in its layout
    // (`lay`), kept in memory or in a file of the cache folder backstop made (its user's
    // only, its length checked as the folder was read and as it was mapped); llama.cpp checks
    // every read against their length.
    let read = unsafe { ctx.state_seq_set_data_ext(bytes, seq, LlamaStateSeqFlags::empty()) };
    if !read {
        return Err("llama.cpp could not read the rows".to_owned());
    }
    let end = u32::try_from(end).map_err(|e| e.to_string())?;
    ctx.clear_kv_cache_seq(Some(seq as u32), Some(end), None)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Bytes of one cell's entry before a stream's data: its position, its count of sequences
/// (one), and that sequence. Models whose cells carry more (M-RoPE, per-layer embeddings)
/// write more, which the parse below refuses.
const META: usize = 12;

/// The one stream of a KV cache that holds a sequence's cells, in its rows.
#[derive(Debug, PartialEq)]
struct Stream {
    /// Where its cell count is.
    count_at: usize,
    /// Each cell's position, in cell order.
    positions: Vec<i32>,
    /// The sequence each cell's entry names.
    seq: i32,
    /// Each block of per-cell data (a layer's K rows, its V rows, or, with V stored
    /// transposed, one element of every cell's V): where it starts, and bytes a cell.
    blocks: Vec<(usize, usize)>,
}

impl Stream {
    fn meta_end(&self) -> usize {
        self.count_at + 4 + self.positions.len() * META
    }

    fn block_end(&self, (at, size): (usize, usize)) -> usize {
        at + size * self.positions.len()
    }
}

/// Reads little-endian fields in order.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let field = self.bytes.get(self.at..self.at.checked_add(N)?)?;
        self.at += N;
        field.try_into().ok()
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    fn i32(&mut self) -> Option<i32> {
        self.take().map(i32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        let to = self.at.checked_add(n)?;
        (to <= self.bytes.len()).then(|| self.at = to)
    }

    /// A block of `cells` entries of `size` bytes each.
    fn block(&mut self, size: u64, cells: usize) -> Option<(usize, usize)> {
        let size = usize::try_from(size).ok()?;
        let at = self.at;
        self.skip(size.checked_mul(cells)?)?;
        Some((at, size))
    }
}

/// The stream holding the sequence in each KV cache the rows hold (llama.cpp writes an
/// interleaved sliding-window model's full-attention cache first, then its sliding-window
/// cache), or `None` if the rows are not laid out as the pinned llama.cpp writes them.
fn parse(bytes: &[u8]) -> Option<Vec<Stream>> {
    let mut r = Reader { bytes, at: 0 };
    // llama.cpp's mark of a sequence's state, and the sequence it came from.
    r.u32()?;
    r.i32()?;
    let mut caches = Vec::new();
    while r.at < bytes.len() {
        let streams = r.u32()?;
        let mut found = None;
        for _ in 0..streams {
            let count_at = r.at;
            let cells = r.u32()? as usize;
            if cells == 0 {
                continue;
            }
            if found.is_some() {
                return None;
            }
            let mut positions = Vec::with_capacity(cells.min(bytes.len() / META));
            let mut seq = None;
            for _ in 0..cells {
                positions.push(r.i32()?);
                if r.u32()? != 1 {
                    return None;
                }
                let s = r.i32()?;
                if *seq.get_or_insert(s) != s {
                    return None;
                }
            }
            let transposed = match r.u32()? {
                0 => false,
                1 => true,
                _ => return None,
            };
            let layers = r.u32()?;
            r.u32()?; // the K and V rotations' sizes
            r.u32()?;
            let mut blocks = Vec::new();
            for _ in 0..layers {
                r.i32()?; // its type
                let row = r.u64()?;
                blocks.push(r.block(row, cells)?);
            }
            for _ in 0..layers {
                r.i32()?;
                if transposed {
                    let element = r.u32()?;
                    let rows = r.u32()?;
                    for _ in 0..rows {
                        blocks.push(r.block(u64::from(element), cells)?);
                    }
                } else {
                    let row = r.u64()?;
                    blocks.push(r.block(row, cells)?);
                }
            }
            found = Some(Stream {
                count_at,
                positions,
                seq: seq?,
                blocks,
            });
        }
        caches.push(found?);
    }
    Some(caches)
}

/// The first part with its sliding-window stream's cells replaced by `cells`: each a position
/// and the part and cell its rows come from (`None`: a stray, with zero rows).
fn lay(parts: &[Vec<u8>], streams: &[Stream], cells: &[(i32, Option<(usize, usize)>)]) -> Vec<u8> {
    let (bytes, s) = (&parts[0], &streams[0]);
    let per_cell: usize = s.blocks.iter().map(|b| b.1).sum::<usize>() + META;
    let mut out = Vec::with_capacity(bytes.len() + per_cell * cells.len());
    out.extend_from_slice(&bytes[..s.count_at]);
    out.extend_from_slice(&(cells.len() as u32).to_le_bytes());
    for &(p, _) in cells {
        out.extend_from_slice(&p.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&s.seq.to_le_bytes());
    }
    let mut copied = s.meta_end();
    for (b, &block) in s.blocks.iter().enumerate() {
        let (at, size) = block;
        out.extend_from_slice(&bytes[copied..at]);
        for &(_, from) in cells {
            match from {
                Some((part, k)) => {
                    let start = streams[part].blocks[b].0 + k * size;
                    out.extend_from_slice(&parts[part][start..start + size]);
                }
                None => out.resize(out.len() + size, 0),
            }
        }
        copied = s.block_end(block);
    }
    out.extend_from_slice(&bytes[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One KV cache as llama.cpp writes a sequence of it out: the positions of its cells in
    /// cell order, in stream `stream` of `streams`.
    struct Cache {
        positions: Vec<i32>,
        streams: u32,
        stream: u32,
        layers: u8,
        transposed: bool,
    }

    const K_ROW: usize = 6;
    const V_ROW: usize = 4;
    const V_ELEMENT: usize = 2;

    /// A cell's byte in a block: which position, layer and kind of row it holds (never 0).
    fn byte(p: i32, layer: u8, kind: u8) -> u8 {
        ((p as u8).wrapping_mul(8) ^ (layer << 2) ^ kind) | 0x80
    }

    fn cache(positions: impl IntoIterator<Item = i32>, transposed: bool) -> Cache {
        Cache {
            positions: positions.into_iter().collect(),
            streams: 3,
            stream: 1,
            layers: 2,
            transposed,
        }
    }

    /// Rows laid out as `llama_state_seq_get_data` writes them, at the pinned llama.cpp.
    fn rows(caches: &[Cache]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut put = |b: &[u8]| out.extend_from_slice(b);
        put(&0xaf14_3cd8u32.to_le_bytes());
        put(&1i32.to_le_bytes());
        for c in caches {
            put(&c.streams.to_le_bytes());
            for s in 0..c.streams {
                if s != c.stream {
                    put(&0u32.to_le_bytes());
                    continue;
                }
                put(&(c.positions.len() as u32).to_le_bytes());
                for p in &c.positions {
                    put(&p.to_le_bytes());
                    put(&1u32.to_le_bytes());
                    put(&1i32.to_le_bytes());
                }
                put(&u32::from(c.transposed).to_le_bytes());
                put(&u32::from(c.layers).to_le_bytes());
                put(&[0; 8]);
                for l in 0..c.layers {
                    put(&1i32.to_le_bytes());
                    put(&(K_ROW as u64).to_le_bytes());
                    for &p in &c.positions {
                        put(&[byte(p, l, 1); K_ROW]);
                    }
                }
                for l in 0..c.layers {
                    put(&1i32.to_le_bytes());
                    if c.transposed {
                        put(&(V_ELEMENT as u32).to_le_bytes());
                        put(&((V_ROW / V_ELEMENT) as u32).to_le_bytes());
                        for j in 0..V_ROW / V_ELEMENT {
                            for &p in &c.positions {
                                put(&[byte(p, l, 2 + j as u8); V_ELEMENT]);
                            }
                        }
                    } else {
                        put(&(V_ROW as u64).to_le_bytes());
                        for &p in &c.positions {
                            put(&[byte(p, l, 2); V_ROW]);
                        }
                    }
                }
            }
        }
        out
    }

    /// The sliding-window cache's cells in `bytes`, of two layers: each position, and
    /// whether every block holds that position's rows (false: zero rows; anything else
    /// fails).
    fn cells(bytes: &[u8], transposed: bool) -> Vec<(i32, bool)> {
        let streams = parse(bytes).expect("parses");
        let s = streams.last().unwrap();
        let per_layer = if transposed { V_ROW / V_ELEMENT } else { 1 };
        // Which layer and kind of row each block holds.
        let kinds: Vec<(u8, u8)> = (0..2)
            .map(|l| (l, 1))
            .chain((0..2).flat_map(|l| (0..per_layer).map(move |j| (l, 2 + j as u8))))
            .collect();
        assert_eq!(kinds.len(), s.blocks.len());
        s.positions
            .iter()
            .enumerate()
            .map(|(k, &p)| {
                let rows: Vec<&[u8]> = s
                    .blocks
                    .iter()
                    .map(|&(at, size)| &bytes[at + k * size..at + (k + 1) * size])
                    .collect();
                let real = rows
                    .iter()
                    .zip(&kinds)
                    .all(|(r, &(l, kind))| r.iter().all(|&x| x == byte(p, l, kind)));
                let zero = rows.iter().all(|r| r.iter().all(|&x| x == 0));
                assert!(real || zero, "cell {k} holds other rows");
                (p, real)
            })
            .collect()
    }

    /// Rows over several pieces, the last one short, come back from the file as they were,
    /// mapped; a mapping lives on when its file is removed (a kept conversation dropped while
    /// its rows are read), and a file of another length than the one written is refused.
    #[test]
    fn rows_go_to_a_file_whole_piece_by_piece_and_come_back_mapped() {
        let bytes: Vec<u8> = (0..2 * WRITE_PIECE + 12_345)
            .map(|i| (i % 251) as u8)
            .collect();
        let path = std::env::temp_dir().join(format!("backstop-rows-{}", std::process::id()));
        SeqRows::new(bytes.clone()).write(&path).unwrap();
        let len = bytes.len() as u64;
        let refused = FileRows::open(&path, len + 1).err();
        let back = FileRows::open(&path, len).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(
            back.bytes() == &bytes[..],
            "{} bytes back of {}",
            back.bytes().len(),
            bytes.len()
        );
        assert_eq!(
            refused.as_deref(),
            Some(format!("the file holds {len} bytes, not the {} written", len + 1).as_str())
        );
        assert!(FileRows::open(&path, len).is_err(), "removed");
    }

    #[test]
    fn rows_parse_as_the_pinned_llama_cpp_writes_them() {
        for transposed in [false, true] {
            let bytes = rows(&[cache(0..5, transposed), cache([3, 4, 1, 2], transposed)]);
            let streams = parse(&bytes).expect("parses");
            assert_eq!(streams.len(), 2);
            assert_eq!(streams[1].positions, [3, 4, 1, 2]);
            let blocks = if transposed {
                2 + 2 * V_ROW / V_ELEMENT
            } else {
                4
            };
            assert_eq!(streams[1].blocks.len(), blocks);
            // Each block of the second cache holds its cells' rows, in order.
            let (at, size) = streams[1].blocks[1];
            assert_eq!(bytes[at + 2 * size], byte(1, 1, 1));
        }
        let bytes = rows(&[cache(0..5, false)]);
        assert!(parse(&bytes[..bytes.len() - 1]).is_none(), "cut short");
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(parse(&longer).is_none(), "a byte more");
        let mut two = rows(&[cache(0..5, false)]);
        // A second stream holding cells: not one sequence's.
        two[12..16].copy_from_slice(&5u32.to_le_bytes());
        assert!(parse(&two).is_none());
    }

    /// Eight cells a sequence, a window of four: positions 6..14 lapped the cells (p in cell
    /// p mod 8). Written at the end, llama.cpp keeps 10..14 (cells 2..5); cut back to 10 and
    /// written again, 6..10 (cells 0, 1, 6, 7, in that order).
    #[test]
    fn a_lapped_window_goes_back_cell_for_cell_with_its_oldest_cell_a_stray() {
        for transposed in [false, true] {
            let whole = rows(&[cache(0..14, transposed), cache(10..14, transposed)]);
            let cut = rows(&[cache(0..10, transposed), cache([8, 9, 6, 7], transposed)]);
            let (laid, held) =
                SeqRows::assemble(&[whole.clone(), cut], (6, 14), 4, Some(8)).expect("assembled");
            // The cell after the newest position's holds the oldest; it goes back as a stray
            // (14, past the end), so llama.cpp goes on from there as a cold read does.
            assert_eq!(
                cells(&laid.bytes, transposed),
                [
                    (8, true),
                    (9, true),
                    (10, true),
                    (11, true),
                    (12, true),
                    (13, true),
                    (14, false),
                    (7, true)
                ]
            );
            assert_eq!(
                held,
                Held {
                    first: 7,
                    end: 14,
                    ordered: true
                }
            );
            // The full-attention cache goes back as it was written.
            let base = |b: &[u8]| {
                let s = parse(b).unwrap().remove(0);
                b[..s.block_end(*s.blocks.last().unwrap())].to_vec()
            };
            assert_eq!(base(&laid.bytes), base(&whole));
        }
    }

    /// Positions 6..12 of the same cache after the last two were removed: cells 4 and 5 are
    /// free, and go back as strays, so llama.cpp goes on from cell 4.
    #[test]
    fn cells_freed_at_the_end_go_back_as_strays() {
        let whole = rows(&[cache(0..12, false), cache([8, 9, 10, 11], false)]);
        let cut = rows(&[cache(0..10, false), cache([8, 9, 6, 7], false)]);
        let (laid, held) =
            SeqRows::assemble(&[whole, cut], (6, 12), 4, Some(8)).expect("assembled");
        assert_eq!(
            cells(&laid.bytes, false),
            [
                (8, true),
                (9, true),
                (10, true),
                (11, true),
                (12, false),
                (13, false),
                (6, true),
                (7, true)
            ]
        );
        assert_eq!(
            held,
            Held {
                first: 6,
                end: 12,
                ordered: true
            }
        );
    }

    /// Within its first lap (and with the whole context cached, `--swa-full`) position p is
    /// in cell p.
    #[test]
    fn a_sequence_within_its_first_lap_goes_back_in_order() {
        for cells_a_sequence in [Some(8), None] {
            let whole = rows(&[cache(0..7, false), cache(3..7, false)]);
            let cut = rows(&[cache(0..4, false), cache(0..4, false)]);
            let (laid, held) =
                SeqRows::assemble(&[whole, cut], (0, 7), 4, cells_a_sequence).expect("assembled");
            assert_eq!(
                cells(&laid.bytes, false),
                (0..7).map(|p| (p, true)).collect::<Vec<_>>()
            );
            assert_eq!(
                held,
                Held {
                    first: 0,
                    end: 7,
                    ordered: true
                }
            );
        }
    }

    #[test]
    fn rows_that_cannot_go_back_cell_for_cell_are_refused() {
        let whole = || rows(&[cache(0..14, false), cache(10..14, false)]);
        let cut = || rows(&[cache(0..10, false), cache([8, 9, 6, 7], false)]);
        let assemble = |parts: &[Vec<u8>], held, cells| SeqRows::assemble(parts, held, 4, cells);
        assert!(assemble(&[whole(), cut()], (6, 14), Some(8)).is_some());
        // Without the second write, positions 6..10 have no rows.
        assert!(assemble(&[whole()], (6, 14), Some(8)).is_none());
        // Cells not where a cold read puts them.
        let moved = rows(&[cache(0..14, false), cache([11, 10, 12, 13], false)]);
        assert!(assemble(&[moved, cut()], (6, 14), Some(8)).is_none());
        // Free cells on both sides of the last one (positions 9..15 in cells 1..7, 0 and 7 free).
        assert!(assemble(&[whole(), cut()], (9, 15), Some(8)).is_none());
        // More positions than cells, or within the window.
        assert!(assemble(&[whole(), cut()], (5, 14), Some(8)).is_none());
        assert!(assemble(&[whole(), cut()], (0, 4), Some(8)).is_none());
        // Parts whose rows differ in size.
        let mut other = cache([8, 9, 6, 7], false);
        other.layers = 3;
        let other = rows(&[cache(0..10, false), other]);
        assert!(assemble(&[whole(), other], (6, 14), Some(8)).is_none());
    }
}
