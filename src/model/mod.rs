//! The Grok-1 forward pass (see `grok.rs`, readable top to bottom), its weights, KV cache, and
//! the pieces it is made of.

pub mod attention;
pub mod backend;
pub mod geglu;
mod grok;
pub mod kv_cache;
pub mod load;
pub mod moe;
pub mod ops;
pub mod weights;

pub use grok::{Model, Scratch};
pub use kv_cache::{KvCache, KvDropList};
pub use weights::{LayerWeights, Weights};
