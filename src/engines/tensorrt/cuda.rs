//! The GPU an engine runs on, through the CUDA driver API loaded at run time (`cudarc`, no link-time CUDA).
//!
//! The engine's inputs and outputs are libtorch CUDA tensors (their `data_ptr`). TensorRT runs on a stream of
//! its own; before a run the device is synchronised (libtorch wrote the inputs on its stream) and after it the
//! stream is, so the outputs are complete before libtorch reads them.

use std::ffi::c_void;
use std::sync::Arc;

use anyhow::{ensure, Context as _, Result};
use cudarc::driver::{CudaContext, CudaStream};

/// A CUDA device with a stream for TensorRT.
pub struct CudaDevice {
    // The stream before the context: it must be destroyed first.
    stream: Arc<CudaStream>,
    context: Arc<CudaContext>,
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .finish()
    }
}

/// True when the CUDA driver library (libcuda.so) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

impl CudaDevice {
    /// Opens GPU `ordinal` (its primary context, shared with libtorch) and creates a stream.
    pub fn open(ordinal: usize) -> Result<Self> {
        ensure!(
            driver_present(),
            "no CUDA driver (libcuda.so.1) on this machine: TensorRT needs an NVIDIA GPU"
        );
        let count = CudaContext::device_count()
            .map_err(|e| anyhow::anyhow!("the CUDA driver found no usable GPU: {e:?}"))?;
        ensure!(
            (ordinal as i64) < i64::from(count),
            "GPU {ordinal} asked for, but the CUDA driver sees {count} GPU(s)"
        );
        let context = CudaContext::new(ordinal)
            .map_err(|e| anyhow::anyhow!("cannot open GPU {ordinal}: {e:?}"))?;
        let compute_capability = context
            .compute_capability()
            .map_err(|e| anyhow::anyhow!("GPU {ordinal}: compute capability: {e:?}"))?;
        let name = context.name().unwrap_or_else(|_| "unknown GPU".into());
        let stream = context
            .new_stream()
            .map_err(|e| anyhow::anyhow!("GPU {ordinal}: cannot create a stream: {e:?}"))
            .context("CUDA")?;
        Ok(Self {
            stream,
            context,
            ordinal,
            name,
            compute_capability,
        })
    }

    /// The device index.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The GPU's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `major.minor`, as engine keys record it.
    pub fn compute_capability(&self) -> String {
        format!(
            "{}.{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }

    /// The raw stream for `enqueueV3`.
    pub fn raw_stream(&self) -> *mut c_void {
        self.stream.cu_stream() as *mut c_void
    }

    /// Makes the device's context current on the calling thread (TensorRT runs in the current context).
    pub fn bind(&self) -> Result<()> {
        self.context
            .bind_to_thread()
            .map_err(|e| anyhow::anyhow!("cannot use GPU {} on this thread: {e:?}", self.ordinal))
    }

    /// Waits for all work on the device (libtorch's included).
    pub fn synchronize_device(&self) -> Result<()> {
        self.context
            .synchronize()
            .map_err(|e| anyhow::anyhow!("CUDA error on GPU {}: {e:?}", self.ordinal))
    }

    /// Waits for the TensorRT stream.
    pub fn synchronize_stream(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| {
            anyhow::anyhow!("CUDA error on GPU {} after TensorRT: {e:?}", self.ordinal)
        })
    }
}
