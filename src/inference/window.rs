//! Sliding-window inference as MONAI's `sliding_window_inference` (the bundle's `SlidingWindowInfererAdapt`):
//! window grid, replicate padding, constant or gaussian blending, with the stitching streamed through
//! "cells" so that memory is bounded by the windows in flight instead of prompts x volume.
//!
//! The volume is cut along every axis at all window starts and ends; each resulting cell is covered by a
//! fixed set of windows. Each cell adds its windows' contributions in MONAI's order (x slowest), holding one
//! that comes early until its turn, so results are MONAI's bit for bit whatever order the windows run in. A cell
//! whose last covering window has run is divided by its weight and handed to a sink (for example the
//! argmax/label mapping), then freed. The windows run in the order, among MONAI's, row orders along each axis
//! and 2-D wavefronts, that keeps the fewest voxels live ([`StitchPlan`]): the long axis slowest, so that
//! what is live is bounded by the smallest cross-section rather than the volume.

use std::ops::Range;

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

use crate::volume::AXIS_PERMUTATIONS;

/// Blending of overlapping windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlendMode {
    /// Plain average (the bundle's effective setting).
    Constant,
    /// Gaussian importance map with sigma = 0.125 x roi.
    Gaussian,
}

impl std::str::FromStr for BlendMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "constant" => Ok(Self::Constant),
            "gaussian" => Ok(Self::Gaussian),
            other => anyhow::bail!("unknown blend mode '{other}': use constant or gaussian"),
        }
    }
}

/// Window starts along one axis of (padded) length `size` for window length `roi` (MONAI's
/// `_get_scan_interval` and `dense_patch_slices`).
pub fn axis_starts(size: usize, roi: usize, overlap: f64) -> Vec<usize> {
    let interval = if roi == size {
        roi
    } else {
        ((roi as f64 * (1.0 - overlap)) as usize).max(1)
    };
    let num = size.div_ceil(interval);
    let count = (0..num)
        .find(|d| d * interval + roi >= size)
        .map_or(1, |d| d + 1);
    (0..count)
        .map(|i| {
            let s = i * interval;
            s - (s + roi).saturating_sub(size)
        })
        .collect()
}

/// The windows over a volume: its padded size, the roi and the starts along each axis.
#[derive(Debug, Clone)]
pub struct WindowGrid {
    /// Size after padding (every axis at least the roi).
    pub padded: [usize; 3],
    /// Replicate padding `(before, after)` per axis (MONAI pads `diff / 2` before).
    pub pad: [(usize, usize); 3],
    pub roi: [usize; 3],
    pub starts: [Vec<usize>; 3],
}

impl WindowGrid {
    pub fn new(size: [usize; 3], roi: [usize; 3], overlap: f64) -> Result<Self> {
        ensure!(
            roi.iter().all(|&r| r > 0),
            "roi/patch size must be positive, got {roi:?}"
        );
        ensure!(
            (0.0..1.0).contains(&overlap),
            "overlap must be in [0, 1), got {overlap}"
        );
        let pad = std::array::from_fn(|a| {
            let diff = roi[a].saturating_sub(size[a]);
            (diff / 2, diff - diff / 2)
        });
        let padded = std::array::from_fn(|a| size[a].max(roi[a]));
        let starts = std::array::from_fn(|a| axis_starts(padded[a], roi[a], overlap));
        Ok(Self {
            padded,
            pad,
            roi,
            starts,
        })
    }

    /// Windows as per-axis indices into `starts`, in MONAI's order (x slowest, z fastest).
    pub fn windows(&self) -> Vec<[usize; 3]> {
        let mut out = Vec::new();
        for x in 0..self.starts[0].len() {
            for y in 0..self.starts[1].len() {
                for z in 0..self.starts[2].len() {
                    out.push([x, y, z]);
                }
            }
        }
        out
    }

    /// The window with per-axis indices `index`, as index ranges of the padded volume.
    pub fn ranges(&self, index: [usize; 3]) -> [Range<usize>; 3] {
        std::array::from_fn(|a| {
            let start = self.starts[a][index[a]];
            start..start + self.roi[a]
        })
    }
}

