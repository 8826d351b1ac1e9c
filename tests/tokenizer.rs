//! Tokenizer tests: Grok-1's real model against recorded SentencePiece output, decoding rules,
//! malformed files, and synthetic models.
//!
//! The real model is not part of the crate; tests that need it read
//! `../shared/grok1/tokenizer.model` and skip with a message when it is absent.

use std::path::PathBuf;
use std::sync::OnceLock;

use grok1::tokenizer::{synth, PieceType, Tokenizer, TokenizerError};

fn shared(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/grok1").join(name)
}

/// The real Grok-1 tokenizer, loaded once; `None` (with a printed reason) when absent.
fn grok() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    let tok = TOK.get_or_init(|| {
        let path = shared("tokenizer.model");
        if !path.exists() {
            return None;
        }
        Some(Tokenizer::from_file(&path).expect("load tokenizer.model"))
    });
    if tok.is_none() {
        eprintln!("skipping: ../shared/grok1/tokenizer.model not found");
    }
    tok.as_ref()
}

#[test]
fn grok_model_facts() {
    let Some(t) = grok() else { return };
    assert_eq!(t.vocab_size(), 131072);
    assert_eq!((t.pad_id(), t.bos_id(), t.eos_id(), t.unk_id()), (Some(0), Some(1), Some(2), 3));
    assert!(t.byte_fallback());
    assert_eq!(t.piece(69), Some("<0x00>"));
    assert_eq!(t.piece(324), Some("<0xFF>"));
    assert_eq!(t.piece(47), Some("<|separator|>"));
    assert_eq!(t.piece_type(47), Some(PieceType::UserDefined));
    assert_eq!(t.piece_type(1), Some(PieceType::Control));
    assert_eq!(t.piece_type(325), Some(PieceType::Normal));
    assert_eq!(t.piece(131072), None);
    assert_eq!(t.piece_to_id("▁the"), Some(333));
    assert_eq!(t.piece_to_id("no such piece"), None);
}

