//! Just enough protobuf to read and write SentencePiece's `ModelProto`.
//!
//! The schema is small and stable, so a hand-written reader keeps the crate free of a protobuf
//! code generator. Every error names the byte offset in the file where reading stopped, which is
//! what one needs to look at a damaged file with a hex dump.

use super::{PieceType, TokenizerError};

type Result<T> = std::result::Result<T, TokenizerError>;

// Wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// A cursor over one message. `base` is the message's offset in the whole file, so that errors
/// inside nested messages still report absolute positions.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize) -> Self {
        Reader { buf, pos: 0, base }
    }

    fn at(&self) -> usize {
        self.base + self.pos
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Result<u64> {
        let start = self.at();
        let mut v: u64 = 0;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(TokenizerError::Truncated { what: "varint", offset: start });
            };
            self.pos += 1;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(TokenizerError::Malformed { offset: start, msg: "varint longer than 10 bytes".into() })
    }

    /// Next field key, or `None` at the end of the message.
    fn key(&mut self) -> Result<Option<(u32, u8, usize)>> {
        if self.done() {
            return Ok(None);
        }
        let at = self.at();
        let k = self.varint()?;
        let field = k >> 3;
        if field == 0 || field > u64::from(u32::MAX >> 3) {
            return Err(TokenizerError::Malformed { offset: at, msg: format!("invalid field number {field}") });
        }
        Ok(Some((field as u32, (k & 7) as u8, at)))
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(TokenizerError::Truncated { what, offset: self.at() });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// A length-delimited payload and its absolute offset.
    fn bytes(&mut self) -> Result<(&'a [u8], usize)> {
        let at = self.at();
        let n = self.varint()?;
        let left = self.buf.len() - self.pos;
        if n > left as u64 {
            return Err(TokenizerError::TruncatedField { offset: at, need: n, left });
        }
        let body = self.at();
        Ok((self.take(n as usize, "length-delimited field")?, body))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let (b, at) = self.bytes()?;
        String::from_utf8(b.to_vec())
            .map_err(|_| TokenizerError::Malformed { offset: at, msg: format!("{what} is not valid UTF-8") })
    }

    fn fixed32(&mut self) -> Result<u32> {
        let b = self.take(4, "fixed32")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn skip(&mut self, wire: u8, at: usize) -> Result<()> {
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8, "fixed64").map(drop),
            LEN => self.bytes().map(drop),
            FIXED32 => self.take(4, "fixed32").map(drop),
            w => Err(TokenizerError::Malformed { offset: at, msg: format!("unsupported wire type {w}") }),
        }
    }

    /// Reads a field whose wire type must be `want`; a mismatch is an error rather than a silent
    /// skip, because it means the file is not a SentencePiece model.
    fn wire_type(&self, wire: u8, want: u8, at: usize, name: &str) -> Result<()> {
        if wire == want {
            Ok(())
        } else {
            Err(TokenizerError::Malformed {
                offset: at,
                msg: format!("field {name} has wire type {wire}, expected {want}"),
            })
        }
    }
}

/// Model type from `TrainerSpec.model_type`.
pub const MODEL_UNIGRAM: i32 = 1;
pub const MODEL_BPE: i32 = 2;

pub fn model_type_name(t: i32) -> String {
    match t {
        1 => "UNIGRAM".into(),
        2 => "BPE".into(),
        3 => "WORD".into(),
        4 => "CHAR".into(),
        n => format!("unknown ({n})"),
    }
}

/// The fields of `TrainerSpec` that encoding and decoding depend on, with protobuf defaults.
#[derive(Debug, Clone)]
pub struct TrainerSpec {
    pub model_type: i32,
    pub vocab_size: i32,
    pub max_sentencepiece_length: i32,
    pub split_digits: bool,
    pub treat_whitespace_as_suffix: bool,
    pub byte_fallback: bool,
    pub unk_id: i32,
    pub bos_id: i32,
    pub eos_id: i32,
    pub pad_id: i32,
    pub unk_surface: Option<String>,
    pub unk_piece: String,
    pub bos_piece: String,
    pub eos_piece: String,
    pub pad_piece: String,
}

