//! The rendezvous store: libtorch's own `c10d::TCPStore` (the store torchrun and `torch.distributed` use),
//! reached through `shim/c10d/store_shim.cpp`, compiled against the torch wheel's headers by `build.rs`
//! (`cfg(vista3d_c10d_store)`). Without the shim every call reports [`DistError::Unavailable`].
//!
//! Keys are prefixed (see [`super::LaunchEnv::key_prefix`]), values are bytes, counters are TCPStore's atomic `add`.
//! A [`Store`] may be shared between threads: the TCPStore client serialises its requests (a blocking `get` holds
//! the connection, so the watchdog uses a connection of its own).

use std::ffi::{c_char, CStr, CString};
use std::ptr::NonNull;
use std::time::Duration;

use super::DistError;

#[allow(non_camel_case_types, dead_code)]
mod ffi {
    use std::ffi::c_char;

    pub const VS_OK: i32 = 0;
    pub const VS_TIMEOUT: i32 = -2;
    pub const VS_ERROR_LEN: usize = 2048;

    #[repr(C)]
    pub struct VsError {
        pub message: [c_char; VS_ERROR_LEN],
    }

    #[repr(C)]
    pub struct VsStore {
        _private: [u8; 0],
    }

    #[cfg(vista3d_c10d_store)]
    extern "C" {
        pub fn vs_store_create(
            host: *const c_char,
            port: u16,
            is_server: i32,
            num_workers: i32,
            wait_workers: i32,
            timeout_ms: i64,
            err: *mut VsError,
        ) -> *mut VsStore;
        pub fn vs_store_destroy(store: *mut VsStore);
        pub fn vs_store_port(store: *mut VsStore, port: *mut u16, err: *mut VsError) -> i32;
        pub fn vs_store_set(
            store: *mut VsStore,
            key: *const c_char,
            data: *const u8,
            len: usize,
            err: *mut VsError,
        ) -> i32;
        pub fn vs_store_get(
            store: *mut VsStore,
            key: *const c_char,
            data: *mut *mut u8,
            len: *mut usize,
            err: *mut VsError,
        ) -> i32;
        pub fn vs_store_add(
            store: *mut VsStore,
            key: *const c_char,
            delta: i64,
            value: *mut i64,
            err: *mut VsError,
        ) -> i32;
        pub fn vs_store_check(
            store: *mut VsStore,
            keys: *const *const c_char,
            n: usize,
            exists: *mut i32,
            err: *mut VsError,
        ) -> i32;
        pub fn vs_store_wait(
            store: *mut VsStore,
            keys: *const *const c_char,
            n: usize,
            timeout_ms: i64,
            err: *mut VsError,
        ) -> i32;
        pub fn vs_free(p: *mut std::ffi::c_void);
    }

    /// Stand-ins with the shim's signatures, for builds without it: never reached, because no [`super::Store`] can
    /// be created there.
    #[cfg(not(vista3d_c10d_store))]
    mod stub {
        use super::{VsError, VsStore};
        use std::ffi::c_char;
        pub unsafe fn vs_store_destroy(_: *mut VsStore) {}
        pub unsafe fn vs_store_port(_: *mut VsStore, _: *mut u16, _: *mut VsError) -> i32 {
            -1
        }
        pub unsafe fn vs_store_set(
            _: *mut VsStore,
            _: *const c_char,
            _: *const u8,
            _: usize,
            _: *mut VsError,
        ) -> i32 {
            -1
        }
        pub unsafe fn vs_store_get(
            _: *mut VsStore,
            _: *const c_char,
            _: *mut *mut u8,
            _: *mut usize,
            _: *mut VsError,
        ) -> i32 {
            -1
        }
        pub unsafe fn vs_store_add(
            _: *mut VsStore,
            _: *const c_char,
            _: i64,
            _: *mut i64,
            _: *mut VsError,
        ) -> i32 {
            -1
        }
        pub unsafe fn vs_store_check(
            _: *mut VsStore,
            _: *const *const c_char,
            _: usize,
            _: *mut i32,
            _: *mut VsError,
        ) -> i32 {
            -1
        }
        pub unsafe fn vs_store_wait(
            _: *mut VsStore,
            _: *const *const c_char,
            _: usize,
            _: i64,
            _: *mut VsError,
        ) -> i32 {
            -1
        }
        pub unsafe fn vs_free(_: *mut std::ffi::c_void) {}
    }
    #[cfg(not(vista3d_c10d_store))]
    pub use stub::*;
}

/// A connection to (and, on the hosting rank, the server of) a TCPStore.
pub struct Store {
    raw: NonNull<ffi::VsStore>,
    prefix: String,
    /// `host:port`, for messages.
    address: String,
}

// SAFETY: c10d::TCPStore serialises requests on its client connection with a mutex; the handle is only freed in
// Drop, which needs exclusive ownership.
unsafe impl Send for Store {}
// SAFETY: as above: every method goes through TCPStore's own locking.
unsafe impl Sync for Store {}

