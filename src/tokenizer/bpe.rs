//! The BPE segmentation step, in the same order of operations as SentencePiece's `bpe::Model`.
//!
//! The normalized text is split into characters (or whole user-defined symbols, which are frozen),
//! then the adjacent pair whose concatenation is a piece with the highest score is merged,
//! leftmost first on ties, until no adjacent pair forms a piece. Candidate pairs sit in a binary
//! heap; stale entries are detected when popped rather than removed, so each merge costs two hash
//! lookups and two pushes. Symbols always cover contiguous bytes of the normalized text, so a
//! candidate's string is a slice of it and no merge allocates.

use std::collections::{BinaryHeap, HashMap};

/// Marks "no neighbour" and "id not known yet".
pub const NONE: u32 = u32::MAX;

const K1: u64 = 0x517c_c1b7_2722_0a95;
const K2: u64 = 0xff51_afd7_ed55_8ccd;

/// The first 8 bytes of `b`, zero-padded, little-endian. Short keys are assembled from
/// overlapping loads: a variable-length copy into a buffer costs a memcpy call and a
/// store-forwarding stall, which showed up as the most expensive step of a lookup.
#[inline]
fn head(b: &[u8]) -> u64 {
    let n = b.len();
    if n >= 8 {
        u64::from_le_bytes(b[..8].try_into().unwrap())
    } else if n >= 4 {
        let lo = u64::from(u32::from_le_bytes(b[..4].try_into().unwrap()));
        let hi = u64::from(u32::from_le_bytes(b[n - 4..].try_into().unwrap()));
        lo | hi << (8 * (n - 4))
    } else if n > 0 {
        u64::from(b[0]) | u64::from(b[n / 2]) << (8 * (n / 2)) | u64::from(b[n - 1]) << (8 * (n - 1))
    } else {
        0
    }
}

#[inline]
fn hash(head: u64, b: &[u8]) -> u64 {
    let mut h = (b.len() as u64 ^ head).wrapping_mul(K1);
    if b.len() > 8 {
        let mut chunks = b[8..].chunks_exact(8);
        for c in &mut chunks {
            h = (h.rotate_left(5) ^ u64::from_le_bytes(c.try_into().unwrap())).wrapping_mul(K1);
        }
        let rem = chunks.remainder();
        if !rem.is_empty() {
            h = (h.rotate_left(5) ^ self::head(rem)).wrapping_mul(K1);
        }
    }
    h = (h ^ (h >> 33)).wrapping_mul(K2);
    h ^ (h >> 33)
}

/// Piece strings, stored once in one arena.
pub struct Vocab {
    pub arena: String,
    pub spans: Vec<(u32, u32)>,
}

impl Vocab {
    #[inline]
    pub fn text(&self, id: u32) -> &str {
        let (s, n) = self.spans[id as usize];
        &self.arena[s as usize..(s + n) as usize]
    }

    #[inline]
    pub fn bytes(&self, id: u32) -> &[u8] {
        self.text(id).as_bytes()
    }
}

/// One slot: a piece's first 8 bytes and length inline, so that a lookup of a piece of up to
/// 8 bytes (most of them) touches a single cache line; longer ones also compare the arena.
#[derive(Clone, Copy, Default)]
struct Slot {
    head: u64,
    len: u32,
    /// id + 1; 0 marks an empty slot.
    id1: u32,
}

/// Open-addressing map from piece string to id. Lookups dominate encoding time and are mostly
/// cache misses, so the layout is chosen to need one memory access per probe.
pub struct PieceTable {
    slots: Vec<Slot>,
    mask: usize,
}

impl PieceTable {
    pub fn new(expected: usize) -> Self {
        let n = (expected.max(4) * 2).next_power_of_two();
        PieceTable { slots: vec![Slot::default(); n], mask: n - 1 }
    }

    /// Inserts `id`; returns the id already stored under the same string, if any.
    pub fn insert(&mut self, vocab: &Vocab, id: u32) -> Option<u32> {
        let key = vocab.bytes(id);
        if let Some(other) = self.get(vocab, key) {
            return Some(other);
        }
        let hd = head(key);
        let mut i = hash(hd, key) as usize & self.mask;
        while self.slots[i].id1 != 0 {
            i = (i + 1) & self.mask;
        }
        self.slots[i] = Slot { head: hd, len: key.len() as u32, id1: id + 1 };
        None
    }

    #[inline]
    pub fn get(&self, vocab: &Vocab, key: &[u8]) -> Option<u32> {
        let hd = head(key);
        let mut i = hash(hd, key) as usize & self.mask;
        loop {
            let s = self.slots[i];
            if s.id1 == 0 {
                return None;
            }
            if s.head == hd && s.len as usize == key.len() && (key.len() <= 8 || vocab.bytes(s.id1 - 1) == key) {
                return Some(s.id1 - 1);
            }
            i = (i + 1) & self.mask;
        }
    }
}

