//! Safe owning handles over the shim's TensorRT objects (this file is compiled only with the shim; `dummy.rs`
//! stands in for it otherwise): [`Builder`], [`Runtime`], [`Engine`], [`Context`]. Each holds a non-null
//! pointer it created and destroys it once in `Drop`; an engine keeps its runtime alive and a context its engine
//! (through an `Arc`), as TensorRT requires. Every fallible call goes through [`call`].

use std::ffi::{c_char, c_void, CStr};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::engines::tensorrt::ffi;
use crate::engines::tensorrt::shim::{
    c_string, call, from_dims, owned_name, to_dims, zero_dims, DataType, InferFactory, IoTensor,
    NetworkInput, ParserFactory, ShimError,
};
use crate::engines::Method;

/// `NV_TENSORRT_VERSION` of the headers the shim was compiled with.
pub fn header_version() -> i32 {
    // SAFETY: no arguments; returns a constant compiled into the shim.
    unsafe { ffi::trt_shim_header_version() }
}

/// Forwards TensorRT's log messages to the `log` crate (target `tensorrt`).
unsafe extern "C" fn log_to_rust(_user: *mut c_void, severity: i32, message: *const c_char) {
    if message.is_null() {
        return;
    }
    // SAFETY: the shim passes a NUL-terminated string valid for the call.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy();
    let level = match severity {
        ffi::TRT_SHIM_SEVERITY_INTERNAL_ERROR | ffi::TRT_SHIM_SEVERITY_ERROR => log::Level::Error,
        ffi::TRT_SHIM_SEVERITY_WARNING => log::Level::Warn,
        ffi::TRT_SHIM_SEVERITY_INFO => log::Level::Debug,
        _ => log::Level::Trace,
    };
    log::log!(target: "tensorrt", level, "{text}");
}

/// The most verbose TensorRT severity worth forwarding at the current log level.
fn min_severity() -> i32 {
    match log::max_level() {
        log::LevelFilter::Trace => ffi::TRT_SHIM_SEVERITY_VERBOSE,
        log::LevelFilter::Debug => ffi::TRT_SHIM_SEVERITY_INFO,
        _ => ffi::TRT_SHIM_SEVERITY_WARNING,
    }
}

/// Copies the bytes of a shim blob and frees it.
fn take_bytes(blob: NonNull<ffi::TrtShimBytes>) -> Vec<u8> {
    let raw = blob.as_ptr();
    // SAFETY: `raw` is a live blob returned by the shim; data/size describe its bytes until it is destroyed,
    // which happens once, here, after the copy.
    unsafe {
        let data = ffi::trt_shim_bytes_data(raw) as *const u8;
        let size = ffi::trt_shim_bytes_size(raw);
        let out = if data.is_null() || size == 0 {
            Vec::new()
        } else {
            std::slice::from_raw_parts(data, size).to_vec()
        };
        ffi::trt_shim_bytes_destroy(raw);
        out
    }
}

/// A non-null shim object with the shim function that destroys it, called once when this is dropped.
struct Owned<T> {
    raw: NonNull<T>,
    destroy: unsafe extern "C" fn(*mut T),
}

impl<T> Owned<T> {
    /// Takes ownership of `raw`, a live object that `destroy` releases.
    fn new(raw: NonNull<T>, destroy: unsafe extern "C" fn(*mut T)) -> Self {
        Self { raw, destroy }
    }

    /// The pointer, for shim calls while `self` is alive.
    fn as_ptr(&self) -> *mut T {
        self.raw.as_ptr()
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: `raw` was created live by the shim and handed to this owner only; it is destroyed once, here,
        // by its matching destroy function. Objects it depends on (an engine's runtime, a context's engine) are
        // held by the owning handle in fields declared after it, so they are dropped later.
        unsafe { (self.destroy)(self.raw.as_ptr()) }
    }
}

/// TensorRT builder + network + ONNX parser + builder config (one model per builder).
pub struct Builder {
    raw: Owned<ffi::TrtShimBuilder>,
}

/// A TensorRT runtime; engines keep it alive.
pub struct Runtime {
    raw: Owned<ffi::TrtShimRuntime>,
}

/// A deserialized engine; contexts keep it alive.
pub struct Engine {
    // Declared (so dropped) before the runtime it came from.
    raw: Owned<ffi::TrtShimEngine>,
    _runtime: Arc<Runtime>,
}

/// An execution context of an engine.
pub struct Context {
    // Declared (so dropped) before its engine.
    raw: Owned<ffi::TrtShimContext>,
    engine: Arc<Engine>,
}

