//! The CPU backend: gloo's own collectives (Debian's `libgloo-dev`: tcp pairs, ring all-reduce, broadcast,
//! barrier) through `shim/c10d/gloo_shim.cpp`, bridged to the TCPStore for the rendezvous.
//!
//! Why a separately loaded object: `libtorch_cpu.so` (linked into vista3d) exports its own, newer copy of gloo's
//! symbols, with other class layouts. Linked normally, Debian's `libgloo.so.0` would resolve part of its calls to
//! torch's copy and crash (measured: a segmentation fault in the first all-reduce). `build.rs` therefore builds the
//! shim as a shared object linked with `-lgloo`, the binary embeds its bytes, and [`GlooLibrary::load`] maps it
//! from an anonymous file (`memfd_create`) with `RTLD_LOCAL | RTLD_DEEPBIND`, so the shim and libgloo resolve
//! gloo's symbols to Debian's library first. Nothing else in the binary links gloo: a machine without `libgloo0`
//! only loses this backend (with an error that says which package to install).
//!
//! CUDA tensors are staged through host memory, so gloo can also serve GPU ranks when NCCL is not wanted
//! (`dist_backend: "gloo"`).

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use super::store::Store;
use super::{Backend, Collective, DistError};

#[allow(non_camel_case_types, dead_code)]
mod ffi {
    use std::ffi::{c_char, c_void};

    pub const VG_OK: i32 = 0;
    pub const VG_ERROR_LEN: usize = 2048;
    pub const VG_API_VERSION: i32 = 1;
    pub const VG_FLOAT32: i32 = 0;
    pub const VG_FLOAT64: i32 = 1;

    #[repr(C)]
    pub struct VgError {
        pub message: [c_char; VG_ERROR_LEN],
    }

    #[repr(C)]
    pub struct VgContext {
        _private: [u8; 0],
    }

    pub type SetFn =
        unsafe extern "C" fn(*mut c_void, *const c_char, *const u8, usize, *mut VgError) -> i32;
    pub type GetFn = unsafe extern "C" fn(
        *mut c_void,
        *const c_char,
        *mut *const u8,
        *mut usize,
        *mut VgError,
    ) -> i32;
    pub type WaitFn =
        unsafe extern "C" fn(*mut c_void, *const *const c_char, usize, i64, *mut VgError) -> i32;

    #[repr(C)]
    pub struct VgStore {
        pub ctx: *mut c_void,
        pub set: SetFn,
        pub get: GetFn,
        pub wait: WaitFn,
    }

    pub type ApiVersionFn = unsafe extern "C" fn() -> i32;
    pub type ConnectFn = unsafe extern "C" fn(
        *const VgStore,
        i32,
        i32,
        *const c_char,
        *const c_char,
        i64,
        *mut VgError,
    ) -> *mut VgContext;
    pub type DestroyFn = unsafe extern "C" fn(*mut VgContext);
    pub type AllreduceFn =
        unsafe extern "C" fn(*mut VgContext, *mut c_void, usize, i32, *mut VgError) -> i32;
    pub type BroadcastFn =
        unsafe extern "C" fn(*mut VgContext, *mut c_void, usize, i32, *mut VgError) -> i32;
    pub type BarrierFn = unsafe extern "C" fn(*mut VgContext, *mut VgError) -> i32;
}

/// The shim object built by build.rs (absent when gloo's headers were not found at build time).
#[cfg(vista3d_gloo_shim)]
static SHIM_OBJECT: Option<&[u8]> = Some(include_bytes!(env!("VISTA3D_GLOO_SHIM_SO")));
#[cfg(not(vista3d_gloo_shim))]
static SHIM_OBJECT: Option<&[u8]> = None;

/// The loaded shim and its entry points.
struct GlooLibrary {
    _lib: libloading::os::unix::Library,
    connect: ffi::ConnectFn,
    destroy: ffi::DestroyFn,
    allreduce: ffi::AllreduceFn,
    broadcast: ffi::BroadcastFn,
    barrier: ffi::BarrierFn,
}

