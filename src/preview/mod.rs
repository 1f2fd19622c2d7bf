//! QC previews: a PNG of a segmentation over its CT, and a contact sheet of many cases.
//!
//! [`render`] draws, from the CT and its label map on the same (original) grid:
//! - a top row with an axial, a coronal and a sagittal slice through the centre of the segmented structures: on
//!   each axis, the slice at the median of the labelled voxels' positions (that slice always holds labels);
//!   the volume's centre when nothing was found;
//! - a second row of axial slices at fixed fractions of the labelled extent along the superior-inferior axis
//!   (0 = its most superior labelled slice, 1 = its most inferior; the whole volume when nothing was found),
//!   [`PreviewOptions::axial_fractions`];
//! - the CT in a display window (soft tissue W 400 / L 40 by default; see [`Window::grey`] for the exact mapping),
//!   each class as a semi-transparent overlay of its fixed colour ([`class_color`]) with a one-pixel outline in the
//!   full colour on the class's own boundary pixels (so every coloured pixel shows a voxel of that class);
//! - slices oriented the radiological way with orientation letters from the affine (see [`geometry`]), panels
//!   sized by physical extent (one scale in millimetres for the whole top row, so anisotropic voxels are not
//!   squashed);
//! - point prompts as markers (green: positive, red: negative; filled on the slice they lie on, a ring where
//!   projected from elsewhere) on the three main slices;
//! - label 255 ("not computed", outside the point windows) shown distinctly: the CT under a diagonal hatch with
//!   its own legend entry "not computed";
//! - a legend of the classes present (ids ascending, names from the [`LabelTable`], volumes in mL), with the same
//!   colours as the overlays, and, when no class voxel exists, the note "nothing found".
//!
//! Label values must be class ids: integers 0..=255 (0 background, 1..=254 classes, 255 not computed); anything
//! else is an error. [`write_png`] renders and writes atomically (temporary file renamed). [`contact_sheet`] puts
//! one thumbnail per case (e.g. [`render`] with [`PreviewOptions::thumbnail`], or a PNG read back with
//! [`read_png`]) on one image, failed cases framed in red with a short reason.

pub mod geometry;
pub mod palette;
mod sheet;
mod text;

use std::io::BufReader;
use std::path::{Path, PathBuf};

use image::RgbImage;
use ndarray::Array3;
use rayon::prelude::*;

use crate::prompts::LabelTable;
use crate::volume::{Affine, Volume};

pub use geometry::{EdgeLetters, Panel, Rect, View};
pub use palette::{class_color, Window};
pub use sheet::{
    contact_sheet, write_contact_sheet, ContactSheet, SheetCell, SheetItem, SheetOptions,
    FAILED_COLOR, FRAME_COLOR, MAX_SHEET_ITEMS,
};

/// Label value meaning "not computed" (outside the point windows).
pub const NOT_COMPUTED: u8 = 255;

/// Background of the preview.
pub const BACKGROUND: [u8; 3] = [16, 16, 16];
/// Colour of the "nothing found" note.
pub const NOTE_COLOR: [u8; 3] = [255, 176, 0];
/// Colour of the hatch lines over "not computed" voxels; a line runs through every pixel whose image coordinates
/// satisfy `(x + y) % HATCH_PERIOD == 0`.
pub const HATCH_COLOR: [u8; 3] = [150, 150, 210];
/// Spacing of the hatch lines, in pixels.
pub const HATCH_PERIOD: u32 = 6;
/// Colour of positive point markers.
pub const POSITIVE_POINT: [u8; 3] = [40, 230, 40];
/// Colour of negative point markers.
pub const NEGATIVE_POINT: [u8; 3] = [255, 50, 50];

const TEXT_COLOR: [u8; 3] = [235, 235, 235];
const CAPTION_COLOR: [u8; 3] = [170, 170, 170];
const LETTER_COLOR: [u8; 3] = [255, 214, 90];
const PAD: u32 = 10;
const GAP: u32 = 8;

