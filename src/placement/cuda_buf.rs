//! A growable device buffer (feature `cuda`): the CUDA backend's activations.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, ValidAsZeroBits};

/// Empty until first reserved; grows (losing its contents) and never shrinks.
pub struct CudaBuf<T>(Option<CudaSlice<T>>);

impl<T> Default for CudaBuf<T> {
    fn default() -> Self {
        CudaBuf(None)
    }
}

impl<T: DeviceRepr + ValidAsZeroBits> CudaBuf<T> {
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |s| s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hold at least `n` values; a buffer that grows is new, zeroed.
    pub fn reserve(&mut self, gpu: &Gpu, n: usize) -> Result<()> {
        if self.len() < n {
            self.0 = Some(gpu.zeros(n)?);
        }
        Ok(())
    }

    pub fn view(&self, n: usize) -> Result<CudaView<'_, T>> {
        match &self.0 {
            Some(s) if s.len() >= n => Ok(s.slice(0..n)),
            _ => Err(Error::Invalid(format!("device buffer of {} values read as {n}", self.len()))),
        }
    }

    pub fn view_mut(&mut self, n: usize) -> Result<CudaViewMut<'_, T>> {
        let len = self.len();
        match &mut self.0 {
            Some(s) if len >= n => Ok(s.slice_mut(0..n)),
            _ => Err(Error::Invalid(format!("device buffer of {len} values written as {n}"))),
        }
    }
}