// SAFETY: TensorRT objects may be moved between threads. TensorRT documents IRuntime and ICudaEngine as safe to
// use from several threads at once (deserialization, queries, creating contexts); the shim's logger is
// mutex-protected (concurrent calls on one runtime could only attribute a logged error to the wrong call).
// Builders and contexts are not Sync: their calls never overlap (they take `&mut self` to run).
unsafe impl Send for Builder {}
// SAFETY: see above.
unsafe impl Send for Runtime {}
// SAFETY: see above.
unsafe impl Sync for Runtime {}
// SAFETY: see above.
unsafe impl Send for Engine {}
// SAFETY: see above.
unsafe impl Sync for Engine {}
// SAFETY: see above.
unsafe impl Send for Context {}

impl Builder {
    /// A builder from factory functions (TensorRT's, or the shim's test factories).
    pub fn with_factories(create: InferFactory, parser: ParserFactory) -> Result<Self, ShimError> {
        let raw = call(|err| {
            // SAFETY: valid function pointers for the whole call; the log user pointer is null and never read;
            // `err` is the helper's live buffer.
            unsafe {
                ffi::trt_shim_builder_create(
                    Some(create),
                    Some(parser),
                    Some(log_to_rust),
                    std::ptr::null_mut(),
                    min_severity(),
                    err,
                )
            }
        })?;
        Ok(Self {
            raw: Owned::new(raw, ffi::trt_shim_builder_destroy),
        })
    }

    /// Parses an ONNX file (NATIVE_INSTANCENORM).
    pub fn parse_onnx(&mut self, path: &Path) -> Result<(), ShimError> {
        let c = c_string(&path.to_string_lossy())?;
        // SAFETY: live builder, NUL-terminated path and live error buffer, all valid for the call.
        call(|err| unsafe { ffi::trt_shim_builder_parse_onnx(self.raw.as_ptr(), c.as_ptr(), err) })
    }

    /// The network's inputs (after parsing).
    pub fn inputs(&self) -> Result<Vec<NetworkInput>, ShimError> {
        // SAFETY: live builder.
        let n = unsafe { ffi::trt_shim_builder_num_inputs(self.raw.as_ptr()) };
        let mut out = Vec::new();
        for i in 0..n {
            let mut name: *const c_char = std::ptr::null();
            let mut dims = zero_dims();
            let mut dtype = 0;
            call(|err| {
                // SAFETY: live builder, index in range, out pointers valid for the call.
                unsafe {
                    ffi::trt_shim_builder_input(
                        self.raw.as_ptr(),
                        i,
                        &mut name,
                        &mut dims,
                        &mut dtype,
                        err,
                    )
                }
            })?;
            out.push(NetworkInput {
                // SAFETY: null or a NUL-terminated name owned by the network, which the builder keeps alive.
                name: unsafe { owned_name(name) },
                dims: from_dims(&dims),
                dtype: DataType::from_raw(dtype),
            });
        }
        Ok(out)
    }

    /// Builder flags for the TensorRT `method`; `fp16_model`: the parsed model is the float16 export (its types
    /// give the engine's precision: required for FP16 with TensorRT 11, whose networks are strongly typed).
    pub fn set_precision(&mut self, method: Method, fp16_model: bool) -> Result<(), ShimError> {
        let p =
            match (method, fp16_model) {
                (Method::TrtFp16, true) => ffi::TRT_SHIM_PRECISION_FP16_MODEL,
                (Method::TrtFp16, false) => ffi::TRT_SHIM_PRECISION_FP16,
                (Method::TrtTf32, false) => ffi::TRT_SHIM_PRECISION_TF32,
                (Method::TrtTf32, true) => return Err(ShimError(
                    "a TF32 engine must be built from the float32 ONNX model, not the float16 one"
                        .into(),
                )),
                (other, _) => {
                    return Err(ShimError(format!(
                        "{other} is not a TensorRT method (trt_fp16 or trt_tf32)"
                    )))
                }
            };
        // SAFETY: live builder and error buffer.
        call(|err| unsafe { ffi::trt_shim_builder_set_precision(self.raw.as_ptr(), p, err) })
    }

    /// Builder optimisation level (0..=5).
    pub fn set_optimization_level(&mut self, level: i32) -> Result<(), ShimError> {
        // SAFETY: live builder and error buffer.
        call(|err| unsafe {
            ffi::trt_shim_builder_set_optimization_level(self.raw.as_ptr(), level, err)
        })
    }

