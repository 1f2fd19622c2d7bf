//! The safe pieces every call into the shim shares: [`call`], the one helper for the shim's calling
//! convention (a caller-owned error buffer, then a status code or a handle that is null on failure), tensor
//! dimensions and [`DataType`].
//!
//! Everything here uses only the bindings' types and constants, never a shim function, so it compiles (and its
//! tests run) in every build; without the shim nothing calls it.
#![cfg_attr(not(vista3d_trt_shim), allow(dead_code))]

use std::ffi::{c_void, CStr, CString};
use std::ptr::NonNull;

use super::ffi;

/// A call into the TensorRT shim failed: the shim's message (TensorRT's own errors are in it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShimError(pub String);

/// A TensorRT tensor data type (TensorRT's `DataType`, as the shim reports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// 32-bit float (`kFLOAT`).
    Float,
    /// 16-bit float (`kHALF`).
    Half,
    /// 32-bit signed integer (`kINT32`).
    Int32,
    /// 64-bit signed integer (`kINT64`).
    Int64,
    /// A type this crate does not exchange with TensorRT, with TensorRT's value for the message.
    Unsupported(i32),
}

impl DataType {
    /// The type of a TensorRT `DataType` value.
    pub fn from_raw(value: i32) -> Self {
        match value {
            ffi::TRT_SHIM_DTYPE_FLOAT => DataType::Float,
            ffi::TRT_SHIM_DTYPE_HALF => DataType::Half,
            ffi::TRT_SHIM_DTYPE_INT32 => DataType::Int32,
            ffi::TRT_SHIM_DTYPE_INT64 => DataType::Int64,
            other => DataType::Unsupported(other),
        }
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataType::Float => f.write_str("float32"),
            DataType::Half => f.write_str("float16"),
            DataType::Int32 => f.write_str("int32"),
            DataType::Int64 => f.write_str("int64"),
            DataType::Unsupported(v) => write!(f, "TensorRT data type {v}"),
        }
    }
}

/// A network input as parsed from ONNX.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInput {
    pub name: String,
    /// -1 for a dynamic dimension.
    pub dims: Vec<i64>,
    pub dtype: DataType,
}

/// An engine's input or output tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoTensor {
    pub name: String,
    pub is_input: bool,
    pub dtype: DataType,
    /// -1 for a dynamic dimension.
    pub dims: Vec<i64>,
}

/// `createInferBuilder_INTERNAL` / `createInferRuntime_INTERNAL` (or a test factory of the shim).
pub type InferFactory = unsafe extern "C" fn(*mut c_void, i32) -> *mut c_void;
/// `createNvOnnxParser_INTERNAL` (or a test factory of the shim).
pub type ParserFactory = unsafe extern "C" fn(*mut c_void, *mut c_void, i32) -> *mut c_void;

/// What a fallible shim function returns: a status code or a handle (null on failure).
pub(crate) trait ShimReturn {
    /// The value of a successful call.
    type Output;
    /// The value, or `None` when the call failed (its message is in the error buffer).
    fn succeeded(self) -> Option<Self::Output>;
}

impl ShimReturn for i32 {
    type Output = ();
    fn succeeded(self) -> Option<()> {
        (self == ffi::TRT_SHIM_OK).then_some(())
    }
}

impl<T> ShimReturn for *mut T {
    type Output = NonNull<T>;
    fn succeeded(self) -> Option<NonNull<T>> {
        NonNull::new(self)
    }
}

/// Runs one fallible shim call with a fresh error buffer: `Ok` with the status's unit or the non-null handle,
/// or the message the shim wrote. The closure makes the FFI call (its `unsafe` block carries the SAFETY
/// argument for that call); the buffer pointer it is given is valid for the call.
pub(crate) fn call<R: ShimReturn>(
    f: impl FnOnce(*mut ffi::TrtShimError) -> R,
) -> Result<R::Output, ShimError> {
    let mut err = new_error();
    let result = f(&mut *err);
    result.succeeded().ok_or_else(|| ShimError(message(&err)))
}

/// A zeroed error buffer (boxed: it is 4 KiB).
fn new_error() -> Box<ffi::TrtShimError> {
    Box::new(ffi::TrtShimError {
        message: [0; ffi::TRT_SHIM_ERROR_LEN as usize],
    })
}

