//! The device: finding it, its context and stream, and the compiled kernel program.

use super::info::GpuInfo;
use super::{nvrtc, source};
use crate::error::{Error, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, DriverError, ValidAsZeroBits,
};
use std::collections::HashMap;
use std::sync::Arc;

/// Map a driver error to ours, naming the operation.
pub(crate) fn gpu_err(what: &str) -> impl FnOnce(DriverError) -> Error + '_ {
    move |e| Error::Gpu(format!("{what}: {e}"))
}

/// The first GPU with the kernel program loaded. All work goes to one stream, in order; calls
/// return once the work is queued, and the `*_host` methods and [`Gpu::download`] wait for it.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    info: GpuInfo,
}

struct Found {
    ctx: Arc<CudaContext>,
    info: GpuInfo,
}

fn find() -> std::result::Result<Found, String> {
    // SAFETY: only tries to open the library by its candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) is not installed".into());
    }
    cudarc::driver::result::init().map_err(|e| format!("the CUDA driver does not initialise: {e}"))?;
    let count = CudaContext::device_count().map_err(|e| format!("cannot count CUDA devices: {e}"))?;
    if count < 1 {
        return Err("the CUDA driver sees no device".into());
    }
    let ctx = CudaContext::new(0).map_err(|e| format!("no context on device 0: {e}"))?;
    let name = ctx.name().map_err(|e| format!("device 0 has no name: {e}"))?;
    let (major, minor) = ctx.compute_capability().map_err(|e| format!("{name}: compute capability: {e}"))?;
    let (free, total) = ctx.mem_get_info().map_err(|e| format!("{name}: memory info: {e}"))?;
    let mut drv = 0i32;
    // SAFETY: the driver is loaded and initialised; the call writes one int.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut drv) };
    nvrtc::present()?;
    let nv = nvrtc::version().map_err(|e| e.to_string())?;
    let archs = nvrtc::supported_archs().map_err(|e| e.to_string())?;
    let cc = (major as u32, minor as u32);
    let arch = match nvrtc::sm_for(cc, &archs) {
        Some(sm) => sm,
        None => nvrtc::arch_for(cc, &archs)
            .ok_or_else(|| {
                format!(
                    "{name} (compute {major}.{minor}) is older than anything NVRTC {}.{} targets ({archs:?})",
                    nv.0, nv.1
                )
            })?
            .to_string(),
    };
    Ok(Found {
        ctx,
        info: GpuInfo {
            ordinal: 0,
            name,
            compute_capability: cc,
            total_bytes: total as u64,
            free_bytes: free as u64,
            driver_cuda: ((drv / 1000) as u32, ((drv % 1000) / 10) as u32),
            nvrtc: nv,
            arch,
        },
    })
}

pub(crate) fn probe() -> std::result::Result<GpuInfo, String> {
    find().map(|f| f.info)
}

impl Gpu {
    /// Open the first GPU and compile and load the kernels for it.
    pub fn new() -> Result<Gpu> {
        let Found { ctx, info } = find().map_err(|why| Error::Gpu(format!("no usable device: {why}")))?;
        // Machine code for the device where NVRTC knows it, else PTX the driver compiles.
        let image = if info.arch.starts_with("sm_") {
            cudarc::nvrtc::Ptx::from_binary(nvrtc::compile_cubin(&info.arch)?.0)
        } else {
            let arch = nvrtc::ARCHS.iter().copied().find(|a| *a == info.arch).expect("arch comes from ARCHS");
            nvrtc::compile(arch)?
        };
        let module = ctx.load_module(image).map_err(gpu_err("loading the kernel module"))?;
        let mut funcs = HashMap::new();
        for name in source::kernel_names() {
            let f = module.load_function(name).map_err(gpu_err(name))?;
            funcs.insert(name, f);
        }
        // One stream, used in order: cudarc's per-buffer event bookkeeping would only add cost.
        // SAFETY: every buffer of this handle is used on `stream` alone.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own (non-blocking): the legacy default stream would serialise with
        // every other stream, such as one uploading experts while this one computes.
        let stream = ctx.new_stream().map_err(gpu_err("creating a stream"))?;
        Ok(Gpu { ctx, stream, funcs, info })
    }

    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub(crate) fn func(&self, name: &str) -> &CudaFunction {
        &self.funcs[name]
    }

    /// (free, total) device memory now.
    pub fn mem_info(&self) -> Result<(u64, u64)> {
        let (f, t) = self.ctx.mem_get_info().map_err(gpu_err("memory info"))?;
        Ok((f as u64, t as u64))
    }

    /// Copy host data to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(data).map_err(gpu_err("host-to-device copy"))
    }

    /// A new zeroed device buffer of `n` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(n).map_err(gpu_err("device allocation"))
    }

    /// Wait for the queued work, then copy a device buffer to the host.
    pub fn download<T: DeviceRepr + Default + Clone>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        let v = self.stream.clone_dtoh(buf).map_err(gpu_err("device-to-host copy"))?;
        self.synchronize()?;
        Ok(v)
    }

    /// A mark in the stream: the device time between two marks is the time its work between
    /// them took, without waiting for anything when the marks are set.
    pub fn mark(&self) -> Result<GpuMark> {
        let flags = cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        let e = self.ctx.new_event(Some(flags)).map_err(gpu_err("creating an event"))?;
        e.record(&self.stream).map_err(gpu_err("recording an event"))?;
        Ok(GpuMark(e))
    }

    /// Wait for all queued work (and surface any error a kernel raised).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(gpu_err("waiting for the GPU"))
    }
}

/// A point in the GPU's stream, from [`Gpu::mark`].
pub struct GpuMark(cudarc::driver::CudaEvent);

impl GpuMark {
    /// Seconds of device time from `self` to `later`; waits until `later` is reached.
    pub fn seconds_to(&self, later: &GpuMark) -> Result<f64> {
        let ms = self.0.elapsed_ms(&later.0).map_err(gpu_err("timing events"))?;
        Ok(ms as f64 / 1e3)
    }
}
