//! The MoE's observer hook: told what each forward pass routes and computes. Calibration
//! (`calib::Recorder`) and routing traces (`residency::trace`) implement it; the trait sits below
//! the model, calibration and residency alike, so that none of them imports another for it.
//! Absent in normal runs, where the MoE pays one `Option` test per token and per expert.

/// Told what the MoE routes and computes.
pub trait MoeObserver: Send + Sync {
    /// A forward pass over `n_tokens` tokens starts at KV position `position`. Each layer then
    /// routes its tokens in order, layer 0 first.
    fn pass_started(&self, _position: usize, _n_tokens: usize) {}
    /// Token routed in `layer`: the softmax over all experts and the `k` chosen (expert, gate).
    fn routed(&self, layer: usize, probs: &[f32], chosen: &[(usize, f32)]);
    /// Expert `expert` of `layer` ran on `members` (row of `xn`, gate); `hidden` holds, per
    /// member in order, the GeGLU output that is `down`'s input (`[members.len(), ffn]`).
    fn expert_ran(&self, _layer: usize, _expert: usize, _xn: &[f32], _members: &[(usize, f32)], _hidden: &[f32]) {}
}
