//! What one request holds at its peak, estimated before any work from the image's size, the resampled grid, the
//! window plan and the network, so that a request too large for the machine is refused with a plain message
//! instead of being killed part-way, and the stitching sums are kept in float16 when float32 would not fit.
//!
//! The request goes through three phases, each holding the network:
//! - preprocessing: the image as read (float32), the resampled grid and its intensity-scaled and cropped copies;
//! - the windows: the network input (and its replicate-padded copy), the label map being filled, the live
//!   stitching sums ([`StitchPlan::peak_voxels`] x classes) and one chunk of window logits;
//! - inversion: the labels on the processed grid and on the image's grid.
//!
//! The image as read counts in the last two only when the caller keeps its voxels ([`RequestShape::image_kept`]).

use std::path::Path;

use super::window::{Accumulator, StitchPlan, WindowGrid, FINISH_SLAB};
use super::{slab_thickness, WindowSettings};

/// Where the stitching sums live when the network runs on a GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StitchDevice {
    /// On the GPU when they fit in its free memory, else in host memory.
    #[default]
    Auto,
    /// On the network's device.
    Device,
    /// In host memory.
    Cpu,
}

impl std::str::FromStr for StitchDevice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "device" | "gpu" | "cuda" => Ok(Self::Device),
            "cpu" | "host" => Ok(Self::Cpu),
            other => anyhow::bail!("unknown stitch_device '{other}': use auto, device or cpu"),
        }
    }
}

impl std::fmt::Display for StitchDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Device => "device",
            Self::Cpu => "cpu",
        })
    }
}

/// Bytes of the process before any request: libtorch, the binary, allocator slack (measured: about 0.45 GiB
/// resident for `vista3d infer` on the CPU with a width-8 checkpoint before the first window).
pub const RUNTIME_BYTES: u64 = 450 << 20;

/// The network's own memory: its weights and the activations of `batch` windows of `roi` (float32, libtorch on
/// the CPU: measured 0.4 GB for one 128^3 window at width 8 beyond the process's own; modelled as 0.25 GB plus
/// 20 MB per unit of width, per 128^3 voxels).
pub fn network_bytes(weight_bytes: u64, width: usize, roi: [usize; 3], batch: usize) -> u64 {
    let voxels: f64 = roi.iter().map(|&r| r as f64).product();
    let per_window = (0.25e9 + 0.02e9 * width as f64) * voxels / 128f64.powi(3);
    weight_bytes + (per_window * batch as f64) as u64
}

/// Slabs of window output alive at once with `workers` window workers: the one being stitched and its copy, and
/// with several workers each one's slab in the making and one waiting.
fn window_output_slabs(workers: usize) -> u64 {
    match workers {
        0 | 1 => 2,
        w => 2 * w as u64 + 1,
    }
}

/// A request's estimated peak, by part (bytes).
#[derive(Debug, Clone)]
pub struct MemoryEstimate {
    pub input: u64,
    pub network: u64,
    pub preprocessing: u64,
    pub network_input: u64,
    pub labels: u64,
    /// The live stitching sums.
    pub accumulators: u64,
    pub window_output: u64,
    /// Blending and labelling the largest cell.
    pub finishing: u64,
    pub inversion: u64,
    /// Whether `input` stays beyond preprocessing.
    pub image_kept: bool,
    /// The element type the sums were estimated in.
    pub accumulator: Accumulator,
    /// Live accumulator voxels per channel at the peak (from the window plan).
    pub peak_voxels: u64,
}

/// What a request needs, for [`estimate`].
#[derive(Debug, Clone, Copy)]
pub struct RequestShape {
    /// The image as read.
    pub input_dims: [usize; 3],
    /// The grid after resampling (before the foreground crop, which only makes it smaller).
    pub resampled_dims: [usize; 3],
    /// Output channels (classes, or 1 for point-only requests).
    pub classes: usize,
    /// Whether a label map is kept rather than every class's logits.
    pub as_labels: bool,
    /// Bytes per voxel of the written label map.
    pub output_bytes: u64,
    /// Whether the image as read stays in memory while the windows run.
    pub image_kept: bool,
}