/// Errors of the preview renderer.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error(
        "the label map has {labels:?} voxels but the CT has {ct:?}: they must be on the same grid"
    )]
    ShapeMismatch { ct: [usize; 3], labels: [usize; 3] },
    #[error("the CT has no voxels (shape {0:?})")]
    EmptyVolume([usize; 3]),
    #[error("the CT's affine has no usable orientation (singular or not finite): {0:?}")]
    BadAffine(Box<Affine>),
    #[error("label value {value} at voxel {voxel:?} is not a class id (an integer 0..=255)")]
    InvalidLabel { value: f32, voxel: [usize; 3] },
    #[error("point {index} {point:?} is not a finite voxel position")]
    InvalidPoint { index: usize, point: [f64; 3] },
    #[error("{points} points but {labels} point labels: give one label per point, or none")]
    PointLabelCount { points: usize, labels: usize },
    #[error("invalid preview option: {0}")]
    InvalidOption(String),
    #[error("a contact sheet needs at least one case")]
    NoItems,
    #[error("{count} cases are more than one contact sheet holds ({max}): split them into pages")]
    TooManyItems { count: usize, max: usize },
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
}

/// What a preview shows and how big it is.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewOptions {
    /// CT display window.
    pub window: Window,
    /// Pixels for the largest physical extent of the volume (all three main slices share this scale).
    pub panel_px: u32,
    /// Axial slices of the second row, as fractions (0..=1) of the labelled extent from its superior end.
    pub axial_fractions: Vec<f64>,
    /// Opacity of the class overlays (0 = CT only, 1 = opaque).
    pub overlay_alpha: f32,
    /// Whether class boundaries are drawn in the full class colour.
    pub outlines: bool,
    /// Whether the legend is drawn.
    pub legend: bool,
    /// Whether captions (view and slice index) are drawn above the slices.
    pub captions: bool,
    /// Text size in pixels (letters, captions, legend).
    pub font_px: u32,
    /// A title line at the top (e.g. the case name).
    pub title: Option<String>,
    /// Labels of the `points` given to [`render`], in order (1 or 3: positive, 0 or 2: negative); empty: all
    /// positive.
    pub point_labels: Vec<i64>,
}

impl Default for PreviewOptions {
    fn default() -> Self {
        Self {
            window: Window::SOFT_TISSUE,
            panel_px: 320,
            axial_fractions: vec![0.1, 0.3, 0.5, 0.7, 0.9],
            overlay_alpha: 0.45,
            outlines: true,
            legend: true,
            captions: true,
            font_px: 13,
            title: None,
            point_labels: Vec::new(),
        }
    }
}