/// MONAI `compute_importance_map` for the given blend mode and window size, `[1, 1, rx, ry, rz]` float32.
pub fn importance_map(mode: BlendMode, roi: [usize; 3], device: Device) -> Tensor {
    let roi_i: [i64; 3] = roi.map(|r| r as i64);
    let map = match mode {
        BlendMode::Constant => Tensor::ones(roi_i, (Kind::Float, device)),
        BlendMode::Gaussian => {
            let mut map: Option<Tensor> = None;
            for (i, &n) in roi.iter().enumerate() {
                let sigma = n as f64 * 0.125;
                let half = (n as f64 - 1.0) / 2.0;
                let x = Tensor::arange_start_step(-half, half + 1.0, 1.0, (Kind::Float, device));
                let x = (x.square() / (-2.0 * sigma * sigma)).exp();
                map = Some(match map {
                    None => x,
                    Some(m) => {
                        let shape: Vec<i64> = (0..i).map(|_| 1).chain([n as i64]).collect();
                        m.unsqueeze(-1) * x.view(shape.as_slice())
                    }
                });
            }
            let map = map.expect("three axes");
            let min_non_zero = map.min().double_value(&[]).max(1e-3);
            map.clamp_min(min_non_zero)
        }
    };
    map.view([1, 1, roi_i[0], roi_i[1], roi_i[2]])
}

/// Per-axis cells: boundaries and, for each window index, the cells it covers.
#[derive(Debug)]
struct AxisCells {
    bounds: Vec<usize>,
    /// For window index i along this axis: the range of cell indices it covers.
    window_cells: Vec<Range<usize>>,
    /// For each cell: the range of window indices along this axis that cover it.
    cell_windows: Vec<Range<usize>>,
}

impl AxisCells {
    fn new(starts: &[usize], roi: usize) -> Self {
        let mut bounds: Vec<usize> = starts.iter().flat_map(|&s| [s, s + roi]).collect();
        bounds.sort_unstable();
        bounds.dedup();
        let position = |v: usize| bounds.partition_point(|&b| b < v);
        let window_cells: Vec<Range<usize>> = starts
            .iter()
            .map(|&s| position(s)..position(s + roi))
            .collect();
        let cell_windows = (0..bounds.len() - 1)
            .map(|c| {
                let covering = |w: &usize| window_cells[*w].contains(&c);
                let first = (0..starts.len()).find(covering).unwrap_or(0);
                let end = (first..starts.len())
                    .find(|w| !covering(w))
                    .unwrap_or(starts.len());
                first..end
            })
            .collect();
        Self {
            bounds,
            window_cells,
            cell_windows,
        }
    }

    fn len(&self) -> usize {
        self.cell_windows.len()
    }

    fn cell(&self, c: usize) -> Range<usize> {
        self.bounds[c]..self.bounds[c + 1]
    }
}

/// The cells of a window grid: the volume cut along every axis at all window starts and ends, so that each cell
/// is covered by a fixed set of windows (a box of window indices).
#[derive(Debug)]
struct CellGrid {
    axes: [AxisCells; 3],
}

impl CellGrid {
    fn new(grid: &WindowGrid) -> Self {
        Self {
            axes: std::array::from_fn(|a| AxisCells::new(&grid.starts[a], grid.roi[a])),
        }
    }

    fn count(&self) -> usize {
        self.axes.iter().map(AxisCells::len).product()
    }

    fn flatten(&self, c: [usize; 3]) -> usize {
        (c[0] * self.axes[1].len() + c[1]) * self.axes[2].len() + c[2]
    }

    fn region(&self, c: [usize; 3]) -> [Range<usize>; 3] {
        std::array::from_fn(|a| self.axes[a].cell(c[a]))
    }

    fn voxels(&self, c: [usize; 3]) -> u64 {
        self.region(c).iter().map(|r| r.len() as u64).product()
    }

    /// How many windows cover cell `c`.
    fn cover(&self, c: [usize; 3]) -> u32 {
        (0..3)
            .map(|a| self.axes[a].cell_windows[c[a]].len() as u32)
            .product()
    }

    /// The position of window `w` among the windows covering cell `c` in MONAI's order (x slowest): the order
    /// in which MONAI adds their contributions into the cell.
    fn monai_rank(&self, c: [usize; 3], w: [usize; 3]) -> u32 {
        let r: [&Range<usize>; 3] = std::array::from_fn(|a| &self.axes[a].cell_windows[c[a]]);
        (((w[0] - r[0].start) * r[1].len() + (w[1] - r[1].start)) * r[2].len()
            + (w[2] - r[2].start)) as u32
    }