#[test]
fn grok_recorded_cases() {
    let Some(t) = grok() else { return };
    let path = shared("tokenizer-cases.json");
    let Ok(json) = std::fs::read_to_string(&path) else {
        eprintln!("skipping: ../shared/grok1/tokenizer-cases.json not found");
        return;
    };
    let cases: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert!(cases.len() >= 20);
    for c in &cases {
        let text = c["text"].as_str().unwrap();
        let ids: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let pieces: Vec<&str> = c["pieces"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(t.encode(text, false, false), ids, "ids of {text:?}");
        assert_eq!(t.encode_pieces(text), pieces, "pieces of {text:?}");
        let decoded = t.decode(&ids);
        assert_eq!(decoded, c["decoded"].as_str().unwrap(), "decode of {text:?}");
        assert_eq!(decoded == text, c["roundtrip"].as_bool().unwrap(), "round trip of {text:?}");
        if !text.contains('\u{2581}') {
            assert_eq!(decoded, text);
        } else {
            assert_eq!(decoded, text.replace('\u{2581}', " "));
        }
    }
}

#[test]
fn grok_bos_eos() {
    let Some(t) = grok() else { return };
    let text = "The answer to life the universe and everything is of course";
    let plain = t.encode(text, false, false);
    assert_eq!(plain[0], 422);
    let both = t.encode(text, true, true);
    assert_eq!(both.first(), Some(&1));
    assert_eq!(both.last(), Some(&2));
    assert_eq!(&both[1..both.len() - 1], &plain[..]);
    assert_eq!(t.encode("", true, true), vec![1, 2]);
    assert_eq!(t.encode("a", true, false), vec![1, 327]);
    assert_eq!(t.decode(&both), text);
}

#[test]
fn grok_decode_rules() {
    let Some(t) = grok() else { return };
    let cases: &[(&[u32], &str)] = &[
        (&[1, 422], "The"),
        (&[130089, 130089], " "),
        (&[325], " "),
        (&[4, 422], "\n The"),
        (&[309], "\u{FFFD}"),
        (&[309, 228, 221], "\u{FFFD}\u{FFFD}\u{FFFD}"),
        (&[309, 228, 221, 422], "\u{FFFD}\u{FFFD}\u{FFFD} The"),
        (&[3], "[UNK]"),
        (&[3, 3], "[UNK][UNK]"),
        (&[69], "\0"),
        (&[0], ""),
        (&[0, 130089, 422], " The"),
        (&[309, 130089, 422], "\u{FFFD}  The"),
        (&[130089, 309, 422], "\u{FFFD} The"),
        (&[69 + 0xC0, 69 + 0x80], "\u{FFFD}\u{FFFD}"),
        (&[69 + 0xED, 69 + 0xA0, 69 + 0x80], "\u{FFFD}\u{FFFD}\u{FFFD}"),
        (&[69 + 0xEF, 69 + 0xBF, 69 + 0xBD], "\u{FFFD}"),
        (&[69 + 0xE2, 69 + 0x96, 69 + 0x81], "\u{2581}"),
        (&[], ""),
    ];
    for (ids, want) in cases {
        assert_eq!(t.decode(ids), *want, "decode {ids:?}");
    }
    assert!(matches!(t.try_decode(&[422, 131072]), Err(TokenizerError::IdOutOfRange { id: 131072, .. })));
    assert_eq!(t.decode(&[422, 131072]), "The\u{FFFD}");
}

#[test]
fn grok_encode_edge_cases() {
    let Some(t) = grok() else { return };
    let cases: &[(&str, &[u32])] = &[
        ("\0a", &[130089, 69, 130092]),
        ("a\0b", &[327, 69, 130110]),
        ("\u{FFFD}", &[45914]),
        ("\r\n", &[1499, 4]),
        ("\u{2581}", &[325]),
        ("a\u{3000}b", &[327, 130237, 130110]),
        (" \t x", &[325, 24, 1734]),
        ("<|separator|><|mask|>", &[130089, 47, 48]),
        ("<|sep", &[112586, 27435]),
        ("[UNK]", &[794, 56209, 130165]),
        ("\u{200D}", &[130089, 295, 197, 210]),
    ];
    for (text, ids) in cases {
        assert_eq!(t.encode(text, false, false), *ids, "encode {text:?}");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..Default::default()
    })]
    #[test]
    fn grok_round_trip(s in "\\PC*|[ \\t\\n a-z0-9\u{2581}]*") {
        let Some(t) = grok() else { return Ok(()) };
        let ids = t.encode(&s, false, false);
        proptest::prop_assert_eq!(t.decode(&ids), s.replace('\u{2581}', " "));
    }
}

// ---------------------------------------------------------------------------------------------
// Malformed files.

/// Minimal protobuf encoding for hand-made models.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(field: u64, body: &[u8], out: &mut Vec<u8>) {
    varint(field << 3 | 2, out);
    varint(body.len() as u64, out);
    out.extend_from_slice(body);
}

fn piece_msg(text: &str, score: f32, ty: i64) -> Vec<u8> {
    let mut p = Vec::new();
    field_bytes(1, text.as_bytes(), &mut p);
    varint(2 << 3 | 5, &mut p);
    p.extend_from_slice(&score.to_le_bytes());
    varint(3 << 3, &mut p);
    varint(ty as u64, &mut p);
    p
}