impl PreviewOptions {
    /// A compact preview for contact sheets: the three main slices only, small, no legend or captions (the
    /// "nothing found" note stays).
    pub fn thumbnail() -> Self {
        Self {
            panel_px: 160,
            axial_fractions: Vec::new(),
            legend: false,
            captions: false,
            font_px: 10,
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<(), PreviewError> {
        let bad = |m: String| Err(PreviewError::InvalidOption(m));
        let w = self.window;
        if !(w.width.is_finite() && w.width > 0.0 && w.level.is_finite()) {
            return bad(format!(
                "the window needs a finite width > 0 and a finite level, got W {} / L {}",
                w.width, w.level
            ));
        }
        if !(16..=2048).contains(&self.panel_px) {
            return bad(format!("panel_px must be 16..=2048, got {}", self.panel_px));
        }
        if self.axial_fractions.len() > 12
            || self
                .axial_fractions
                .iter()
                .any(|f| !(0.0..=1.0).contains(f))
        {
            return bad(format!(
                "axial_fractions must be at most 12 values in 0..=1, got {:?}",
                self.axial_fractions
            ));
        }
        if !(0.0..=1.0).contains(&self.overlay_alpha) {
            return bad(format!(
                "overlay_alpha must be in 0..=1, got {}",
                self.overlay_alpha
            ));
        }
        if !(8..=64).contains(&self.font_px) {
            return bad(format!("font_px must be 8..=64, got {}", self.font_px));
        }
        Ok(())
    }
}

/// One entry of the legend.
#[derive(Debug, Clone, PartialEq)]
pub struct LegendEntry {
    /// Class id.
    pub id: u8,
    /// Its name in the label table (`class <id>` when it has none).
    pub name: String,
    /// Its colour (the overlays' colour).
    pub color: [u8; 3],
    /// Its voxels in the whole label map.
    pub voxels: u64,
    /// Its volume in millilitres.
    pub volume_ml: f64,
    /// Where its colour swatch is in the image.
    pub swatch: Rect,
}

/// A rendered preview and what is where in it.
#[derive(Debug, Clone)]
pub struct Preview {
    /// The picture.
    pub image: RgbImage,
    /// The slices: axial, coronal, sagittal, then the axial slices at [`PreviewOptions::axial_fractions`].
    pub panels: Vec<Panel>,
    /// The classes present, ids ascending (empty when the legend is off).
    pub legend: Vec<LegendEntry>,
    /// Voxels labelled 255 (not computed).
    pub not_computed_voxels: u64,
    /// The swatch of the "not computed" legend entry, when there is one.
    pub not_computed_swatch: Option<Rect>,
    /// `true` when no voxel holds a class (1..=254).
    pub nothing_found: bool,
    /// Where the "nothing found" note is, when drawn.
    pub note: Option<Rect>,
}

/// Voxel counts of a label map: per value, and per index along each axis for class voxels (1..=254).
struct LabelStats {
    voxels: Box<[u64; 256]>,
    per_axis: [Vec<u64>; 3],
}

/// Checks every label value and counts them, in parallel over slabs of the first axis.
fn label_stats(labels: &Array3<f32>) -> Result<LabelStats, PreviewError> {
    let dims = shape(labels);
    let [_, ny, nz] = dims;
    let copied: Vec<f32>;
    let data = match labels.as_slice() {
        Some(d) => d,
        None => {
            // Not in standard layout (e.g. a transposed array): copy in index order.
            copied = labels.iter().copied().collect();
            &copied
        }
    };
    struct Acc {
        voxels: Box<[u64; 256]>,
        /// Class voxels per index along the first two axes.
        per_axis: [Vec<u64>; 2],
        /// Along the last axis, as differences: +1 where a run of class voxels starts, -1 after it ends.
        last_axis_diff: Vec<i64>,
        bad: Option<(f32, [usize; 3])>,
    }
    let new = || Acc {
        voxels: Box::new([0; 256]),
        per_axis: [vec![0; dims[0]], vec![0; ny]],
        last_axis_diff: vec![0; nz + 1],
        bad: None,
    };
    let slab = (ny * nz).max(1);
    let acc = data
        .par_chunks(slab)
        .enumerate()
        .fold(new, |mut acc, (i, chunk)| {
            let mut in_slab = 0u64;
            for (j, row) in chunk.chunks(nz.max(1)).enumerate() {
                // Runs of equal values (label maps are piecewise constant), found 8 values at a time: each value
                // is checked and counted once per run.
                let mut in_row = 0u64;
                let mut k = 0;
                while k < row.len() {
                    let v = row[k];
                    let bits = v.to_bits();
                    let mut run_end = k + 1;
                    while run_end + 8 <= row.len()
                        && row[run_end..run_end + 8]
                            .iter()
                            .fold(0u32, |a, x| a | (x.to_bits() ^ bits))
                            == 0
                    {
                        run_end += 8;
                    }
                    while run_end < row.len() && row[run_end].to_bits() == bits {
                        run_end += 1;
                    }
                    let run = (run_end - k) as u64;
                    let c = v as u32; // saturating: NaN and negatives give 0, caught below
                    if v == 0.0 {
                        acc.voxels[0] += run;
                    } else if c as f32 != v || c > 255 {
                        if acc.bad.is_none_or(|(_, at)| [i, j, k] < at) {
                            acc.bad = Some((v, [i, j, k]));
                        }
                    } else {
                        acc.voxels[c as usize] += run;
                        if c != u32::from(NOT_COMPUTED) {
                            in_row += run;
                            acc.last_axis_diff[k] += 1;
                            acc.last_axis_diff[run_end] -= 1;
                        }
                    }
                    k = run_end;
                }
                acc.per_axis[1][j] += in_row;
                in_slab += in_row;
            }
            acc.per_axis[0][i] += in_slab;
            acc
        })
        .reduce(new, |mut a, b| {
            for (x, y) in a.voxels.iter_mut().zip(b.voxels.iter()) {
                *x += y;
            }
            for axis in 0..2 {
                for (x, y) in a.per_axis[axis].iter_mut().zip(&b.per_axis[axis]) {
                    *x += y;
                }
            }
            for (x, y) in a.last_axis_diff.iter_mut().zip(&b.last_axis_diff) {
                *x += y;
            }
            a.bad = match (a.bad, b.bad) {
                (Some(x), Some(y)) => Some(if y.1 < x.1 { y } else { x }),
                (x, y) => x.or(y),
            };
            a
        });
    if let Some((value, voxel)) = acc.bad {
        return Err(PreviewError::InvalidLabel { value, voxel });
    }
    let [first, second] = acc.per_axis;
    let last: Vec<u64> = acc
        .last_axis_diff
        .iter()
        .take(nz)
        .scan(0i64, |running, d| {
            *running += d;
            Some(*running as u64)
        })
        .collect();
    Ok(LabelStats {
        voxels: acc.voxels,
        per_axis: [first, second, last],
    })
}

fn shape<T>(a: &Array3<T>) -> [usize; 3] {
    let s = a.shape();
    [s[0], s[1], s[2]]
}

/// The slice at the median of the labelled voxels' positions (it always holds labels); the middle when empty.
fn centre_slice(hist: &[u64]) -> usize {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return hist.len() / 2;
    }
    let mut cum = 0u64;
    for (i, &h) in hist.iter().enumerate() {
        cum += h;
        if 2 * cum >= total {
            return i;
        }
    }
    hist.len() - 1
}

/// First and last index holding labels, or the whole axis when none does.
fn labelled_extent(hist: &[u64]) -> (usize, usize) {
    let first = hist.iter().position(|&h| h > 0);
    let last = hist.iter().rposition(|&h| h > 0);
    match (first, last) {
        (Some(a), Some(b)) => (a, b),
        _ => (0, hist.len() - 1),
    }
}

/// Renders the preview of `labels` over `ct` (same grid; the CT's affine places both) with `points` (voxel
/// positions of the point prompts, `[i, j, k]`) as markers; class names come from `table`.
pub fn render(
    ct: &Volume,
    labels: &Array3<f32>,
    points: &[[f64; 3]],
    table: &LabelTable,
    opts: &PreviewOptions,
) -> Result<Preview, PreviewError> {
    opts.validate()?;
    let dims = ct.dims();
    if shape(labels) != dims {
        return Err(PreviewError::ShapeMismatch {
            ct: dims,
            labels: shape(labels),
        });
    }
    if dims.contains(&0) {
        return Err(PreviewError::EmptyVolume(dims));
    }
    if let Some((index, p)) = points
        .iter()
        .enumerate()
        .find(|(_, p)| p.iter().any(|v| !v.is_finite()))
    {
        return Err(PreviewError::InvalidPoint { index, point: *p });
    }
    if !opts.point_labels.is_empty() && opts.point_labels.len() != points.len() {
        return Err(PreviewError::PointLabelCount {
            points: points.len(),
            labels: opts.point_labels.len(),
        });
    }
    let orientation = geometry::Orientation::from_affine(&ct.affine)?;
    let stats = label_stats(labels)?;
    let class_voxels: u64 = stats.voxels[1..usize::from(NOT_COMPUTED)].iter().sum();
    let nothing_found = class_voxels == 0;
    let not_computed_voxels = stats.voxels[usize::from(NOT_COMPUTED)];

    // Slices and their scale.
    let extent_mm = |w: usize| {
        let a = orientation.voxel_axis[w];
        dims[a] as f64 * orientation.spacing[a]
    };
    let largest = (0..3).map(extent_mm).fold(0.0, f64::max);
    let scale = f64::from(opts.panel_px) / largest;
    let font = opts.font_px as f32;
    let axis_name = |a: usize| ['i', 'j', 'k'][a];
    let mut main = Vec::new();
    for view in [View::Axial, View::Coronal, View::Sagittal] {
        let through = match view {
            View::Axial => 2,
            View::Coronal => 1,
            View::Sagittal => 0,
        };
        let axis = orientation.voxel_axis[through];
        let index = centre_slice(&stats.per_axis[axis]);
        let mut p = Panel::new(view, &orientation, dims, index, scale, (0, 0));
        p.caption = format!("{} {}={index}", view.name(), axis_name(axis));
        main.push(p);
    }
    let margin = (font * 1.4).round() as u32;
    let caption_h = if opts.captions {
        (font * 1.5).round() as u32
    } else {
        0
    };
    let row_width = |panels: &[Panel]| {
        panels
            .iter()
            .map(|p| p.rect.width + 2 * margin)
            .sum::<u32>()
            + GAP * (panels.len() as u32).saturating_sub(1)
    };
    let top_width = row_width(&main);

    let axial_axis = orientation.voxel_axis[2];
    let (lo, hi) = labelled_extent(&stats.per_axis[axial_axis]);
    let superior_is_high = orientation.direction[axial_axis][2] >= 0.0;
    let mut fractions = Vec::new();
    if !opts.axial_fractions.is_empty() {
        let n = opts.axial_fractions.len() as u32;
        let avail = (top_width.saturating_sub(GAP * (n - 1)) / n).saturating_sub(2 * margin);
        let scale2 = scale.min(f64::from(avail.max(8)) / extent_mm(0));
        for &f in &opts.axial_fractions {
            let step = (f * (hi - lo) as f64).round() as usize;
            let index = if superior_is_high {
                hi - step
            } else {
                lo + step
            };
            let mut p = Panel::new(View::Axial, &orientation, dims, index, scale2, (0, 0));
            p.caption = format!("axial {:.0}% {}={index}", f * 100.0, axis_name(axial_axis));
            fractions.push(p);
        }
    }

    // Legend entries and layout.
    let voxel_ml = det3(&ct.affine).abs() / 1000.0;
    let mut legend: Vec<LegendEntry> = Vec::new();
    if opts.legend {
        for id in 1..NOT_COMPUTED {
            let voxels = stats.voxels[usize::from(id)];
            if voxels > 0 {
                legend.push(LegendEntry {
                    id,
                    name: table
                        .name(i64::from(id))
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("class {id}")),
                    color: class_color(id),
                    voxels,
                    volume_ml: voxels as f64 * voxel_ml,
                    swatch: Rect {
                        x: 0,
                        y: 0,
                        width: 0,
                        height: 0,
                    },
                });
            }
        }
    }
    let show_not_computed = opts.legend && not_computed_voxels > 0;
    let legend_items = legend.len() + usize::from(show_not_computed);
    let title_h = if opts.title.is_some() {
        text::line_height(font * 1.3) + 8
    } else {
        0
    };
    let content_w = top_width
        .max(row_width(&fractions))
        .max(if opts.legend { 360 } else { 0 });
    let row_h = |panels: &[Panel]| {
        panels
            .iter()
            .map(|p| caption_h + p.rect.height + 2 * margin)
            .max()
            .unwrap_or(0)
    };
    let note_px = font * if opts.legend { 2.0 } else { 1.5 };
    let note_h = if nothing_found {
        text::line_height(note_px) + 8
    } else {
        0
    };
    let entry_h = text::line_height(font) + 6;
    let column_w = (font * 20.0).round() as u32;
    let columns = (content_w / column_w).max(1) as usize;
    let legend_rows = legend_items.div_ceil(columns) as u32;
    let mut y = PAD;
    let title_y = y;
    y += title_h;
    let top_y = y;
    y += row_h(&main);
    let fractions_y = y + GAP;
    if !fractions.is_empty() {
        y = fractions_y + row_h(&fractions);
    }
    let note_y = y + GAP;
    if nothing_found {
        y = note_y + note_h;
    }
    let legend_y = y + GAP;
    if legend_items > 0 {
        y = legend_y + legend_rows * entry_h;
    }
    let width = content_w + 2 * PAD;
    let height = y + PAD;
    let place_row = |panels: &mut [Panel], y0: u32| {
        let mut x = PAD;
        for p in panels.iter_mut() {
            p.place(x + margin, y0 + caption_h + margin);
            x += p.rect.width + 2 * margin + GAP;
        }
    };
    place_row(&mut main, top_y);
    place_row(&mut fractions, fractions_y);