    /// The cells window `w` covers.
    fn cells_of(&self, w: [usize; 3]) -> impl Iterator<Item = [usize; 3]> + '_ {
        let r: [Range<usize>; 3] = std::array::from_fn(|a| self.axes[a].window_cells[w[a]].clone());
        let (ry, rz) = (r[1].clone(), r[2].clone());
        r[0].clone().flat_map(move |cx| {
            let rz = rz.clone();
            ry.clone()
                .flat_map(move |cy| rz.clone().map(move |cz| [cx, cy, cz]))
        })
    }
}

/// The order in which windows run. Any order gives MONAI's result bit for bit (each cell adds its windows'
/// contributions in MONAI's order, holding early ones until their turn); the order only changes how much is live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowOrder {
    /// MONAI's: x slowest, z fastest.
    Monai,
    /// Rows: `axes[0]` slowest, `axes[2]` fastest.
    Rows([usize; 3]),
    /// A 2-D wavefront: diagonals of `axes[0]` and `axes[1]` (both advance together), `axes[2]` fastest.
    Wavefront([usize; 3]),
    /// Rows as [`WindowOrder::Rows`], except that along the two slower axes a window that overlaps its
    /// neighbour by more than the others do (the last one, shifted back to end at the volume's edge) runs
    /// interleaved with that neighbour, column by column, so that their wide overlap is never live across a
    /// whole row.
    Grouped([usize; 3]),
}

impl std::fmt::Display for WindowOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const NAMES: [char; 3] = ['x', 'y', 'z'];
        let axes = |a: &[usize; 3]| a.map(|i| NAMES[i]).iter().collect::<String>();
        match self {
            Self::Monai => write!(f, "monai (xyz rows)"),
            Self::Rows(a) => write!(f, "{} rows", axes(a)),
            Self::Wavefront(a) => write!(f, "{} wavefront", axes(a)),
            Self::Grouped(a) => write!(f, "{} grouped rows", axes(a)),
        }
    }
}

impl WindowGrid {
    /// Windows as per-axis indices into `starts` in `order`.
    pub fn ordered(&self, order: WindowOrder) -> Vec<[usize; 3]> {
        let mut windows = self.windows();
        match order {
            WindowOrder::Monai => {}
            WindowOrder::Rows(a) => windows.sort_by_key(|w| (w[a[0]], w[a[1]], w[a[2]])),
            WindowOrder::Wavefront(a) => {
                windows.sort_by_key(|w| (w[a[0]] + w[a[1]], w[a[0]], w[a[2]]))
            }
            WindowOrder::Grouped(a) => {
                let groups: [Vec<usize>; 3] = std::array::from_fn(|axis| self.overlap_groups(axis));
                windows.sort_by_key(|w| {
                    let (s, p) = (groups[a[0]][w[a[0]]], groups[a[1]][w[a[1]]]);
                    (s, p, w[a[2]], w[a[0]], w[a[1]])
                })
            }
        }
        windows
    }

    /// For each window along `axis`, a group number: a window that overlaps its predecessor by more than the
    /// smallest overlap along the axis joins its group.
    fn overlap_groups(&self, axis: usize) -> Vec<usize> {
        let starts = &self.starts[axis];
        let overlap = |i: usize| (starts[i] + self.roi[axis]).saturating_sub(starts[i + 1]);
        let least = (0..starts.len().saturating_sub(1))
            .map(overlap)
            .min()
            .unwrap_or(0);
        let mut group = 0;
        (0..starts.len())
            .map(|i| {
                if i > 0 && overlap(i - 1) <= least {
                    group += 1;
                }
                group
            })
            .collect()
    }
}

/// A window order and what it keeps live.
#[derive(Debug, Clone)]
pub struct StitchPlan {
    pub order: WindowOrder,
    pub windows: Vec<[usize; 3]>,
    /// The most accumulator voxels (per channel) live at once: cells being summed plus contributions waiting for
    /// their turn.
    pub peak_voxels: u64,
    /// Voxels of the largest cell (finished cells are blended and turned into labels one at a time).
    pub largest_cell: u64,
    /// Its length along x.
    pub largest_cell_x: u64,
}