impl MemoryEstimate {
    /// The whole process at the request's peak.
    pub fn total(&self) -> u64 {
        let windows = self.network_input
            + self.labels
            + self.accumulators
            + self.window_output
            + self.finishing;
        let kept = if self.image_kept { self.input } else { 0 };
        RUNTIME_BYTES
            + self.network
            + (self.input + self.preprocessing)
                .max(kept + windows)
                .max(kept + self.inversion)
    }
}

impl std::fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        write!(
            f,
            "{:.2} GiB (image {:.2}, network {:.2}, preprocessing {:.2}, network input {:.2}, labels {:.2}, \
             {} sums {:.2}, window output {:.2}, finishing a cell {:.2}, inversion {:.2}, runtime {:.2})",
            gib(self.total()),
            gib(self.input),
            gib(self.network),
            gib(self.preprocessing),
            gib(self.network_input),
            gib(self.labels),
            self.accumulator,
            gib(self.accumulators),
            gib(self.window_output),
            gib(self.finishing),
            gib(self.inversion),
            gib(RUNTIME_BYTES),
        )
    }
}

/// Estimates a request's peak memory with `accumulator` sums; `network` from [`network_bytes`].
pub fn estimate(
    shape: &RequestShape,
    settings: &WindowSettings,
    accumulator: Accumulator,
    network: u64,
) -> anyhow::Result<MemoryEstimate> {
    let voxels = |d: &[usize; 3]| d.iter().map(|&v| v as u64).product::<u64>();
    let input = 4 * voxels(&shape.input_dims);
    let grid = WindowGrid::new(shape.resampled_dims, settings.patch_size, settings.overlap)?;
    let processed = voxels(&shape.resampled_dims);
    let padded = voxels(&grid.padded);
    let batch = settings.sw_batch_size.max(1) as u64;
    let plan = StitchPlan::new(&grid, accumulator, batch as usize);
    let classes = shape.classes.max(1) as u64;
    let slab_voxels = slab_thickness(
        settings.window_output_bytes,
        batch as usize,
        classes as usize,
        &grid.roi,
    ) as u64
        * (grid.roi[1] * grid.roi[2]) as u64;
    let padding = if padded > processed { 4 * padded } else { 0 };
    let (labels, accumulators) = if shape.as_labels {
        (processed, plan.peak_voxels * classes * accumulator.bytes())
    } else {
        (4 * processed * classes, 0)
    };
    Ok(MemoryEstimate {
        input,
        network,
        // The resampled image, its scaled copy and the cropped one.
        preprocessing: 3 * 4 * processed,
        network_input: 4 * processed + padding,
        labels,
        accumulators,
        // One slab of the network's output and a copy of its size (weighted, or converted for float16 sums); with
        // window workers, also each worker's slab in the making and one waiting for the stitching.
        window_output: window_output_slabs(settings.window_workers)
            * 4
            * batch
            * classes
            * slab_voxels,
        // A blended float32 slab of the largest cell (4 bytes), its clamped copy (4) and two masks (1 + 1).
        finishing: if shape.as_labels {
            let slab = plan.largest_cell / plan.largest_cell_x.max(1)
                * plan.largest_cell_x.min(FINISH_SLAB as u64);
            10 * classes * slab
        } else {
            0
        },
        // float32 labels on both grids and the written map.
        inversion: 4 * processed
            + 4 * voxels(&shape.input_dims)
            + shape.output_bytes * voxels(&shape.input_dims),
        image_kept: shape.image_kept,
        accumulator,
        peak_voxels: plan.peak_voxels,
    })
}

/// The memory this process may use: the cgroup limit if one is set, else the machine's total (bytes).
pub fn memory_limit_bytes() -> Option<u64> {
    cgroup_limit(Path::new("/proc/self/cgroup"), Path::new("/sys/fs/cgroup")).or_else(mem_total)
}

