//! The random part of the training transforms, with MONAI's semantics:
//! `RandCropByLabelClassesd` (class choice by ratios among the classes present, a random voxel of that class as
//! centre, MONAI's `correct_crop_centers` clamping, `ClassesToIndicesd`'s `max_samples_per_class` subsampling),
//! `ResizeWithPadOrCropd`, `SpatialPadd` (symmetric, constant 0), `RandScaleIntensityd` and `RandShiftIntensityd`.
//!
//! Random numbers come from `rand`'s `StdRng`; draws are not numpy's (different generator), but every draw is
//! seeded, so a run is reproducible.

use anyhow::{bail, ensure, Result};
use ndarray::{s, Array3, ArrayView3};
use rand::Rng;

/// Number of voxels of each label value.
pub fn class_counts(label: ArrayView3<u8>) -> [usize; 256] {
    let mut c = [0usize; 256];
    for &v in label.iter() {
        c[v as usize] += 1;
    }
    c
}

/// How `RandCropByLabelClassesd` picks patches.
#[derive(Debug, Clone, PartialEq)]
pub struct CropSettings {
    /// Patch size (`spatial_size`).
    pub patch: [usize; 3],
    /// Classes `0..num_classes` can be centres (`num_classes`).
    pub num_classes: usize,
    /// Relative frequency of each class (`ratios`; `None` = all equal). Classes absent from the label get 0.
    pub ratios: Option<Vec<f64>>,
    /// `ClassesToIndicesd(max_samples_per_class)`: only this many voxels per class, evenly spaced in index order,
    /// can be centres (`None` = all voxels).
    pub max_samples_per_class: Option<usize>,
}

/// Picks a class with probability proportional to its ratio, classes without voxels excluded
/// (`generate_label_classes_crop_centers`).
pub fn choose_class<R: Rng>(counts: &[usize; 256], s: &CropSettings, rng: &mut R) -> Result<usize> {
    ensure!(
        (1..=256).contains(&s.num_classes),
        "num_classes for the crop must be in 1..=256, got {}",
        s.num_classes
    );
    let mut w: Vec<f64> = match &s.ratios {
        Some(r) => {
            ensure!(
                r.len() == s.num_classes,
                "crop ratios must have one entry per class ({}), got {}",
                s.num_classes,
                r.len()
            );
            ensure!(
                r.iter().all(|x| *x >= 0.0 && x.is_finite()),
                "crop ratios must be non-negative, got {r:?}"
            );
            r.clone()
        }
        None => vec![1.0; s.num_classes],
    };
    for (c, wc) in w.iter_mut().enumerate() {
        if counts[c] == 0 {
            *wc = 0.0;
        }
    }
    let total: f64 = w.iter().sum();
    if total <= 0.0 {
        bail!(
            "no voxel of any class 0..{} with a positive ratio: cannot choose a patch centre",
            s.num_classes
        );
    }
    let mut x = rng.gen::<f64>() * total;
    for (c, wc) in w.iter().enumerate() {
        if *wc > 0.0 {
            if x < *wc {
                return Ok(c);
            }
            x -= wc;
        }
    }
    Ok(w.iter().rposition(|wc| *wc > 0.0).unwrap_or(0))
}

/// The position in a class's voxel list of the `r`-th of `m` subsampled voxels out of `n`:
/// `np.round(np.linspace(0, n - 1, m))[r]` (round half to even).
pub fn subsample_position(n: usize, m: usize, r: usize) -> usize {
    if m <= 1 {
        return 0;
    }
    if r + 1 == m {
        return n - 1;
    }
    let step = (n - 1) as f64 / (m - 1) as f64;
    (r as f64 * step).round_ties_even() as usize
}

/// The `k`-th voxel (in C order of `[x, y, z]`, as `np.nonzero` lists them) whose value is `class`.
pub fn kth_voxel_of_class(label: ArrayView3<u8>, class: u8, k: usize) -> Option<[usize; 3]> {
    let d = label.shape();
    let (ny, nz) = (d[1], d[2]);
    let mut seen = 0usize;
    if let Some(sl) = label.as_slice() {
        for (i, &v) in sl.iter().enumerate() {
            if v == class {
                if seen == k {
                    return Some([i / (ny * nz), (i / nz) % ny, i % nz]);
                }
                seen += 1;
            }
        }
        return None;
    }
    label
        .indexed_iter()
        .filter(|(_, &v)| v == class)
        .nth(k)
        .map(|((x, y, z), _)| [x, y, z])
}

