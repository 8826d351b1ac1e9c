//! Synthetic SentencePiece BPE models of any vocabulary size, for demo checkpoints that have no
//! real `tokenizer.model`. The output is an ordinary serialized `ModelProto`, so SentencePiece
//! itself loads it and encodes exactly as [`super::Tokenizer`] does.
//!
//! Layout (ids in order):
//! * 0 `[PAD]`, 1 `[BOS]`, 2 `[EOS]` (control), 3 `[UNK]` (unknown);
//! * when `vocab_size >= 261`: the 256 byte pieces `<0x00>`..`<0xFF>` (ids 4..259) and byte
//!   fallback, so every text round-trips;
//! * merges, best score first: frequent English bigrams, code punctuation, space runs, then
//!   common words with a `▁` prefix (each preceded by its own prefixes, so BPE can reach it),
//!   then an enumeration of `▁`+letters and letter strings by length until the vocabulary is full;
//! * single characters last (lowest scores): `▁`, letters, digits, ASCII punctuation, `\n`, `\t`.
//!
//! Smaller vocabularies: when `vocab_size - 4 - bytes` is less than the 97 single characters,
//! only the first ones in the list above are kept and there are no merges. Below 261 there are
//! no byte pieces and no byte fallback: characters outside the kept set encode to `[UNK]` and do
//! not round-trip (a 256-piece model keeps all 97 characters, so ASCII text still round-trips).
//! The smallest model is 5 pieces (the four specials and `▁`).

use std::collections::HashSet;

use super::proto::{Writer, MODEL_BPE};
use super::{PieceType, TokenizerError};

/// Smallest vocabulary [`build_model`] accepts.
pub const MIN_VOCAB: usize = 5;

const SPECIALS: [(&str, PieceType); 4] = [
    ("[PAD]", PieceType::Control),
    ("[BOS]", PieceType::Control),
    ("[EOS]", PieceType::Control),
    ("[UNK]", PieceType::Unknown),
];

const CHARS: &str =
    "\u{2581}etaoinshrdlcumwfgypbvkjxqzETAOINSHRDLCUMWFGYPBVKJXQZ0123456789.,'\"-?!:;()[]{}<>/\\|@#$%^&*_+=~`\n\t";

/// Written with `_` for `▁`.
const BIGRAMS: &str = "_t _a he in th er _s on re an _w _o _c _b at en nd _f _p es or _m _d it ed is ou ar \
    _h _i al te st le ng se to nt ha as io ve co me de hi ri ro ic ne ea ra ce li ch ll be ma si om ur";
const CODE: &str = "() ): (): == -> != <= >= += // ** :: _= _+ _- _* _/ _( _{ _} _# _\" _' _< _> __ ___ ____ ________";
const WORDS: &str = "the of and to in is you that it he was for on are as with his they at be this have from \
    or one had by word but not what all were we when your can said there use an each which she do how \
    their if will up other about out many then them these so some her would make like him into time has \
    look two more write go see number no way could people my than first water been call who its now find \
    long down day did get come made may part The In It This A I Hello world answer life universe \
    everything course model token text data code def return print import else self true false None";

/// A serialized SentencePiece BPE model with exactly `vocab_size` pieces.
///
/// # Panics
/// If `vocab_size` is below [`MIN_VOCAB`]; see [`try_build_model`] for a non-panicking form.
pub fn build_model(vocab_size: usize) -> Vec<u8> {
    try_build_model(vocab_size).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`build_model`], but returns an error for a vocabulary below [`MIN_VOCAB`] or above
