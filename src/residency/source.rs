//! Where the mixture of experts gets its experts from, and the hook through which it tells the
//! source its guess for the next layer.
//!
//! The MoE routes, then asks the source for the experts it needs; a source that streams experts
//! (the `ExpertStore`) also takes a guess of the next layer's experts, so that their reads
//! overlap with this layer's compute. Resident weights need no guess and say so, and the MoE
//! then does not compute one.

use crate::error::Result;
use crate::expert::Expert;

pub trait ExpertSource: Sync {
    /// Hand each expert of `needed` (distinct indices) of `layer` to `f` exactly once, in the
    /// order they become available. The first error (a failed read, an `f` that failed) ends
    /// the call.
    fn for_each_expert(
        &self,
        layer: usize,
        needed: &[usize],
        f: &mut dyn FnMut(usize, &Expert) -> Result<()>,
    ) -> Result<()>;

    /// Whether [`ExpertSource::guess_next_layer`] does anything.
    fn takes_guesses(&self) -> bool {
        false
    }

    /// The experts `layer` will likely ask for, guessed before its turn.
    fn guess_next_layer(&self, _layer: usize, _guessed: &[usize]) {}

    /// `n` tokens went through the whole model (per-token statistics).
    fn tokens_done(&self, _n: u64) {}
}