impl Default for TrainerSpec {
    fn default() -> Self {
        TrainerSpec {
            model_type: MODEL_UNIGRAM,
            vocab_size: 8000,
            max_sentencepiece_length: 16,
            split_digits: false,
            treat_whitespace_as_suffix: false,
            byte_fallback: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            unk_surface: None,
            unk_piece: "<unk>".into(),
            bos_piece: "<s>".into(),
            eos_piece: "</s>".into(),
            pad_piece: "<pad>".into(),
        }
    }
}

/// `NormalizerSpec`, with protobuf defaults.
#[derive(Debug, Clone)]
pub struct NormalizerSpec {
    pub name: String,
    pub precompiled_charsmap_len: usize,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        NormalizerSpec {
            name: String::new(),
            precompiled_charsmap_len: 0,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

/// All pieces in one string arena: a 131072-piece vocabulary becomes three flat vectors instead
/// of 131072 small allocations.
#[derive(Debug, Default)]
pub struct RawModel {
    pub arena: String,
    pub spans: Vec<(u32, u32)>,
    pub scores: Vec<f32>,
    pub types: Vec<PieceType>,
    pub trainer: TrainerSpec,
    pub normalizer: NormalizerSpec,
    pub has_denormalizer: bool,
}

fn int32(v: u64) -> i32 {
    // protobuf int32: negative values are sign-extended 10-byte varints; truncation recovers them.
    v as u32 as i32
}

pub fn parse_model(buf: &[u8]) -> Result<RawModel> {
    if buf.len() > u32::MAX as usize {
        return Err(TokenizerError::Malformed { offset: 0, msg: "file larger than 4 GiB".into() });
    }
    let mut m = RawModel::default();
    let mut r = Reader::new(buf, 0);
    while let Some((field, wire, at)) = r.key()? {
        match field {
            1 => {
                r.wire_type(wire, LEN, at, "ModelProto.pieces")?;
                let (body, base) = r.bytes()?;
                parse_piece(body, base, &mut m)?;
            }
            2 => {
                r.wire_type(wire, LEN, at, "ModelProto.trainer_spec")?;
                let (body, base) = r.bytes()?;
                parse_trainer(body, base, &mut m.trainer)?;
            }
            3 => {
                r.wire_type(wire, LEN, at, "ModelProto.normalizer_spec")?;
                let (body, base) = r.bytes()?;
                parse_normalizer(body, base, &mut m.normalizer)?;
            }
            5 => {
                r.wire_type(wire, LEN, at, "ModelProto.denormalizer_spec")?;
                let (body, base) = r.bytes()?;
                let mut d = NormalizerSpec::default();
                parse_normalizer(body, base, &mut d)?;
                // An identity denormalizer changes nothing; anything else we cannot honour.
                m.has_denormalizer |= d.precompiled_charsmap_len > 0;
            }
            _ => r.skip(wire, at)?,
        }
    }
    Ok(m)
}

fn parse_piece(buf: &[u8], base: usize, m: &mut RawModel) -> Result<()> {
    let id = m.spans.len();
    let mut text: Option<&[u8]> = None;
    let mut score = 0.0f32;
    let mut ty = PieceType::Normal;
    let mut r = Reader::new(buf, base);
    while let Some((field, wire, at)) = r.key()? {
        match field {
            1 => {
                r.wire_type(wire, LEN, at, "SentencePiece.piece")?;
                text = Some(r.bytes()?.0);
            }
            2 => {
                r.wire_type(wire, FIXED32, at, "SentencePiece.score")?;
                score = f32::from_bits(r.fixed32()?);
            }
            3 => {
                r.wire_type(wire, VARINT, at, "SentencePiece.type")?;
                let v = int32(r.varint()?);
                ty = PieceType::from_proto(v)
                    .ok_or(TokenizerError::BadPiece { id, msg: format!("unknown piece type {v} (at byte {at})") })?;
            }
            _ => r.skip(wire, at)?,
        }
    }
    let text = text.unwrap_or(b"");
    let text = std::str::from_utf8(text)
        .map_err(|_| TokenizerError::BadPiece { id, msg: format!("not valid UTF-8 (at byte {base})") })?;
    let start = m.arena.len() as u32;
    m.arena.push_str(text);
    m.spans.push((start, text.len() as u32));
    m.scores.push(score);
    m.types.push(ty);
    Ok(())
}

fn parse_trainer(buf: &[u8], base: usize, t: &mut TrainerSpec) -> Result<()> {
    let mut r = Reader::new(buf, base);
    while let Some((field, wire, at)) = r.key()? {
        macro_rules! int {
            ($name:literal) => {{
                r.wire_type(wire, VARINT, at, $name)?;
                int32(r.varint()?)
            }};
        }
        macro_rules! boolean {
            ($name:literal) => {{
                r.wire_type(wire, VARINT, at, $name)?;
                r.varint()? != 0
            }};
        }
        macro_rules! string {
            ($name:literal) => {{
                r.wire_type(wire, LEN, at, $name)?;
                r.string($name)?
            }};
        }
        match field {
            3 => t.model_type = int!("TrainerSpec.model_type"),
            4 => t.vocab_size = int!("TrainerSpec.vocab_size"),
            20 => t.max_sentencepiece_length = int!("TrainerSpec.max_sentencepiece_length"),
            24 => t.treat_whitespace_as_suffix = boolean!("TrainerSpec.treat_whitespace_as_suffix"),
            25 => t.split_digits = boolean!("TrainerSpec.split_digits"),
            35 => t.byte_fallback = boolean!("TrainerSpec.byte_fallback"),
            40 => t.unk_id = int!("TrainerSpec.unk_id"),
            41 => t.bos_id = int!("TrainerSpec.bos_id"),
            42 => t.eos_id = int!("TrainerSpec.eos_id"),
            43 => t.pad_id = int!("TrainerSpec.pad_id"),
            44 => t.unk_surface = Some(string!("TrainerSpec.unk_surface")),
            45 => t.unk_piece = string!("TrainerSpec.unk_piece"),
            46 => t.bos_piece = string!("TrainerSpec.bos_piece"),
            47 => t.eos_piece = string!("TrainerSpec.eos_piece"),
            48 => t.pad_piece = string!("TrainerSpec.pad_piece"),
            _ => r.skip(wire, at)?,
        }
    }
    Ok(())
}

fn parse_normalizer(buf: &[u8], base: usize, n: &mut NormalizerSpec) -> Result<()> {
    let mut r = Reader::new(buf, base);
    while let Some((field, wire, at)) = r.key()? {
        match field {
            1 => {
                r.wire_type(wire, LEN, at, "NormalizerSpec.name")?;
                n.name = r.string("NormalizerSpec.name")?;
            }
            2 => {
                r.wire_type(wire, LEN, at, "NormalizerSpec.precompiled_charsmap")?;
                n.precompiled_charsmap_len = r.bytes()?.0.len();
            }
            3..=5 => {
                r.wire_type(wire, VARINT, at, "NormalizerSpec flag")?;
                let v = r.varint()? != 0;
                match field {
                    3 => n.add_dummy_prefix = v,
                    4 => n.remove_extra_whitespaces = v,
                    _ => n.escape_whitespaces = v,
                }
            }
            _ => r.skip(wire, at)?,
        }
    }
    Ok(())
}

/// Protobuf writer, used to build synthetic models.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }

    pub fn int(&mut self, field: u32, v: i64) {
        self.key(field, VARINT);
        self.varint(v as u64);
    }

    pub fn boolean(&mut self, field: u32, v: bool) {
        self.int(field, i64::from(v));
    }

    pub fn bytes(&mut self, field: u32, v: &[u8]) {
        self.key(field, LEN);
        self.varint(v.len() as u64);
        self.buf.extend_from_slice(v);
    }

    pub fn float(&mut self, field: u32, v: f32) {
        self.key(field, FIXED32);
        self.buf.extend_from_slice(&v.to_bits().to_le_bytes());
    }

    pub fn message(&mut self, field: u32, inner: Writer) {
        self.bytes(field, &inner.buf);
    }
}