    /// min/opt/max dims of one input in the optimisation profile.
    pub fn set_profile(&mut self, input: &str, dims: &[Vec<i64>; 3]) -> Result<(), ShimError> {
        let c = c_string(input)?;
        let (min, opt, max) = (to_dims(&dims[0])?, to_dims(&dims[1])?, to_dims(&dims[2])?);
        // SAFETY: live builder; name, dims and error buffer valid for the call.
        call(|err| unsafe {
            ffi::trt_shim_builder_set_profile_dims(
                self.raw.as_ptr(),
                c.as_ptr(),
                &min,
                &opt,
                &max,
                err,
            )
        })
    }

    /// Uses the serialized timing cache `bytes` (empty: a new cache).
    pub fn set_timing_cache(&mut self, bytes: &[u8]) -> Result<(), ShimError> {
        // SAFETY: live builder; `bytes` outlives the call (TensorRT copies it).
        call(|err| unsafe {
            ffi::trt_shim_builder_set_timing_cache(
                self.raw.as_ptr(),
                bytes.as_ptr() as *const c_void,
                bytes.len(),
                err,
            )
        })
    }

    /// The builder's timing cache, serialized.
    pub fn timing_cache(&self) -> Result<Vec<u8>, ShimError> {
        // SAFETY: live builder and error buffer.
        let blob = call(|err| unsafe {
            ffi::trt_shim_builder_serialize_timing_cache(self.raw.as_ptr(), err)
        })?;
        Ok(take_bytes(blob))
    }

    /// Builds the serialized engine.
    pub fn build(&mut self) -> Result<Vec<u8>, ShimError> {
        // SAFETY: live builder and error buffer.
        let blob = call(|err| unsafe { ffi::trt_shim_builder_build(self.raw.as_ptr(), err) })?;
        Ok(take_bytes(blob))
    }
}

impl Runtime {
    /// A runtime from a factory function (TensorRT's, or the shim's test factories).
    pub fn with_factory(create: InferFactory) -> Result<Self, ShimError> {
        let raw = call(|err| {
            // SAFETY: valid function pointer for the call; the log user pointer is null and never read.
            unsafe {
                ffi::trt_shim_runtime_create(
                    Some(create),
                    Some(log_to_rust),
                    std::ptr::null_mut(),
                    min_severity(),
                    err,
                )
            }
        })?;
        Ok(Self {
            raw: Owned::new(raw, ffi::trt_shim_runtime_destroy),
        })
    }

    /// Deserializes a plan.
    pub fn deserialize(self: &Arc<Self>, plan: &[u8]) -> Result<Engine, ShimError> {
        // SAFETY: live runtime; TensorRT copies what it needs from `plan` during the call.
        let raw = call(|err| unsafe {
            ffi::trt_shim_engine_deserialize(
                self.raw.as_ptr(),
                plan.as_ptr() as *const c_void,
                plan.len(),
                err,
            )
        })?;
        Ok(Engine {
            raw: Owned::new(raw, ffi::trt_shim_engine_destroy),
            _runtime: self.clone(),
        })
    }
}

impl Engine {
    /// The engine's inputs and outputs.
    pub fn io_tensors(&self) -> Result<Vec<IoTensor>, ShimError> {
        // SAFETY: live engine.
        let n = unsafe { ffi::trt_shim_engine_num_io(self.raw.as_ptr()) };
        let mut out = Vec::new();
        for i in 0..n {
            // SAFETY: live engine, index in range; the name (or null) lives as long as the engine, which `self`
            // keeps alive while it is copied.
            let name = unsafe { owned_name(ffi::trt_shim_engine_io_name(self.raw.as_ptr(), i)) };
            if name.is_empty() {
                return Err(ShimError(format!("the engine has no I/O tensor {i}")));
            }
            let c = c_string(&name)?;
            let (mut is_input, mut dtype, mut dims) = (0, 0, zero_dims());
            call(|err| {
                // SAFETY: live engine, NUL-terminated name, out pointers valid for the call.
                unsafe {
                    ffi::trt_shim_engine_io_info(
                        self.raw.as_ptr(),
                        c.as_ptr(),
                        &mut is_input,
                        &mut dtype,
                        &mut dims,
                        err,
                    )
                }
            })?;
            out.push(IoTensor {
                name,
                is_input: is_input != 0,
                dtype: DataType::from_raw(dtype),
                dims: from_dims(&dims),
            });
        }
        Ok(out)
    }

