//! SentencePiece BPE tokenizer: reads a `tokenizer.model` and encodes and decodes exactly as
//! SentencePiece does for BPE models with the identity normalizer (Grok-1's tokenizer among
//! them).
//!
//! What encoding does, in order:
//! 1. normalize: empty input stays empty; otherwise prepend one space (the "dummy prefix") and
//!    escape every ASCII space as U+2581 `▁`. Nothing else changes (no NFKC, tabs and newlines
//!    stay as they are). `remove_extra_whitespaces` is honoured when a model asks for it.
//! 2. split into characters, except that user-defined pieces (Grok-1: newline and tab runs, the
//!    ten digits, `<|separator|>`...) are matched whole, longest first, and never merged;
//! 3. BPE merges by piece score (see [`bpe`]); control, byte and unknown pieces never result
//!    from a merge, and UNUSED pieces are split back into the pieces they were merged from;
//! 4. characters that are not pieces become byte pieces `<0xNN>` of their UTF-8 bytes when the
//!    model has byte fallback, else the unknown id (a run of unknowns becomes one unknown).
//!
//! `TrainerSpec.split_digits` only affects training; Grok-1 splits digits because each digit is a
//! user-defined piece.
//!
//! Decoding turns `▁` back into spaces, drops the dummy-prefix space at the start, reassembles
//! byte pieces into UTF-8 and renders each byte that does not form a valid character as U+FFFD,
//! renders control pieces as nothing and the unknown piece as the model's `unk_surface`.

mod bpe;
mod decode;
mod proto;
pub mod synth;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bpe::{MergeModel, PieceTable, Scratch, Segment, UserMatcher, Vocab, NONE};

/// Errors from loading a model or decoding ids.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("tokenizer model: truncated {what} at byte {offset}")]
    Truncated { what: &'static str, offset: usize },
    #[error("tokenizer model: truncated length-delimited field at byte {offset} (needs {need} bytes, {left} remain)")]
    TruncatedField { offset: usize, need: u64, left: usize },
    #[error("tokenizer model: malformed protobuf at byte {offset}: {msg}")]
    Malformed { offset: usize, msg: String },
    #[error("tokenizer model: piece {id}: {msg}")]
    BadPiece { id: usize, msg: String },
    #[error("{what} {id} is out of range (the vocabulary has {vocab_size} pieces)")]
    IdOutOfRange { what: &'static str, id: i64, vocab_size: usize },
    #[error("tokenizer model: {0}")]
    Invalid(String),
    #[error("tokenizer model: unsupported: {0}")]
    Unsupported(String),
}

/// `ModelProto.SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    fn from_proto(v: i32) -> Option<Self> {
        Some(match v {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => return None,
        })
    }

    fn to_proto(self) -> i64 {
        match self {
            PieceType::Normal => 1,
            PieceType::Unknown => 2,
            PieceType::Control => 3,
            PieceType::UserDefined => 4,
            PieceType::Unused => 5,
            PieceType::Byte => 6,
        }
    }

    /// Pieces that BPE may produce by merging (SentencePiece's `pieces_` map); the others are
    /// reserved and reachable only by id.
    fn mergeable(self) -> bool {
        matches!(self, PieceType::Normal | PieceType::UserDefined | PieceType::Unused)
    }
}

const SPACE_SYMBOL: &str = "\u{2581}";
const DEFAULT_UNK_SURFACE: &str = " \u{2047} ";
/// SentencePiece rejects pieces this long.
const MAX_PIECE_BYTES: usize = 8000;

/// A loaded SentencePiece BPE model. Cheap to share across threads (`&Tokenizer` is `Sync`).
pub struct Tokenizer {
    vocab: Vocab,
    scores: Vec<f32>,
    types: Vec<PieceType>,
    score_keys: Vec<u32>,
    normal: PieceTable,
    reserved: PieceTable,
    remap: HashMap<u32, u32>,
    unused: Option<Vec<bool>>,
    user: UserMatcher,
    max_piece_len: usize,
    byte_ids: Option<[u32; 256]>,
    unk_id: u32,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    /// What `add_bos`/`add_eos` insert: the id of the named piece whatever its type, or unknown.
    bos_insert: u32,
    eos_insert: u32,
    unk_surface: String,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
    by_word_exact: bool,
    by_word: bool,
    uid: u64,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("unk_id", &self.unk_id)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("byte_fallback", &self.byte_ids.is_some())
            .finish_non_exhaustive()
    }
}

static NEXT_UID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

