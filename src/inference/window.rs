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
    /// The window order with the fewest live voxels (MONAI's own on ties) for sums in `accumulator`, running
    /// `batch` windows per network call. Batches of several windows keep MONAI's order, so that each holds the
    /// windows MONAI's does.
    pub fn new(grid: &WindowGrid, accumulator: Accumulator, batch: usize) -> Self {
        let mut candidates = vec![WindowOrder::Monai];
        if batch <= 1 {
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
        Self::best_of(grid, accumulator, batch, &candidates)
    }

    /// MONAI's order, whatever it keeps live.
    pub fn monai(grid: &WindowGrid, accumulator: Accumulator, batch: usize) -> Self {
        Self::best_of(grid, accumulator, batch, &[WindowOrder::Monai])
    }

    fn best_of(
        grid: &WindowGrid,
        accumulator: Accumulator,
        batch: usize,
        candidates: &[WindowOrder],
    ) -> Self {
        let exact = accumulator == Accumulator::Float32;
        let cells = CellGrid::new(grid);
        let largest: [u64; 3] = std::array::from_fn(|a| {
            let axis = &cells.axes[a];
            (0..axis.len())
                .map(|c| axis.cell(c).len() as u64)
                .max()
                .unwrap_or(0)
        });
        candidates
            .iter()
            .map(|&order| {
                let windows = grid.ordered(order);
                let peak_voxels = simulate(&cells, &windows, exact, batch);
                Self {
                    order,
                    windows,
                    peak_voxels,
                    largest_cell: largest.iter().product(),
                    largest_cell_x: largest[0],
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

/// What happens to a window's contribution to one cell.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// It came before its turn in MONAI's order: held as a copy.
    Wait { rank: u32 },
    /// Added now (`first`: it starts the sum), then the held contributions of the `absorbed` ranks in that order;
    /// `finished` when no later window covers the cell.
    Fold {
        first: bool,
        absorbed: Vec<u32>,
        finished: bool,
    },
}

/// One cell a window covers, and what its contribution does there.
#[derive(Debug, Clone)]
struct CellStep {
    cell: [usize; 3],
    /// [`CellGrid::flatten`] of `cell`.
    index: usize,
    voxels: u64,
    step: Step,
}

/// Where every cell's sum stands: how many contributions it holds and the MONAI ranks of those waiting for
/// their turn. The plan's simulation and the stitcher step through one alike, so that the plan counts exactly
/// what the stitcher holds.
struct Ledger {
    folded: Vec<u32>,
    waiting: Vec<Vec<u32>>,
    /// Float32 sums keep MONAI's order; float16 sums differ from MONAI's anyway, so they add everything as it
    /// comes and hold nothing back.
    exact: bool,
}

impl Ledger {
    fn new(cells: &CellGrid, exact: bool) -> Self {
        let n = cells.count();
        Self {
            folded: vec![0; n],
            waiting: vec![Vec::new(); n],
            exact,
        }
    }

    /// Window `w` arrives: the step of its contribution to each cell it covers.
    fn arrive(&mut self, cells: &CellGrid, w: [usize; 3]) -> Vec<CellStep> {
        cells
            .cells_of(w)
            .map(|cell| {
                let i = cells.flatten(cell);
                let rank = cells.monai_rank(cell, w);
                let step = if self.exact && !foldable(rank, self.folded[i]) {
                    self.waiting[i].push(rank);
                    Step::Wait { rank }
                } else {
                    let first = self.folded[i] == 0;
                    self.folded[i] += 1;
                    let mut absorbed = Vec::new();
                    while let Some(k) = self.waiting[i].iter().position(|&r| r == self.folded[i]) {
                        absorbed.push(self.waiting[i].swap_remove(k));
                        self.folded[i] += 1;
                    }
                    Step::Fold {
                        first,
                        absorbed,
                        finished: self.folded[i] == cells.cover(cell),
                    }
                };
                CellStep {
                    cell,
                    index: i,
                    voxels: cells.voxels(cell),
                    step,
                }
            })
            .collect()
    }
}

/// Voxels (per channel) a window's steps make live when it starts (new sums, held copies) and free when it ends
/// (absorbed copies, finished cells). A window's output comes in channel chunks, so everything it starts is
/// live before anything it ends is freed.
fn live_change(steps: &[CellStep]) -> (u64, u64) {
    steps.iter().fold((0, 0), |(grow, free), s| match &s.step {
        Step::Wait { .. } => (grow + s.voxels, free),
        Step::Fold {
            first,
            absorbed,
            finished,
        } => (
            grow + if *first { s.voxels } else { 0 },
            free + s.voxels * (absorbed.len() as u64 + u64::from(*finished)),
        ),
    })
}

/// The peak live voxels of stitching `windows` in that order, `batch` per network call (what [`Stitcher`]
/// holds, without tensors: every window of a call is open before any ends).
fn simulate(cells: &CellGrid, windows: &[[usize; 3]], exact: bool, batch: usize) -> u64 {
    let mut ledger = Ledger::new(cells, exact);
    let (mut live, mut peak) = (0u64, 0u64);
    for call in windows.chunks(batch.max(1)) {
        let mut freed = 0;
        for &w in call {
            let (grow, free) = live_change(&ledger.arrive(cells, w));
            live += grow;
            freed += free;
        }
        peak = peak.max(live);
        live -= freed;
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
    logits: Option<Tensor>,
    /// Gaussian mode: the summed importance (constant mode divides by the window count).
    weight: Option<Tensor>,
    waiting: Vec<Waiting>,
}

impl CellSum {
    fn held(&self, rank: u32) -> Result<&Waiting> {
        self.waiting
            .iter()
            .find(|w| w.rank == rank)
            .ok_or_else(|| anyhow::anyhow!("internal: no held contribution of rank {rank}"))
    }
}

/// A window whose output is coming in slabs along x.
struct OpenWindow {
    index: [usize; 3],
    steps: Vec<CellStep>,
    channels: i64,
    /// Voxels along x received so far.
    received: usize,
}

/// Streams window outputs into cells and hands each finished cell to a sink. A window's output may come whole
/// ([`Stitcher::add`]) or in slabs along x ([`Stitcher::add_slab`] then [`Stitcher::end`]), so that a window's
/// logits for every class never need to exist at once.
pub struct Stitcher<'a> {
    grid: &'a WindowGrid,
    cells: CellGrid,
    ledger: Ledger,
    sums: Vec<CellSum>,
    open: Vec<OpenWindow>,
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
            ledger: Ledger::new(&cells, accumulator == Accumulator::Float32),
            cells,
            open: Vec::new(),
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

    /// The part of `t` (whose dims from `first_dim` on are window-sized) that lies in `cell` of the window
    /// with per-axis indices `index`.
    fn local(&self, t: &Tensor, first_dim: i64, index: [usize; 3], cell: [usize; 3]) -> Tensor {
        let region = self.cells.region(cell);
        let mut t = t.shallow_clone();
        for (a, r) in region.iter().enumerate() {
            let start = self.grid.starts[a][index[a]];
            t = t.narrow(
                first_dim + a as i64,
                (r.start - start) as i64,
                r.len() as i64,
            );
        }
        t
    }

    /// Adds one window's logits `[B, rx, ry, rz]` (float32) for the window with per-axis indices `index` (into
    /// `grid.starts`), then finishes the cells no later window covers. Windows may come in any order.
    pub fn add(
        &mut self,
        index: [usize; 3],
        logits: &Tensor,
        sink: &mut dyn CellSink,
    ) -> Result<()> {
        self.add_slab(index, 0..self.grid.roi[0], logits)?;
        self.end(index, sink)
    }

    /// Whether the windows of one network call may come in slabs: only when they all start at the same x, so that
    /// a slab is the same voxels in each and every voxel still sees the call's windows in their order (with
    /// windows at other x, a later window's slab would reach a voxel before an earlier window's).
    pub fn slabs_allowed(call: &[[usize; 3]]) -> bool {
        call.iter().all(|w| w[0] == call[0][0])
    }

    /// Adds the slab `x` (window coordinates along x) of window `index`'s logits, `[B, x.len(), ry, rz]`
    /// (float32). The first slab of a window opens it: its new sums and held copies are made whole. Slabs come
    /// in any order; [`Stitcher::end`] closes the window once all have come. Each voxel still adds its
    /// contributions in MONAI's order: slabs only split the voxels (see [`Stitcher::slabs_allowed`] for the
    /// windows open at once).
    pub fn add_slab(&mut self, index: [usize; 3], x: Range<usize>, logits: &Tensor) -> Result<()> {
        let size = logits.size();
        let roi = self.grid.roi;
        ensure!(
            size.len() == 4
                && x.start < x.end
                && x.end <= roi[0]
                && size[1..] == [x.len() as i64, roi[1] as i64, roi[2] as i64],
            "window logits of shape {size:?} are not the slab {x:?} of a {roi:?} window"
        );
        let whole = x == (0..roi[0]);
        ensure!(
            whole || self.open.iter().all(|o| o.index[0] == index[0]),
            "window {index:?} came in slabs while a window at another x is open"
        );
        let k = match self.open.iter().position(|o| o.index == index) {
            Some(k) => k,
            None => self.open_window(index, size[0]),
        };
        let open = &self.open[k];
        ensure!(
            open.channels == size[0],
            "window {index:?} has {} channels, not {}",
            open.channels,
            size[0]
        );
        // MONAI multiplies every window by the importance map before adding; by ones in constant mode, which
        // changes nothing and is skipped.
        let weighted = match &self.importance {
            Some(map) => logits * map.narrow(0, x.start as i64, x.len() as i64),
            None => logits.shallow_clone(),
        };
        let window_x = self.grid.starts[0][index[0]];
        let (kind, device) = (self.accumulator.kind(), self.device);
        for s in &open.steps {
            // The cell's voxels along x that lie in the slab: their offsets in the cell and in the slab.
            let cell_x = self.cells.region(s.cell)[0].clone();
            let lo = cell_x.start.max(window_x + x.start);
            let hi = cell_x.end.min(window_x + x.end);
            if lo >= hi {
                continue;
            }
            let (in_cell, in_slab, len) = (
                (lo - cell_x.start) as i64,
                (lo - window_x - x.start) as i64,
                (hi - lo) as i64,
            );
            let region = self.cells.region(s.cell);
            let mut part = weighted.narrow(1, in_slab, len);
            for a in 1..3 {
                let start = self.grid.starts[a][index[a]];
                part = part.narrow(
                    1 + a as i64,
                    (region[a].start - start) as i64,
                    region[a].len() as i64,
                );
            }
            let part = if part.kind() == kind && part.device() == device {
                part
            } else {
                part.to_device(device).to_kind(kind)
            };
            let sum = &self.sums[s.index];
            let slice = |t: &Tensor| t.narrow(1, in_cell, len);
            match &s.step {
                Step::Wait { rank } => {
                    slice(&sum.held(*rank)?.logits).copy_(&part);
                }
                Step::Fold {
                    first, absorbed, ..
                } => {
                    let mut acc = slice(sum.logits.as_ref().ok_or_else(|| {
                        anyhow::anyhow!("internal: cell {:?} has no sum", s.cell)
                    })?);
                    // MONAI's sums start from zeros: the first contribution is `part + 0` (which turns -0 into
                    // +0 as `0 + part` does), in one pass.
                    if *first {
                        let _ = part.f_add_scalar_out(&acc, 0.0)?;
                    } else {
                        let _ = acc.f_add_(&part)?;
                    }
                    for &rank in absorbed {
                        let _ = acc.f_add_(&slice(&sum.held(rank)?.logits))?;
                    }
                }
            }
        }
        self.open[k].received += x.len();
        Ok(())
    }

    /// Opens window `index`: steps it through the ledger and makes its new sums and held copies.
    fn open_window(&mut self, index: [usize; 3], channels: i64) -> usize {
        let steps = self.ledger.arrive(&self.cells, index);
        let (grow, _) = live_change(&steps);
        self.live_voxels += grow;
        self.peak_voxels = self.peak_voxels.max(self.live_voxels);
        let options = (self.accumulator.kind(), self.device);
        for s in &steps {
            let region = self.cells.region(s.cell);
            let shape = [
                channels,
                region[0].len() as i64,
                region[1].len() as i64,
                region[2].len() as i64,
            ];
            match &s.step {
                Step::Wait { rank } => {
                    let weight = self
                        .importance
                        .as_ref()
                        .map(|m| self.local(m, 0, index, s.cell));
                    self.sums[s.index].waiting.push(Waiting {
                        rank: *rank,
                        logits: Tensor::empty(shape, options),
                        weight,
                    });
                }
                Step::Fold { first: true, .. } => {
                    self.sums[s.index].logits = Some(Tensor::empty(shape, options));
                }
                Step::Fold { .. } => {}
            }
        }
        self.open.push(OpenWindow {
            index,
            steps,
            channels,
            received: 0,
        });
        self.open.len() - 1
    }

    /// Closes window `index` once all its slabs have come: sums its importance (gaussian mode), frees the
    /// copies it absorbed and finishes the cells no later window covers.
    pub fn end(&mut self, index: [usize; 3], sink: &mut dyn CellSink) -> Result<()> {
        let k = self
            .open
            .iter()
            .position(|o| o.index == index)
            .ok_or_else(|| {
                anyhow::anyhow!("window {index:?} ended before any of its logits came")
            })?;
        ensure!(
            self.open[k].received == self.grid.roi[0],
            "window {index:?} ended with {} of its {} voxels along x",
            self.open[k].received,
            self.grid.roi[0]
        );
        let open = self.open.swap_remove(k);
        let (_, free) = live_change(&open.steps);
        for s in open.steps {
            let Step::Fold {
                first,
                absorbed,
                finished,
            } = s.step
            else {
                continue;
            };
            let weight = self
                .importance
                .as_ref()
                .map(|m| self.local(m, 0, index, s.cell));
            let sum = &mut self.sums[s.index];
            if let Some(w) = weight {
                if first {
                    sum.weight = Some(w.f_add_scalar(0.0)?);
                } else if let Some(acc) = &mut sum.weight {
                    let _ = acc.f_add_(&w)?;
                }
            }
            for rank in absorbed {
                let k = sum.waiting.iter().position(|w| w.rank == rank);
                let held = k.map(|k| sum.waiting.swap_remove(k));
                if let (Some(acc), Some(w)) = (
                    &mut sum.weight,
                    held.as_ref().and_then(|h| h.weight.as_ref()),
                ) {
                    let _ = acc.f_add_(w)?;
                }
            }
            if finished {
                let sum = std::mem::take(&mut self.sums[s.index]);
                self.finish(s.cell, sum, sink)?;
            }
        }
        self.live_voxels -= free;
        Ok(())
    }

    /// Blends a finished cell and hands it to `sink` in slabs along x, so that finishing a large cell never
    /// needs a float32 copy of it whole.
    fn finish(&self, cell: [usize; 3], sum: CellSum, sink: &mut dyn CellSink) -> Result<()> {
        let region = self.cells.region(cell);
        let logits = sum
            .logits
            .ok_or_else(|| anyhow::anyhow!("internal: finished cell {cell:?} has no sum"))?;
        // MONAI divides by its count map, which holds exactly `cover` here; a 0-dim tensor (not a host scalar) so
        // that every device divides rather than multiplying by a reciprocal.
        let count = Tensor::from(self.cells.cover(cell) as f32).to_device(self.device);
        let mut x = region[0].start;
        while x < region[0].end {
            let len = FINISH_SLAB.min(region[0].end - x);
            let offset = (x - region[0].start) as i64;
            let slab = logits.narrow(1, offset, len as i64).to_kind(Kind::Float);
            let blended = match &sum.weight {
                Some(weight) => slab / weight.narrow(0, offset, len as i64),
                None => slab / &count,
            };
            sink.finish([x..x + len, region[1].clone(), region[2].clone()], blended)?;
            x += len;
        }
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
    fn windows_in_slabs_stitch_as_monai_bit_for_bit() {
        for (size, roi, overlap) in cases() {
            let grid = WindowGrid::new(size, roi, overlap).unwrap();
            let out = outputs(&grid, 3, 11);
            let monai = grid.windows();
            // Slabs along x, out of order: a third, the rest, the first voxel (or the whole window if thin).
            let r = roi[0];
            let slabs: Vec<Range<usize>> = (0..r).map(|x| x..x + 1).collect();
            for mode in [BlendMode::Constant, BlendMode::Gaussian] {
                let expected = monai_stitch(&grid, mode, &out);
                for batch in [1, 2, 3] {
                    let plan = StitchPlan::new(&grid, Accumulator::Float32, batch);
                    let p = grid.padded.map(|v| v as i64);
                    let mut sink = Collect {
                        out: Tensor::full(
                            [3, p[0], p[1], p[2]],
                            f64::NAN,
                            (Kind::Float, Device::Cpu),
                        ),
                        finished: Tensor::zeros([p[0], p[1], p[2]], (Kind::Int, Device::Cpu)),
                    };
                    let mut stitcher =
                        Stitcher::new(&grid, mode, Accumulator::Float32, Device::Cpu);
                    // A batch of windows is open at once, each slab going to all of them in turn.
                    for call in plan.windows.chunks(batch) {
                        let whole: Vec<Range<usize>> = std::iter::once(0..r).collect();
                        let slabs = if Stitcher::slabs_allowed(call) {
                            &slabs
                        } else {
                            &whole
                        };
                        for x in slabs {
                            for w in call {
                                let k = monai.iter().position(|m| m == w).unwrap();
                                let part = out[k].narrow(1, x.start as i64, x.len() as i64);
                                stitcher.add_slab(*w, x.clone(), &part).unwrap();
                            }
                        }
                        for w in call {
                            stitcher.end(*w, &mut sink).unwrap();
                        }
                    }
                    assert!(
                        sink.out.equal(&expected),
                        "{size:?} roi {roi:?} {mode:?} batch {batch} ({}): slabs differ from MONAI's sums",
                        plan.order
                    );
                    assert!(sink.finished.eq(1).all().int64_value(&[]) == 1);
                    assert_eq!(stitcher.peak_voxels(), plan.peak_voxels);
                }
            }
        }
    }

    #[test]
    fn a_window_must_come_whole_before_it_ends() {
        let grid = WindowGrid::new([40, 20, 20], [16, 16, 16], 0.25).unwrap();
        let out = outputs(&grid, 4, 2);
        let mut stitcher = Stitcher::new(
            &grid,
            BlendMode::Constant,
            Accumulator::Float32,
            Device::Cpu,
        );
        let mut sink = Collect {
            out: Tensor::zeros([4, 40, 32, 32], (Kind::Float, Device::Cpu)),
            finished: Tensor::zeros([40, 32, 32], (Kind::Int, Device::Cpu)),
        };
        let w = grid.windows()[0];
        assert!(stitcher.end(w, &mut sink).is_err(), "nothing came");
        stitcher.add_slab(w, 0..6, &out[0].narrow(1, 0, 6)).unwrap();
        let err = stitcher.end(w, &mut sink).unwrap_err().to_string();
        assert!(err.contains("6 of its 16 voxels"), "{err}");
        // A slab whose size does not match, one beyond the window, and one with another channel count.
        assert!(stitcher
            .add_slab(w, 6..10, &out[0].narrow(1, 6, 5))
            .is_err());
        assert!(stitcher
            .add_slab(w, 10..20, &out[0].narrow(1, 6, 10))
            .is_err());
        assert!(stitcher
            .add_slab(w, 6..16, &out[0].narrow(0, 0, 2).narrow(1, 6, 10))
            .is_err());
        stitcher
            .add_slab(w, 6..16, &out[0].narrow(1, 6, 10))
            .unwrap();
        stitcher.end(w, &mut sink).unwrap();
        // Windows at different x open at once may not come in slabs.
        let all = grid.windows();
        let a = all[1];
        let b = *all.iter().find(|w| w[0] != a[0]).unwrap();
        assert!(!Stitcher::slabs_allowed(&[a, b]));
        stitcher.add_slab(a, 0..16, &out[1]).unwrap();
        let err = stitcher
            .add_slab(b, 0..4, &out[2].narrow(1, 0, 4))
            .unwrap_err();
        assert!(err.to_string().contains("another x"), "{err}");
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
                let plan = StitchPlan::new(&grid, acc, 1);
                let (_, _, peak) = stitch(&grid, BlendMode::Constant, acc, &out, &plan.windows);
                assert_eq!(
                    peak, plan.peak_voxels,
                    "{size:?} roi {roi:?} {acc} {}",
                    plan.order
                );
                let monai = StitchPlan::monai(&grid, acc, 1);
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
        let monai = StitchPlan::monai(&grid, Accumulator::Float32, 1);
        let exact = StitchPlan::new(&grid, Accumulator::Float32, 1);
        let half = StitchPlan::new(&grid, Accumulator::Float16, 1);
        for size in [[333, 333, 603], [1024, 1024, 768]] {
            let g = WindowGrid::new(size, [128; 3], 0.25).unwrap();
            for acc in [Accumulator::Float32, Accumulator::Float16] {
                let p = StitchPlan::new(&g, acc, 1);
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
        let plan = StitchPlan::new(&grid, Accumulator::Float16, 1);
        let mode = BlendMode::Constant;
        let (f32_sums, ..) = stitch(&grid, mode, Accumulator::Float32, &out, &plan.windows);
        let (f16_sums, ..) = stitch(&grid, mode, Accumulator::Float16, &out, &plan.windows);
        // Values up to 1e3, where float16's spacing is 0.5: a blended sum is off by a rounding or two.
        let max = (&f16_sums - &f32_sums).abs().max().double_value(&[]);
        assert!(max <= 1.0, "float16 sums off by {max}");
        assert!(!f16_sums.equal(&f32_sums));
    }
}
