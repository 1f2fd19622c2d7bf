//! Where each voxel goes on screen.
//!
//! Slices are shown the radiological way whatever the file's voxel order: axial slices with the patient's right on
//! the left of the image and anterior at the top, coronal slices with right on the left and superior at the top,
//! sagittal slices with anterior on the left and superior at the top. Which voxel axis runs along which screen axis,
//! and in which sense, comes from the affine (RAS+ world, as nibabel gives it): each world axis takes the voxel
//! axis closest to it (the permutation with the largest sum of direction cosines, so oblique scans still get one
//! voxel axis per world axis). Pixels are sampled nearest-neighbour on the voxel grid (no interpolation across
//! an oblique rotation), and each panel is `voxels x spacing x scale` pixels along each screen axis, so the
//! physical aspect ratio is kept for anisotropic voxels. The orientation letters at the edges are computed from
//! the actual world direction of each screen axis (the dominant RAS component), so they are what the affine
//! says, also for LPS, permuted or oblique files.

use crate::volume::{spacing, Affine, AXIS_PERMUTATIONS};

use super::PreviewError;

/// A rectangle of pixels in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    /// Left column.
    pub x: u32,
    /// Top row.
    pub y: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl Rect {
    /// Whether pixel `(x, y)` lies inside.
    pub fn contains(&self, x: u32, y: u32) -> bool {
        x >= self.x && y >= self.y && x - self.x < self.width && y - self.y < self.height
    }
}

/// The three slice orientations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Across the superior-inferior axis (seen from the feet).
    Axial,
    /// Across the anterior-posterior axis (seen from the front).
    Coronal,
    /// Across the left-right axis (seen from the patient's left).
    Sagittal,
}

impl View {
    /// Lowercase name ("axial", "coronal", "sagittal").
    pub fn name(self) -> &'static str {
        match self {
            View::Axial => "axial",
            View::Coronal => "coronal",
            View::Sagittal => "sagittal",
        }
    }

    /// World axes (0 = R/L, 1 = A/P, 2 = S/I) along the screen's horizontal and vertical, and across the slice.
    /// Screen-right points to L (axial, coronal) or P (sagittal); screen-down points to P (axial) or I.
    fn world_axes(self) -> (usize, usize, usize) {
        match self {
            View::Axial => (0, 1, 2),
            View::Coronal => (0, 2, 1),
            View::Sagittal => (1, 2, 0),
        }
    }
}

/// The orientation letter of a world direction (RAS+): its dominant component's end (`R`/`L`, `A`/`P`, `S`/`I`).
pub fn direction_letter(v: [f64; 3]) -> char {
    let w = (0..3)
        .max_by(|&a, &b| v[a].abs().total_cmp(&v[b].abs()))
        .unwrap_or(0);
    let (plus, minus) = [('R', 'L'), ('A', 'P'), ('S', 'I')][w];
    if v[w] >= 0.0 {
        plus
    } else {
        minus
    }
}

/// How the voxel axes of an image lie in the world.
#[derive(Debug, Clone, PartialEq)]
pub struct Orientation {
    /// The voxel axis running along each world axis (R/L, A/P, S/I).
    pub voxel_axis: [usize; 3],
    /// Unit world direction (RAS+) of each voxel axis, towards increasing index.
    pub direction: [[f64; 3]; 3],
    /// Spacing of each voxel axis in millimetres.
    pub spacing: [f64; 3],
}

impl Orientation {
    /// Reads the orientation from an affine; an error when its 3x3 part is singular or not finite.
    pub fn from_affine(a: &Affine) -> Result<Self, PreviewError> {
        let spacing = spacing(a);
        let finite = a.iter().flatten().all(|v| v.is_finite());
        let det = a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
            - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
        if !finite || spacing.iter().any(|&s| s <= 0.0) || det.abs() < 1e-9 {
            return Err(PreviewError::BadAffine(Box::new(*a)));
        }
        let direction: [[f64; 3]; 3] =
            std::array::from_fn(|k| std::array::from_fn(|w| a[w][k] / spacing[k]));
        let score = |p: &[usize; 3]| (0..3).map(|w| direction[p[w]][w].abs()).sum::<f64>();
        let voxel_axis = AXIS_PERMUTATIONS
            .iter()
            .copied()
            .max_by(|p, q| score(p).total_cmp(&score(q)))
            .unwrap_or([0, 1, 2]);
        Ok(Self {
            voxel_axis,
            direction,
            spacing,
        })
    }

    /// Whether increasing index along the voxel axis of world axis `w` goes towards R, A or S.
    fn towards_plus(&self, w: usize) -> bool {
        self.direction[self.voxel_axis[w]][w] >= 0.0
    }
}

/// One screen axis of a panel: which voxel axis it shows, in which sense, over how many pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AxisMap {
    /// Voxel axis shown along this screen axis.
    pub axis: usize,
    /// Voxels along that axis.
    pub len: usize,
    /// Whether the voxel index decreases along the screen axis.
    pub reversed: bool,
    /// Pixels along the screen axis.
    pub pixels: u32,
}

