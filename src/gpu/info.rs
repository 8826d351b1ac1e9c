//! What the probe of the first GPU reports; built with or without the `cuda` feature.

use serde::Serialize;

/// What [`available`](super::available) found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuInfo {
    /// Device ordinal (always 0: the tier uses the first device).
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for an H100.
    pub compute_capability: (u32, u32),
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// CUDA version the driver supports, (major, minor).
    pub driver_cuda: (u32, u32),
    /// NVRTC's version, (major, minor).
    pub nvrtc: (u32, u32),
    /// What the kernels are compiled for: the device's own architecture (`sm_90`, machine
    /// code) when NVRTC knows it, else the newest virtual one below it (`compute_90`, PTX).
    pub arch: String,
}