    // Pixels.
    let mut image = RgbImage::from_pixel(width, height, image::Rgb(BACKGROUND));
    let mut panels = main;
    panels.extend(fractions);
    for p in &panels {
        paint_slice(&mut image, p, &ct.data, labels, opts);
    }
    for p in panels.iter().take(3) {
        for (i, point) in points.iter().enumerate() {
            let positive = opts.point_labels.get(i).is_none_or(|&l| l == 1 || l == 3);
            draw_marker(&mut image, p, *point, positive, font);
        }
    }
    for p in &panels {
        draw_annotations(&mut image, p, margin, caption_h, font);
    }
    if let Some(t) = &opts.title {
        let t = text::fit(t, font * 1.3, content_w as f32);
        text::draw(
            &mut image,
            &t,
            PAD as f32,
            title_y as f32,
            font * 1.3,
            TEXT_COLOR,
        );
    }
    let note = nothing_found.then(|| {
        text::draw_centred(
            &mut image,
            "nothing found",
            (PAD + content_w / 2) as f32,
            (note_y + note_h / 2) as f32,
            note_px,
            NOTE_COLOR,
        )
    });
    let mut not_computed_swatch = None;
    let swatch_side = (font * 0.9).round() as u32;
    let mut slot = 0usize;
    let mut next_slot = || {
        let (col, row) = (slot % columns, slot / columns);
        slot += 1;
        (PAD + col as u32 * column_w, legend_y + row as u32 * entry_h)
    };
    for e in &mut legend {
        let (x, y) = next_slot();
        e.swatch = Rect {
            x,
            y: y + (entry_h - swatch_side) / 2,
            width: swatch_side,
            height: swatch_side,
        };
        fill_rect(&mut image, e.swatch, e.color);
        let label = format!("{} {}  {}", e.id, e.name, format_ml(e.volume_ml));
        let label = text::fit(&label, font, (column_w - swatch_side - 12) as f32);
        text::draw(
            &mut image,
            &label,
            (x + swatch_side + 5) as f32,
            (y + 3) as f32,
            font,
            TEXT_COLOR,
        );
    }
    if show_not_computed {
        let (x, y) = next_slot();
        let swatch = Rect {
            x,
            y: y + (entry_h - swatch_side) / 2,
            width: swatch_side,
            height: swatch_side,
        };
        fill_rect(&mut image, swatch, [60, 60, 60]);
        for py in swatch.y..swatch.y + swatch.height {
            for px in swatch.x..swatch.x + swatch.width {
                if (px + py) % HATCH_PERIOD == 0 {
                    image.put_pixel(px, py, image::Rgb(HATCH_COLOR));
                }
            }
        }
        let label = format!(
            "not computed (255)  {}",
            format_ml(not_computed_voxels as f64 * voxel_ml)
        );
        let label = text::fit(&label, font, (column_w - swatch_side - 12) as f32);
        text::draw(
            &mut image,
            &label,
            (x + swatch_side + 5) as f32,
            (y + 3) as f32,
            font,
            TEXT_COLOR,
        );
        not_computed_swatch = Some(swatch);
    }
    Ok(Preview {
        image,
        panels,
        legend,
        not_computed_voxels,
        not_computed_swatch,
        nothing_found,
        note,
    })
}