impl StitchPlan {
    /// The window order with the fewest live voxels (MONAI's own on ties) for sums in `accumulator`. With
    /// `monai_only`, MONAI's order (a batch of several windows must hold the same windows as MONAI's batches).
    pub fn new(grid: &WindowGrid, accumulator: Accumulator, monai_only: bool) -> Self {
        let exact = accumulator == Accumulator::Float32;
        let cells = CellGrid::new(grid);
        let largest: [u64; 3] = std::array::from_fn(|a| {
            let axis = &cells.axes[a];
            (0..axis.len())
                .map(|c| axis.cell(c).len() as u64)
                .max()
                .unwrap_or(0)
        });
        let largest_cell = largest.iter().product();
        let largest_cell_x = largest[0];
        let mut candidates = vec![WindowOrder::Monai];
        if !monai_only {
            // Rows in x, y, z order are MONAI's order.
            candidates.extend(
                AXIS_PERMUTATIONS
                    .iter()
                    .skip(1)
                    .map(|&a| WindowOrder::Rows(a)),
            );
            candidates.extend(AXIS_PERMUTATIONS.iter().map(|&a| WindowOrder::Wavefront(a)));
            candidates.extend(AXIS_PERMUTATIONS.iter().map(|&a| WindowOrder::Grouped(a)));
        }
        candidates
            .into_iter()
            .map(|order| {
                let windows = grid.ordered(order);
                let peak_voxels = simulate(&cells, &windows, exact);
                Self {
                    order,
                    windows,
                    peak_voxels,
                    largest_cell,
                    largest_cell_x,
                }
            })
            .min_by_key(|p| p.peak_voxels)
            .expect("at least MONAI's order")
    }
}

/// Whether the contribution of MONAI rank `rank` can be added to a sum of `folded` contributions now. MONAI adds
/// the ranks in order from zero; the first two may come either way round (`(0 + a) + b == (0 + b) + a` bit for
/// bit: float addition is commutative), every later one only in its turn.
fn foldable(rank: u32, folded: u32) -> bool {
    rank == folded || (folded < 2 && rank < 2)
}

/// Whether a contribution must wait: only float32 sums keep MONAI's order (float16 sums differ from MONAI's
/// anyway, so they add everything as it comes and hold nothing back).
fn must_wait(exact: bool, rank: u32, folded: u32) -> bool {
    exact && !foldable(rank, folded)
}

/// The peak live voxels of stitching `windows` in that order (what [`Stitcher`] holds, without tensors).
fn simulate(cells: &CellGrid, windows: &[[usize; 3]], exact: bool) -> u64 {
    let n = cells.count();
    let mut folded = vec![0u32; n];
    let mut waiting: Vec<Vec<u32>> = vec![Vec::new(); n];
    let (mut live, mut peak) = (0u64, 0u64);
    for &w in windows {
        for c in cells.cells_of(w) {
            let i = cells.flatten(c);
            let voxels = cells.voxels(c);
            let rank = cells.monai_rank(c, w);
            if must_wait(exact, rank, folded[i]) {
                waiting[i].push(rank);
                live += voxels;
                peak = peak.max(live);
                continue;
            }
            if folded[i] == 0 {
                live += voxels;
                peak = peak.max(live);
            }
            folded[i] += 1;
            while let Some(k) = waiting[i].iter().position(|&r| r == folded[i]) {
                waiting[i].swap_remove(k);
                live -= voxels;
                folded[i] += 1;
            }
            if folded[i] == cells.cover(c) {
                live -= voxels;
            }
        }
    }
    peak
}

/// The element type of the stitching accumulators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accumulator {
    /// MONAI's (bit-identical results).
    Float32,
    /// Half the memory; for networks that run in reduced precision or accumulators that would not fit.
    Float16,
}

impl Accumulator {
    pub fn kind(self) -> Kind {
        match self {
            Self::Float32 => Kind::Float,
            Self::Float16 => Kind::Half,
        }
    }

    pub fn bytes(self) -> u64 {
        match self {
            Self::Float32 => 4,
            Self::Float16 => 2,
        }
    }
}

impl std::fmt::Display for Accumulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Float32 => "float32",
            Self::Float16 => "float16",
        })
    }
}

