//! The GPU tier: dense weights and the hottest experts on an NVIDIA GPU.
//!
//! Everything that touches CUDA is behind the `cuda` feature, and even then nothing links against
//! CUDA: the driver (`libcuda`) and NVRTC (`libnvrtc`) are loaded at run time, and the kernels
//! (`cu/*.cu`) are CUDA C source compiled by NVRTC for the device that is present. A build with
//! the feature therefore runs on machines without a GPU; [`available`] then says why the GPU
//! cannot be used, and the runner carries on on the CPU. Without the feature only [`available`]
//! (which says so), [`GpuInfo`], the planning in [`plan`] and the kernel sources exist.
//!
//! # Pieces
//!
//! * [`plan`]: what goes on the device under a byte budget (always built, tested without a GPU).
//! * `Gpu` (cuda): context, stream and the compiled kernels; `DeviceMatrix`: one weight matrix
//!   repacked into a device layout (scales apart from quants, 16-byte aligned rows) with
//!   `matvec` (decode: a warp per row, coalesced 16-byte loads) and `matmul` (prefill:
//!   shared-memory tiles, each weight tile dequantized once per 64 tokens); the element-wise
//!   ops and attention over a device KV cache (`ops`); `DenseWeights::upload`, which copies a
//!   converted model's dense tensors to the device with byte counts.
//! * NVRTC can be pointed at a library outside the loader's search path with the environment
//!   variable `GROK1_NVRTC` (the full path of `libnvrtc.so.*`); `.ci/install-nvrtc.sh` installs
//!   one from PyPI, which is enough to compile the kernels on a machine without a GPU.
//!
//! # How the runner uses it (integration design)
//!
//! **Budget.** `grok1-run generate|logits|bench --gpu-budget BYTES` (sizes as
//! `crate::size::parse_size` reads them: `20G`, `24GB`, `0` to keep the GPU out). The default is the device's free memory minus a margin
//! (`plan::default_budget`: the larger of 1 GiB and 5% of the card, for the CUDA context, the
//! kernels' module and fragmentation). The runner prints
//! `no GPU found (REASON); running on the CPU` when [`available`] fails.
//!
//! **What goes where.** `plan::plan` fills the budget in a fixed order: first the KV cache for
//! the context the runner will allow and the activation scratch (without them nothing runs),
//! then all dense weights (the tied embedding / output head, every layer's attention, norms and
//! routers: every token reads them, so they are the best bytes to place), then experts one at a
//! time in the residency policy's ranking (hottest first; `ExpertStore::hottest` on the
//! residency side; `plan::default_ranking` spreads them over the layers when nothing is known
//! yet), skipping any that no longer fit. A budget too small for the dense part
//! gives a plan that uses no GPU, with the reason, rather than a half-placed attention stack.
//! Experts not placed stay with the RAM/disk store; the store learns which experts the GPU holds
//! through its `DeviceResidency` seam and neither reads nor caches those. When the ranking
//! drifts, the runner may swap a GPU expert for a hotter one between tokens (one PCIe upload of
//! the chunk, which the store has to read anyway); the first version keeps the initial
//! placement, ranked from a warm-up prompt.
//!
//! **Per token, only activations cross PCIe.** The residual stream lives on the device. Per
//! layer: attention runs entirely on the GPU (norm, q/k/v matvec, RoPE, KV write, attention,
//! o-projection, post-norm and residual add). The router's input (the pre-MoE norm output,
//! `d_model` floats) is computed on the device and copied to the host, where routing runs in f32
//! exactly as on the CPU (routing flips on tiny differences, and the host needs the choice to
//! start reads early anyway). For the chosen experts:
//! * on the GPU: `gather_rows` (prefill), gate and up `matmul`/`matvec`, `geglu`, down, and
//!   `scatter_add_rows` with the gates into a device MoE accumulator;
//! * on the CPU: the same `d_model` input, already on the host, goes through the CPU kernels
//!   and the store, and the CPU's partial sum (`d_model` floats per token) is uploaded and added
//!   to the accumulator;
//! * then the post-MoE norm and residual add on the device.
//!
//! Bytes over PCIe per token and layer: `d_model` floats down, at most `d_model` floats up (none
//! when both experts are on the GPU), plus the embedding row at the start and the logits
//! (`vocab` floats) at the end. Weights never move per token.
//!
//! **Overlap.** The device's work is queued on its stream asynchronously. Once routing is known
//! the runner launches the GPU experts' kernels, then computes the CPU experts of the same layer
//! on the CPU threads, and only then waits for the stream and uploads the CPU's sum. So a layer
//! costs `max(gpu, cpu)` rather than their sum; with the dense part on the GPU the CPU does
//! nothing but its experts. Prefill batches tokens per expert the same way on both sides.
//!
//! **Stats** (`stats::GpuStats`; the runner's `bench --json` reports `GpuReport` next to the
//! residency store's numbers): GPU expert hit rate and experts per token, bytes copied
//! host-to-device and device-to-host per token, time per device per token (GPU: `Gpu::mark`
//! event timing around each layer's device work; CPU: wall time of its experts), and device
//! memory by kind (dense, experts, KV cache, scratch) from the plan.
//!
//! What exists today: planning (`plan`), stats (`stats`), device buffers and device-time marks,
//! the kernels and their host-side wrappers, and uploading dense tensors and expert chunks. The
//! per-layer loop above is `model/grok.rs` over the backend seam (`src/model/backend.rs`), and
//! the placement module (`src/placement/`) picks the backend: the CPU, a device emulated by the
//! CPU (its own buffers and counted copies, `--emulate-gpu`), or the CUDA device built from the
//! pieces here. A layer's device experts are queued on the stream and the host computes its
//! own meanwhile (the emulated device models this with a thread of its own and counts it);
//! the CUDA device's time per token comes from timing events around its stretches of work.
//! Not yet: the warm-up or trace ranking (the plan uses `plan::default_ranking`).
//!
//! # Checking without a GPU
//!
//! * `tests/gpu_plan.rs`: planning, parsing, the device layouts, launch geometry, the kernel
//!   list (every build);
//! * `tests/gpu_emu.rs`: the kernels' logic, compiled as host C++ against an emulation of the
//!   CUDA execution model, against the CPU references (every build with a C++20 compiler);
//! * `tests/gpu.rs` (feature `cuda`): NVRTC compiles the program for compute_80 and compute_90
//!   and assembles it for sm_90 without register spills; with a GPU, every kernel against the
//!   CPU. `benches/gpu-check.sh` runs all of it, and the runner benchmarks, on a GPU machine.

mod info;
pub mod launch;
pub mod layout;
pub mod plan;
pub mod source;
pub mod stats;

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod matrix;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
mod ops;
#[cfg(feature = "cuda")]
mod upload;

pub use info::GpuInfo;

#[cfg(feature = "cuda")]
pub use device::{Gpu, GpuMark};
#[cfg(feature = "cuda")]
pub use matrix::{DeviceMatrix, MatKernel};
#[cfg(feature = "cuda")]
pub use ops::{AttnShape, DeviceKvCache};
#[cfg(feature = "cuda")]
pub use upload::{DenseWeights, DeviceExpert, DeviceLayer, UploadStats};

/// The first GPU, if this build can use one and one is present: the driver loads, a device
/// exists, a context can be made and NVRTC loads. Otherwise a one-line reason.
#[cfg(feature = "cuda")]
pub fn available() -> Result<GpuInfo, String> {
    device::probe()
}

/// Always `Err` in a build without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub fn available() -> Result<GpuInfo, String> {
    Err("built without the cuda feature".into())
}
