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

/// The folder of the libtorch the process runs against (where `libtorch_cpu.so` was loaded from).
pub fn libtorch_dir() -> Option<std::path::PathBuf> {
    let name = CString::new("_ZN2at13globalContextEv").ok()?;
    // SAFETY: dlsym on the global namespace with a valid C string; null is handled.
    let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    if sym.is_null() {
        return None;
    }
    // SAFETY: Dl_info is a plain C struct of pointers, valid when zeroed.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr fills `info` for an address inside a loaded object; `dli_fname` is then a valid C string
    // owned by the loader (or null, handled).
    let ok = unsafe { libc::dladdr(sym, &mut info) };
    if ok == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: checked non-null above.
    let file = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) }
        .to_string_lossy()
        .into_owned();
    let path = std::fs::canonicalize(&file).ok()?;
    path.parent().map(std::path::Path::to_path_buf)
}

/// Where ONNX Runtime's shared library is, in the order the project looks (no environment needed):
/// `ORT_DYLIB_PATH`, then the Python environment of the libtorch the binary runs against
/// (`site-packages/onnxruntime/capi/`), then the install prefix of `scripts/install.sh` (`<bin>/../lib`, and the
/// folder libtorch was loaded from). Candidates are returned in that order; the first that exists should be used.
pub fn onnxruntime_candidates() -> Vec<std::path::PathBuf> {
    let mut out: Vec<std::path::PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        out.push(std::path::PathBuf::from(p));
    }
    out.extend(onnxruntime_beside_libtorch());
    out
}

/// ONNX Runtime libraries found without any environment variable: in the Python environment of the libtorch the
/// binary runs against, in the folder libtorch was loaded from, and in `<bin>/../lib` (the install prefix).
pub fn onnxruntime_beside_libtorch() -> Vec<std::path::PathBuf> {
    use std::path::PathBuf;
    let mut out: Vec<PathBuf> = Vec::new();
    let in_dir = |dir: &std::path::Path| -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .map(|n| n.to_string_lossy().starts_with("libonnxruntime.so"))
                            .unwrap_or(false)
                    })
                    .collect()
            })
            .unwrap_or_default();
        // The most specific name first (libonnxruntime.so.1.31.1 before libonnxruntime.so).
        found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        found
    };
    if let Some(torch_lib) = libtorch_dir() {
        if let Some(site) = torch_lib.parent().and_then(|t| t.parent()) {
            out.extend(in_dir(&site.join("onnxruntime").join("capi")));
        }
        out.extend(in_dir(&torch_lib));
    }
    if let Some(bin) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.to_path_buf()))
    {
        out.extend(in_dir(&bin.join("..").join("lib")));
    }
    out
}

