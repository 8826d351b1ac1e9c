//! One weight matrix on the device, in the layout of `layout.rs`, and its products with
//! activations in device memory.

use super::device::{gpu_err, Gpu};
use super::launch::{self, Geometry};
use super::layout::{repack, DeviceLayout};
use super::source;
use crate::error::{Error, Result};
use crate::quant::QuantType;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, LaunchArgs, LaunchConfig, PushKernelArg};

/// Queue a launch of `g`; a grid with no blocks (empty input) queues nothing.
///
/// # Safety
/// `b`'s arguments must match the kernel's parameters, and its buffers must be as large as the
/// kernel will index for `g`.
pub(crate) unsafe fn launch_on(b: &mut LaunchArgs<'_>, g: Geometry, name: &str) -> Result<()> {
    if g.grid.0 == 0 || g.grid.1 == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (g.grid.0, g.grid.1, 1),
        block_dim: (g.block, 1, 1),
        shared_mem_bytes: g.shared_bytes,
    };
    b.launch(cfg).map(|_| ()).map_err(gpu_err(name))
}

/// Which kernel computes a product. `Auto` is what the runner uses: the decode kernel for one
/// token, the tiled kernel for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatKernel {
    Auto,
    /// The warp-per-row kernel, run once per token (each token re-reads the weights).
    Matvec,
    /// The shared-memory tiled kernel.
    Tiled,
}

/// A `[rows, cols]` weight matrix (rows = output channels) resident on the device.
pub struct DeviceMatrix {
    pub qtype: QuantType,
    pub rows: usize,
    pub cols: usize,
    w: CudaSlice<u8>,
    d: Option<CudaSlice<u16>>,
}

impl DeviceMatrix {
    /// Upload a matrix given in the on-disk layout (`rows` rows of `qtype.row_bytes(cols)`
    /// bytes), repacking it for the kernels.
    pub fn upload(
        gpu: &Gpu,
        qtype: QuantType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<DeviceMatrix> {
        let l = repack(qtype, rows, cols, bytes)?;
        Self::from_layout(gpu, &l)
    }

    pub fn from_layout(gpu: &Gpu, l: &DeviceLayout) -> Result<DeviceMatrix> {
        let w = gpu.upload(&l.w)?;
        let d = if l.d.is_empty() { None } else { Some(gpu.upload(&l.d)?) };
        Ok(DeviceMatrix { qtype: l.qtype, rows: l.rows, cols: l.cols, w, d })
    }

    /// Device bytes of the weights (equal to the on-disk size).
    pub fn nbytes(&self) -> u64 {
        (self.w.len() + 2 * self.d.as_ref().map_or(0, |d| d.len())) as u64
    }

    /// `y = W x` on device buffers (`x`: `cols` floats, `y`: `rows` floats). Queued, not waited for.
    pub fn matvec(&self, gpu: &Gpu, x: &CudaView<'_, f32>, y: &mut CudaViewMut<'_, f32>) -> Result<()> {
        self.matmul_with(gpu, x, 1, y, MatKernel::Auto)
    }

    /// `ys[t] = W xs[t]` for `t < n`; `xs` is `[n, cols]`, `ys` is `[n, rows]`, row-major.
    pub fn matmul(
        &self,
        gpu: &Gpu,
        xs: &CudaView<'_, f32>,
        n: usize,
        ys: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        self.matmul_with(gpu, xs, n, ys, MatKernel::Auto)
    }

    pub fn matmul_with(
        &self,
        gpu: &Gpu,
        xs: &CudaView<'_, f32>,
        n: usize,
        ys: &mut CudaViewMut<'_, f32>,
        kernel: MatKernel,
    ) -> Result<()> {
        if xs.len() < n * self.cols || ys.len() < n * self.rows {
            return Err(Error::Invalid(format!(
                "{} matrix [{}, {}] times {n} tokens needs {} inputs and {} outputs, got buffers of {} and {}",
                self.qtype,
                self.rows,
                self.cols,
                n * self.cols,
                n * self.rows,
                xs.len(),
                ys.len()
            )));
        }
        if n == 0 || self.rows == 0 {
            return Ok(());
        }
        // The decode kernels read activations as float4: a view must start 16-byte aligned
        // (any buffer does; a slice of one does when its offset is a multiple of 4 floats).
        let (ptr, _read) = xs.device_ptr(gpu.stream());
        if ptr % 16 != 0 {
            return Err(Error::Invalid(format!(
                "activations for a {} matrix start at device address {ptr:#x}, not 16-byte aligned",
                self.qtype
            )));
        }
        let tiled = match kernel {
            MatKernel::Auto => n > 1,
            MatKernel::Matvec => false,
            MatKernel::Tiled => true,
        };
        if !tiled && n > 65535 {
            return Err(Error::Invalid(format!("the decode kernel takes at most 65535 tokens, got {n}")));
        }
        let (name, g) = if tiled {
            (source::matmul_kernel(self.qtype), launch::matmul(self.rows, n))
        } else {
            (source::matvec_kernel(self.qtype), launch::matvec(self.rows, n))
        };
        let (rows, cols, n_i) = (self.rows as i32, self.cols as i32, n as i32);
        let null = 0u64;
        let mut b = gpu.stream().launch_builder(gpu.func(name));
        b.arg(&self.w);
        match &self.d {
            Some(d) => b.arg(d),
            None => b.arg(&null),
        };
        b.arg(xs).arg(ys).arg(&rows).arg(&cols);
        if tiled {
            b.arg(&n_i);
        }
        // SAFETY: the argument list matches the kernel's signature (cu/matvec.cu, cu/matmul.cu),
        // and the buffers hold the sizes checked above.
        unsafe { launch_on(&mut b, g, name) }?;
        Ok(())
    }

    /// Host convenience: upload `xs` (`[n, cols]`), multiply, wait, return `[n, rows]`.
    pub fn matmul_host(&self, gpu: &Gpu, xs: &[f32], n: usize, kernel: MatKernel) -> Result<Vec<f32>> {
        if xs.len() != n * self.cols {
            return Err(Error::Invalid(format!(
                "{} inputs for {n} tokens of {} columns",
                xs.len(),
                self.cols
            )));
        }
        let x = gpu.upload(xs)?;
        let mut y = gpu.zeros::<f32>(n * self.rows)?;
        self.matmul_with(gpu, &x.as_view(), n, &mut y.as_view_mut(), kernel)?;
        gpu.download(&y)
    }

    /// Host convenience: `W x` for one vector.
    pub fn matvec_host(&self, gpu: &Gpu, x: &[f32]) -> Result<Vec<f32>> {
        self.matmul_host(gpu, x, 1, MatKernel::Auto)
    }
}