/// The cgroup memory limit of this process (`None` when unlimited or not found). `proc_cgroup` is
/// `/proc/self/cgroup`, `root` the cgroup file system's mount (`/sys/fs/cgroup`).
pub fn cgroup_limit(proc_cgroup: &Path, root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(proc_cgroup).unwrap_or_default();
    let mut candidates = Vec::new();
    for line in text.lines() {
        // "0::/path" (v2) or "N:memory:/path" / "N:cpu,memory:/path" (v1).
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            candidates.push(root.join(rel).join("memory.max"));
            candidates.push(root.join("memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(root.join("memory").join(rel).join("memory.limit_in_bytes"));
            candidates.push(root.join("memory").join("memory.limit_in_bytes"));
        }
    }
    candidates.into_iter().find_map(|p| {
        let v = std::fs::read_to_string(p).ok()?;
        let v = v.trim();
        if v == "max" {
            return None;
        }
        // cgroup v1 reports "no limit" as a huge number (page-rounded i64::MAX).
        v.parse::<u64>().ok().filter(|&b| b < (1u64 << 60))
    })
}

/// `MemTotal` of `/proc/meminfo` in bytes.
fn mem_total() -> Option<u64> {
    meminfo("MemTotal:")
}

/// The `/proc/meminfo` line starting with `key` (kB) in bytes.
fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Memory this process can still take now: `MemAvailable`, capped by what the cgroup limit leaves (bytes).
pub fn available_bytes() -> Option<u64> {
    let available = meminfo("MemAvailable:")?;
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096);
    Some(match memory_limit_bytes() {
        Some(limit) => available.min(limit.saturating_sub(rss)),
        None => available,
    })
}

/// Free memory of `device` now: [`available_bytes`] for the CPU, the driver's free memory for a GPU.
pub fn device_free_bytes(device: tch::Device) -> Option<u64> {
    match device {
        tch::Device::Cuda(ordinal) => {
            let context = cudarc::driver::CudaContext::new(ordinal).ok()?;
            context.mem_get_info().ok().map(|(free, _)| free as u64)
        }
        _ => available_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(dims: [usize; 3], classes: usize) -> RequestShape {
        RequestShape {
            input_dims: dims,
            resampled_dims: dims,
            classes,
            as_labels: true,
            output_bytes: 1,
            image_kept: false,
        }
    }

    #[test]
    fn sums_scale_with_classes_and_element_size() {
        let settings = WindowSettings::default();
        let one = estimate(
            &shape([333, 333, 603], 1),
            &settings,
            Accumulator::Float32,
            0,
        )
        .unwrap();
        let all = estimate(
            &shape([333, 333, 603], 117),
            &settings,
            Accumulator::Float32,
            0,
        )
        .unwrap();
        assert_eq!(all.accumulators, 117 * one.accumulators);
        let half = estimate(
            &shape([333, 333, 603], 117),
            &settings,
            Accumulator::Float16,
            0,
        )
        .unwrap();
        assert!(2 * half.accumulators <= all.accumulators);
        assert!(half.total() < all.total());
        // The live band is bounded by the smallest cross-section: well under a full row of windows across it.
        let row = 128 * 333 * 603;
        assert!(one.peak_voxels < row / 2, "{} live voxels", one.peak_voxels);
    }

    #[test]
    fn window_output_is_one_slab_and_a_released_image_leaves_the_windows() {
        let settings = WindowSettings::default();
        let dims = [333, 333, 603];
        let at = |classes, kept| {
            let mut s = shape(dims, classes);
            s.image_kept = kept;
            estimate(&s, &settings, Accumulator::Float16, 0).unwrap()
        };
        // Every class's logits of a whole 128^3 window would be 0.98 GB; a slab stays within the bound.
        let everything = at(117, false);
        assert!(everything.window_output <= 2 * super::super::WINDOW_OUTPUT_BYTES);
        assert!(at(2, false).window_output < everything.window_output);
        let kept = at(117, true);
        assert!(kept.total() > everything.total());
        assert!(kept.total() - everything.total() <= kept.input);
        // Two window workers: each one's slab in the making and one waiting, besides the one being stitched.
        let two = WindowSettings {
            window_workers: 2,
            ..settings.clone()
        };
        let with_workers = estimate(&shape(dims, 117), &two, Accumulator::Float16, 0).unwrap();
        assert_eq!(2 * with_workers.window_output, 5 * everything.window_output);
    }
}
