//! Kernels on a real GPU against the CPU reference. Every test takes the one shared `Gpu` (behind
//! a lock: the tests share its stream) and skips with a printed reason when there is none.

mod bench;
mod matrices;
mod ops;
mod upload;

use grok1::gpu::Gpu;
use std::sync::{Mutex, MutexGuard, OnceLock};

pub fn gpu() -> Option<MutexGuard<'static, Gpu>> {
    super::setup();
    static G: OnceLock<Option<Mutex<Gpu>>> = OnceLock::new();
    let g = G.get_or_init(|| match Gpu::new() {
        Ok(g) => {
            eprintln!("GPU: {:?}", g.info());
            Some(Mutex::new(g))
        }
        Err(e) => {
            eprintln!("no GPU for the kernel tests: {e}");
            None
        }
    });
    g.as_ref().map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The shared GPU, or return from the test with a printed reason.
#[macro_export]
macro_rules! gpu_or_skip {
    () => {
        match $crate::gpu_kernels::gpu() {
            Some(g) => g,
            None => {
                eprintln!("skipping: no GPU");
                return;
            }
        }
    };
}

/// Deterministic values in [-scale, scale) with one in 61 eight times larger (outliers).
pub fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = ((x >> 11) as f64 / (1u64 << 53) as f64) as f32 * 2.0 - 1.0;
            if i % 61 == 7 {
                8.0 * scale * u
            } else {
                scale * u
            }
        })
        .collect()
}

/// Largest |a - b| over the elements, and where.
pub fn max_diff(a: &[f32], b: &[f32]) -> (f32, usize) {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).enumerate().map(|(i, (x, y))| ((x - y).abs(), i)).fold((0.0, 0), |m, v| {
        if v.0 > m.0 || v.0.is_nan() {
            v
        } else {
            m
        }
    })
}
