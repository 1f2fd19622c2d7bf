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
/// Setting `VISTA3D_NO_CUDA` skips it.
pub fn init_cuda() {
    CUDA_INIT.call_once(|| {
        if std::env::var_os("VISTA3D_NO_CUDA").is_some() {
            log::debug!("VISTA3D_NO_CUDA set: libtorch_cuda.so not loaded");
            return;
        }
        // Without a CUDA driver there is no GPU to use, and a loaded libtorch_cuda.so makes libtorch's CPU
        // kernels several times slower (measured: 4.6 s vs 1.3 s per window), so load it only with a driver.
        if let Err(e) = dlopen("libcuda.so.1") {
            log::debug!("no CUDA driver ({e}): running on the CPU");
            return;
        }
        match dlopen("libtorch_cuda.so") {
            Ok(()) => log::debug!("libtorch_cuda.so loaded"),
            Err(e) => log::debug!("libtorch_cuda.so not loaded, CUDA disabled: {e}"),
        }
    });
}

/// `dlopen(name, RTLD_NOW | RTLD_GLOBAL)`, keeping the library loaded for the life of the process.
fn dlopen(name: &str) -> Result<(), String> {
    let c_name = CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: dlopen with a valid C string; the handle is intentionally never closed.
    let handle = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if !handle.is_null() {
        return Ok(());
    }
    // SAFETY: dlerror returns null or a valid NUL-terminated, thread-local string.
    let err = unsafe { libc::dlerror() };
    Err(if err.is_null() {
        "unknown error".to_string()
    } else {
        // SAFETY: checked non-null above.
        unsafe { std::ffi::CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned()
    })
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
