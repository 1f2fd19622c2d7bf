//! The handles of a build without the TensorRT shim (no TensorRT headers at build time): the same API as
//! `handles.rs`, but no handle can be made. The constructors say why; every other method is unreachable
//! because the types are uninhabited. (The shape of candle's `dummy_cuda_backend.rs`.)

use std::convert::Infallible;
use std::ffi::c_void;
use std::path::Path;
use std::sync::Arc;

use super::NO_SHIM;
use crate::engines::tensorrt::shim::{
    InferFactory, IoTensor, NetworkInput, ParserFactory, ShimError,
};
use crate::engines::Method;

/// No headers, no version.
pub fn header_version() -> i32 {
    0
}

/// TensorRT builder (none can exist without the shim).
pub struct Builder {
    never: Infallible,
}

/// TensorRT runtime (none can exist without the shim).
pub struct Runtime {
    never: Infallible,
}

/// Deserialized engine (none can exist without the shim).
pub struct Engine {
    never: Infallible,
}

/// Execution context (none can exist without the shim).
pub struct Context {
    never: Infallible,
}

impl Builder {
    /// Unavailable without the shim.
    pub fn with_factories(
        _create: InferFactory,
        _parser: ParserFactory,
    ) -> Result<Self, ShimError> {
        Err(ShimError(NO_SHIM.into()))
    }
    pub fn parse_onnx(&mut self, _path: &Path) -> Result<(), ShimError> {
        match self.never {}
    }
    pub fn inputs(&self) -> Result<Vec<NetworkInput>, ShimError> {
        match self.never {}
    }
    pub fn set_precision(&mut self, _method: Method, _fp16_model: bool) -> Result<(), ShimError> {
        match self.never {}
    }
    pub fn set_optimization_level(&mut self, _level: i32) -> Result<(), ShimError> {
        match self.never {}
    }
    pub fn set_profile(&mut self, _input: &str, _dims: &[Vec<i64>; 3]) -> Result<(), ShimError> {
        match self.never {}
    }
    pub fn set_timing_cache(&mut self, _bytes: &[u8]) -> Result<(), ShimError> {
        match self.never {}
    }
    pub fn timing_cache(&self) -> Result<Vec<u8>, ShimError> {
        match self.never {}
    }
    pub fn build(&mut self) -> Result<Vec<u8>, ShimError> {
        match self.never {}
    }
}

impl Runtime {
    /// Unavailable without the shim.
    pub fn with_factory(_create: InferFactory) -> Result<Self, ShimError> {
        Err(ShimError(NO_SHIM.into()))
    }
    pub fn deserialize(self: &Arc<Self>, _plan: &[u8]) -> Result<Engine, ShimError> {
        match self.never {}
    }
}

impl Engine {
    pub fn io_tensors(&self) -> Result<Vec<IoTensor>, ShimError> {
        match self.never {}
    }
    pub fn profile_dims(&self, _name: &str) -> Result<[Vec<i64>; 3], ShimError> {
        match self.never {}
    }
    pub fn context(self: &Arc<Self>) -> Result<Context, ShimError> {
        match self.never {}
    }
}

impl Context {
    pub fn engine(&self) -> &Arc<Engine> {
        match self.never {}
    }
    pub fn set_input_shape(&mut self, _name: &str, _shape: &[i64]) -> Result<(), ShimError> {
        match self.never {}
    }
    pub fn tensor_shape(&self, _name: &str) -> Result<Vec<i64>, ShimError> {
        match self.never {}
    }
    /// # Safety
    /// As in the shim build: `address` must be device memory for the tensor, valid until the run completes.
    pub unsafe fn set_tensor_address(
        &mut self,
        _name: &str,
        _address: *mut c_void,
    ) -> Result<(), ShimError> {
        match self.never {}
    }
    /// # Safety
    /// As in the shim build: every address set and valid until the run completes; a live stream.
    pub unsafe fn enqueue(&mut self, _stream: *mut c_void) -> Result<(), ShimError> {
        match self.never {}
    }
}