/// A tiny BPE model: specials, `▁`, `a`, `b` and the merge `ab`; `extra` pieces appended, and
/// `trainer` fields (already encoded) appended to the trainer spec.
fn tiny_model(extra: &[(&str, i64)], trainer: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    let mut pieces =
        vec![("<pad>", 3), ("<s>", 3), ("</s>", 3), ("<unk>", 2), ("ab", 1), ("\u{2581}", 1), ("a", 1), ("b", 1)];
    pieces.extend_from_slice(extra);
    for (i, (text, ty)) in pieces.iter().enumerate() {
        field_bytes(1, &piece_msg(text, -(i as f32), *ty), &mut m);
    }
    let mut t = Vec::new();
    varint(3 << 3, &mut t);
    varint(2, &mut t); // BPE
    t.extend_from_slice(trainer);
    field_bytes(2, &t, &mut m);
    let mut n = Vec::new();
    field_bytes(1, b"identity", &mut n);
    varint(4 << 3, &mut n);
    varint(0, &mut n);
    field_bytes(3, &n, &mut m);
    m
}

#[test]
fn hand_made_model_works() {
    let t = Tokenizer::from_bytes(&tiny_model(&[], &[])).unwrap();
    assert_eq!(t.vocab_size(), 8);
    assert_eq!(t.encode("ab ba", false, false), vec![5, 4, 5, 7, 6]);
    // No byte fallback: unknown characters become one unknown token per run.
    assert_eq!(t.encode("ab xyz", false, false), vec![5, 4, 5, 3]);
    assert_eq!(t.encode_pieces("ab xyz"), vec!["\u{2581}", "ab", "\u{2581}", "xyz"]);
    assert_eq!(t.decode(&[5, 4, 5, 3]), "ab  \u{2047} ");
    assert_eq!((t.bos_id(), t.eos_id(), t.pad_id()), (Some(1), Some(2), Some(0)));
}

#[test]
fn inner_space_pieces_disable_word_splitting() {
    // "a▁b" spans a word boundary, so words cannot be segmented separately.
    let t = Tokenizer::from_bytes(&tiny_model(&[("a\u{2581}", 1), ("a\u{2581}b", 1)], &[])).unwrap();
    assert!(!t.word_cache());
    assert_eq!(t.encode("a b", false, false), vec![5, 9]);
    let mut plain = Tokenizer::from_bytes(&tiny_model(&[], &[])).unwrap();
    assert!(plain.word_cache());
    plain.set_word_cache(false);
    assert!(!plain.word_cache());
    assert_eq!(plain.encode("ab ba", false, false), vec![5, 4, 5, 7, 6]);
}