/// Thickness (voxels along x) of the slabs a finished cell is handed to its sink in.
pub const FINISH_SLAB: usize = 16;

/// Receives finished cells (in slabs of at most [`FINISH_SLAB`] along x): `region` in padded-volume coordinates and the blended logits `[B, cx, cy, cz]`.
pub trait CellSink {
    fn finish(&mut self, region: [Range<usize>; 3], logits: Tensor) -> Result<()>;
}

/// A contribution that arrived before its turn in MONAI's order.
struct Waiting {
    rank: u32,
    logits: Tensor,
    weight: Option<Tensor>,
}

/// One cell being summed.
#[derive(Default)]
struct CellSum {
    /// Contributions added so far (the MONAI rank of the next one).
    folded: u32,
    logits: Option<Tensor>,
    /// Gaussian mode: the summed importance (constant mode divides by the window count).
    weight: Option<Tensor>,
    waiting: Vec<Waiting>,
}

/// Streams window outputs into cells and hands each finished cell to a sink.
pub struct Stitcher<'a> {
    grid: &'a WindowGrid,
    cells: CellGrid,
    sums: Vec<CellSum>,
    /// Gaussian mode: the importance map `[rx, ry, rz]` on `device` (constant mode multiplies by nothing).
    importance: Option<Tensor>,
    accumulator: Accumulator,
    /// Where the accumulators live.
    device: Device,
    live_voxels: u64,
    peak_voxels: u64,
}

impl<'a> Stitcher<'a> {
    /// A stitcher keeping `accumulator` sums on `device`.
    pub fn new(
        grid: &'a WindowGrid,
        mode: BlendMode,
        accumulator: Accumulator,
        device: Device,
    ) -> Self {
        let cells = CellGrid::new(grid);
        let importance = (mode == BlendMode::Gaussian)
            .then(|| importance_map(mode, grid.roi, device).view(grid.roi.map(|r| r as i64)));
        Self {
            grid,
            sums: (0..cells.count()).map(|_| CellSum::default()).collect(),
            cells,
            importance,
            accumulator,
            device,
            live_voxels: 0,
            peak_voxels: 0,
        }
    }

    /// Most accumulator voxels (per channel) alive at once so far.
    pub fn peak_voxels(&self) -> u64 {
        self.peak_voxels
    }

    fn grow(&mut self, voxels: u64) {
        self.live_voxels += voxels;
        self.peak_voxels = self.peak_voxels.max(self.live_voxels);
    }

    /// A copy of `t` in the accumulator type on the accumulator device (never a view of the window output).
    fn owned(&self, t: &Tensor) -> Tensor {
        let mut out = Tensor::empty(t.size(), (self.accumulator.kind(), self.device));
        out.copy_(t);
        out
    }

