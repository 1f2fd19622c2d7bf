//! The GPU backend: NCCL from the torch wheel (`nvidia/nccl/lib/libnccl.so.2`, which `libtorch_cuda.so` already
//! loads on GPU machines), opened at run time with `libloading`, so CPU-only machines never need it.
//!
//! One communicator per process, on the GPU `LOCAL_RANK` picks; the unique id travels through the TCPStore.
//! Collectives run on the legacy default stream (the stream libtorch's kernels use unless told otherwise), so they
//! are ordered after the backward pass that produced the gradients and before the optimizer step that reads them.
//!
//! Not exercised by the test suite: the project's machines have at most one GPU, and NCCL refuses two ranks on one
//! device. The CPU backend passes the same tests through the same [`Collective`] trait.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use super::store::Store;
use super::{Backend, Collective, DistError};

/// `ncclUniqueId`: 128 opaque bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

type Comm = *mut c_void;
type NcclResult = c_int;
const NCCL_SUCCESS: NcclResult = 0;
/// `ncclSum`.
const NCCL_SUM: c_int = 0;
/// `ncclDataType_t` values.
const NCCL_UINT8: c_int = 1;
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;

type GetUniqueIdFn = unsafe extern "C" fn(*mut UniqueId) -> NcclResult;
type CommInitRankFn = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult;
type AllReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    Comm,
    *mut c_void,
) -> NcclResult;
type BroadcastFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    Comm,
    *mut c_void,
) -> NcclResult;
type CommFn = unsafe extern "C" fn(Comm) -> NcclResult;
type ErrorStringFn = unsafe extern "C" fn(NcclResult) -> *const c_char;
type SetDeviceFn = unsafe extern "C" fn(c_int) -> c_int;

struct NcclLibrary {
    _lib: libloading::Library,
    get_unique_id: GetUniqueIdFn,
    comm_init_rank: CommInitRankFn,
    all_reduce: AllReduceFn,
    broadcast: BroadcastFn,
    comm_destroy: CommFn,
    comm_abort: CommFn,
    error_string: ErrorStringFn,
}

impl NcclLibrary {
    fn get() -> Result<&'static NcclLibrary, DistError> {
        static LIB: OnceLock<Result<NcclLibrary, String>> = OnceLock::new();
        LIB.get_or_init(Self::load)
            .as_ref()
            .map_err(|e| DistError::Unavailable(e.clone()))
    }

    /// `libnccl.so.2` as already loaded by libtorch_cuda, else from the torch wheel's `nvidia/nccl/lib`.
    fn candidates() -> Vec<PathBuf> {
        let mut out = vec![PathBuf::from("libnccl.so.2")];
        if let Some(torch) = std::env::var_os("LIBTORCH") {
            out.push(PathBuf::from(torch).join("../nvidia/nccl/lib/libnccl.so.2"));
        }
        out
    }

    fn load() -> Result<NcclLibrary, String> {
        let mut errors = Vec::new();
        for path in Self::candidates() {
            // SAFETY: loading NCCL, whose initialisers have no preconditions.
            match unsafe { libloading::Library::new(&path) } {
                Ok(lib) => {
                    // SAFETY: NCCL's C API with the signatures of nccl.h (2.x).
                    return unsafe {
                        Ok(NcclLibrary {
                            get_unique_id: *lib
                                .get(b"ncclGetUniqueId\0")
                                .map_err(|e| e.to_string())?,
                            comm_init_rank: *lib
                                .get(b"ncclCommInitRank\0")
                                .map_err(|e| e.to_string())?,
                            all_reduce: *lib.get(b"ncclAllReduce\0").map_err(|e| e.to_string())?,
                            broadcast: *lib.get(b"ncclBroadcast\0").map_err(|e| e.to_string())?,
                            comm_destroy: *lib
                                .get(b"ncclCommDestroy\0")
                                .map_err(|e| e.to_string())?,
                            comm_abort: *lib.get(b"ncclCommAbort\0").map_err(|e| e.to_string())?,
                            error_string: *lib
                                .get(b"ncclGetErrorString\0")
                                .map_err(|e| e.to_string())?,
                            _lib: lib,
                        })
                    };
                }
                Err(e) => errors.push(format!("{}: {e}", path.display())),
            }
        }
        Err(format!(
            "NCCL is not available ({}); it comes with the CUDA torch wheel (nvidia-nccl-cu13); \
             or use dist_backend \"gloo\"",
            errors.join("; ")
        ))
    }

    fn check(&self, r: NcclResult, what: &str) -> Result<(), DistError> {
        if r == NCCL_SUCCESS {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string.
        let text = unsafe { CStr::from_ptr((self.error_string)(r)) }.to_string_lossy();
        Err(DistError::Collective(format!(
            "NCCL {what}: {text} (code {r})"
        )))
    }
}