/// Determinant of the affine's 3x3 part (voxel volume in mm^3, signed).
fn det3(a: &Affine) -> f64 {
    a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
        - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
        + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
}

fn format_ml(ml: f64) -> String {
    if ml >= 100.0 {
        format!("{ml:.0} mL")
    } else if ml >= 1.0 {
        format!("{ml:.1} mL")
    } else {
        format!("{ml:.2} mL")
    }
}

fn fill_rect(image: &mut RgbImage, r: Rect, color: [u8; 3]) {
    let (w, h) = image.dimensions();
    for y in r.y..(r.y + r.height).min(h) {
        for x in r.x..(r.x + r.width).min(w) {
            image.put_pixel(x, y, image::Rgb(color));
        }
    }
}

/// Draws one slice: CT grey, class overlays blended by `overlay_alpha`, outlines in the full class colour on
/// class pixels with a 4-neighbour (inside the panel) of another value, hatch over "not computed".
fn paint_slice(
    image: &mut RgbImage,
    panel: &Panel,
    ct: &Array3<f32>,
    labels: &Array3<f32>,
    opts: &PreviewOptions,
) {
    let (w, h) = (panel.rect.width as usize, panel.rect.height as usize);
    let hv: Vec<usize> = (0..panel.rect.width)
        .map(|x| panel.horizontal.voxel(x))
        .collect();
    let vv: Vec<usize> = (0..panel.rect.height)
        .map(|y| panel.vertical.voxel(y))
        .collect();
    let mut class = vec![0u8; w * h];
    let mut grey = vec![0u8; w * h];
    let mut idx = [0usize; 3];
    idx[panel.slice_axis] = panel.slice_index;
    let mut sample = |x: usize, y: usize, idx: [usize; 3]| {
        // Values were checked by `label_stats`: integers 0..=255.
        class[y * w + x] = labels[idx] as u8;
        grey[y * w + x] = opts.window.grey(ct[idx]);
    };
    // The inner loop runs along the voxel axis with the smaller memory stride: on a 512 x 512 x 300 volume this
    // is several times faster than screen order for axial slices (far fewer cache and TLB misses).
    let stride = |axis: usize| ct.strides()[axis].unsigned_abs();
    if stride(panel.vertical.axis) < stride(panel.horizontal.axis) {
        for (x, &hx) in hv.iter().enumerate() {
            idx[panel.horizontal.axis] = hx;
            for (y, &vy) in vv.iter().enumerate() {
                idx[panel.vertical.axis] = vy;
                sample(x, y, idx);
            }
        }
    } else {
        for (y, &vy) in vv.iter().enumerate() {
            idx[panel.vertical.axis] = vy;
            for (x, &hx) in hv.iter().enumerate() {
                idx[panel.horizontal.axis] = hx;
                sample(x, y, idx);
            }
        }
    }
    for y in 0..h {
        for x in 0..w {
            let c = class[y * w + x];
            let g = grey[y * w + x];
            let (ix, iy) = (panel.rect.x + x as u32, panel.rect.y + y as u32);
            let rgb = match c {
                0 => [g, g, g],
                NOT_COMPUTED => {
                    if (ix + iy) % HATCH_PERIOD == 0 {
                        HATCH_COLOR
                    } else {
                        [g, g, g]
                    }
                }
                _ => {
                    let edge = opts.outlines
                        && ((x > 0 && class[y * w + x - 1] != c)
                            || (x + 1 < w && class[y * w + x + 1] != c)
                            || (y > 0 && class[(y - 1) * w + x] != c)
                            || (y + 1 < h && class[(y + 1) * w + x] != c));
                    if edge {
                        class_color(c)
                    } else {
                        palette::blend(g, class_color(c), opts.overlay_alpha)
                    }
                }
            };
            image.put_pixel(ix, iy, image::Rgb(rgb));
        }
    }
}

