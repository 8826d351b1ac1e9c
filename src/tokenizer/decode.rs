//! Ids back to text, following SentencePiece's decoder.

use super::{piece_to_byte, PieceType, Tokenizer, TokenizerError, SPACE_SYMBOL};

impl Tokenizer {
    /// Decodes ids to text. An id outside the vocabulary becomes U+FFFD; use
    /// [`Tokenizer::try_decode`] to reject it instead.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.decode_impl(ids, false).unwrap_or_default()
    }

    /// Like [`Tokenizer::decode`], but fails on an id outside the vocabulary, as SentencePiece
    /// does.
    pub fn try_decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.decode_impl(ids, true)
    }

    fn decode_impl(&self, ids: &[u32], strict: bool) -> Result<String, TokenizerError> {
        let mut text = String::with_capacity(ids.len() * 4);
        let mut bytes: Vec<u8> = Vec::new();
        let mut is_bos_ws = true;
        let mut bos_ws_seen = false;
        for &raw in ids {
            if raw as usize >= self.vocab_size() {
                if strict {
                    return Err(TokenizerError::IdOutOfRange {
                        what: "token id",
                        id: raw.into(),
                        vocab_size: self.vocab_size(),
                    });
                }
                flush_bytes(&mut bytes, &mut text);
                text.push('\u{FFFD}');
                bos_ws_seen = false;
                is_bos_ws = false;
                continue;
            }
            // SentencePiece decodes a piece string, so a normal piece spelled like a reserved
            // one is treated as the reserved piece.
            let id = if self.remap.is_empty() { raw } else { self.remap.get(&raw).copied().unwrap_or(raw) };
            if self.types[id as usize] == PieceType::Byte {
                if let Some(b) = piece_to_byte(self.vocab.text(id)) {
                    bytes.push(b);
                    continue;
                }
            }
            flush_bytes(&mut bytes, &mut text);
            if bos_ws_seen || !text.is_empty() {
                is_bos_ws = false;
            }
            bos_ws_seen = false;
            match self.types[id as usize] {
                PieceType::Control => {}
                PieceType::Unknown => text.push_str(&self.unk_surface),
                _ => {
                    let mut piece = self.vocab.text(id);
                    if is_bos_ws && (self.add_dummy_prefix || self.remove_extra_whitespaces) {
                        if let Some(rest) = piece.strip_prefix(SPACE_SYMBOL) {
                            piece = rest;
                            bos_ws_seen = !self.remove_extra_whitespaces;
                        }
                    }
                    push_unescaped(&mut text, piece);
                }
            }
        }
        flush_bytes(&mut bytes, &mut text);
        Ok(text)
    }
}

fn push_unescaped(text: &mut String, piece: &str) {
    let mut rest = piece;
    while let Some(i) = rest.find(SPACE_SYMBOL) {
        text.push_str(&rest[..i]);
        text.push(' ');
        rest = &rest[i + SPACE_SYMBOL.len()..];
    }
    text.push_str(rest);
}

/// Appends a run of byte pieces: each valid UTF-8 character as itself, each byte that does not
/// start one as U+FFFD (one per byte, as SentencePiece does; `from_utf8_lossy` would merge some).
fn flush_bytes(bytes: &mut Vec<u8>, text: &mut String) {
    let mut i = 0;
    while i < bytes.len() {
        match valid_char(&bytes[i..]) {
            Some(c) => {
                text.push_str(c);
                i += c.len();
            }
            None => {
                text.push('\u{FFFD}');
                i += 1;
            }
        }
    }
    bytes.clear();
}

/// The valid UTF-8 character at the start of `b`, if there is one.
fn valid_char(b: &[u8]) -> Option<&str> {
    let n = match b[0] {
        0x00..=0x7F => 1,
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return None,
    };
    // std rejects overlong forms, surrogates and code points above U+10FFFF, which is exactly
    // what SentencePiece's decoder rejects.
    std::str::from_utf8(b.get(..n)?).ok()
}