/// `i32::MAX` pieces.
pub fn try_build_model(vocab_size: usize) -> Result<Vec<u8>, TokenizerError> {
    if !(MIN_VOCAB..=i32::MAX as usize).contains(&vocab_size) {
        return Err(TokenizerError::Invalid(format!(
            "a synthetic model needs between {MIN_VOCAB} and {} pieces, not {vocab_size}",
            i32::MAX
        )));
    }
    // Byte fallback only once `▁` fits too; without it a space would decode as a literal `▁`.
    let byte_fallback = vocab_size > SPECIALS.len() + 256;
    let n_bytes = if byte_fallback { 256 } else { 0 };
    let chars: Vec<char> = CHARS.chars().take(vocab_size - SPECIALS.len() - n_bytes).collect();
    let n_merges = vocab_size - SPECIALS.len() - n_bytes - chars.len();
    let merges = merges(&chars, n_merges);

    let mut model = Writer::default();
    let mut piece = |text: &str, score: f32, ty: PieceType| {
        let mut p = Writer::default();
        p.bytes(1, text.as_bytes());
        p.float(2, score);
        if ty != PieceType::Normal {
            p.int(3, ty.to_proto());
        }
        model.message(1, p);
    };
    for (text, ty) in SPECIALS {
        piece(text, 0.0, ty);
    }
    for b in 0..n_bytes {
        piece(&format!("<0x{b:02X}>"), 0.0, PieceType::Byte);
    }
    let mut rank = 0.0f32;
    for m in &merges {
        piece(m, -rank, PieceType::Normal);
        rank += 1.0;
    }
    for c in &chars {
        piece(c.encode_utf8(&mut [0; 4]), -rank, PieceType::Normal);
        rank += 1.0;
    }

    let mut t = Writer::default();
    t.int(3, MODEL_BPE.into());
    t.int(4, vocab_size as i64);
    t.int(20, 16);
    t.boolean(35, byte_fallback);
    t.int(40, 3);
    t.int(41, 1);
    t.int(42, 2);
    t.int(43, 0);
    t.bytes(44, b"[UNK]");
    t.bytes(45, b"[UNK]");
    t.bytes(46, b"[BOS]");
    t.bytes(47, b"[EOS]");
    t.bytes(48, b"[PAD]");
    model.message(2, t);

    let mut n = Writer::default();
    n.bytes(1, b"identity");
    n.boolean(3, true);
    n.boolean(4, false);
    n.boolean(5, true);
    model.message(3, n);
    Ok(model.buf)
}

/// `count` distinct multi-character pieces built only from `chars`, each preceded by its
/// prefixes.
fn merges(chars: &[char], count: usize) -> Vec<String> {
    let allowed: HashSet<char> = chars.iter().copied().collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut out = Vec::with_capacity(count);
    let mut add = |s: &str, out: &mut Vec<String>| {
        let s = s.replace('_', "\u{2581}");
        if s.chars().count() < 2 || !s.chars().all(|c| allowed.contains(&c)) {
            return;
        }
        let ends = s.char_indices().map(|(i, c)| i + c.len_utf8()).skip(1);
        for end in ends {
            if out.len() == count {
                return;
            }
            if seen.insert(s[..end].to_owned()) {
                out.push(s[..end].to_owned());
            }
        }
    };
    for s in BIGRAMS.split_whitespace().chain(CODE.split_whitespace()) {
        add(s, &mut out);
    }
    for w in WORDS.split_whitespace() {
        add(&format!("_{w}"), &mut out);
    }
    // Then every `▁`+word and word over the kept lower-case letters, shortest first; a string's
    // prefixes are always shorter, so they come earlier. With no letters, space runs fill up.
    let letters: Vec<char> = chars.iter().copied().filter(char::is_ascii_lowercase).collect();
    if letters.is_empty() {
        let mut run = String::from("__");
        while out.len() < count {
            add(&run, &mut out);
            run.push('_');
        }
        return out;
    }
    let mut len = 1u32;
    while out.len() < count {
        let total = (letters.len() as u64).saturating_pow(len);
        for with_space in [true, false] {
            for mut k in 0..total {
                if out.len() == count {
                    return out;
                }
                let mut word = vec![' '; len as usize];
                for slot in word.iter_mut().rev() {
                    *slot = letters[(k % letters.len() as u64) as usize];
                    k /= letters.len() as u64;
                }
                let word: String = word.into_iter().collect();
                add(&if with_space { format!("_{word}") } else { word }, &mut out);
            }
        }
        len += 1;
    }
    out
}