fn new_error() -> ffi::VgError {
    ffi::VgError {
        message: [0; ffi::VG_ERROR_LEN],
    }
}

fn message(err: &ffi::VgError) -> String {
    // SAFETY: the shim NUL-terminates within the buffer, which starts zeroed.
    unsafe { CStr::from_ptr(err.message.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Writes `text` into a callback's error buffer (truncated, NUL-terminated).
fn set_message(err: *mut ffi::VgError, text: &str) {
    if err.is_null() {
        return;
    }
    let bytes = text.as_bytes();
    let n = bytes.len().min(ffi::VG_ERROR_LEN - 1);
    // SAFETY: err points to a VgError owned by the shim for the duration of the callback.
    let buf = unsafe { &mut (*err).message };
    for (dst, &src) in buf.iter_mut().zip(&bytes[..n]) {
        *dst = src as c_char;
    }
    buf[n] = 0;
}

impl GlooLibrary {
    /// The process-wide shim, loaded on first use.
    fn get() -> Result<&'static GlooLibrary, DistError> {
        static LIB: OnceLock<Result<GlooLibrary, String>> = OnceLock::new();
        LIB.get_or_init(Self::load)
            .as_ref()
            .map_err(|e| DistError::Unavailable(e.clone()))
    }

    fn load() -> Result<GlooLibrary, String> {
        let bytes = SHIM_OBJECT.ok_or_else(|| {
            "the CPU process group (gloo) is not built into this vista3d: gloo's headers were not found at build \
             time (install Debian's libgloo-dev, or set GLOO_INCLUDE_DIR, and rebuild)"
                .to_string()
        })?;
        let path = write_anonymous_file(bytes)?;
        let flags = libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_DEEPBIND;
        // SAFETY: loading our own shim object; its initialisers only register gloo's static objects.
        let lib =
            unsafe { libloading::os::unix::Library::open(Some(&path), flags) }.map_err(|e| {
                let e = e.to_string();
                if e.contains("libgloo") {
                    format!(
                    "the CPU process group needs gloo's library: {e}; install Debian's libgloo0 \
                     (apt-get install libgloo0) or run on GPUs with NCCL"
                )
                } else {
                    format!("cannot load the gloo shim: {e}")
                }
            })?;
        // SAFETY: the symbols are the shim's C API with the signatures in gloo_shim.h (checked by its version).
        unsafe {
            let version: ffi::ApiVersionFn = *lib
                .get::<ffi::ApiVersionFn>(b"vg_api_version\0")
                .map_err(|e| e.to_string())?;
            let v = version();
            if v != ffi::VG_API_VERSION {
                return Err(format!(
                    "gloo shim API version {v}, this vista3d expects {}",
                    ffi::VG_API_VERSION
                ));
            }
            Ok(GlooLibrary {
                connect: *lib.get(b"vg_connect\0").map_err(|e| e.to_string())?,
                destroy: *lib.get(b"vg_destroy\0").map_err(|e| e.to_string())?,
                allreduce: *lib.get(b"vg_allreduce_sum\0").map_err(|e| e.to_string())?,
                broadcast: *lib.get(b"vg_broadcast\0").map_err(|e| e.to_string())?,
                barrier: *lib.get(b"vg_barrier\0").map_err(|e| e.to_string())?,
                _lib: lib,
            })
        }
    }
}

/// Copies `bytes` into an anonymous memory file and returns a path that `dlopen` can open
/// (`/proc/self/fd/N`; the descriptor stays open for the life of the process).
fn write_anonymous_file(bytes: &[u8]) -> Result<String, String> {
    let name = CString::new("vista3d_gloo_shim").map_err(|e| e.to_string())?;
    // SAFETY: memfd_create with a valid name; the descriptor is owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    if fd < 0 {
        return Err(format!(
            "memfd_create failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    std::io::Write::write_all(&mut file, bytes)
        .map_err(|e| format!("writing the gloo shim: {e}"))?;
    // Keep the descriptor (and so the path) alive: the loader maps the file by path.
    let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
    Ok(format!("/proc/self/fd/{fd}"))
}

/// What the store callbacks see: the store and the buffer of the last `get`.
struct CallbackContext<'a> {
    store: &'a Store,
    last: Vec<u8>,
}

fn key_from(key: *const c_char) -> String {
    // SAFETY: gloo passes NUL-terminated keys.
    unsafe { CStr::from_ptr(key) }
        .to_string_lossy()
        .into_owned()
}

unsafe extern "C" fn cb_set(
    ctx: *mut c_void,
    key: *const c_char,
    data: *const u8,
    len: usize,
    err: *mut ffi::VgError,
) -> i32 {
    // SAFETY: ctx is the CallbackContext passed to vg_connect, alive during the call.
    let ctx = unsafe { &*(ctx as *const CallbackContext) };
    let value = if len == 0 {
        &[][..]
    } else {
        // SAFETY: gloo passes `len` readable bytes.
        unsafe { std::slice::from_raw_parts(data, len) }
    };
    match ctx.store.set(&format!("gloo/{}", key_from(key)), value) {
        Ok(()) => 0,
        Err(e) => {
            set_message(err, &e.to_string());
            1
        }
    }
}

unsafe extern "C" fn cb_get(
    ctx: *mut c_void,
    key: *const c_char,
    data: *mut *const u8,
    len: *mut usize,
    err: *mut ffi::VgError,
) -> i32 {
    // SAFETY: ctx is the CallbackContext passed to vg_connect, used by one thread at a time.
    let ctx = unsafe { &mut *(ctx as *mut CallbackContext) };
    match ctx.store.get(&format!("gloo/{}", key_from(key))) {
        Ok(v) => {
            ctx.last = v;
            // SAFETY: out pointers provided by the shim.
            unsafe {
                *data = ctx.last.as_ptr();
                *len = ctx.last.len();
            }
            0
        }
        Err(e) => {
            set_message(err, &e.to_string());
            1
        }
    }
}

unsafe extern "C" fn cb_wait(
    ctx: *mut c_void,
    keys: *const *const c_char,
    n: usize,
    timeout_ms: i64,
    err: *mut ffi::VgError,
) -> i32 {
    // SAFETY: ctx is the CallbackContext passed to vg_connect.
    let ctx = unsafe { &*(ctx as *const CallbackContext) };
    let keys: Vec<String> = (0..n)
        // SAFETY: gloo passes an array of n valid C strings.
        .map(|i| format!("gloo/{}", key_from(unsafe { *keys.add(i) })))
        .collect();
    match ctx
        .store
        .wait(&keys, Duration::from_millis(timeout_ms.max(0) as u64))
    {
        Ok(()) => 0,
        Err(e) => {
            set_message(err, &e.to_string());
            1
        }
    }
}

/// A connected gloo context: the CPU backend of one process group.
pub struct GlooBackend {
    lib: &'static GlooLibrary,
    ctx: NonNull<ffi::VgContext>,
}

// SAFETY: the gloo context is used by one thread at a time (the process group keeps the backend behind a mutex).
unsafe impl Send for GlooBackend {}

impl GlooBackend {
    /// Connects all ranks through the store. `hostname` is this process's address reachable by the others;
    /// `iface` (GLOO_SOCKET_IFNAME) picks a network interface instead.
    pub fn connect(
        store: &Store,
        rank: usize,
        world_size: usize,
        hostname: &str,
        iface: Option<&str>,
        timeout: Duration,
    ) -> Result<GlooBackend, DistError> {
        let lib = GlooLibrary::get()?;
        let host = CString::new(hostname)
            .map_err(|_| DistError::Launch(format!("host name {hostname:?} has a NUL byte")))?;
        let iface = CString::new(iface.unwrap_or(""))
            .map_err(|_| DistError::Launch("GLOO_SOCKET_IFNAME has a NUL byte".into()))?;
        let mut cb = CallbackContext {
            store,
            last: Vec::new(),
        };
        let vg_store = ffi::VgStore {
            ctx: (&mut cb as *mut CallbackContext).cast(),
            set: cb_set,
            get: cb_get,
            wait: cb_wait,
        };
        let mut err = new_error();
        // SAFETY: valid store table (its context outlives the call), C strings and error buffer.
        let raw = unsafe {
            (lib.connect)(
                &vg_store,
                rank as i32,
                world_size as i32,
                host.as_ptr(),
                iface.as_ptr(),
                timeout.as_millis().min(i64::MAX as u128) as i64,
                &mut err,
            )
        };
        let ctx = NonNull::new(raw).ok_or_else(|| {
            DistError::Collective(format!(
                "gloo could not connect rank {rank} of {world_size} (listening on {}): {}",
                if iface.as_bytes().is_empty() {
                    hostname.to_string()
                } else {
                    format!("interface {}", iface.to_string_lossy())
                },
                message(&err)
            ))
        })?;
        Ok(GlooBackend { lib, ctx })
    }

    fn check(&self, status: i32, err: &ffi::VgError, what: &str) -> Result<(), DistError> {
        if status == ffi::VG_OK {
            Ok(())
        } else {
            Err(DistError::Collective(format!(
                "gloo {what}: {}",
                message(err)
            )))
        }
    }

    /// Runs `f` on a host copy of `t` when it is not a contiguous CPU tensor, then copies the result back.
    fn on_host(
        t: &mut Tensor,
        f: impl FnOnce(&mut Tensor) -> Result<(), DistError>,
    ) -> Result<(), DistError> {
        if t.device() == Device::Cpu && t.is_contiguous() {
            return f(t);
        }
        let mut host = t.to_device(Device::Cpu).contiguous();
        f(&mut host)?;
        tch::no_grad(|| t.copy_(&host));
        Ok(())
    }
}

impl Collective for GlooBackend {
    fn backend(&self) -> Backend {
        Backend::Gloo
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), DistError> {
        let dtype = match t.kind() {
            Kind::Float => ffi::VG_FLOAT32,
            Kind::Double => ffi::VG_FLOAT64,
            k => {
                return Err(DistError::Collective(format!(
                    "all-reduce supports float32 and float64 tensors, got {k:?}"
                )))
            }
        };
        let (lib, ctx) = (self.lib, self.ctx);
        Self::on_host(t, |h| {
            let mut err = new_error();
            // SAFETY: h is a contiguous CPU tensor of numel elements of the given type, exclusively borrowed.
            let status =
                unsafe { (lib.allreduce)(ctx.as_ptr(), h.data_ptr(), h.numel(), dtype, &mut err) };
            self.check(status, &err, "all-reduce")
        })
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), DistError> {
        let (lib, ctx) = (self.lib, self.ctx);
        Self::on_host(t, |h| {
            let bytes = h.numel() * h.kind().elt_size_in_bytes();
            let mut err = new_error();
            // SAFETY: h is a contiguous CPU tensor of `bytes` bytes, exclusively borrowed.
            let status = unsafe {
                (lib.broadcast)(ctx.as_ptr(), h.data_ptr(), bytes, root as i32, &mut err)
            };
            self.check(status, &err, "broadcast")
        })
    }

    fn barrier(&mut self) -> Result<(), DistError> {
        let mut err = new_error();
        // SAFETY: valid context and error buffer.
        let status = unsafe { (self.lib.barrier)(self.ctx.as_ptr(), &mut err) };
        self.check(status, &err, "barrier")
    }
}

impl Drop for GlooBackend {
    fn drop(&mut self) {
        // SAFETY: the context came from vg_connect and is released once.
        unsafe { (self.lib.destroy)(self.ctx.as_ptr()) };
    }
}

/// The local address that routes to `master:port` (what the other ranks can reach this process at).
pub fn local_address_towards(master: &str, port: u16) -> Option<String> {
    use std::net::{ToSocketAddrs, UdpSocket};
    let target = (master, port).to_socket_addrs().ok()?.next()?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_address_towards_loopback_is_loopback() {
        assert_eq!(
            local_address_towards("127.0.0.1", 29500).as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(local_address_towards("no.such.host.invalid", 1), None);
    }
}