/// The message in an error buffer.
fn message(err: &ffi::TrtShimError) -> String {
    let bytes: Vec<u8> = err
        .message
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    if bytes.is_empty() {
        "TensorRT shim call failed without a message".into()
    } else {
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// A C string for a tensor name or path.
pub(crate) fn c_string(s: &str) -> Result<CString, ShimError> {
    CString::new(s).map_err(|_| ShimError(format!("'{s}' contains a NUL byte")))
}

/// A name the shim returned (NUL-terminated, owned by a live TensorRT object); empty for null.
///
/// # Safety
/// `name` is null or points to a NUL-terminated string that stays valid during this call.
pub(crate) unsafe fn owned_name(name: *const std::ffi::c_char) -> String {
    if name.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated, valid for the call (the caller's contract).
    unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned()
}

/// Dimensions for the shim; more than TensorRT's maximum is an error.
pub(crate) fn to_dims(shape: &[i64]) -> Result<ffi::TrtShimDims, ShimError> {
    let max = ffi::TRT_SHIM_MAX_DIMS as usize;
    if shape.len() > max {
        return Err(ShimError(format!(
            "a TensorRT tensor has at most {max} dims, got {shape:?}"
        )));
    }
    let mut d = [0i64; ffi::TRT_SHIM_MAX_DIMS as usize];
    d[..shape.len()].copy_from_slice(shape);
    Ok(ffi::TrtShimDims {
        nb_dims: shape.len() as i32,
        d,
    })
}

/// The dimensions the shim wrote.
pub(crate) fn from_dims(dims: &ffi::TrtShimDims) -> Vec<i64> {
    let n = dims.nb_dims.clamp(0, ffi::TRT_SHIM_MAX_DIMS) as usize;
    dims.d[..n].to_vec()
}

/// Empty dimensions for the shim to fill.
pub(crate) fn zero_dims() -> ffi::TrtShimDims {
    ffi::TrtShimDims {
        nb_dims: 0,
        d: [0; ffi::TRT_SHIM_MAX_DIMS as usize],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::c_char;

    #[test]
    fn dims_round_trip_and_reject_too_many() {
        let d = to_dims(&[2, 16, 128, 128, 128]).unwrap();
        assert_eq!(from_dims(&d), vec![2, 16, 128, 128, 128]);
        assert!(to_dims(&[1; 9]).is_err());
        assert!(from_dims(&zero_dims()).is_empty());
    }

    #[test]
    fn the_call_helper_checks_status_and_null() {
        // A failing status: the message the callee wrote.
        let err = call(|e| {
            // SAFETY: `e` is the helper's live buffer; writing inside its bounds.
            let buffer = unsafe { &mut *e };
            for (i, b) in b"boom".iter().enumerate() {
                buffer.message[i] = *b as c_char;
            }
            ffi::TRT_SHIM_FAILED
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "boom");
        assert_eq!(call(|_| ffi::TRT_SHIM_OK), Ok(()));
        // A null handle without a message still says that the call failed.
        let err = call(|_| std::ptr::null_mut::<u8>()).unwrap_err();
        assert!(err.0.contains("without a message"), "{err}");
        let mut value = 7u8;
        let handle = call(|_| &mut value as *mut u8).unwrap();
        assert_eq!(handle.as_ptr(), &mut value as *mut u8);
    }

    #[test]
    fn data_types_and_names() {
        assert_eq!(
            DataType::from_raw(ffi::TRT_SHIM_DTYPE_FLOAT),
            DataType::Float
        );
        assert_eq!(DataType::from_raw(ffi::TRT_SHIM_DTYPE_HALF), DataType::Half);
        assert_eq!(
            DataType::from_raw(ffi::TRT_SHIM_DTYPE_INT32),
            DataType::Int32
        );
        assert_eq!(
            DataType::from_raw(ffi::TRT_SHIM_DTYPE_INT64),
            DataType::Int64
        );
        assert_eq!(DataType::from_raw(2), DataType::Unsupported(2));
        assert_eq!(DataType::Unsupported(2).to_string(), "TensorRT data type 2");
        assert!(c_string("a\0b").is_err());
        // SAFETY: null is allowed; the literal is NUL-terminated and static.
        unsafe {
            assert_eq!(owned_name(std::ptr::null()), "");
            assert_eq!(owned_name(c"features".as_ptr()), "features");
        }
    }
}
