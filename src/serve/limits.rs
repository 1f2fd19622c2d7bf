//! Memory: the machine's (or container's) limit, what one request needs, and the budget running requests share.
//!
//! The default budget is 80% of the memory this process may use: the cgroup limit when there is one (containers:
//! cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`), else the machine's `MemTotal`. Each request reserves its
//! estimate before its image is read and gives it back when it ends, so memory is bounded by the budget however
//! many clients wait: requests that do not fit yet wait in the queue; one that could never fit fails with its
//! estimate and the setting to change (`--memory-budget`).

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::config::InferenceConfig;
use crate::inference::memory;
use crate::inference::window::Accumulator;

pub use crate::inference::memory::{cgroup_limit, memory_limit_bytes};

/// The default budget: 80% of [`memory_limit_bytes`] (8 GiB when nothing can be read).
pub fn default_budget_bytes() -> u64 {
    memory_limit_bytes().map_or(8 << 30, |b| b / 10 * 8)
}

/// One request's peak memory (bytes) for an image of `dims` voxels of `spacing` mm with `classes` output
/// channels: [`crate::inference::memory::estimate`] on the grid resampled to `resample_spacing` (before the
/// foreground crop, which only makes it smaller), float32 sums, without the network (shared by all requests).
pub fn estimate_request_bytes(
    dims: [usize; 3],
    spacing: [f64; 3],
    config: &InferenceConfig,
    classes: usize,
) -> u64 {
    let resampled: [usize; 3] = std::array::from_fn(|a| {
        let target = config.resample_spacing[a];
        if target > 0.0 && spacing[a].is_finite() && spacing[a] > 0.0 {
            (dims[a] as f64 * spacing[a] / target).ceil() as usize
        } else {
            dims[a]
        }
        .max(1)
    });
    let shape = memory::RequestShape {
        input_dims: dims,
        resampled_dims: resampled,
        classes,
        as_labels: true,
        output_bytes: 4,
        // The server keeps the image for the record and a preview.
        image_kept: true,
    };
    memory::estimate(&shape, &config.window(), Accumulator::Float32, 0)
        .map_or(u64::MAX, |e| e.total() - memory::RUNTIME_BYTES)
}

/// Bytes shared by the running requests.
#[derive(Debug)]
pub struct MemoryBudget {
    total: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

/// A reservation, given back when dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    budget: &'a MemoryBudget,
    bytes: u64,
}

/// Why a reservation was not made.
#[derive(Debug, PartialEq, Eq)]
pub enum ReserveError {
    /// The request alone needs more than the whole budget.
    TooLarge { needed: u64, total: u64 },
    /// `cancelled` said to stop waiting.
    Cancelled,
}

impl MemoryBudget {
    /// A budget of `total` bytes.
    pub fn new(total: u64) -> Self {
        Self {
            total,
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// The whole budget.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        *self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `bytes`, waiting while other requests hold too much; `cancelled` is polled while waiting.
    pub fn reserve(
        &self,
        bytes: u64,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Reservation<'_>, ReserveError> {
        if bytes > self.total {
            return Err(ReserveError::TooLarge {
                needed: bytes,
                total: self.total,
            });
        }
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used + bytes > self.total {
            if cancelled() {
                return Err(ReserveError::Cancelled);
            }
            used = self
                .freed
                .wait_timeout(used, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *used += bytes;
        Ok(Reservation {
            budget: self,
            bytes,
        })
    }
}

impl Reservation<'_> {
    /// The bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(self.bytes);
        self.budget.freed.notify_all();
    }
}

/// `12.3 GiB`-style sizes for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v2_and_v1_limits_are_read() {
        let d = tempfile::tempdir().unwrap();
        let proc_v2 = d.path().join("cgroup_v2");
        std::fs::write(&proc_v2, "0::/kubepods/pod1\n").unwrap();
        let root = d.path().join("sys");
        std::fs::create_dir_all(root.join("kubepods/pod1")).unwrap();
        std::fs::write(root.join("kubepods/pod1/memory.max"), "4294967296\n").unwrap();
        assert_eq!(cgroup_limit(&proc_v2, &root), Some(4 << 30));
        std::fs::write(root.join("kubepods/pod1/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_limit(&proc_v2, &root), None, "max means no limit");

        let proc_v1 = d.path().join("cgroup_v1");
        std::fs::write(&proc_v1, "12:cpu,cpuacct:/x\n5:memory:/docker/abc\n").unwrap();
        std::fs::create_dir_all(root.join("memory/docker/abc")).unwrap();
        std::fs::write(
            root.join("memory/docker/abc/memory.limit_in_bytes"),
            "2147483648\n",
        )
        .unwrap();
        assert_eq!(cgroup_limit(&proc_v1, &root), Some(2 << 30));
        std::fs::write(
            root.join("memory/docker/abc/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        assert_eq!(cgroup_limit(&proc_v1, &root), None, "v1's 'unlimited'");
        assert!(memory_limit_bytes().is_some_and(|b| b > 0));
    }

    #[test]
    fn estimates_grow_with_classes_and_size_and_budgets_wait() {
        let c = InferenceConfig::defaults();
        let one = estimate_request_bytes([333, 333, 603], [1.5; 3], &c, 1);
        let all = estimate_request_bytes([333, 333, 603], [1.5; 3], &c, 117);
        assert!(all > 3 * one, "{one} {all}");
        // "Everything" on 333 x 333 x 603 with float32 sums: about 7 GiB (benches/RESULTS.md measures it).
        assert!(all > 4 << 30 && all < 12 << 30, "{}", gib(all));

        let budget = MemoryBudget::new(100);
        assert_eq!(
            budget.reserve(101, &|| false).unwrap_err(),
            ReserveError::TooLarge {
                needed: 101,
                total: 100
            }
        );
        let a = budget.reserve(60, &|| false).unwrap();
        assert_eq!(budget.used(), 60);
        assert_eq!(
            budget.reserve(60, &|| true).unwrap_err(),
            ReserveError::Cancelled
        );
        std::thread::scope(|s| {
            let waiter = s.spawn(|| budget.reserve(60, &|| false).map(|r| r.bytes));
            std::thread::sleep(Duration::from_millis(50));
            drop(a);
            assert_eq!(waiter.join().unwrap(), Ok(60));
        });
        assert_eq!(budget.used(), 0);
    }
}