    /// min/opt/max dims of input `name` in profile 0.
    pub fn profile_dims(&self, name: &str) -> Result<[Vec<i64>; 3], ShimError> {
        let c = c_string(name)?;
        let mut out: [Vec<i64>; 3] = Default::default();
        let selectors = [
            ffi::TRT_SHIM_PROFILE_MIN,
            ffi::TRT_SHIM_PROFILE_OPT,
            ffi::TRT_SHIM_PROFILE_MAX,
        ];
        for (slot, selector) in out.iter_mut().zip(selectors) {
            let mut dims = zero_dims();
            // SAFETY: live engine, NUL-terminated name, out pointer valid for the call.
            call(|err| unsafe {
                ffi::trt_shim_engine_profile_dims(
                    self.raw.as_ptr(),
                    c.as_ptr(),
                    selector,
                    &mut dims,
                    err,
                )
            })?;
            *slot = from_dims(&dims);
        }
        Ok(out)
    }

    /// An execution context (allocates the engine's activation memory).
    pub fn context(self: &Arc<Self>) -> Result<Context, ShimError> {
        // SAFETY: live engine and error buffer.
        let raw = call(|err| unsafe { ffi::trt_shim_context_create(self.raw.as_ptr(), err) })?;
        Ok(Context {
            raw: Owned::new(raw, ffi::trt_shim_context_destroy),
            engine: self.clone(),
        })
    }
}

impl Context {
    /// The engine this context runs.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Sets the shape of an input for the next run.
    pub fn set_input_shape(&mut self, name: &str, shape: &[i64]) -> Result<(), ShimError> {
        let c = c_string(name)?;
        let dims = to_dims(shape)?;
        // SAFETY: live context; name, dims and error buffer valid for the call.
        call(|err| unsafe {
            ffi::trt_shim_context_set_input_shape(self.raw.as_ptr(), c.as_ptr(), &dims, err)
        })
    }

    /// The shape of a tensor given the input shapes set.
    pub fn tensor_shape(&self, name: &str) -> Result<Vec<i64>, ShimError> {
        let c = c_string(name)?;
        let mut dims = zero_dims();
        // SAFETY: live context; name, out pointer and error buffer valid for the call.
        call(|err| unsafe {
            ffi::trt_shim_context_tensor_shape(self.raw.as_ptr(), c.as_ptr(), &mut dims, err)
        })?;
        Ok(from_dims(&dims))
    }

    /// Sets the device address of a tensor.
    ///
    /// # Safety
    /// `address` must point to device memory large enough for the tensor's shape and type, valid until the
    /// run that uses it has completed.
    pub unsafe fn set_tensor_address(
        &mut self,
        name: &str,
        address: *mut c_void,
    ) -> Result<(), ShimError> {
        let c = c_string(name)?;
        // SAFETY: the caller guarantees the address; live context; name and error buffer valid for the call.
        call(|err| unsafe {
            ffi::trt_shim_context_set_tensor_address(self.raw.as_ptr(), c.as_ptr(), address, err)
        })
    }

    /// Queues a run on `stream`.
    ///
    /// # Safety
    /// Every tensor address must be set and valid until the stream has finished the run; `stream` must be a
    /// live CUDA stream of the engine's device.
    pub unsafe fn enqueue(&mut self, stream: *mut c_void) -> Result<(), ShimError> {
        // SAFETY: guaranteed by the caller; live context and error buffer.
        call(|err| unsafe { ffi::trt_shim_context_enqueue(self.raw.as_ptr(), stream, err) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_reports_its_header_version() {
        let v = super::super::TrtVersion::from_encoded(header_version());
        assert!(super::super::SUPPORTED_MAJORS.contains(&v.major), "{v}");
    }

    #[test]
    fn an_error_logged_by_tensorrt_fails_the_call() {
        // As TensorRT without a GPU: an error is logged and a non-null, unusable pointer returned.
        let err = Runtime::with_factory(ffi::trt_shim_test_factory_logs_error)
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains("createInferRuntime"), "{err}");
        assert!(err.contains("CUDA initialization failure"), "{err}");
        let err = Builder::with_factories(
            ffi::trt_shim_test_factory_logs_error,
            ffi::trt_shim_test_factory_null_parser,
        )
        .err()
        .expect("must fail")
        .to_string();
        assert!(err.contains("createInferBuilder"), "{err}");
    }

    #[test]
    fn a_null_factory_result_fails_the_call() {
        let err = Runtime::with_factory(ffi::trt_shim_test_factory_null)
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains("createInferRuntime returned null"), "{err}");
    }
}
