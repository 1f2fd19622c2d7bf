//! libtorch's OpenMP thread team, for this crate's own CPU kernels ([`super::winograd`], [`super::fused_norm`]).
//!
//! libtorch runs its CPU operators on an OpenMP team whose idle workers keep spinning for a while after each
//! operator (libgomp's default wait policy). A kernel that brought its own threads would compete with those
//! spinning workers for the same cores: measured on a 2-vCPU VM, a window with Winograd's convolutions on
//! `std::thread`s took 21.6 s with `OMP_WAIT_POLICY=ACTIVE` and 15.9-17.1 s with `PASSIVE`
//! (`benches/RESULTS.md`). Running the kernel's shares on libtorch's own team instead reuses the workers that
//! are already spinning, whatever the wait policy.
//!
//! The team is entered through libgomp's `GOMP_parallel`, which the OpenMP runtime libtorch is linked against
//! exports (libgomp, and Intel's and LLVM's runtimes for compatibility); it is looked up at run time among the
//! libraries already loaded, so nothing links against it and [`run`] reports when none is there.

use std::any::Any;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};

type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, u32, u32);
type OmpQuery = unsafe extern "C" fn() -> i32;

/// The OpenMP runtime's entry points, found among the loaded libraries.
struct Runtime {
    parallel: GompParallel,
    thread_num: OmpQuery,
    num_threads: OmpQuery,
}

fn runtime() -> Option<&'static Runtime> {
    static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let find = |name: &std::ffi::CStr| {
                // SAFETY: dlsym with RTLD_DEFAULT only reads the loaded libraries' symbol tables.
                let symbol = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
                (!symbol.is_null()).then_some(symbol)
            };
            let parallel = find(c"GOMP_parallel")?;
            let thread_num = find(c"omp_get_thread_num")?;
            let num_threads = find(c"omp_get_num_threads")?;
            // SAFETY: these are the OpenMP runtime's C entry points with the signatures above (libgomp's ABI,
            // which the other runtimes export for compatibility).
            unsafe {
                Some(Runtime {
                    parallel: std::mem::transmute::<*mut c_void, GompParallel>(parallel),
                    thread_num: std::mem::transmute::<*mut c_void, OmpQuery>(thread_num),
                    num_threads: std::mem::transmute::<*mut c_void, OmpQuery>(num_threads),
                })
            }
        })
        .as_ref()
}

/// What one parallel region needs: the work and the first panic of any of its threads.
struct Region<'a> {
    runtime: &'static Runtime,
    shares: usize,
    work: &'a (dyn Fn(usize) + Sync),
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

extern "C" fn region_body(data: *mut c_void) {
    // SAFETY: `data` is the `Region` that `run` passed to GOMP_parallel, alive until GOMP_parallel returns.
    let region = unsafe { &*(data as *const Region) };
    // SAFETY: called inside the parallel region, as OpenMP requires.
    let (me, team) = unsafe {
        (
            (region.runtime.thread_num)().max(0) as usize,
            (region.runtime.num_threads)().max(1) as usize,
        )
    };
    // The team may have fewer threads than asked for (thread limits, nesting): every thread takes every
    // `team`-th share, so all shares run whatever its size. No panic may unwind into the OpenMP runtime.
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        (me..region.shares)
            .step_by(team)
            .for_each(|share| (region.work)(share))
    }));
    if let Err(payload) = outcome {
        let mut first = region.panic.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(payload);
    }
}

/// Runs `work(share)` for every share in `0..shares` on libtorch's OpenMP team of `shares` threads (this thread
/// and `shares - 1` workers), returning when all have run; a panic in any share resumes on this thread. Returns
/// `false`, having run nothing, where no OpenMP runtime is loaded.
pub fn run(shares: usize, work: &(dyn Fn(usize) + Sync)) -> bool {
    let Some(runtime) = runtime() else {
        return false;
    };
    if shares == 0 {
        return true;
    }
    let region = Region {
        runtime,
        shares,
        work,
        panic: Mutex::new(None),
    };
    let threads = u32::try_from(shares).unwrap_or(u32::MAX);
    // SAFETY: `region_body` receives `&region`, which outlives the call; GOMP_parallel returns only after every
    // thread of the team has finished `region_body` (the region ends with an implicit barrier).
    unsafe {
        (runtime.parallel)(
            region_body,
            &region as *const Region as *mut c_void,
            threads,
            0,
        );
    }
    if let Some(payload) = region.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        std::panic::resume_unwind(payload);
    }
    true
}