/// A point marker: filled on the slice the point lies on (within half a voxel), a ring when projected from
/// elsewhere; black rim for contrast; clipped to the panel.
fn draw_marker(image: &mut RgbImage, panel: &Panel, point: [f64; 3], positive: bool, font: f32) {
    let ((cx, cy), distance) = panel.project(point);
    let r = (font * 0.45).max(4.0) as f64;
    let on_slice = distance <= 0.5;
    let color = if positive {
        POSITIVE_POINT
    } else {
        NEGATIVE_POINT
    };
    let rect = panel.rect;
    let x0 = (cx - r - 2.0).floor().max(f64::from(rect.x)) as u32;
    let y0 = (cy - r - 2.0).floor().max(f64::from(rect.y)) as u32;
    let x1 = ((cx + r + 2.0).ceil() as u32).min(rect.x + rect.width);
    let y1 = ((cy + r + 2.0).ceil() as u32).min(rect.y + rect.height);
    for y in y0..y1 {
        for x in x0..x1 {
            let d = ((f64::from(x) + 0.5 - cx).powi(2) + (f64::from(y) + 0.5 - cy).powi(2)).sqrt();
            let inner = if on_slice { -1.0 } else { r - 2.0 };
            let rgb = if d <= r && d >= inner {
                color
            } else if d <= r + 1.5 && d >= inner - 1.5 {
                [0, 0, 0]
            } else {
                continue;
            };
            image.put_pixel(x, y, image::Rgb(rgb));
        }
    }
}