/// Longest-match lookup of user-defined symbols at a position. Only bytes that start some symbol
/// lead to a scan, so ordinary text pays one table read per character.
pub struct UserMatcher {
    first: [u16; 256],
    groups: Vec<Vec<u32>>,
}

impl UserMatcher {
    pub fn new(vocab: &Vocab, ids: &[u32]) -> Self {
        let mut m = UserMatcher { first: [0; 256], groups: Vec::new() };
        for &id in ids {
            let b = vocab.bytes(id)[0] as usize;
            if m.first[b] == 0 {
                m.groups.push(Vec::new());
                m.first[b] = m.groups.len() as u16;
            }
            m.groups[m.first[b] as usize - 1].push(id);
        }
        for g in &mut m.groups {
            g.sort_by_key(|&id| std::cmp::Reverse(vocab.bytes(id).len()));
        }
        m
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// `(length, id)` of the longest user-defined symbol that `s` starts with.
    #[inline]
    pub fn longest(&self, vocab: &Vocab, s: &[u8]) -> Option<(usize, u32)> {
        let g = self.first[*s.first()? as usize];
        if g == 0 {
            return None;
        }
        self.groups[g as usize - 1].iter().find_map(|&id| {
            let p = vocab.bytes(id);
            s.starts_with(p).then_some((p.len(), id))
        })
    }
}

/// Byte length of the UTF-8 character that starts with `b` (1 for a stray continuation byte,
/// which cannot occur in a `&str`).
#[inline]
pub fn char_len(b: u8) -> usize {
    match b {
        0x00..=0xBF => 1,
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

/// Maps a score to a u32 whose unsigned order is the float order (-0.0 counts as 0.0, as in
/// the C++ comparison).
pub fn score_key(score: f32) -> u32 {
    let bits = (score + 0.0).to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

#[derive(Clone, Copy)]
struct Sym {
    start: u32,
    len: u32,
    prev: u32,
    next: u32,
    /// Piece id in the merge table when known; `NONE` for a character not yet looked up.
    id: u32,
    frozen: bool,
}

/// What the merge loop needs to know about the model.
pub struct MergeModel<'a> {
    pub vocab: &'a Vocab,
    pub normal: &'a PieceTable,
    pub reserved: &'a PieceTable,
    pub unk_id: u32,
    pub score_keys: &'a [u32],
    pub unused: Option<&'a [bool]>,
    /// Normal ids whose string is also a reserved piece; SentencePiece reports the reserved id.
    pub remap: &'a HashMap<u32, u32>,
    pub user: &'a UserMatcher,
    pub max_piece_len: usize,
    /// The escaped space (`▁`, or ` ` without escaping).
    pub space: &'a [u8],
    /// Whether words may be segmented one at a time (see [`MergeModel::segment`]).
    pub by_word: bool,
    /// Identifies the tokenizer that owns a thread's word cache.
    pub uid: u64,
}

/// Reusable buffers, so that encoding many short lines does not allocate per line.
#[derive(Default)]
pub struct Scratch {
    syms: Vec<Sym>,
    heap: BinaryHeap<u128>,
    rev_merge: HashMap<u32, u32>,
    cache: WordCache,
}

/// Segmentations of recently seen words, per thread. Text is Zipfian, so most words hit. Keys
/// and segments live in two flat arenas indexed by an open-addressing table, so that inserting
/// allocates nothing per word and clearing frees nothing.
#[derive(Default)]
struct WordCache {
    owner: u64,
    slots: Vec<CacheSlot>,
    keys: Vec<u8>,
    segs: Vec<Segment>,
    len: usize,
}

#[derive(Clone, Copy, Default)]
struct CacheSlot {
    tag: u32,
    key_at: u32,
    seg_at: u32,
    /// 0 marks an empty slot (words are never empty).
    key_len: u16,
    seg_len: u16,
}

/// Longer words are rare and cheap to recompute relative to their length.
const MAX_CACHED_WORD: usize = 96;
/// Bounds the cache at a few MB per thread; on overflow it starts over.
const MAX_CACHED_WORDS: usize = 1 << 16;

impl WordCache {
    fn reset(&mut self, owner: u64) {
        self.owner = owner;
        self.slots.clear();
        self.keys.clear();
        self.segs.clear();
        self.len = 0;
    }

    fn find(&self, w: &[u8], h: u64) -> Result<usize, usize> {
        let mask = self.slots.len() - 1;
        let mut i = h as usize & mask;
        loop {
            let s = self.slots[i];
            if s.key_len == 0 {
                return Err(i);
            }
            if s.tag == (h >> 32) as u32
                && s.key_len as usize == w.len()
                && &self.keys[s.key_at as usize..s.key_at as usize + w.len()] == w
            {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    fn get(&self, w: &[u8]) -> Option<&[Segment]> {
        if self.slots.is_empty() {
            return None;
        }
        let s = self.slots[self.find(w, hash(head(w), w)).ok()?];
        Some(&self.segs[s.seg_at as usize..s.seg_at as usize + s.seg_len as usize])
    }

    /// Stores `segs` (offsets relative to the word) for `w`, which must not be cached yet.
    fn insert(&mut self, w: &[u8], segs: impl Iterator<Item = Segment>) {
        if self.len >= MAX_CACHED_WORDS || self.keys.len() + w.len() > u32::MAX as usize {
            let owner = self.owner;
            self.reset(owner);
        }
        if self.slots.len() < 2 * (self.len + 1) {
            self.grow();
        }
        let seg_at = self.segs.len();
        self.segs.extend(segs);
        let slot = CacheSlot {
            tag: (hash(head(w), w) >> 32) as u32,
            key_at: self.keys.len() as u32,
            seg_at: seg_at as u32,
            key_len: w.len() as u16,
            seg_len: (self.segs.len() - seg_at) as u16,
        };
        self.keys.extend_from_slice(w);
        let i = self.find(w, hash(head(w), w)).unwrap_or_else(|free| free);
        self.slots[i] = slot;
        self.len += 1;
    }

    fn grow(&mut self) {
        let n = (self.slots.len() * 2).max(1024);
        let old = std::mem::replace(&mut self.slots, vec![CacheSlot::default(); n]);
        for s in old.into_iter().filter(|s| s.key_len != 0) {
            let w = &self.keys[s.key_at as usize..s.key_at as usize + s.key_len as usize];
            let mut i = hash(head(w), w) as usize & (n - 1);
            while self.slots[i].key_len != 0 {
                i = (i + 1) & (n - 1);
            }
            self.slots[i] = s;
        }
    }
}

/// A token of the normalized text: `(id, start, end)`; unknown characters have the unknown id,
/// byte fallback is left to the caller.
pub type Segment = (u32, u32, u32);

impl MergeModel<'_> {
    /// Runs BPE over `s` and appends the resulting segments in order.
    ///
    /// When no mergeable piece has a space after a non-space character (true of Grok-1's
    /// vocabulary, checked at load), no piece can span the point just before a space that follows
    /// a non-space, so merges on either side are independent: the text is cut there into words
    /// (`▁▁word`), each segmented alone, which is what makes a per-word cache exact. Models with
    /// UNUSED pieces are excluded, because SentencePiece splits those using the last merge of the
    /// same string anywhere in the text.
    pub fn segment(&self, s: &[u8], scratch: &mut Scratch, out: &mut Vec<Segment>) {
        if !self.by_word {
            self.segment_word(s, 0, scratch, out);
            return;
        }
        if scratch.cache.owner != self.uid {
            scratch.cache.reset(self.uid);
        }
        let sp = self.space;
        let mut start = 0;
        let mut i = 0;
        let mut prev_space = false;
        while i < s.len() {
            if s[i] == sp[0] && s[i..].starts_with(sp) {
                if !prev_space && i > start {
                    self.segment_cached(s, start, i, scratch, out);
                    start = i;
                }
                prev_space = true;
                i += sp.len();
            } else {
                prev_space = false;
                i += 1;
            }
        }
        if start < s.len() {
            self.segment_cached(s, start, s.len(), scratch, out);
        }
    }

    fn segment_cached(&self, s: &[u8], start: usize, end: usize, scratch: &mut Scratch, out: &mut Vec<Segment>) {
        let w = &s[start..end];
        if w.len() > MAX_CACHED_WORD {
            self.segment_word(w, start as u32, scratch, out);
            return;
        }
        let base = start as u32;
        if let Some(segs) = scratch.cache.get(w) {
            out.extend(segs.iter().map(|&(id, a, b)| (id, a + base, b + base)));
            return;
        }
        let first = out.len();
        self.segment_word(w, base, scratch, out);
        scratch.cache.insert(w, out[first..].iter().map(|&(id, a, b)| (id, a - base, b - base)));
    }

    /// Plain BPE over `s`; segments are reported at `base +` their offset in `s`.
    fn segment_word(&self, s: &[u8], base: u32, scratch: &mut Scratch, out: &mut Vec<Segment>) {
        let Scratch { syms, heap, rev_merge, .. } = scratch;
        syms.clear();
        heap.clear();
        rev_merge.clear();
        if s.is_empty() {
            return;
        }
        let mut i = 0;
        while i < s.len() {
            let (len, id, frozen) = if self.user.is_empty() {
                (char_len(s[i]), NONE, false)
            } else {
                match self.user.longest(self.vocab, &s[i..]) {
                    Some((len, id)) => (len, id, true),
                    None => (char_len(s[i]), NONE, false),
                }
            };
            let len = len.min(s.len() - i);
            let n = syms.len() as u32;
            syms.push(Sym { start: i as u32, len: len as u32, prev: n.wrapping_sub(1), next: n + 1, id, frozen });
            i += len;
        }
        let last = syms.len() - 1;
        syms[last].next = NONE;

        for r in 1..syms.len() as u32 {
            self.push_pair(s, syms, heap, rev_merge, r - 1, r);
        }

        while let Some(e) = heap.pop() {
            let l = !((e >> 64) as u32);
            let id = (e >> 32) as u32;
            let size = e as u32;
            let left = syms[l as usize];
            // An entry is stale when either side has been absorbed or has grown since it was
            // pushed. A live left symbol's right neighbour can only change by absorbing it, so
            // checking the current neighbour is the same as checking the one pushed with it.
            if left.len == 0 || left.next == NONE {
                continue;
            }
            let right = syms[left.next as usize];
            if right.len == 0 || left.len + right.len != size {
                continue;
            }
            let sl = &mut syms[l as usize];
            sl.len = size;
            sl.id = id;
            sl.next = right.next;
            syms[left.next as usize].len = 0;
            if right.next != NONE {
                syms[right.next as usize].prev = l;
            }
            let prev = syms[l as usize].prev;
            self.push_pair(s, syms, heap, rev_merge, prev, l);
            self.push_pair(s, syms, heap, rev_merge, l, right.next);
        }

        let first = out.len();
        let mut k = 0u32;
        while k != NONE {
            let sym = syms[k as usize];
            self.emit(s, sym.id, sym.start, sym.start + sym.len, rev_merge, out);
            k = sym.next;
        }
        if base != 0 {
            for seg in &mut out[first..] {
                seg.1 += base;
                seg.2 += base;
            }
        }
    }

    #[inline]
    fn push_pair(
        &self,
        s: &[u8],
        syms: &[Sym],
        heap: &mut BinaryHeap<u128>,
        rev_merge: &mut HashMap<u32, u32>,
        l: u32,
        r: u32,
    ) {
        if l == NONE || r == NONE {
            return;
        }
        let (a, b) = (syms[l as usize], syms[r as usize]);
        if a.frozen || b.frozen {
            return;
        }
        let size = (a.len + b.len) as usize;
        if size > self.max_piece_len {
            return;
        }
        let start = a.start as usize;
        let Some(id) = self.normal.get(self.vocab, &s[start..start + size]) else {
            return;
        };
        let key = (u64::from(self.score_keys[id as usize]) << 32) | u64::from(!l);
        heap.push((u128::from(key) << 64) | (u128::from(id) << 32) | size as u128);
        if let Some(unused) = self.unused {
            if unused[id as usize] {
                // Like SentencePiece, remember the latest split of each UNUSED piece, keyed by the
                // piece, so the final output can be split back into usable pieces.
                rev_merge.insert(id, a.len);
            }
        }
    }

    fn emit(&self, s: &[u8], id: u32, start: u32, end: u32, rev_merge: &HashMap<u32, u32>, out: &mut Vec<Segment>) {
        if let (Some(unused), true) = (self.unused, id != NONE) {
            if unused[id as usize] && !self.remap.contains_key(&id) {
                if let Some(&left_len) = rev_merge.get(&id) {
                    // The recorded split may come from another occurrence of the same string;
                    // only its left length matters.
                    let mid = start + left_len;
                    let li = self.normal.get(self.vocab, &s[start as usize..mid as usize]).unwrap_or(NONE);
                    let ri = self.normal.get(self.vocab, &s[mid as usize..end as usize]).unwrap_or(NONE);
                    self.emit(s, li, start, mid, rev_merge, out);
                    self.emit(s, ri, mid, end, rev_merge, out);
                    return;
                }
            }
        }
        // Resolve as SentencePiece's PieceToId does: reserved pieces first, then the others,
        // else unknown.
        let id = if id == NONE {
            let piece = &s[start as usize..end as usize];
            self.reserved.get(self.vocab, piece).or_else(|| self.normal.get(self.vocab, piece)).unwrap_or(self.unk_id)
        } else if self.remap.is_empty() {
            id
        } else {
            self.remap.get(&id).copied().unwrap_or(id)
        };
        out.push((id, start, end));
    }
}