impl AxisMap {
    /// The voxel index shown at pixel `p` (0-based, `p < pixels`): the voxel containing the pixel's centre,
    /// `floor((p + 0.5) * len / pixels)` in screen order, computed exactly in integers.
    pub fn voxel(&self, p: u32) -> usize {
        let u = ((2 * u64::from(p) + 1) * self.len as u64 / (2 * u64::from(self.pixels))) as usize;
        let u = u.min(self.len - 1);
        if self.reversed {
            self.len - 1 - u
        } else {
            u
        }
    }

    /// Continuous pixel position (from the panel's edge) of continuous voxel coordinate `v`.
    pub fn pixel(&self, v: f64) -> f64 {
        let u = if self.reversed {
            (self.len - 1) as f64 - v
        } else {
            v
        };
        (u + 0.5) * f64::from(self.pixels) / self.len as f64
    }
}

/// Orientation letters at the four edges of a panel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeLetters {
    pub left: char,
    pub right: char,
    pub top: char,
    pub bottom: char,
}

/// One slice on screen: where it is in the preview and which voxel each of its pixels shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// The slice's orientation.
    pub view: View,
    /// Where the slice's pixels are in the preview image.
    pub rect: Rect,
    /// The voxel axis across the slice (0, 1, 2 = the file's i, j, k).
    pub slice_axis: usize,
    /// The slice's index on that axis.
    pub slice_index: usize,
    /// Orientation letters at its edges (from the affine).
    pub letters: EdgeLetters,
    /// The caption drawn above it (e.g. `axial k=14`, `axial 30% k=20`).
    pub caption: String,
    pub(crate) horizontal: AxisMap,
    pub(crate) vertical: AxisMap,
}

impl Panel {
    /// A panel of `view` through `slice_index`, at `scale` pixels per millimetre, its top-left pixel at `(x, y)`.
    pub(crate) fn new(
        view: View,
        orientation: &Orientation,
        dims: [usize; 3],
        slice_index: usize,
        scale: f64,
        (x, y): (u32, u32),
    ) -> Self {
        let (hw, vw, tw) = view.world_axes();
        // Screen-right is towards -world (L or P) and screen-down towards -world (P or I): the voxel index runs
        // with the screen when increasing index goes towards the minus end.
        let map = |w: usize| {
            let axis = orientation.voxel_axis[w];
            let len = dims[axis];
            let pixels = (len as f64 * orientation.spacing[axis] * scale)
                .round()
                .max(1.0) as u32;
            AxisMap {
                axis,
                len,
                reversed: orientation.towards_plus(w),
                pixels,
            }
        };
        let horizontal = map(hw);
        let vertical = map(vw);
        let screen_dir = |m: &AxisMap| {
            let d = orientation.direction[m.axis];
            let s = if m.reversed { -1.0 } else { 1.0 };
            [d[0] * s, d[1] * s, d[2] * s]
        };
        let right = screen_dir(&horizontal);
        let down = screen_dir(&vertical);
        let neg = |v: [f64; 3]| [-v[0], -v[1], -v[2]];
        Self {
            view,
            rect: Rect {
                x,
                y,
                width: horizontal.pixels,
                height: vertical.pixels,
            },
            slice_axis: orientation.voxel_axis[tw],
            slice_index,
            letters: EdgeLetters {
                left: direction_letter(neg(right)),
                right: direction_letter(right),
                top: direction_letter(neg(down)),
                bottom: direction_letter(down),
            },
            caption: String::new(),
            horizontal,
            vertical,
        }
    }

    /// The voxel `[i, j, k]` shown at image pixel `(x, y)`, or `None` outside the panel.
    pub fn voxel_at(&self, x: u32, y: u32) -> Option<[usize; 3]> {
        if !self.rect.contains(x, y) {
            return None;
        }
        let mut v = [0; 3];
        v[self.slice_axis] = self.slice_index;
        v[self.horizontal.axis] = self.horizontal.voxel(x - self.rect.x);
        v[self.vertical.axis] = self.vertical.voxel(y - self.rect.y);
        Some(v)
    }

    /// Image position (continuous pixel coordinates) of a continuous voxel position projected onto the panel, and
    /// its distance from the slice in voxels.
    pub fn project(&self, voxel: [f64; 3]) -> ((f64, f64), f64) {
        let x = f64::from(self.rect.x) + self.horizontal.pixel(voxel[self.horizontal.axis]);
        let y = f64::from(self.rect.y) + self.vertical.pixel(voxel[self.vertical.axis]);
        (
            (x, y),
            (voxel[self.slice_axis] - self.slice_index as f64).abs(),
        )
    }

