//! The GPU an engine runs on, through the CUDA driver API loaded at run time (`cudarc`, no link-time CUDA).
//!
//! The engine's inputs and outputs are libtorch CUDA tensors (their `data_ptr`). TensorRT runs on a stream of
//! its own, ordered with libtorch's current stream through two events: before a run TensorRT's stream waits for
//! what libtorch queued (the inputs), after it libtorch's stream waits for TensorRT's work (the outputs). Nothing
//! waits on the host and no other stream of the device is touched.

use std::ffi::c_void;
use std::sync::Arc;

use anyhow::{ensure, Context as _, Result};
use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream};

/// A CUDA device with a stream for TensorRT and the events that order it with libtorch's stream.
pub struct CudaDevice {
    // Events and stream before the context: they must be destroyed first.
    /// Recorded on libtorch's stream before a run: TensorRT's stream waits for it.
    inputs_ready: CudaEvent,
    /// Recorded on TensorRT's stream after a run: libtorch's stream waits for it.
    outputs_ready: CudaEvent,
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
        let event = || {
            context
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .map_err(|e| anyhow::anyhow!("GPU {ordinal}: cannot create an event: {e:?}"))
        };
        Ok(Self {
            inputs_ready: event()?,
            outputs_ready: event()?,
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

    /// Makes TensorRT's stream wait (on the device, not the host) for everything queued so far on
    /// `torch_stream`, libtorch's current stream of this device (null: the legacy default stream).
    pub fn stream_waits_for(&self, torch_stream: *mut c_void) -> Result<()> {
        self.bind()?;
        // SAFETY: the event and TensorRT's stream are alive (owned by self); `torch_stream` is libtorch's live
        // stream of this device's context (or null, the legacy default stream).
        unsafe {
            result::event::record(self.inputs_ready.cu_event(), torch_stream as sys::CUstream)
                .and_then(|()| {
                    result::stream::wait_event(
                        self.stream.cu_stream(),
                        self.inputs_ready.cu_event(),
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                })
        }
        .map_err(|e| {
            anyhow::anyhow!(
                "GPU {}: cannot order TensorRT after libtorch's stream: {e:?}",
                self.ordinal
            )
        })
    }

    /// Makes `torch_stream` (libtorch's current stream of this device) wait (on the device) for everything
    /// queued so far on TensorRT's stream.
    pub fn torch_stream_waits(&self, torch_stream: *mut c_void) -> Result<()> {
        self.bind()?;
        // SAFETY: as in `stream_waits_for`.
        unsafe {
            result::event::record(self.outputs_ready.cu_event(), self.stream.cu_stream()).and_then(
                |()| {
                    result::stream::wait_event(
                        torch_stream as sys::CUstream,
                        self.outputs_ready.cu_event(),
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                },
            )
        }
        .map_err(|e| {
            anyhow::anyhow!(
                "GPU {}: cannot order libtorch after TensorRT's stream: {e:?}",
                self.ordinal
            )
        })
    }
}