/// A buffer's pointer, shared by the shares of [`for_each_share`] that read or write disjoint elements of it
/// (the kernels' safety comments say which).
pub struct SharedPtr(pub *mut f32);

impl SharedPtr {
    pub fn ptr(&self) -> *mut f32 {
        self.0
    }
}

// SAFETY: a raw pointer; every user makes its threads touch disjoint elements of a buffer that outlives them.
unsafe impl Sync for SharedPtr {}

/// Runs `f` on every item, the items split into `threads` contiguous shares run at once: on libtorch's OpenMP
/// team (whose workers are already awake from the operator before), or on scoped threads
/// where no OpenMP runtime is loaded.
pub fn for_each_share<T: Send>(mut items: Vec<T>, threads: usize, f: impl Fn(T) + Sync) {
    if threads <= 1 || items.len() <= 1 {
        items.into_iter().for_each(f);
        return;
    }
    let per = items.len().div_ceil(threads);
    let mut shares = Vec::with_capacity(threads);
    while !items.is_empty() {
        let rest = items.split_off(per.min(items.len()));
        shares.push(Mutex::new(Some(std::mem::replace(&mut items, rest))));
    }
    let take = |share: usize| {
        shares[share]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default()
    };
    let run_share = |share: usize| take(share).into_iter().for_each(&f);
    if run(shares.len(), &run_share) {
        return;
    }
    std::thread::scope(|s| {
        for share in 0..shares.len() {
            let run_share = &run_share;
            s.spawn(move || run_share(share));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn libtorch_brings_an_openmp_runtime() {
        // Make sure libtorch is loaded and has started its runtime, as it has wherever a kernel runs.
        let _ = tch::Tensor::ones([64], (tch::Kind::Float, tch::Device::Cpu)).sum(tch::Kind::Float);
        assert!(
            runtime().is_some(),
            "no GOMP_parallel among the loaded libraries"
        );
    }

    #[test]
    fn every_share_runs_once_on_the_team() {
        for shares in [1, 2, 3, 7] {
            let counts: Vec<AtomicUsize> = (0..shares).map(|_| AtomicUsize::new(0)).collect();
            let threads = Mutex::new(std::collections::HashSet::new());
            assert!(run(shares, &|share| {
                counts[share].fetch_add(1, Ordering::SeqCst);
                threads
                    .lock()
                    .unwrap()
                    .insert(format!("{:?}", std::thread::current().id()));
            }));
            assert!(counts.iter().all(|c| c.load(Ordering::SeqCst) == 1));
            let distinct = threads.lock().unwrap().len();
            assert!(
                distinct >= 1 && distinct <= shares,
                "{distinct} threads for {shares} shares"
            );
        }
    }

    #[test]
    fn callers_on_several_threads_each_get_their_own_team() {
        // As window workers do: each thread enters its own parallel regions, many times, at the same time.
        let totals: Vec<usize> = std::thread::scope(|s| {
            let callers: Vec<_> = (0..3)
                .map(|caller| {
                    s.spawn(move || {
                        let sum = AtomicUsize::new(0);
                        for _ in 0..200 {
                            assert!(run(2, &|share| {
                                sum.fetch_add(caller * 10 + share + 1, Ordering::SeqCst);
                            }));
                        }
                        sum.load(Ordering::SeqCst)
                    })
                })
                .collect();
            callers.into_iter().map(|c| c.join().unwrap()).collect()
        });
        let want: Vec<usize> = (0..3)
            .map(|c| 200 * ((c * 10 + 1) + (c * 10 + 2)))
            .collect();
        assert_eq!(totals, want);
    }

    #[test]
    fn a_panicking_share_resumes_on_the_caller() {
        let ran = AtomicUsize::new(0);
        let caught = catch_unwind(AssertUnwindSafe(|| {
            run(4, &|share| {
                ran.fetch_add(1, Ordering::SeqCst);
                if share == 2 {
                    panic!("share two failed");
                }
            })
        }));
        let payload = caught.expect_err("the panic reaches the caller");
        assert_eq!(
            crate::runtime::panic_message(payload.as_ref()),
            "share two failed"
        );
        assert_eq!(ran.load(Ordering::SeqCst), 4, "the other shares still ran");
        // The team is usable afterwards.
        assert!(run(2, &|_| {}));
    }
}