/// Makes `index` the current CUDA device of this thread (what NCCL's communicator binds to), through the CUDA
/// runtime that libtorch_cuda loaded.
fn set_cuda_device(index: usize) -> Result<(), DistError> {
    // SAFETY: dlsym on the global scope with a valid C string.
    let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"cudaSetDevice".as_ptr()) };
    if sym.is_null() {
        return Err(DistError::Unavailable(
            "cudaSetDevice not found: libtorch_cuda.so (and its CUDA runtime) is not loaded".into(),
        ));
    }
    // SAFETY: cudaSetDevice(int) -> cudaError_t.
    let f: SetDeviceFn = unsafe { std::mem::transmute::<*mut c_void, SetDeviceFn>(sym) };
    // SAFETY: plain call with a device index.
    let status = unsafe { f(index as c_int) };
    if status != 0 {
        return Err(DistError::Collective(format!(
            "cudaSetDevice({index}) failed with CUDA error {status}"
        )));
    }
    Ok(())
}

/// An NCCL communicator: the GPU backend of one process group.
pub struct NcclBackend {
    lib: &'static NcclLibrary,
    comm: Comm,
    device: usize,
    aborted: bool,
}

// SAFETY: the communicator is used by one thread at a time (the process group keeps the backend behind a mutex).
unsafe impl Send for NcclBackend {}

impl NcclBackend {
    /// Creates the communicator of `world_size` ranks on GPU `device`; rank 0's unique id goes through the store.
    pub fn connect(
        store: &Store,
        rank: usize,
        world_size: usize,
        device: usize,
    ) -> Result<NcclBackend, DistError> {
        let lib = NcclLibrary::get()?;
        set_cuda_device(device)?;
        let id = if rank == 0 {
            let mut id = UniqueId { internal: [0; 128] };
            // SAFETY: valid out pointer.
            lib.check(unsafe { (lib.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
            // SAFETY: UniqueId is 128 plain bytes.
            let bytes: [u8; 128] = unsafe { std::mem::transmute(id.internal) };
            store.set("nccl/unique_id", &bytes)?;
            id
        } else {
            let bytes = store.get("nccl/unique_id")?;
            let bytes: [u8; 128] = bytes.try_into().map_err(|v: Vec<u8>| {
                DistError::Store(format!("NCCL unique id of {} bytes, expected 128", v.len()))
            })?;
            // SAFETY: 128 plain bytes.
            UniqueId {
                internal: unsafe { std::mem::transmute::<[u8; 128], [c_char; 128]>(bytes) },
            }
        };
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: valid out pointer; the current device was set above.
        lib.check(
            unsafe { (lib.comm_init_rank)(&mut comm, world_size as c_int, id, rank as c_int) },
            "ncclCommInitRank",
        )?;
        Ok(NcclBackend {
            lib,
            comm,
            device,
            aborted: false,
        })
    }

    fn check_tensor(&self, t: &Tensor) -> Result<(), DistError> {
        if t.device() != Device::Cuda(self.device) || !t.is_contiguous() {
            return Err(DistError::Collective(format!(
                "NCCL needs a contiguous tensor on cuda:{}, got {:?}",
                self.device,
                t.device()
            )));
        }
        Ok(())
    }
}

impl Collective for NcclBackend {
    fn backend(&self) -> Backend {
        Backend::Nccl
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), DistError> {
        self.check_tensor(t)?;
        let dtype = match t.kind() {
            Kind::Float => NCCL_FLOAT32,
            Kind::Double => NCCL_FLOAT64,
            k => {
                return Err(DistError::Collective(format!(
                    "all-reduce supports float32 and float64 tensors, got {k:?}"
                )))
            }
        };
        let ptr = t.data_ptr();
        // SAFETY: in-place all-reduce of numel elements on the default stream of the communicator's device.
        let r = unsafe {
            (self.lib.all_reduce)(
                ptr,
                ptr,
                t.numel(),
                dtype,
                NCCL_SUM,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.lib.check(r, "all-reduce")
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), DistError> {
        self.check_tensor(t)?;
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        let ptr = t.data_ptr();
        // SAFETY: in-place broadcast of `bytes` bytes on the default stream.
        let r = unsafe {
            (self.lib.broadcast)(
                ptr,
                ptr,
                bytes,
                NCCL_UINT8,
                root as c_int,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.lib.check(r, "broadcast")
    }

    fn barrier(&mut self) -> Result<(), DistError> {
        // A one-element all-reduce, waited for on the host.
        let mut t = Tensor::zeros([1], (Kind::Float, Device::Cuda(self.device)));
        self.all_reduce_sum(&mut t)?;
        let _ = t.double_value(&[0]);
        Ok(())
    }

    fn abort(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: valid communicator; abort cancels pending operations and frees it.
            let _ = unsafe { (self.lib.comm_abort)(self.comm) };
        }
    }
}

impl Drop for NcclBackend {
    fn drop(&mut self) {
        if !self.aborted {
            // SAFETY: valid communicator, destroyed once.
            let _ = unsafe { (self.lib.comm_destroy)(self.comm) };
        }
    }
}