thread_local! {
    static SCRATCH: RefCell<(Scratch, Vec<u8>, Vec<Segment>)> = RefCell::default();
}

impl Tokenizer {
    /// Loads a serialized SentencePiece `ModelProto` (a `tokenizer.model` file).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })?;
        Self::from_bytes(&bytes)
    }

    /// Parses a serialized SentencePiece `ModelProto`. Only BPE models without a precompiled
    /// normalization map are accepted.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TokenizerError> {
        let m = proto::parse_model(bytes)?;
        let t = &m.trainer;
        let n = &m.normalizer;
        let size = m.spans.len();
        if size == 0 {
            return Err(TokenizerError::Invalid("the model has no pieces".into()));
        }
        if t.model_type != proto::MODEL_BPE {
            return Err(TokenizerError::Unsupported(format!(
                "model type {}; only BPE is implemented",
                proto::model_type_name(t.model_type)
            )));
        }
        if n.precompiled_charsmap_len > 0 {
            return Err(TokenizerError::Unsupported(format!(
                "normalizer '{}' has a precompiled character map; only the identity normalizer is implemented",
                n.name
            )));
        }
        if m.has_denormalizer {
            return Err(TokenizerError::Unsupported("denormalizer rules".into()));
        }
        if t.treat_whitespace_as_suffix {
            return Err(TokenizerError::Unsupported("treat_whitespace_as_suffix".into()));
        }
        for (what, id) in [("unk_id", t.unk_id), ("bos_id", t.bos_id), ("eos_id", t.eos_id), ("pad_id", t.pad_id)] {
            if id >= 0 && id as usize >= size {
                return Err(TokenizerError::IdOutOfRange { what, id: id.into(), vocab_size: size });
            }
        }

        let vocab = Vocab { arena: m.arena, spans: m.spans };
        let types = m.types;
        let scores = m.scores;
        let n_normal = types.iter().filter(|t| t.mergeable()).count();
        let mut normal = PieceTable::new(n_normal);
        let mut reserved = PieceTable::new(size - n_normal);
        let mut user_ids = Vec::new();
        let mut unk_id = None;
        let mut byte_ids = [NONE; 256];
        let mut max_piece_len = 0;
        for id in 0..size as u32 {
            let i = id as usize;
            let text = vocab.text(id);
            let bad = |msg: String| TokenizerError::BadPiece { id: i, msg };
            if text.is_empty() {
                return Err(bad("empty piece".into()));
            }
            if text.len() >= MAX_PIECE_BYTES {
                return Err(bad(format!("piece of {} bytes is too long", text.len())));
            }
            if text.contains('\0') {
                return Err(bad("piece contains a NUL character".into()));
            }
            if scores[i].is_nan() {
                return Err(bad("score is NaN".into()));
            }
            let ty = types[i];
            let table = if ty.mergeable() { &mut normal } else { &mut reserved };
            if let Some(other) = table.insert(&vocab, id) {
                return Err(bad(format!("{text:?} is already defined as piece {other}")));
            }
            match ty {
                PieceType::Normal | PieceType::Unused => max_piece_len = max_piece_len.max(text.len()),
                PieceType::UserDefined => {
                    max_piece_len = max_piece_len.max(text.len());
                    user_ids.push(id);
                }
                PieceType::Unknown => {
                    if let Some(u) = unk_id {
                        return Err(bad(format!("a second unknown piece (the first is piece {u})")));
                    }
                    unk_id = Some(id);
                }
                PieceType::Byte => {
                    if !t.byte_fallback {
                        return Err(bad(format!("byte piece {text:?} but byte_fallback is false")));
                    }
                    let b = piece_to_byte(text).ok_or_else(|| bad(format!("invalid byte piece {text:?}")))?;
                    byte_ids[b as usize] = id;
                }
                PieceType::Control => {}
            }
        }
        let unk_id = unk_id.ok_or_else(|| TokenizerError::Invalid("no piece has type UNKNOWN".into()))?;
        let byte_ids = if t.byte_fallback {
            if let Some(b) = byte_ids.iter().position(|&id| id == NONE) {
                return Err(TokenizerError::Invalid(format!(
                    "byte_fallback is true but there is no byte piece <0x{b:02X}>"
                )));
            }
            Some(byte_ids)
        } else {
            None
        };

        let mut remap = HashMap::new();
        for id in 0..size as u32 {
            if types[id as usize].mergeable() {
                if let Some(r) = reserved.get(&vocab, vocab.bytes(id)) {
                    remap.insert(id, r);
                }
            }
        }
        let score_keys = scores.iter().map(|&s| bpe::score_key(s)).collect();
        let unused =
            types.contains(&PieceType::Unused).then(|| types.iter().map(|&t| t == PieceType::Unused).collect());
        let user = UserMatcher::new(&vocab, &user_ids);

        let mut tok = Tokenizer {
            vocab,
            scores,
            types,
            score_keys,
            normal,
            reserved,
            remap,
            unused,
            user,
            max_piece_len,
            byte_ids,
            unk_id,
            bos_id: None,
            eos_id: None,
            pad_id: None,
            bos_insert: unk_id,
            eos_insert: unk_id,
            unk_surface: t.unk_surface.clone().unwrap_or_else(|| DEFAULT_UNK_SURFACE.into()),
            add_dummy_prefix: n.add_dummy_prefix,
            remove_extra_whitespaces: n.remove_extra_whitespaces,
            escape_whitespaces: n.escape_whitespaces,
            by_word_exact: false,
            by_word: false,
            uid: NEXT_UID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        tok.by_word_exact = tok.unused.is_none() && !tok.has_inner_space();
        tok.by_word = tok.by_word_exact;
        // Like SentencePiece, special ids come from the piece names, and count only when the
        // named piece is a control piece.
        let control = |tok: &Tokenizer, name: &str| {
            let id = tok.piece_to_id(name)?;
            (tok.types[id as usize] == PieceType::Control).then_some(id)
        };
        tok.bos_id = control(&tok, &t.bos_piece);
        tok.eos_id = control(&tok, &t.eos_piece);
        tok.pad_id = control(&tok, &t.pad_piece);
        tok.bos_insert = tok.piece_to_id(&t.bos_piece).unwrap_or(unk_id);
        tok.eos_insert = tok.piece_to_id(&t.eos_piece).unwrap_or(unk_id);
        Ok(tok)
    }

    /// Number of pieces; every id below it is valid.
    pub fn vocab_size(&self) -> usize {
        self.types.len()
    }

    /// The piece string of `id` (`▁` for spaces, `<0xNN>` for bytes).
    pub fn piece(&self, id: u32) -> Option<&str> {
        ((id as usize) < self.vocab_size()).then(|| self.vocab.text(id))
    }

    pub fn score(&self, id: u32) -> Option<f32> {
        self.scores.get(id as usize).copied()
    }

    pub fn piece_type(&self, id: u32) -> Option<PieceType> {
        self.types.get(id as usize).copied()
    }

    /// The id of a piece string, or `None` if it is not in the vocabulary.
    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        let b = piece.as_bytes();
        self.reserved.get(&self.vocab, b).or_else(|| self.normal.get(&self.vocab, b))
    }

    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    pub fn byte_fallback(&self) -> bool {
        self.byte_ids.is_some()
    }

    /// Turns word-at-a-time encoding with a per-thread cache of word segmentations on or off.
    /// It is on by default for models where it is provably exact (no piece has a space after a
    /// non-space character, no UNUSED pieces; Grok-1 qualifies) and cannot be turned on for
    /// others. Both settings give identical ids; turning it off only serves tests and
    /// benchmarks of the plain algorithm.
    pub fn set_word_cache(&mut self, enabled: bool) {
        self.by_word = enabled && self.by_word_exact;
    }

    /// Whether word-at-a-time encoding is in use (see [`Tokenizer::set_word_cache`]).
    pub fn word_cache(&self) -> bool {
        self.by_word
    }

    /// Encodes `text` into ids. Grok-1 was run without BOS/EOS, so pass `false, false` to match
    /// the official runner.
    pub fn encode(&self, text: &str, add_bos: bool, add_eos: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        self.encode_with(text, add_bos, add_eos, |id, _| ids.push(id));
        ids
    }

    /// Encodes `text` into piece strings (what `encode_as_pieces` returns in SentencePiece). An
    /// unknown piece (no byte fallback) is the text it covers.
    pub fn encode_pieces(&self, text: &str) -> Vec<String> {
        let mut pieces = Vec::new();
        self.encode_with(text, false, false, |id, unk_text| {
            pieces.push(match unk_text {
                Some(t) => String::from_utf8_lossy(t).into_owned(),
                None => self.vocab.text(id).to_owned(),
            })
        });
        pieces
    }

    /// Calls `f(id, unknown_text)` for each token; `unknown_text` is the normalized text behind
    /// an unknown token.
    fn encode_with(&self, text: &str, add_bos: bool, add_eos: bool, mut f: impl FnMut(u32, Option<&[u8]>)) {
        if add_bos {
            f(self.bos_insert, None);
        }
        SCRATCH.with(|cell| {
            let mut guard = cell.borrow_mut();
            let (scratch, norm, segs) = &mut *guard;
            self.normalize(text, norm);
            segs.clear();
            self.merge_model().segment(norm, scratch, segs);
            let mut prev_unk: Option<(u32, u32)> = None;
            for &(id, start, end) in segs.iter() {
                let piece = &norm[start as usize..end as usize];
                if self.types[id as usize] != PieceType::Unknown {
                    if let Some((s, e)) = prev_unk.take() {
                        f(self.unk_id, Some(&norm[s as usize..e as usize]));
                    }
                    f(id, None);
                } else if let Some(byte_ids) = &self.byte_ids {
                    for &b in piece {
                        f(byte_ids[b as usize], None);
                    }
                } else {
                    // A run of unknown pieces is reported as one.
                    prev_unk = Some(match prev_unk {
                        Some((s, _)) => (s, end),
                        None => (start, end),
                    });
                }
            }
            if let Some((s, e)) = prev_unk {
                f(self.unk_id, Some(&norm[s as usize..e as usize]));
            }
        });
        if add_eos {
            f(self.eos_insert, None);
        }
    }

    fn merge_model(&self) -> MergeModel<'_> {
        MergeModel {
            vocab: &self.vocab,
            normal: &self.normal,
            reserved: &self.reserved,
            unk_id: self.unk_id,
            score_keys: &self.score_keys,
            unused: self.unused.as_deref(),
            remap: &self.remap,
            user: &self.user,
            max_piece_len: self.max_piece_len,
            space: self.space(),
            by_word: self.by_word,
            uid: self.uid,
        }
    }

    fn space(&self) -> &'static [u8] {
        if self.escape_whitespaces {
            SPACE_SYMBOL.as_bytes()
        } else {
            b" "
        }
    }

    /// Whether some mergeable piece has a space right after a non-space character.
    fn has_inner_space(&self) -> bool {
        let sp = self.space();
        (0..self.vocab_size() as u32).filter(|&id| self.types[id as usize].mergeable()).any(|id| {
            let b = self.vocab.bytes(id);
            let mut i = 0;
            while b[i..].starts_with(sp) {
                i += sp.len();
            }
            b[i..].windows(sp.len()).any(|w| w == sp)
        })
    }

    fn normalize(&self, text: &str, out: &mut Vec<u8>) {
        out.clear();
        if text.is_empty() {
            return;
        }
        let space = self.space();
        out.reserve(text.len() + text.len() / 2 + 3);
        if !self.remove_extra_whitespaces {
            if self.add_dummy_prefix {
                out.extend_from_slice(space);
            }
            for &b in text.as_bytes() {
                if b == b' ' {
                    out.extend_from_slice(space);
                } else {
                    out.push(b);
                }
            }
            return;
        }
        // SentencePiece walks the text in chunks (a user-defined symbol or one character) and
        // drops the spaces at the start of a chunk that follows a chunk ending in a space.
        let mut rest = text.as_bytes();
        let chunk_len = |s: &[u8]| match self.user.longest(&self.vocab, s) {
            Some((n, _)) => n,
            None => bpe::char_len(s[0]).min(s.len()),
        };
        while !rest.is_empty() && chunk_len(rest) == 1 && rest[0] == b' ' {
            rest = &rest[1..];
        }
        if rest.is_empty() {
            return;
        }
        if self.add_dummy_prefix {
            out.extend_from_slice(space);
        }
        let mut prev_space = true;
        while !rest.is_empty() {
            let n = chunk_len(rest);
            let mut chunk = &rest[..n];
            rest = &rest[n..];
            if prev_space {
                while let [b' ', tail @ ..] = chunk {
                    chunk = tail;
                }
            }
            if !chunk.is_empty() {
                for &b in chunk {
                    if b == b' ' {
                        out.extend_from_slice(space);
                    } else {
                        out.push(b);
                    }
                }
                prev_space = chunk.ends_with(b" ");
            }
        }
        while out.ends_with(space) {
            out.truncate(out.len() - space.len());
        }
    }
}

/// `<0xNN>` (upper-case hex, as SentencePiece writes them) to the byte.
fn piece_to_byte(p: &str) -> Option<u8> {
    let hex = p.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 || !hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'A'..=b'F')) {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}
