//! Process set-up for libtorch: CUDA support and threads.

use std::ffi::CString;
use std::sync::Once;

use tch::Device;

static CUDA_INIT: Once = Once::new();

/// Makes libtorch's CUDA backend available when the machine has it.
///
/// The linker drops `libtorch_cuda.so` from the binary because no symbol of it is used directly, so
/// `tch::Cuda::is_available()` would always be false. Loading it at start-up (from the same libtorch the
/// binary runs against, found through the binary's rpath or `LD_LIBRARY_PATH`) registers the CUDA backend.
/// On a machine without it (or without CUDA libraries) this does nothing and everything runs on the CPU.
pub fn init_cuda() {
    CUDA_INIT.call_once(|| {
        {
            let name = "libtorch_cuda.so";
            let c_name = CString::new(name).expect("library name has no NUL byte");
            // SAFETY: dlopen with a valid C string; the handle is intentionally kept for the process lifetime.
            let handle =
                unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if handle.is_null() {
                // SAFETY: dlerror returns a thread-local C string or null.
                let err = unsafe { libc::dlerror() };
                let msg = if err.is_null() {
                    "unknown error".to_string()
                } else {
                    // SAFETY: non-null dlerror result is a valid NUL-terminated string.
                    unsafe { std::ffi::CStr::from_ptr(err) }
                        .to_string_lossy()
                        .into_owned()
                };
                log::debug!("{name} not loaded, CUDA disabled: {msg}");
            } else {
                log::debug!("{name} loaded");
            }
        }
    });
}

/// Parses a device name: `cpu`, `cuda`, `cuda:N`, or `auto` (the first GPU when there is one).
pub fn parse_device(name: &str) -> anyhow::Result<Device> {
    init_cuda();
    let name = name.trim().to_ascii_lowercase();
    let device = match name.as_str() {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" | "gpu" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => anyhow::bail!("unknown device '{name}': use cpu, cuda, cuda:N or auto"),
        },
    };
    if let Device::Cuda(i) = device {
        let n = tch::Cuda::device_count() as usize;
        anyhow::ensure!(
            i < n,
            "device cuda:{i} asked for, but this machine has {n} CUDA device(s) usable by libtorch"
        );
    }
    Ok(device)
}