    /// Moves the panel so that its top-left pixel is at `(x, y)`.
    pub(crate) fn place(&mut self, x: u32, y: u32) {
        self.rect.x = x;
        self.rect.y = y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn affine(cols: [[f64; 3]; 3]) -> Affine {
        let mut a = crate::volume::IDENTITY;
        for (k, c) in cols.iter().enumerate() {
            for w in 0..3 {
                a[w][k] = c[w];
            }
        }
        a
    }

    #[test]
    fn ras_and_lps_get_the_same_letters_and_mirrored_indices() {
        let ras =
            Orientation::from_affine(&affine([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]]))
                .unwrap();
        let lps = Orientation::from_affine(&affine([
            [-1.5, 0.0, 0.0],
            [0.0, -1.5, 0.0],
            [0.0, 0.0, 1.5],
        ]))
        .unwrap();
        for o in [&ras, &lps] {
            let p = Panel::new(View::Axial, o, [10, 20, 30], 5, 1.0, (0, 0));
            assert_eq!(
                p.letters,
                EdgeLetters {
                    left: 'R',
                    right: 'L',
                    top: 'A',
                    bottom: 'P'
                }
            );
            let s = Panel::new(View::Sagittal, o, [10, 20, 30], 5, 1.0, (0, 0));
            assert_eq!(
                (
                    s.letters.left,
                    s.letters.right,
                    s.letters.top,
                    s.letters.bottom
                ),
                ('A', 'P', 'S', 'I')
            );
            assert_eq!(s.slice_axis, 0);
        }
        // RAS: index i grows towards R, so the leftmost column shows the last i; LPS: the first.
        let p = Panel::new(View::Axial, &ras, [10, 20, 30], 5, 1.0, (0, 0));
        assert_eq!(p.rect.width, 30);
        assert_eq!(p.voxel_at(0, 0), Some([9, 19, 5]));
        let p = Panel::new(View::Axial, &lps, [10, 20, 30], 5, 1.0, (0, 0));
        assert_eq!(p.rect.width, 15);
        assert_eq!(p.voxel_at(0, 0), Some([0, 0, 5]));
        assert_eq!(p.voxel_at(14, 29), Some([9, 19, 5]));
        assert_eq!(p.voxel_at(15, 0), None);
    }

    #[test]
    fn permuted_axes_are_assigned_by_direction() {
        // A sagittal acquisition: i runs S->I (2 mm), j runs P->A (1 mm), k runs L->R (4 mm).
        let o = Orientation::from_affine(&affine([
            [0.0, 0.0, -2.0],
            [0.0, 1.0, 0.0],
            [4.0, 0.0, 0.0],
        ]))
        .unwrap();
        assert_eq!(o.voxel_axis, [2, 1, 0]);
        let axial = Panel::new(View::Axial, &o, [8, 16, 32], 3, 1.0, (0, 0));
        assert_eq!(axial.slice_axis, 0);
        assert_eq!((axial.rect.width, axial.rect.height), (128, 16));
        assert_eq!((axial.letters.left, axial.letters.top), ('R', 'A'));
        // k grows towards R and j towards A: the top-left pixel shows the last k and the last j.
        assert_eq!(axial.voxel_at(0, 0), Some([3, 15, 31]));
        let coronal = Panel::new(View::Coronal, &o, [8, 16, 32], 3, 0.5, (0, 0));
        assert_eq!(coronal.slice_axis, 1);
        assert_eq!((coronal.rect.width, coronal.rect.height), (64, 8));
        // i grows towards I: the top row shows i = 0.
        assert_eq!(coronal.voxel_at(0, 0), Some([0, 3, 31]));
        assert_eq!(coronal.voxel_at(63, 7), Some([7, 3, 0]));
    }

    #[test]
    fn oblique_letters_follow_the_dominant_direction_and_bad_affines_fail() {
        let c = 30f64.to_radians().cos();
        let s = 30f64.to_radians().sin();
        let o = Orientation::from_affine(&affine([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]]))
            .unwrap();
        assert_eq!(o.voxel_axis, [0, 1, 2]);
        let p = Panel::new(View::Axial, &o, [10, 10, 10], 0, 1.0, (0, 0));
        assert_eq!((p.letters.left, p.letters.right), ('R', 'L'));
        assert_eq!(direction_letter([0.1, -0.9, 0.2]), 'P');
        assert_eq!(direction_letter([0.1, 0.2, -0.9]), 'I');
        assert!(Orientation::from_affine(&[[0.0; 4]; 4]).is_err());
        let mut nan = crate::volume::IDENTITY;
        nan[0][0] = f64::NAN;
        assert!(Orientation::from_affine(&nan).is_err());
    }

    #[test]
    fn axis_map_samples_pixel_centres() {
        let m = AxisMap {
            axis: 0,
            len: 3,
            reversed: false,
            pixels: 7,
        };
        let got: Vec<usize> = (0..7).map(|p| m.voxel(p)).collect();
        assert_eq!(got, vec![0, 0, 1, 1, 1, 2, 2]);
        assert!((m.pixel(1.0) - 3.5).abs() < 1e-12);
        let r = AxisMap {
            reversed: true,
            ..m
        };
        assert_eq!(r.voxel(0), 2);
        assert!((r.pixel(2.0) - 0.5 * 7.0 / 3.0).abs() < 1e-12);
    }
}
