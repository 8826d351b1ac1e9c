//! The first byte picks the reader: a ckpt-0 file at that position of the micro fixture's order,
//! or a torch zip archive. Seed the corpus with tests/data/micro/ckpt0/* and tests/data/bin/**.
#![no_main]

use grok1::checkpoint::{ckpt0, torch_bin};
use grok1::GrokConfig;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    if which < 26 {
        let cfg = GrokConfig {
            vocab_size: 256,
            d_model: 64,
            ffn_size: 128,
            n_layers: 2,
            n_q_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            ..GrokConfig::default()
        };
        let _ = ckpt0::decode_file(&cfg, which as usize, bytes, Path::new("fuzz"));
    } else if let Ok(ts) = torch_bin::read_archive(bytes) {
        for t in &ts {
            let _ = t.read_all(bytes);
        }
    }
});