    /// Adds one window's logits `[B, rx, ry, rz]` (float32) for the window with per-axis indices `index` (into
    /// `grid.starts`), then finishes the cells no later window covers. Windows may come in any order.
    pub fn add(
        &mut self,
        index: [usize; 3],
        logits: &Tensor,
        sink: &mut dyn CellSink,
    ) -> Result<()> {
        let start: [usize; 3] = std::array::from_fn(|a| self.grid.starts[a][index[a]]);
        // MONAI multiplies every window by the importance map before adding; by ones in constant mode, which
        // changes nothing and is skipped.
        let weighted = match &self.importance {
            Some(map) => logits * map,
            None => logits.shallow_clone(),
        };
        let cells: Vec<[usize; 3]> = self.cells.cells_of(index).collect();
        for cell in cells {
            let region = self.cells.region(cell);
            let local = |t: &Tensor, first_dim: i64| {
                let mut t = t.shallow_clone();
                for (a, r) in region.iter().enumerate() {
                    t = t.narrow(
                        first_dim + a as i64,
                        (r.start - start[a]) as i64,
                        r.len() as i64,
                    );
                }
                t
            };
            let part = local(&weighted, 1);
            let weight = self.importance.as_ref().map(|m| local(m, 0));
            let i = self.cells.flatten(cell);
            let voxels = self.cells.voxels(cell);
            let rank = self.cells.monai_rank(cell, index);
            let exact = self.accumulator == Accumulator::Float32;
            if must_wait(exact, rank, self.sums[i].folded) {
                let waiting = Waiting {
                    rank,
                    logits: self.owned(&part),
                    weight,
                };
                self.sums[i].waiting.push(waiting);
                self.grow(voxels);
                continue;
            }
            if self.sums[i].folded == 0 {
                self.grow(voxels);
            }
            self.fold(i, &part, weight.as_ref())?;
            while let Some(k) = self.sums[i]
                .waiting
                .iter()
                .position(|w| w.rank == self.sums[i].folded)
            {
                let w = self.sums[i].waiting.swap_remove(k);
                self.live_voxels -= voxels;
                self.fold(i, &w.logits, w.weight.as_ref())?;
            }
            let cover = self.cells.cover(cell);
            if self.sums[i].folded == cover {
                let sum = std::mem::take(&mut self.sums[i]);
                self.live_voxels -= voxels;
                let logits = sum.logits.expect("a finished cell has a sum");
                // MONAI divides by its count map, which holds exactly `cover` here; a 0-dim tensor (not a host
                // scalar) so that every device divides rather than multiplying by a reciprocal.
                let count = Tensor::from(cover as f32).to_device(self.device);
                // Blended and handed over in slabs along x, so that finishing a large cell never needs a float32
                // copy of it whole.
                let mut x = region[0].start;
                while x < region[0].end {
                    let len = FINISH_SLAB.min(region[0].end - x);
                    let offset = (x - region[0].start) as i64;
                    let slab = logits.narrow(1, offset, len as i64).to_kind(Kind::Float);
                    let blended = match &sum.weight {
                        Some(weight) => slab / weight.narrow(0, offset, len as i64),
                        None => slab / &count,
                    };
                    let slab_region = [x..x + len, region[1].clone(), region[2].clone()];
                    sink.finish(slab_region, blended)?;
                    x += len;
                }
            }
        }
        Ok(())
    }

