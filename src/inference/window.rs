//! Sliding-window inference as MONAI's `sliding_window_inference` (the bundle's `SlidingWindowInfererAdapt`):
//! window grid, replicate padding, constant or gaussian blending, with the stitching streamed through
//! "cells" so that memory is bounded by the windows in flight instead of prompts x volume.
//!
//! The volume is cut along every axis at all window starts and ends; each resulting cell is covered by a
//! fixed set of windows. Windows run in MONAI's order (x slowest) and add into per-cell accumulators; a cell
//! whose last covering window has run is divided by its weight and handed to a sink (for example the
//! argmax/label mapping), then freed. Sums happen in the same order as MONAI's, so results are identical.

use std::ops::Range;

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

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
    /// For each cell: how many windows along this axis cover it.
    cover: Vec<u32>,
}

impl AxisCells {
    fn new(starts: &[usize], roi: usize) -> Self {
        let mut bounds: Vec<usize> = starts.iter().flat_map(|&s| [s, s + roi]).collect();
        bounds.sort_unstable();
        bounds.dedup();
        let n_cells = bounds.len() - 1;
        let window_cells: Vec<Range<usize>> = starts
            .iter()
            .map(|&s| {
                let a = bounds
                    .iter()
                    .position(|&b| b == s)
                    .expect("start is a bound");
                let b = bounds
                    .iter()
                    .position(|&b| b == s + roi)
                    .expect("end is a bound");
                a..b
            })
            .collect();
        let mut cover = vec![0u32; n_cells];
        for r in &window_cells {
            for c in r.clone() {
                cover[c] += 1;
            }
        }
        Self {
            bounds,
            window_cells,
            cover,
        }
    }

    fn cell(&self, c: usize) -> Range<usize> {
        self.bounds[c]..self.bounds[c + 1]
    }
}

/// Receives finished cells: `region` in padded-volume coordinates and the blended logits `[B, cx, cy, cz]`.
pub trait CellSink {
    fn finish(&mut self, region: [Range<usize>; 3], logits: Tensor) -> Result<()>;
}

/// Streams window outputs into cells and hands each finished cell to a sink.
pub struct Stitcher<'a> {
    grid: &'a WindowGrid,
    axes: [AxisCells; 3],
    remaining: Vec<u32>,
    acc: Vec<Option<Tensor>>,
    weight: Vec<Option<Tensor>>,
    importance: Tensor,
    peak_cells: usize,
    live_cells: usize,
}

impl<'a> Stitcher<'a> {
    pub fn new(grid: &'a WindowGrid, mode: BlendMode, device: Device) -> Self {
        let axes = std::array::from_fn(|a| AxisCells::new(&grid.starts[a], grid.roi[a]));
        let n: usize = axes.iter().map(|c: &AxisCells| c.cover.len()).product();
        let mut remaining = vec![0u32; n];
        for (i, r) in remaining.iter_mut().enumerate() {
            let [cx, cy, cz] = Self::unflatten_with(&axes, i);
            *r = axes[0].cover[cx] * axes[1].cover[cy] * axes[2].cover[cz];
        }
        Self {
            grid,
            importance: importance_map(mode, grid.roi, device),
            axes,
            remaining,
            acc: (0..n).map(|_| None).collect(),
            weight: (0..n).map(|_| None).collect(),
            peak_cells: 0,
            live_cells: 0,
        }
    }

    fn unflatten_with(axes: &[AxisCells; 3], i: usize) -> [usize; 3] {
        let (ny, nz) = (axes[1].cover.len(), axes[2].cover.len());
        [i / (ny * nz), (i / nz) % ny, i % nz]
    }

    fn flatten(&self, c: [usize; 3]) -> usize {
        (c[0] * self.axes[1].cover.len() + c[1]) * self.axes[2].cover.len() + c[2]
    }

    /// Most cells alive at once so far (a measure of the stitching memory).
    pub fn peak_cells(&self) -> usize {
        self.peak_cells
    }

    /// Adds one window's logits `[B, rx, ry, rz]` for the window with per-axis indices `index` (into
    /// `grid.starts`), then finishes the cells no later window covers.
    pub fn add(
        &mut self,
        index: [usize; 3],
        logits: &Tensor,
        sink: &mut dyn CellSink,
    ) -> Result<()> {
        let start: [usize; 3] = std::array::from_fn(|a| self.grid.starts[a][index[a]]);
        // MONAI multiplies every window by the importance map (ones in constant mode) before adding.
        let importance = self.importance.squeeze_dim(0);
        let weighted = logits * &importance;
        let ranges: [Range<usize>; 3] =
            std::array::from_fn(|a| self.axes[a].window_cells[index[a]].clone());
        for cx in ranges[0].clone() {
            for cy in ranges[1].clone() {
                for cz in ranges[2].clone() {
                    let cell = [cx, cy, cz];
                    let region: [Range<usize>; 3] =
                        std::array::from_fn(|a| self.axes[a].cell(cell[a]));
                    let local = |t: &Tensor, first_dim: i64| {
                        let mut t = t.shallow_clone();
                        for a in 0..3 {
                            let r = &region[a];
                            t = t.narrow(
                                first_dim + a as i64,
                                (r.start - start[a]) as i64,
                                (r.end - r.start) as i64,
                            );
                        }
                        t
                    };
                    let part = local(&weighted, 1);
                    let w = local(&importance, 1);
                    let i = self.flatten(cell);
                    match &mut self.acc[i] {
                        Some(acc) => {
                            let _ = acc.f_add_(&part)?;
                        }
                        slot @ None => {
                            *slot = Some(part.zeros_like() + &part);
                            self.live_cells += 1;
                            self.peak_cells = self.peak_cells.max(self.live_cells);
                        }
                    }
                    match &mut self.weight[i] {
                        Some(acc) => {
                            let _ = acc.f_add_(&w)?;
                        }
                        slot @ None => *slot = Some(w.zeros_like() + &w),
                    }
                    self.remaining[i] -= 1;
                    if self.remaining[i] == 0 {
                        let acc = self.acc[i].take().expect("accumulator exists");
                        let weight = self.weight[i].take().expect("weight exists");
                        self.live_cells -= 1;
                        sink.finish(region, acc / weight)?;
                    }
                }
            }
        }
        Ok(())
    }
}