fn err_of(bytes: &[u8]) -> String {
    match Tokenizer::from_bytes(bytes) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_files_give_errors() {
    let good = tiny_model(&[], &[]);
    // Every truncation either fails cleanly or (at a field boundary) yields a smaller model.
    for n in 0..good.len() {
        let _ = Tokenizer::from_bytes(&good[..n]);
    }
    assert!(err_of(&good[..good.len() - 1]).contains("truncated"), "{}", err_of(&good[..good.len() - 1]));
    assert_eq!(err_of(&[0x0A, 0x80]), "tokenizer model: truncated varint at byte 1");
    assert!(
        err_of(&[0x0A, 0x05, 0x01]).contains("truncated length-delimited field at byte 1 (needs 5 bytes, 1 remain)")
    );
    assert!(err_of(&[0xFF; 12]).contains("varint longer than 10 bytes"));
    assert!(err_of(&[0x0B]).contains("wire type"), "{}", err_of(&[0x0B]));
    assert!(err_of(&[]).contains("no pieces"));

    let bad_type = tiny_model(&[("zz", 9)], &[]);
    let e = err_of(&bad_type);
    assert!(e.contains("piece 8") && e.contains("unknown piece type 9"), "{e}");

    let dup = tiny_model(&[("ab", 1)], &[]);
    assert!(err_of(&dup).contains("already defined"));
    let two_unk = tiny_model(&[("<unk2>", 2)], &[]);
    assert!(err_of(&two_unk).contains("second unknown"));
    let byte_without_fallback = tiny_model(&[("<0x41>", 6)], &[]);
    assert!(err_of(&byte_without_fallback).contains("byte_fallback is false"));
    let mut fallback = Vec::new();
    varint(35 << 3, &mut fallback);
    varint(1, &mut fallback);
    assert!(err_of(&tiny_model(&[("<0x41>", 6)], &fallback)).contains("no byte piece <0x00>"));
    let mut bos = Vec::new();
    varint(41 << 3, &mut bos);
    varint(99, &mut bos);
    assert_eq!(err_of(&tiny_model(&[], &bos)), "bos_id 99 is out of range (the vocabulary has 8 pieces)");
    let mut unigram = tiny_model(&[], &[]);
    let mut t = Vec::new();
    varint(3 << 3, &mut t);
    varint(1, &mut t);
    field_bytes(2, &t, &mut unigram); // a second trainer_spec merges into the first
    assert!(err_of(&unigram).contains("UNIGRAM"));
    assert_eq!(err_of(&tiny_model(&[("", 1)], &[])), "tokenizer model: piece 8: empty piece");
    let e = Tokenizer::from_file("/nonexistent/dir/tokenizer.model").unwrap_err();
    assert!(e.to_string().contains("/nonexistent/dir/tokenizer.model"));
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[test]
fn random_and_corrupted_bytes_never_panic() {
    let mut rng = Rng(7);
    for len in 0..2000usize {
        let bytes: Vec<u8> = (0..len % 300).map(|_| rng.next() as u8).collect();
        let _ = Tokenizer::from_bytes(&bytes);
    }
    let good = synth::build_model(600);
    for _ in 0..3000 {
        let mut bytes = good.clone();
        for _ in 0..1 + rng.next() % 4 {
            let i = (rng.next() as usize) % bytes.len();
            bytes[i] = rng.next() as u8;
        }
        if let Ok(t) = Tokenizer::from_bytes(&bytes) {
            // A corrupted but loadable model must still encode and decode without panicking.
            let ids = t.encode("hello wörld 123 😀", true, true);
            let _ = t.decode(&ids);
        }
    }
    if let Some(path) = Some(shared("tokenizer.model")).filter(|p| p.exists()) {
        let real = std::fs::read(path).unwrap();
        for k in 1..40 {
            let n = real.len() * k / 40;
            assert!(Tokenizer::from_bytes(&real[..n]).is_err() || n == 0, "prefix of {n} bytes");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Synthetic models.

const SAMPLE: &str =
    "The answer to life, the universe and everything is 42.\n\tdef f(x):\n        return x * 2  # ok\n";

#[test]
fn synthetic_models_round_trip() {
    for &size in &[5usize, 30, 101, 256, 260, 261, 300, 357, 512, 1000, 4096, 32768, 131072] {
        let bytes = synth::build_model(size);
        let t = Tokenizer::from_bytes(&bytes).unwrap_or_else(|e| panic!("size {size}: {e}"));
        assert_eq!(t.vocab_size(), size);
        assert_eq!((t.pad_id(), t.bos_id(), t.eos_id(), t.unk_id()), (Some(0), Some(1), Some(2), 3));
        assert_eq!(t.byte_fallback(), size >= 261);
        if size >= 101 {
            let ids = t.encode(SAMPLE, false, false);
            assert_eq!(t.decode(&ids), SAMPLE, "size {size}");
            assert!(ids.iter().all(|&id| (id as usize) < size));
            if size >= 512 {
                assert!(ids.len() < SAMPLE.chars().count() * 3 / 4, "size {size}: merges should shorten {ids:?}");
            }
        }
        if size >= 261 {
            let text = "naïve café — 你好 😀 👨‍👩‍👧 \u{FFFD} \u{2581}x";
            assert_eq!(t.decode(&t.encode(text, true, true)), text.replace('\u{2581}', " "));
        }
    }
    let t = Tokenizer::from_bytes(&synth::build_model(512)).unwrap();
    assert_eq!(t.piece(4), Some("<0x00>"));
    assert_eq!(t.encode_pieces("the cat"), vec!["\u{2581}the", "\u{2581}c", "at"]);
    assert!(synth::try_build_model(4).is_err());
}