/// A random voxel of `class` (one of the first `max_samples_per_class` evenly spaced ones when set).
pub fn random_voxel_of_class<R: Rng>(
    label: ArrayView3<u8>,
    count: usize,
    class: u8,
    max_samples_per_class: Option<usize>,
    rng: &mut R,
) -> Result<[usize; 3]> {
    ensure!(count > 0, "class {class} has no voxel");
    let m = match max_samples_per_class {
        Some(m) if m > 0 && count > m && count > 1 => m,
        _ => count,
    };
    let r = rng.gen_range(0..m);
    let k = if m == count {
        r
    } else {
        subsample_position(count, m, r)
    };
    kth_voxel_of_class(label, class, k)
        .ok_or_else(|| anyhow::anyhow!("class {class}: voxel {k} of {count} not found"))
}

/// MONAI's `correct_crop_centers(allow_smaller=True)`: moves a centre so that the patch lies inside the volume
/// (`valid_start = floor(patch / 2)`, `valid_end = uint16(shape + 1 - patch / 2)`, clamp to
/// `[valid_start, valid_end - 1]`). A side smaller than the patch is treated as the patch's side.
pub fn correct_crop_center(center: [usize; 3], patch: [usize; 3], shape: [usize; 3]) -> [usize; 3] {
    std::array::from_fn(|a| {
        let s = patch[a].min(shape[a]);
        let valid_start = s / 2;
        let mut valid_end = ((shape[a] + 1) as f64 - s as f64 / 2.0) as usize;
        if valid_start == valid_end {
            valid_end += 1;
        }
        center[a].max(valid_start).min(valid_end - 1)
    })
}

/// The crop slices of `SpatialCrop(roi_center, roi_size)`: `start = max(c - size // 2, 0)`, `end = start + size`
/// (clipped to the volume).
pub fn crop_range(
    center: [usize; 3],
    patch: [usize; 3],
    shape: [usize; 3],
) -> ([usize; 3], [usize; 3]) {
    let start: [usize; 3] = std::array::from_fn(|a| center[a].saturating_sub(patch[a] / 2));
    let end: [usize; 3] = std::array::from_fn(|a| (start[a] + patch[a]).min(shape[a]));
    (start, end)
}

fn slice3<T: Clone>(a: ArrayView3<T>, start: [usize; 3], end: [usize; 3]) -> Array3<T> {
    a.slice(s![start[0]..end[0], start[1]..end[1], start[2]..end[2]])
        .to_owned()
}

/// `SpatialPad(spatial_size, method="symmetric", mode="constant")` with value `fill`: sides smaller than
/// `target` get `(target - d) // 2` voxels before and the rest after; larger sides are kept.
pub fn spatial_pad<T: Clone>(a: ArrayView3<T>, target: [usize; 3], fill: T) -> Array3<T> {
    let d = a.shape();
    let d = [d[0], d[1], d[2]];
    if (0..3).all(|i| d[i] >= target[i]) {
        return a.to_owned();
    }
    let out_d: [usize; 3] = std::array::from_fn(|i| d[i].max(target[i]));
    let before: [usize; 3] = std::array::from_fn(|i| (out_d[i] - d[i]) / 2);
    let mut out = Array3::from_elem((out_d[0], out_d[1], out_d[2]), fill);
    out.slice_mut(s![
        before[0]..before[0] + d[0],
        before[1]..before[1] + d[1],
        before[2]..before[2] + d[2]
    ])
    .assign(&a);
    out
}

/// `ResizeWithPadOrCrop(spatial_size)`: centre crop (`CenterSpatialCrop`) of larger sides, then symmetric
/// constant padding of smaller ones.
pub fn resize_with_pad_or_crop<T: Clone>(
    a: ArrayView3<T>,
    target: [usize; 3],
    fill: T,
) -> Array3<T> {
    let d = a.shape();
    let shape = [d[0], d[1], d[2]];
    let center: [usize; 3] = std::array::from_fn(|i| shape[i] / 2);
    let size: [usize; 3] = std::array::from_fn(|i| target[i].min(shape[i]));
    let (start, end) = crop_range(center, size, shape);
    let cropped = a.slice(s![start[0]..end[0], start[1]..end[1], start[2]..end[2]]);
    spatial_pad(cropped, target, fill)
}

/// One random patch: the class chosen, its centre voxel before and after correction, and the crop start.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchChoice {
    pub class: usize,
    pub voxel: [usize; 3],
    pub center: [usize; 3],
    pub start: [usize; 3],
}

