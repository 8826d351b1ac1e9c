//! grok1: convert xAI's Grok-1 checkpoints into a chunked, checksummed quantized format and run
//! them on one workstation.
//!
//! Data flows down this list, and only down:
//!
//! ```text
//! checkpoint   safetensors / ckpt-0 pickles / torch .bin -> canonical tensors, zero-copy
//! quant        rows of f32 -> blocks (q8, q4, bf16), ggml-compatible byte layouts
//! format       chunks, shards, sha256, manifest written last; reader and verifier
//! calib        calibration: what each expert sees and how often; types to a size target
//! convert      the parallel, resumable pipeline that ties the three above together
//! expert       one expert's three matrices, whoever holds them
//! residency    which expert lives where (RAM within a budget, or disk), reads, prefetch; plan
//! kernels      dot products and matrix products per CPU feature set
//! gpu          dense weights and hot experts on an NVIDIA GPU (feature `cuda`)
//! model        the Grok-1 forward pass, readable top to bottom, over a backend seam
//! placement    which backend a run gets: the CPU, or a device holding dense + hot experts
//! tokenizer    SentencePiece BPE, text in, text out
//! target_size  a type per expert to a size target, from the converter's plan and the cost model
//! ```
//!
//! The library never prints: progress flows out through callbacks and results.

pub mod calib;
pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod error;
pub mod expert;
pub mod format;
pub mod gpu;
pub mod kernels;
pub mod model;
pub mod npy;
pub mod observe;
pub mod placement;
pub mod quant;
pub mod residency;
pub mod sampling;
pub mod size;
pub mod synth;
pub mod target_size;
pub mod tokenizer;

pub use config::GrokConfig;
pub use error::{Error, Result};