    /// Adds the next contribution in MONAI's order into cell `i` (MONAI's sums start from zeros: the first is
    /// `part + 0`, which is `0 + part` bit for bit, in one pass).
    fn fold(&mut self, i: usize, part: &Tensor, weight: Option<&Tensor>) -> Result<()> {
        let (kind, device) = (self.accumulator.kind(), self.device);
        let part = if part.kind() == kind && part.device() == device {
            part.shallow_clone()
        } else {
            part.to_device(device).to_kind(kind)
        };
        let sum = &mut self.sums[i];
        match &mut sum.logits {
            Some(acc) => {
                let _ = acc.f_add_(&part)?;
            }
            None => sum.logits = Some(part.f_add_scalar(0.0)?),
        }
        if let Some(w) = weight {
            match &mut sum.weight {
                Some(acc) => {
                    let _ = acc.f_add_(w)?;
                }
                None => sum.weight = Some(w.f_add_scalar(0.0)?),
            }
        }
        sum.folded += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MONAI's stitching as it is written: whole-volume sums in MONAI's window order, then one division.
    fn monai_stitch(grid: &WindowGrid, mode: BlendMode, outputs: &[Tensor]) -> Tensor {
        let b = outputs[0].size()[0];
        let p = grid.padded.map(|v| v as i64);
        let out = Tensor::zeros([b, p[0], p[1], p[2]], (Kind::Float, Device::Cpu));
        let count = Tensor::zeros([1, p[0], p[1], p[2]], (Kind::Float, Device::Cpu));
        let importance = importance_map(mode, grid.roi, Device::Cpu).squeeze_dim(0);
        for (w, logits) in grid.windows().iter().zip(outputs) {
            let r = grid.ranges(*w);
            let view = |t: &Tensor| {
                t.narrow(1, r[0].start as i64, grid.roi[0] as i64)
                    .narrow(2, r[1].start as i64, grid.roi[1] as i64)
                    .narrow(3, r[2].start as i64, grid.roi[2] as i64)
            };
            let _ = view(&out).f_add_(&(logits * &importance)).unwrap();
            let _ = view(&count).f_add_(&importance).unwrap();
        }
        out / count
    }

    /// Collects finished cells into a whole volume and counts how often each voxel was finished.
    struct Collect {
        out: Tensor,
        finished: Tensor,
    }

    impl CellSink for Collect {
        fn finish(&mut self, region: [Range<usize>; 3], logits: Tensor) -> Result<()> {
            let mut dst = self.out.shallow_clone();
            let mut seen = self.finished.shallow_clone();
            for (a, r) in region.iter().enumerate() {
                dst = dst.narrow(1 + a as i64, r.start as i64, r.len() as i64);
                seen = seen.narrow(a as i64, r.start as i64, r.len() as i64);
            }
            dst.copy_(&logits);
            let _ = seen.f_add_scalar_(1)?;
            Ok(())
        }
    }

    /// Random window outputs whose magnitudes vary over decades, so that a different summation order shows.
    fn outputs(grid: &WindowGrid, channels: i64, seed: i64) -> Vec<Tensor> {
        tch::manual_seed(seed);
        let r = grid.roi.map(|v| v as i64);
        grid.windows()
            .iter()
            .map(|_| {
                let t = Tensor::randn([channels, r[0], r[1], r[2]], (Kind::Float, Device::Cpu));
                let scale = (Tensor::randn_like(&t) * 3.0).exp();
                t * scale
            })
            .collect()
    }

    fn stitch(
        grid: &WindowGrid,
        mode: BlendMode,
        accumulator: Accumulator,
        outputs: &[Tensor],
        order: &[[usize; 3]],
    ) -> (Tensor, Tensor, u64) {
        let monai = grid.windows();
        let p = grid.padded.map(|v| v as i64);
        let b = outputs[0].size()[0];
        let mut sink = Collect {
            out: Tensor::full([b, p[0], p[1], p[2]], f64::NAN, (Kind::Float, Device::Cpu)),
            finished: Tensor::zeros([p[0], p[1], p[2]], (Kind::Int, Device::Cpu)),
        };
        let mut stitcher = Stitcher::new(grid, mode, accumulator, Device::Cpu);
        for w in order {
            let k = monai.iter().position(|m| m == w).unwrap();
            stitcher.add(*w, &outputs[k], &mut sink).unwrap();
        }
        (sink.out, sink.finished, stitcher.peak_voxels())
    }

    /// Odd shapes: one window, thinner than a window along an axis, non-cubic windows, overlap 0.5, a last
    /// window far into its neighbour.
    fn cases() -> Vec<([usize; 3], [usize; 3], f64)> {
        vec![
            ([16, 16, 16], [16, 16, 16], 0.25),
            ([9, 40, 23], [16, 16, 16], 0.25),
            ([37, 29, 50], [16, 8, 24], 0.25),
            ([40, 33, 27], [16, 16, 16], 0.5),
            ([49, 20, 61], [16, 16, 16], 0.25),
            ([90, 20, 20], [48, 16, 16], 0.25),
        ]
    }

    #[test]
    fn every_order_stitches_as_monai_bit_for_bit() {
        for (size, roi, overlap) in cases() {
            let grid = WindowGrid::new(size, roi, overlap).unwrap();
            let out = outputs(&grid, 3, 7);
            for mode in [BlendMode::Constant, BlendMode::Gaussian] {
                let expected = monai_stitch(&grid, mode, &out);
                let mut orders = vec![WindowOrder::Monai];
                for a in [[2, 1, 0], [1, 2, 0], [0, 2, 1]] {
                    orders.extend([
                        WindowOrder::Rows(a),
                        WindowOrder::Wavefront(a),
                        WindowOrder::Grouped(a),
                    ]);
                }
                for order in orders {
                    let windows = grid.ordered(order);
                    let (got, finished, _) =
                        stitch(&grid, mode, Accumulator::Float32, &out, &windows);
                    assert!(
                        got.equal(&expected),
                        "{size:?} roi {roi:?} overlap {overlap} {mode:?} {order}: differs from MONAI's sums"
                    );
                    assert!(
                        finished.eq(1).all().int64_value(&[]) == 1,
                        "{size:?} {order}: a voxel was not finished exactly once"
                    );
                }
            }
        }
    }

    #[test]
    fn summing_in_run_order_would_differ_from_monai() {
        // The check above can fail: adding contributions as they come (no waiting for MONAI's turn) changes
        // the float32 rounding of cells covered by three or more windows.
        let grid = WindowGrid::new([40, 40, 40], [16, 16, 16], 0.25).unwrap();
        let out = outputs(&grid, 2, 3);
        let expected = monai_stitch(&grid, BlendMode::Constant, &out);
        let p = grid.padded.map(|v| v as i64);
        let mut naive = Tensor::zeros([2, p[0], p[1], p[2]], (Kind::Float, Device::Cpu));
        let count = Tensor::zeros([1, p[0], p[1], p[2]], (Kind::Float, Device::Cpu));
        let monai = grid.windows();
        for w in grid.ordered(WindowOrder::Rows([2, 1, 0])) {
            let k = monai.iter().position(|m| *m == w).unwrap();
            let r = grid.ranges(w);
            let view = |t: &Tensor| {
                t.narrow(1, r[0].start as i64, 16)
                    .narrow(2, r[1].start as i64, 16)
                    .narrow(3, r[2].start as i64, 16)
            };
            let _ = view(&naive).f_add_(&out[k]).unwrap();
            let _ = view(&count).f_add_scalar_(1).unwrap();
        }
        naive /= &count;
        assert!(!naive.equal(&expected));
    }

    #[test]
    fn the_plan_counts_what_the_stitcher_holds() {
        for (size, roi, overlap) in cases() {
            let grid = WindowGrid::new(size, roi, overlap).unwrap();
            let out = outputs(&grid, 1, 1);
            for acc in [Accumulator::Float32, Accumulator::Float16] {
                let plan = StitchPlan::new(&grid, acc, false);
                let (_, _, peak) = stitch(&grid, BlendMode::Constant, acc, &out, &plan.windows);
                assert_eq!(
                    peak, plan.peak_voxels,
                    "{size:?} roi {roi:?} {acc} {}",
                    plan.order
                );
                let monai = StitchPlan::new(&grid, acc, true);
                assert_eq!(monai.order, WindowOrder::Monai);
                assert!(plan.peak_voxels <= monai.peak_voxels);
            }
        }
    }

    #[test]
    fn long_axes_run_slowest() {
        // The shape of the bundle's memory benchmark: 333 x 333 x 603 at 128^3, overlap 0.25, whose last
        // windows along x and y overlap their neighbours by 115 voxels. MONAI's order keeps that overlap live
        // across the whole y-z cross-section.
        let grid = WindowGrid::new([333, 333, 603], [128; 3], 0.25).unwrap();
        let monai = StitchPlan::new(&grid, Accumulator::Float32, true);
        let exact = StitchPlan::new(&grid, Accumulator::Float32, false);
        let half = StitchPlan::new(&grid, Accumulator::Float16, false);
        for size in [[333, 333, 603], [1024, 1024, 768]] {
            let g = WindowGrid::new(size, [128; 3], 0.25).unwrap();
            for acc in [Accumulator::Float32, Accumulator::Float16] {
                let p = StitchPlan::new(&g, acc, false);
                println!(
                    "{size:?} {acc}: {} keeps {} voxels live",
                    p.order, p.peak_voxels
                );
            }
        }
        assert_ne!(exact.order, WindowOrder::Monai);
        assert!(
            exact.peak_voxels * 2 < monai.peak_voxels,
            "{}: {} vs MONAI's order {}",
            exact.order,
            exact.peak_voxels,
            monai.peak_voxels
        );
        // Sums that need not follow MONAI's order hold nothing back: less again.
        assert!(half.peak_voxels < exact.peak_voxels);
    }

    #[test]
    fn float16_sums_stay_close_to_float32() {
        let grid = WindowGrid::new([40, 33, 27], [16, 16, 16], 0.25).unwrap();
        let out: Vec<Tensor> = outputs(&grid, 2, 5)
            .iter()
            .map(|t| t.clamp(-1e3, 1e3))
            .collect();
        let plan = StitchPlan::new(&grid, Accumulator::Float16, false);
        let mode = BlendMode::Constant;
        let (f32_sums, ..) = stitch(&grid, mode, Accumulator::Float32, &out, &plan.windows);
        let (f16_sums, ..) = stitch(&grid, mode, Accumulator::Float16, &out, &plan.windows);
        // Values up to 1e3, where float16's spacing is 0.5: a blended sum is off by a rounding or two.
        let max = (&f16_sums - &f32_sums).abs().max().double_value(&[]);
        assert!(max <= 1.0, "float16 sums off by {max}");
        assert!(!f16_sums.equal(&f32_sums));
    }
}