/// `RandCropByLabelClassesd` + `ResizeWithPadOrCropd` for one patch of an image/label pair of the same shape.
pub fn rand_crop_by_label_classes<R: Rng>(
    image: ArrayView3<f32>,
    label: ArrayView3<u8>,
    counts: &[usize; 256],
    s: &CropSettings,
    rng: &mut R,
) -> Result<(Array3<f32>, Array3<u8>, PatchChoice)> {
    ensure!(
        image.shape() == label.shape(),
        "image {:?} and label {:?} differ in shape",
        image.shape(),
        label.shape()
    );
    let d = label.shape();
    let shape = [d[0], d[1], d[2]];
    let class = choose_class(counts, s, rng)?;
    let voxel = random_voxel_of_class(
        label,
        counts[class],
        class as u8,
        s.max_samples_per_class,
        rng,
    )?;
    let center = correct_crop_center(voxel, s.patch, shape);
    let (start, end) = crop_range(center, s.patch, shape);
    let img = resize_with_pad_or_crop(slice3(image, start, end).view(), s.patch, 0.0);
    let lab = resize_with_pad_or_crop(slice3(label, start, end).view(), s.patch, 0u8);
    Ok((
        img,
        lab,
        PatchChoice {
            class,
            voxel,
            center,
            start,
        },
    ))
}

/// `RandScaleIntensityd(prob, factors)` then `RandShiftIntensityd(prob, offsets)` (the bundle's train.json: 0.1
/// each): with probability `scale_prob`, `x * (1 + f)` with `f ~ U(-scale_factor, scale_factor)`; then with
/// probability `shift_prob`, `x + o` with `o ~ U(-shift_offset, shift_offset)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IntensityAugment {
    pub scale_prob: f64,
    pub scale_factor: f64,
    pub shift_prob: f64,
    pub shift_offset: f64,
}

impl IntensityAugment {
    /// The bundle's train.json values.
    pub const BUNDLE: IntensityAugment = IntensityAugment {
        scale_prob: 0.1,
        scale_factor: 0.1,
        shift_prob: 0.1,
        shift_offset: 0.1,
    };