fn new_error() -> ffi::VsError {
    ffi::VsError {
        message: [0; ffi::VS_ERROR_LEN],
    }
}

fn message(err: &ffi::VsError) -> String {
    // SAFETY: the shim NUL-terminates the message within the buffer (and the buffer starts zeroed).
    unsafe { CStr::from_ptr(err.message.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn c_string(s: &str) -> Result<CString, DistError> {
    CString::new(s).map_err(|_| DistError::Store(format!("store key {s:?} contains a NUL byte")))
}

impl Store {
    /// Hosts the store on `port` (all interfaces) and waits until `world_size` processes (this one included)
    /// have connected, for at most `timeout` (which also bounds every later request).
    pub fn host(
        port: u16,
        world_size: usize,
        timeout: Duration,
        prefix: &str,
    ) -> Result<Store, DistError> {
        Self::create("0.0.0.0", port, true, world_size, true, timeout, prefix)
            .map(|mut s| {
                s.address = format!("0.0.0.0:{port}");
                s
            })
            .map_err(|e| match e {
                DistError::Timeout(m) => DistError::Timeout(format!(
                    "rendezvous: not all {world_size} ranks connected to the store on port {port} within {} s \
                     ({m}); start every rank (torchrun --nproc_per_node, srun --ntasks) with the same \
                     MASTER_ADDR/MASTER_PORT",
                    timeout.as_secs()
                )),
                other => other,
            })
    }

    /// Connects to a store hosted at `host:port`, retrying until `timeout`. `register` counts this process in the
    /// host's wait for `world_size` workers (what torch's TCPStore clients do); off for torchrun's agent store.
    pub fn connect(
        host: &str,
        port: u16,
        world_size: usize,
        register: bool,
        timeout: Duration,
        prefix: &str,
    ) -> Result<Store, DistError> {
        Self::create(host, port, false, world_size, register, timeout, prefix)
    }

    fn create(
        host: &str,
        port: u16,
        is_server: bool,
        world_size: usize,
        wait_workers: bool,
        timeout: Duration,
        prefix: &str,
    ) -> Result<Store, DistError> {
        #[cfg(not(vista3d_c10d_store))]
        {
            let _ = (
                host,
                port,
                is_server,
                world_size,
                wait_workers,
                timeout,
                prefix,
            );
            Err(DistError::Unavailable(
                "this vista3d was built without the c10d store shim (LIBTORCH's include/ lacked \
                 torch/csrc/distributed/c10d/TCPStore.hpp): multi-process runs are not possible"
                    .into(),
            ))
        }
        #[cfg(vista3d_c10d_store)]
        {
            let c_host = c_string(host)?;
            let mut err = new_error();
            let workers = i32::try_from(world_size)
                .map_err(|_| DistError::Launch(format!("world size {world_size} is too large")))?;
            // SAFETY: valid C string and error buffer; the shim catches every C++ exception.
            let raw = unsafe {
                ffi::vs_store_create(
                    c_host.as_ptr(),
                    port,
                    is_server as i32,
                    workers,
                    wait_workers as i32,
                    timeout.as_millis().min(i64::MAX as u128) as i64,
                    &mut err,
                )
            };
            let address = format!("{host}:{port}");
            match NonNull::new(raw) {
                Some(raw) => Ok(Store {
                    raw,
                    prefix: prefix.to_string(),
                    address,
                }),
                None => {
                    let m = message(&err);
                    if m.contains("imed out") || m.contains("imeout") {
                        Err(DistError::Timeout(format!("store {address}: {m}")))
                    } else {
                        Err(DistError::Store(format!("store {address}: {m}")))
                    }
                }
            }
        }
    }

    /// `host:port` of the store.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The port the store listens on (hosting rank) or is connected to.
    pub fn port(&self) -> Result<u16, DistError> {
        let mut port = 0u16;
        self.call("port", |raw, err| {
            // SAFETY: valid handle, out pointer and error buffer.
            unsafe { ffi::vs_store_port(raw, &mut port, err) }
        })?;
        Ok(port)
    }

    /// Runs one shim call; maps its status to an error naming the operation.
    fn call(
        &self,
        what: &str,
        f: impl FnOnce(*mut ffi::VsStore, *mut ffi::VsError) -> i32,
    ) -> Result<(), DistError> {
        let mut err = new_error();
        match f(self.raw.as_ptr(), &mut err) {
            ffi::VS_OK => Ok(()),
            ffi::VS_TIMEOUT => Err(DistError::Timeout(format!(
                "store {} {what}: {}",
                self.address,
                message(&err)
            ))),
            _ => Err(DistError::Store(format!(
                "store {} {what}: {}",
                self.address,
                message(&err)
            ))),
        }
    }

    fn key(&self, key: &str) -> Result<CString, DistError> {
        c_string(&format!("{}{key}", self.prefix))
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), DistError> {
        let k = self.key(key)?;
        self.call(&format!("set '{key}'"), |raw, err| {
            // SAFETY: valid handle, key, data pointer/length and error buffer.
            unsafe { ffi::vs_store_set(raw, k.as_ptr(), value.as_ptr(), value.len(), err) }
        })
    }

    /// Waits for `key` (up to the store's timeout) and returns its value.
    pub fn get(&self, key: &str) -> Result<Vec<u8>, DistError> {
        let k = self.key(key)?;
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut len = 0usize;
        self.call(&format!("get '{key}'"), |raw, err| {
            // SAFETY: valid handle, key, out pointers and error buffer.
            unsafe { ffi::vs_store_get(raw, k.as_ptr(), &mut data, &mut len, err) }
        })?;
        if data.is_null() {
            return Ok(Vec::new());
        }
        // SAFETY: the shim returned a malloc'ed buffer of `len` bytes, released right after the copy.
        let out = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
        // SAFETY: the buffer came from vs_store_get.
        unsafe { ffi::vs_free(data.cast()) };
        Ok(out)
    }

    /// Atomically adds `delta` to the counter `key` (0 when absent) and returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, DistError> {
        let k = self.key(key)?;
        let mut value = 0i64;
        self.call(&format!("add '{key}'"), |raw, err| {
            // SAFETY: valid handle, key, out pointer and error buffer.
            unsafe { ffi::vs_store_add(raw, k.as_ptr(), delta, &mut value, err) }
        })?;
        Ok(value)
    }

    /// True when every key exists (does not block).
    pub fn check(&self, keys: &[String]) -> Result<bool, DistError> {
        let owned = keys
            .iter()
            .map(|k| self.key(k))
            .collect::<Result<Vec<_>, _>>()?;
        let ptrs: Vec<*const c_char> = owned.iter().map(|k| k.as_ptr()).collect();
        let mut exists = 0i32;
        self.call("check", |raw, err| {
            // SAFETY: valid handle, an array of valid C strings, out pointer and error buffer.
            unsafe { ffi::vs_store_check(raw, ptrs.as_ptr(), ptrs.len(), &mut exists, err) }
        })?;
        Ok(exists != 0)
    }

    /// Waits until every key exists, for at most `timeout`.
    pub fn wait(&self, keys: &[String], timeout: Duration) -> Result<(), DistError> {
        let owned = keys
            .iter()
            .map(|k| self.key(k))
            .collect::<Result<Vec<_>, _>>()?;
        let ptrs: Vec<*const c_char> = owned.iter().map(|k| k.as_ptr()).collect();
        self.call(&format!("wait {keys:?}"), |raw, err| {
            // SAFETY: valid handle, an array of valid C strings and error buffer.
            unsafe {
                ffi::vs_store_wait(
                    raw,
                    ptrs.as_ptr(),
                    ptrs.len(),
                    timeout.as_millis().min(i64::MAX as u128) as i64,
                    err,
                )
            }
        })
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: the handle came from vs_store_create and is released once.
        unsafe { ffi::vs_store_destroy(self.raw.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(vista3d_c10d_store)]
    fn a_hosted_store_serves_a_client() {
        let timeout = Duration::from_secs(20);
        // Port 0: the OS picks a free port; the client learns it from the server.
        let server = std::thread::spawn(move || {
            let s = Store::host(0, 1, timeout, "t/").unwrap();
            let port = s.port().unwrap();
            (s, port)
        });
        let (server, port) = server.join().unwrap();
        assert!(port > 0);
        let client = Store::connect("127.0.0.1", port, 1, false, timeout, "t/").unwrap();
        server.set("k", b"value").unwrap();
        assert_eq!(client.get("k").unwrap(), b"value");
        assert_eq!(client.get("k").unwrap(), b"value");
        assert_eq!(client.add("n", 2).unwrap(), 2);
        assert_eq!(server.add("n", 3).unwrap(), 5);
        assert!(client.check(&["k".into(), "n".into()]).unwrap());
        assert!(!client.check(&["k".into(), "absent".into()]).unwrap());
        client.set("empty", b"").unwrap();
        assert_eq!(server.get("empty").unwrap(), b"");
        let e = client
            .wait(&["absent".into()], Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(e, DistError::Timeout(_)), "{e}");
        // Prefixes keep runs apart.
        let other = Store::connect("127.0.0.1", port, 1, false, timeout, "u/").unwrap();
        assert!(!other.check(&["k".into()]).unwrap());
    }

    #[test]
    #[cfg(vista3d_c10d_store)]
    fn connecting_to_nothing_fails_within_the_timeout() {
        // A port nobody listens on (bound, then released).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = std::time::Instant::now();
        let e = Store::connect("127.0.0.1", port, 2, true, Duration::from_secs(2), "")
            .err()
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        assert!(e.to_string().contains(&port.to_string()), "{e}");
    }
}