/// libtorch's current CUDA stream of GPU `ordinal` (`c10::cuda::getCurrentCUDAStream(ordinal).stream()`, a
/// `cudaStream_t`; null is the legacy default stream), reached through its C++ symbols in `libc10_cuda.so`, so
/// that other CUDA work (TensorRT) can be ordered with libtorch's without synchronising the device. An error when
/// libtorch's CUDA backend is not loaded (no GPU, CPU-only libtorch) or the symbols are missing.
pub fn current_cuda_stream(ordinal: usize) -> anyhow::Result<*mut std::ffi::c_void> {
    /// `c10::cuda::CUDAStream` (a `c10::Stream`: `Device {int8 type, int8 index}`, `int64 id`): trivially
    /// copyable and 16 bytes, so returned by value in registers (Itanium C++ ABI, x86-64 System V).
    #[repr(C)]
    struct CudaStreamRepr {
        device_type: i8,
        device_index: i8,
        id: i64,
    }
    const GET: &str = "_ZN3c104cuda20getCurrentCUDAStreamEa";
    const STREAM: &str = "_ZNK3c104cuda10CUDAStream6streamEv";
    let index =
        i8::try_from(ordinal).map_err(|_| anyhow::anyhow!("GPU ordinal {ordinal} out of range"))?;
    let symbol = |name: &str| -> anyhow::Result<*mut std::ffi::c_void> {
        let c_name = CString::new(name)?;
        // SAFETY: dlsym on the global namespace with a valid C string; null is handled.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c_name.as_ptr()) };
        anyhow::ensure!(
            !p.is_null(),
            "libtorch's CUDA stream API ({name}) is not loaded: no CUDA libtorch in this process"
        );
        Ok(p)
    };
    let (get, stream) = (symbol(GET)?, symbol(STREAM)?);
    // SAFETY: the signatures of `CUDAStream c10::cuda::getCurrentCUDAStream(DeviceIndex)` (DeviceIndex = int8)
    // and `cudaStream_t CUDAStream::stream() const` (`this` first), with the layout above.
    unsafe {
        let get: extern "C" fn(i8) -> CudaStreamRepr = std::mem::transmute(get);
        let stream: extern "C" fn(*const CudaStreamRepr) -> *mut std::ffi::c_void =
            std::mem::transmute(stream);
        let current = get(index);
        anyhow::ensure!(
            current.device_index == index,
            "libtorch returned a stream of device {} (type {}, id {}) for GPU {ordinal}",
            current.device_index,
            current.device_type,
            current.id
        );
        Ok(stream(&current))
    }
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

/// Lets libtorch back CPU tensors of 2 MiB and more with transparent huge pages (its `THP_MEM_ALLOC_ENABLE`,
/// read at its first allocation), unless the environment already sets that variable (`0` turns it off) or the
/// kernel has no transparent huge pages. Without them each new large tensor costs a page fault per 4 KiB, and
/// the windows of a request make thousands of such tensors (measured with `/usr/bin/time -v`, `benches/RESULTS.md`:
/// one 128^3 window of everything 9.1-11.5 s -> 6.1-7.2 s, peak memory +2-11%). Call it first in `main`, before
/// any thread starts and any tensor is made.
pub fn enable_huge_page_tensors() {
    const VAR: &str = "THP_MEM_ALLOC_ENABLE";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok();
    if thp.as_deref().is_some_and(thp_can_advise) {
        std::env::set_var(VAR, "1");
    }
}

/// Whether the kernel's `transparent_hugepage/enabled` (e.g. `always [madvise] never`) lets a process ask for huge
/// pages: any mode but `never`.
fn thp_can_advise(enabled: &str) -> bool {
    enabled.contains('[') && !enabled.contains("[never]")
}

/// Whether this CPU computes bfloat16 natively (x86: `avx512_bf16` or `amx_bf16`; Arm: `bf16`), from
/// `/proc/cpuinfo` (read once). Without it libtorch emulates bf16 and the `bf16` method is slower than fp32.
pub fn cpu_has_native_bf16() -> bool {
    static NATIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NATIVE.get_or_init(|| cpuinfo().is_some_and(|info| cpuinfo_has_bf16(&info)))
}

/// Whether this CPU has AVX-512 (`avx512f` in `/proc/cpuinfo`, read once): where `auto` prefers ONNX Runtime
/// (see [`crate::engines::AutoCpu`]).
pub fn cpu_has_avx512() -> bool {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX512.get_or_init(|| cpuinfo().is_some_and(|info| cpuinfo_has_avx512(&info)))
}

fn cpuinfo() -> Option<String> {
    std::fs::read_to_string("/proc/cpuinfo").ok()
}

/// The CPU feature flags listed in the text of `/proc/cpuinfo` (x86 `flags`, Arm `Features`).
fn cpuinfo_flags(info: &str) -> impl Iterator<Item = &str> {
    info.lines()
        .filter(|l| l.starts_with("flags") || l.starts_with("Features"))
        .flat_map(|l| l.split(':').nth(1).unwrap_or("").split_whitespace())
}

/// [`cpu_has_native_bf16`] on the text of `/proc/cpuinfo`.
pub fn cpuinfo_has_bf16(info: &str) -> bool {
    cpuinfo_flags(info).any(|f| matches!(f, "avx512_bf16" | "amx_bf16" | "bf16"))
}

/// [`cpu_has_avx512`] on the text of `/proc/cpuinfo`.
pub fn cpuinfo_has_avx512(info: &str) -> bool {
    cpuinfo_flags(info).any(|f| f == "avx512f")
}

/// libtorch's global numeric switches that tch does not expose (TF32, cuDNN autotuning, autocast), reached
/// through their C++ symbols in `libtorch_cpu.so` (Itanium ABI: a member function takes `this` first).
/// They matter only on CUDA; calling them on a CPU-only machine is harmless.
pub mod torch_switches {
    use std::ffi::{c_void, CString};

    /// `c10::DeviceType::CPU`.
    const DEVICE_CPU: i8 = 0;
    /// `c10::DeviceType::CUDA`.
    const DEVICE_CUDA: i8 = 1;
    /// `c10::ScalarType::Half`.
    const SCALAR_HALF: i8 = 5;
    /// `c10::ScalarType::BFloat16`.
    const SCALAR_BFLOAT16: i8 = 15;

    fn symbol(name: &str) -> Option<*mut c_void> {
        let c_name = CString::new(name).ok()?;
        // SAFETY: dlsym on the global namespace with a valid C string; null is handled.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c_name.as_ptr()) };
        (!p.is_null()).then_some(p)
    }

    fn context() -> Option<*mut c_void> {
        let f = symbol("_ZN2at13globalContextEv")?;
        // SAFETY: `at::globalContext()` takes no argument and returns a reference (a pointer) to the context.
        let f: extern "C" fn() -> *mut c_void = unsafe { std::mem::transmute(f) };
        Some(f())
    }

    fn set_context_flag(name: &str, on: bool) -> bool {
        let (Some(ctx), Some(f)) = (context(), symbol(name)) else {
            log::debug!("libtorch symbol {name} not found: switch ignored");
            return false;
        };
        // SAFETY: `void at::Context::setX(bool)` called with the global context as `this`.
        let f: extern "C" fn(*mut c_void, bool) = unsafe { std::mem::transmute(f) };
        f(ctx, on);
        true
    }

    /// Allows (or forbids) TF32 tensor cores in cuDNN convolutions and cuBLAS matmuls
    /// (`torch.backends.cudnn.allow_tf32` / `torch.backends.cuda.matmul.allow_tf32`).
    pub fn set_tf32(conv: bool, matmul: bool) -> bool {
        set_context_flag("_ZN2at7Context17setAllowTF32CuDNNEb", conv)
            & set_context_flag("_ZN2at7Context18setAllowTF32CuBLASEb", matmul)
    }

    /// The TF32 mode (cuDNN, cuBLAS) that runners hold, and how many hold it ([`lease_tf32`]).
    static TF32_GATE: Gate = Gate::new();

    /// A process-wide switch that several threads may hold in one state at a time.
    pub struct Gate {
        state: std::sync::Mutex<(Option<(bool, bool)>, usize)>,
        changed: std::sync::Condvar,
    }

    impl Gate {
        pub const fn new() -> Self {
            Self {
                state: std::sync::Mutex::new((None, 0)),
                changed: std::sync::Condvar::new(),
            }
        }

        /// Waits until no holder needs another mode, sets `mode` with `apply` if it is not the current one, and
        /// holds it until the lease is dropped.
        pub fn lease(&self, mode: (bool, bool), apply: impl FnOnce(bool, bool)) -> Lease<'_> {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            while s.1 > 0 && s.0 != Some(mode) {
                s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            if s.0 != Some(mode) {
                apply(mode.0, mode.1);
                s.0 = Some(mode);
            }
            s.1 += 1;
            Lease { gate: self }
        }
    }

    impl Default for Gate {
        fn default() -> Self {
            Self::new()
        }
    }

    /// A held mode of a [`Gate`].
    pub struct Lease<'a> {
        gate: &'a Gate,
    }

    impl Drop for Lease<'_> {
        fn drop(&mut self) {
            let mut s = self.gate.state.lock().unwrap_or_else(|e| e.into_inner());
            s.1 -= 1;
            self.gate.changed.notify_all();
        }
    }

    /// Sets libtorch's process-wide TF32 switches for a request and holds them: a worker on another device that
    /// needs the other mode (e.g. fp32 while this one runs tf32) waits until this lease is dropped, so the
    /// switches never flip under a running request. Held by one request's runner (`engines::runner`); a thread
    /// never holds two.
    pub fn lease_tf32(conv: bool, matmul: bool) -> Lease<'static> {
        TF32_GATE.lease((conv, matmul), |c, m| {
            set_tf32(c, m);
        })
    }

    /// `torch.backends.cudnn.benchmark`: let cuDNN time its algorithms for each new shape.
    pub fn set_cudnn_benchmark(on: bool) -> bool {
        set_context_flag("_ZN2at7Context17setBenchmarkCuDNNEb", on)
    }

    /// Runs `f` under CUDA autocast to fp16 when `on` (see [`with_cuda_autocast`]), plainly otherwise: the one
    /// autocast switch of the project (inference and training).
    pub fn autocast<T>(on: bool, f: impl FnOnce() -> T) -> T {
        if on {
            with_cuda_autocast(f)
        } else {
            f()
        }
    }

    /// Runs `f` under CUDA autocast to fp16 (`torch.autocast("cuda")`), as the bundle's `amp: true`.
    pub fn with_cuda_autocast<T>(f: impl FnOnce() -> T) -> T {
        with_autocast(DEVICE_CUDA, SCALAR_HALF, f)
    }

    /// Runs `f` under autocast to bfloat16 on CUDA or on the CPU (`torch.autocast(device, torch.bfloat16)`):
    /// convolutions and matmuls in bf16, norms and reductions in fp32.
    pub fn with_bf16_autocast<T>(cuda: bool, f: impl FnOnce() -> T) -> T {
        with_autocast(
            if cuda { DEVICE_CUDA } else { DEVICE_CPU },
            SCALAR_BFLOAT16,
            f,
        )
    }

    /// Autocast on `device` to `dtype` around `f`, through libtorch's device-typed API directly (tch's wrapper
    /// prints a deprecation warning per call).
    fn with_autocast<T>(device: i8, scalar: i8, f: impl FnOnce() -> T) -> T {
        let (Some(set), Some(dtype), Some(inc), Some(dec), Some(clear)) = (
            symbol("_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"),
            symbol("_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"),
            symbol("_ZN2at8autocast17increment_nestingEv"),
            symbol("_ZN2at8autocast17decrement_nestingEv"),
            symbol("_ZN2at8autocast11clear_cacheEv"),
        ) else {
            log::warn!("libtorch autocast symbols not found: running without autocast");
            return f();
        };
        // SAFETY: the signatures of at::autocast::{set_autocast_enabled(DeviceType, bool),
        // set_autocast_dtype(DeviceType, ScalarType), increment_nesting(), decrement_nesting(), clear_cache()};
        // DeviceType and ScalarType are int8 enums.
        unsafe {
            let set: extern "C" fn(i8, bool) = std::mem::transmute(set);
            let dtype: extern "C" fn(i8, i8) = std::mem::transmute(dtype);
            let inc: extern "C" fn() -> i32 = std::mem::transmute(inc);
            let dec: extern "C" fn() -> i32 = std::mem::transmute(dec);
            let clear: extern "C" fn() = std::mem::transmute(clear);
            dtype(device, scalar);
            set(device, true);
            inc();
            let out = f();
            if dec() == 0 {
                clear();
            }
            set(device, false);
            out
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn native_bf16_is_read_from_the_cpu_flags() {
            let x86 = "processor : 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n";
            assert!(crate::runtime::cpuinfo_has_bf16(x86));
            assert!(crate::runtime::cpuinfo_has_bf16(
                "Features\t: fp asimd bf16 i8mm\n"
            ));
            assert!(!crate::runtime::cpuinfo_has_bf16(
                "flags\t\t: fpu avx2 avx512f avx512_vnni\nmodel name : bf16 in a name\n"
            ));
        }

        #[test]
        fn huge_pages_are_asked_for_unless_the_kernel_says_never() {
            assert!(crate::runtime::thp_can_advise("always [madvise] never\n"));
            assert!(crate::runtime::thp_can_advise("[always] madvise never\n"));
            assert!(!crate::runtime::thp_can_advise("always madvise [never]\n"));
            assert!(!crate::runtime::thp_can_advise(""));
        }

        #[test]
        fn avx512_is_read_from_the_cpu_flags() {
            assert!(crate::runtime::cpuinfo_has_avx512(
                "flags\t\t: fpu avx2 avx512f avx512_vnni\n"
            ));
            // avx512vl alone, or the word in another field, is not avx512f.
            assert!(!crate::runtime::cpuinfo_has_avx512(
                "flags\t\t: fpu fma avx2 avx512vl\nmodel name\t: avx512f edition\n"
            ));
            assert!(!crate::runtime::cpuinfo_has_avx512(""));
        }

        #[test]
        fn a_held_mode_blocks_other_modes_but_not_its_own() {
            use std::sync::atomic::{AtomicUsize, Ordering};
            use std::sync::Arc;
            use std::time::Duration;
            let gate: &'static Gate = Box::leak(Box::new(Gate::new()));
            let applied = Arc::new(std::sync::Mutex::new(Vec::new()));
            let log = applied.clone();
            let a = gate.lease((false, false), move |c, m| log.lock().unwrap().push((c, m)));
            // The same mode joins at once, without applying it again.
            let same = gate.lease((false, false), |_, _| panic!("applied twice"));
            let waited = Arc::new(AtomicUsize::new(0));
            let (w, log) = (waited.clone(), applied.clone());
            let other = std::thread::spawn(move || {
                let _l = gate.lease((true, true), move |c, m| log.lock().unwrap().push((c, m)));
                w.store(1, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(
                waited.load(Ordering::SeqCst),
                0,
                "the other mode ran while one was held"
            );
            drop(a);
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(waited.load(Ordering::SeqCst), 0, "one holder is left");
            drop(same);
            other.join().unwrap();
            assert_eq!(waited.load(Ordering::SeqCst), 1);
            assert_eq!(*applied.lock().unwrap(), vec![(false, false), (true, true)]);
        }

        #[test]
        fn libtorch_and_onnxruntime_are_found_without_environment() {
            let dir = crate::runtime::libtorch_dir().expect("libtorch is loaded");
            assert!(dir.join("libtorch_cpu.so").is_file(), "{}", dir.display());
            // The test environment has onnxruntime in the same Python environment as torch: found without
            // ORT_DYLIB_PATH, and ORT_DYLIB_PATH (when set) comes first.
            let beside = crate::runtime::onnxruntime_beside_libtorch();
            assert!(
                beside.first().is_some_and(
                    |p| p.is_file() && p.to_string_lossy().contains("libonnxruntime.so")
                ),
                "{beside:?}"
            );
            let all = crate::runtime::onnxruntime_candidates();
            if let Some(env) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
                assert_eq!(all.first(), Some(&std::path::PathBuf::from(env)));
            }
            assert!(beside.iter().all(|p| all.contains(p)), "{all:?}");
        }

        #[test]
        fn libtorch_symbols_resolve() {
            // The binary links libtorch_cpu, so every switch must be found (a renamed symbol would silently
            // turn TF32/amp requests into fp32 otherwise).
            assert!(context().is_some());
            assert!(set_tf32(false, false));
            assert!(set_cudnn_benchmark(false));
            for name in [
                "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb",
                "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE",
                "_ZN2at8autocast17increment_nestingEv",
                "_ZN2at8autocast17decrement_nestingEv",
                "_ZN2at8autocast11clear_cacheEv",
            ] {
                assert!(symbol(name).is_some(), "{name}");
            }
            let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
            assert_eq!(with_cuda_autocast(|| 7), 7);
        }
    }
}

/// The message of a caught panic (tch reports libtorch's errors from its infallible calls as panics).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}