    /// Applies both augmentations in place; returns the (factor, offset) applied, if any.
    pub fn apply<R: Rng>(
        &self,
        image: &mut Array3<f32>,
        rng: &mut R,
    ) -> (Option<f32>, Option<f32>) {
        let mut applied = (None, None);
        if rng.gen::<f64>() < self.scale_prob {
            let f = rng.gen_range(-self.scale_factor..=self.scale_factor) as f32;
            image.mapv_inplace(|x| x * (1.0 + f));
            applied.0 = Some(f);
        }
        if rng.gen::<f64>() < self.shift_prob {
            let o = rng.gen_range(-self.shift_offset..=self.shift_offset) as f32;
            image.mapv_inplace(|x| x + o);
            applied.1 = Some(o);
        }
        applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn label_with_blob(shape: [usize; 3]) -> Array3<u8> {
        Array3::from_shape_fn((shape[0], shape[1], shape[2]), |(x, y, z)| {
            if x < 3 && y < 2 && z < 4 {
                3
            } else if x + 1 == shape[0] && z + 1 == shape[2] {
                7
            } else {
                0
            }
        })
    }

    #[test]
    fn centres_stay_inside_and_patches_contain_the_class() {
        let shape = [20, 17, 23];
        let label = label_with_blob(shape);
        let image = label.mapv(|v| v as f32);
        let counts = class_counts(label.view());
        let s = CropSettings {
            patch: [8, 9, 6],
            num_classes: 255,
            ratios: None,
            max_samples_per_class: None,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut seen = [0usize; 256];
        for _ in 0..600 {
            let (img, lab, c) =
                rand_crop_by_label_classes(image.view(), label.view(), &counts, &s, &mut rng)
                    .unwrap();
            assert_eq!(lab.shape(), &[8, 9, 6]);
            assert_eq!(img, lab.mapv(|v| v as f32));
            assert_eq!(label[c.voxel] as usize, c.class);
            for (a, &side) in shape.iter().enumerate() {
                assert!(c.start[a] + s.patch[a] <= side, "{c:?}");
                // the chosen voxel is inside the patch
                assert!(
                    c.voxel[a] >= c.start[a] && c.voxel[a] < c.start[a] + s.patch[a],
                    "{c:?}"
                );
            }
            assert!(lab.iter().any(|&v| v as usize == c.class));
            seen[c.class] += 1;
        }
        // Three classes present (0, 3, 7), equal ratios: each about 1/3.
        for c in [0, 3, 7] {
            assert!(
                (150..250).contains(&seen[c]),
                "class {c}: {} of 600",
                seen[c]
            );
        }
        assert_eq!(seen.iter().sum::<usize>(), 600);
    }

    #[test]
    fn ratios_are_respected() {
        let label = label_with_blob([10, 10, 10]);
        let counts = class_counts(label.view());
        let mut ratios = vec![0.0; 8];
        ratios[0] = 1.0;
        ratios[3] = 3.0;
        ratios[5] = 100.0; // absent: ignored
        let s = CropSettings {
            patch: [4, 4, 4],
            num_classes: 8,
            ratios: Some(ratios),
            max_samples_per_class: None,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = 4000;
        let threes = (0..n)
            .filter(|_| choose_class(&counts, &s, &mut rng).unwrap() == 3)
            .count();
        let frac = threes as f64 / n as f64;
        // binomial(4000, 0.75): sd 0.0068
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
        let empty = [0usize; 256];
        assert!(choose_class(&empty, &s, &mut rng).is_err());
        let bad = CropSettings {
            ratios: Some(vec![1.0; 3]),
            ..s
        };
        assert!(choose_class(&counts, &bad, &mut rng).is_err());
    }

    #[test]
    fn monai_center_correction() {
        // valid_start = 64, valid_end = uint16(129 - 64) = 65: a 128 patch in 128 voxels has one centre.
        assert_eq!(
            correct_crop_center([0, 127, 64], [128; 3], [128; 3]),
            [64, 64, 64]
        );
        // odd patch 5 in 10: centres 2..=7
        assert_eq!(correct_crop_center([0, 9, 5], [5; 3], [10; 3]), [2, 7, 5]);
        let (st, en) = crop_range([7, 2, 5], [5; 3], [10; 3]);
        assert_eq!((st, en), ([5, 0, 3], [10, 5, 8]));
    }

    #[test]
    fn subsampling_matches_numpy_linspace_round() {
        // np.round(np.linspace(0, 9, 4)) = [0, 3, 6, 9]; np.round(np.linspace(0, 4, 3)) = [0, 2, 4]
        assert_eq!(
            (0..4)
                .map(|r| subsample_position(10, 4, r))
                .collect::<Vec<_>>(),
            vec![0, 3, 6, 9]
        );
        // np.round(np.linspace(0, 5, 3)) = [0., 2., 5.] (2.5 rounds to even)
        assert_eq!(
            (0..3)
                .map(|r| subsample_position(6, 3, r))
                .collect::<Vec<_>>(),
            vec![0, 2, 5]
        );
        let l = Array3::from_shape_fn((2, 2, 2), |(x, y, z)| (x + y + z == 1) as u8);
        assert_eq!(kth_voxel_of_class(l.view(), 1, 0), Some([0, 0, 1]));
        assert_eq!(kth_voxel_of_class(l.view(), 1, 2), Some([1, 0, 0]));
        assert_eq!(kth_voxel_of_class(l.view(), 1, 3), None);
    }

    #[test]
    fn padding_is_symmetric() {
        let a = Array3::from_elem((3, 4, 5), 1u8);
        let p = spatial_pad(a.view(), [6, 4, 2], 0);
        assert_eq!(p.shape(), &[6, 4, 5]);
        assert_eq!(p[[0, 0, 0]], 0);
        assert_eq!(p[[1, 0, 0]], 1); // (6 - 3) // 2 = 1 before
        assert_eq!(p[[4, 0, 0]], 0);
        let r = resize_with_pad_or_crop(a.view(), [2, 6, 5], 9);
        assert_eq!(r.shape(), &[2, 6, 5]);
        assert_eq!(r[[0, 0, 0]], 9);
        assert_eq!(r[[0, 1, 0]], 1);
    }

    #[test]
    fn intensity_augmentation_probabilities() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let aug = IntensityAugment::BUNDLE;
        let mut scaled = 0;
        for _ in 0..2000 {
            let mut x = Array3::from_elem((2, 2, 2), 0.5f32);
            let (f, o) = aug.apply(&mut x, &mut rng);
            let expect = 0.5 * (1.0 + f.unwrap_or(0.0)) + o.unwrap_or(0.0);
            assert!((x[[0, 0, 0]] - expect).abs() < 1e-6);
            if let Some(f) = f {
                assert!(f.abs() <= 0.1);
                scaled += 1;
            }
        }
        assert!((120..280).contains(&scaled), "{scaled}");
    }
}