/// Orientation letters in the margins around a panel and its caption above.
fn draw_annotations(image: &mut RgbImage, p: &Panel, margin: u32, caption_h: u32, font: f32) {
    let r = p.rect;
    let (cx, cy) = (
        r.x as f32 + r.width as f32 / 2.0,
        r.y as f32 + r.height as f32 / 2.0,
    );
    let m = margin as f32 / 2.0;
    let l = p.letters;
    for (c, x, y) in [
        (l.left, r.x as f32 - m, cy),
        (l.right, (r.x + r.width) as f32 + m, cy),
        (l.top, cx, r.y as f32 - m),
        (l.bottom, cx, (r.y + r.height) as f32 + m),
    ] {
        text::draw_centred(image, &c.to_string(), x, y, font, LETTER_COLOR);
    }
    if caption_h > 0 {
        let max_w = (r.width + 2 * margin) as f32;
        let caption = text::fit(&p.caption, font, max_w);
        text::draw(
            image,
            &caption,
            (r.x - margin) as f32,
            (r.y - margin - caption_h) as f32,
            font,
            CAPTION_COLOR,
        );
    }
}

/// Renders (see [`render`]) and writes the preview as a PNG at `path`, atomically.
pub fn write_png(
    path: &Path,
    ct: &Volume,
    labels: &Array3<f32>,
    points: &[[f64; 3]],
    table: &LabelTable,
    opts: &PreviewOptions,
) -> Result<Preview, PreviewError> {
    let preview = render(ct, labels, points, table, opts)?;
    save_png(path, &preview.image)?;
    Ok(preview)
}

/// Writes `image` as a PNG at `path` through a temporary file renamed into place (nothing is left on failure).
pub fn save_png(path: &Path, image: &RgbImage) -> Result<(), PreviewError> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder;
    crate::fsutil::write_atomic_with(path, |w| {
        PngEncoder::new_with_quality(w, CompressionType::Fast, FilterType::Adaptive)
            .write_image(
                image.as_raw(),
                image.width(),
                image.height(),
                image::ColorType::Rgb8,
            )
            .map_err(anyhow::Error::from)
    })
    .map_err(|e| PreviewError::Write {
        path: path.to_path_buf(),
        message: format!("{e:#}"),
    })
}

/// Reads a PNG (e.g. a preview written earlier, for a contact sheet) as 8-bit RGB.
pub fn read_png(path: &Path) -> Result<RgbImage, PreviewError> {
    let err = |message: String| PreviewError::Read {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    image::io::Reader::with_format(BufReader::new(file), image::ImageFormat::Png)
        .decode()
        .map(|i| i.into_rgb8())
        .map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centre_slice_is_a_labelled_median() {
        assert_eq!(centre_slice(&[0, 0, 0, 0]), 2);
        assert_eq!(centre_slice(&[0, 5, 0, 0, 0, 5, 0]), 1);
        assert_eq!(centre_slice(&[0, 1, 0, 0, 0, 5, 0]), 5);
        assert_eq!(centre_slice(&[3]), 0);
        assert_eq!(labelled_extent(&[0, 1, 0, 2, 0]), (1, 3));
        assert_eq!(labelled_extent(&[0, 0, 0]), (0, 2));
    }

    #[test]
    fn label_values_are_checked_and_counted() {
        let mut a = Array3::<f32>::zeros((3, 4, 5));
        a[[1, 2, 3]] = 7.0;
        a[[2, 0, 0]] = 255.0;
        let s = label_stats(&a).unwrap();
        assert_eq!((s.voxels[0], s.voxels[7], s.voxels[255]), (58, 1, 1));
        assert_eq!(s.per_axis[0], vec![0, 1, 0]);
        assert_eq!(s.per_axis[1], vec![0, 0, 1, 0]);
        assert_eq!(s.per_axis[2], vec![0, 0, 0, 1, 0]);
        for bad in [2.5, -1.0, 256.0, f32::NAN, f32::INFINITY] {
            let mut b = a.clone();
            b[[2, 3, 4]] = bad;
            b[[0, 1, 1]] = bad;
            match label_stats(&b) {
                Err(PreviewError::InvalidLabel { voxel, .. }) => assert_eq!(voxel, [0, 1, 1]),
                other => panic!("{bad}: {:?}", other.map(|_| ())),
            }
        }
        // Runs of values along the last axis, not-computed excluded from the per-axis counts.
        let mut r = Array3::<f32>::zeros((1, 2, 9));
        for (k, v) in [0.0, 3.0, 3.0, 3.0, 255.0, 255.0, 7.0, 0.0, 3.0]
            .iter()
            .enumerate()
        {
            r[[0, 1, k]] = *v;
        }
        let s = label_stats(&r).unwrap();
        assert_eq!(
            (s.voxels[0], s.voxels[3], s.voxels[7], s.voxels[255]),
            (11, 4, 1, 2)
        );
        assert_eq!(s.per_axis[2], vec![0, 1, 1, 1, 0, 0, 1, 0, 1]);
        assert_eq!(
            (s.per_axis[0].clone(), s.per_axis[1].clone()),
            (vec![5], vec![0, 5])
        );
        // A non-standard layout (transposed view made owned) is read in index order.
        let t = a.clone().reversed_axes();
        let s = label_stats(&t).unwrap();
        assert_eq!(s.per_axis[0], vec![0, 0, 0, 1, 0]);
    }

    #[test]
    fn bad_options_are_refused() {
        for o in [
            PreviewOptions {
                panel_px: 4,
                ..Default::default()
            },
            PreviewOptions {
                axial_fractions: vec![1.5],
                ..Default::default()
            },
            PreviewOptions {
                overlay_alpha: -0.1,
                ..Default::default()
            },
            PreviewOptions {
                window: Window {
                    width: 0.0,
                    level: 40.0,
                },
                ..Default::default()
            },
        ] {
            assert!(matches!(o.validate(), Err(PreviewError::InvalidOption(_))));
        }
        assert!(PreviewOptions::default().validate().is_ok());
        assert!(PreviewOptions::thumbnail().validate().is_ok());
    }
}
