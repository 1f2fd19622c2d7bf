//! Training prompt sampling: MONAI `monai.apps.vista3d.sampler.sample_prompt_pairs` (regular point sampling).
//!
//! For one label patch it picks the class prompts (foreground classes present in the patch and background
//! classes of the label set absent from it, each trimmed to its maximum), draws positive and negative points for
//! every foreground class (labels 2/3 instead of 0/1 for the special classes), and randomly drops either the
//! class prompts or the points, exactly as the bundle's trainer does before each forward pass.

use anyhow::{ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::{Distribution, Normal};
use tch::{Device, Kind, Tensor};

/// Classes whose points use labels 2 (negative) / 3 (positive): tumours, vessels, trachea (MONAI `SPECIAL_INDEX`).
pub const SPECIAL_INDEX: [i64; 7] = [23, 24, 25, 26, 27, 57, 128];

/// `(negative, positive)` point labels of a class (MONAI `_get_point_label`).
pub fn point_label_pair(class: i64) -> (i64, i64) {
    if SPECIAL_INDEX.contains(&class) {
        (2, 3)
    } else {
        (0, 1)
    }
}

/// The sampling options of the bundle's trainer (`train.json` keys of the same names).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerSettings {
    /// Most points (of each sign) per object.
    pub max_point: usize,
    /// Most prompts in total (`None`: no limit).
    pub max_prompt: Option<usize>,
    /// Most foreground prompts.
    pub max_foreprompt: Option<usize>,
    /// Most background prompts.
    pub max_backprompt: Option<usize>,
    /// Probability of dropping the class prompts (only when a foreground class is present).
    pub drop_label_prob: f64,
    /// Probability of dropping the points (when the class prompts were kept).
    pub drop_point_prob: f64,
    /// Treat class 0 like a foreground class (`not exclude_background`).
    pub include_background: bool,
}

impl Default for SamplerSettings {
    /// `train.json`'s values.
    fn default() -> Self {
        Self {
            max_point: 5,
            max_prompt: None,
            max_foreprompt: None,
            max_backprompt: None,
            drop_label_prob: 0.25,
            drop_point_prob: 0.25,
            include_background: false,
        }
    }
}

/// The prompts of one training step, as the network takes them (all on the label's device).
#[derive(Debug)]
pub struct PromptPairs {
    /// `[B, 1]` int64 class ids for the class head; `None` when the class prompts were dropped.
    pub label_prompt: Option<Tensor>,
    /// `[B, N, 3]` float32 voxel coordinates (padding at 0, 0, 0); `None` when the points were dropped.
    pub points: Option<Tensor>,
    /// `[B, N]` int64 point labels (-1 padding); `None` when the points were dropped.
    pub point_labels: Option<Tensor>,
    /// `[B, 1]` int64: the class of each prompt (the loss target is `labels == prompt_class[k]`).
    pub prompt_class: Tensor,
    /// `prompt_class` as a list.
    pub classes: Vec<i64>,
}

/// One label patch on the host: values in x-major order and the spatial shape.
struct HostLabels {
    values: Vec<i64>,
    shape: [usize; 3],
}

impl HostLabels {
    fn from_tensor(labels: &Tensor) -> Result<Self> {
        let size = labels.size();
        ensure!(
            size.len() >= 3 && size[..size.len() - 3].iter().all(|&s| s == 1),
            "sample_prompt_pairs takes one label patch ([X, Y, Z] or [1, 1, X, Y, Z]), got shape {size:?}"
        );
        let n = size.len();
        let shape = [size[n - 3], size[n - 2], size[n - 1]].map(|s| s as usize);
        let values: Vec<i64> = Vec::try_from(
            labels
                .to_device(Device::Cpu)
                .to_kind(Kind::Int64)
                .contiguous()
                .flatten(0, -1),
        )
        .context("reading the label patch")?;
        Ok(Self { values, shape })
    }

    fn coords(&self, index: usize) -> [usize; 3] {
        let [_, y, z] = self.shape;
        [index / (y * z), (index / z) % y, index % z]
    }
}

/// Classes of `label_set` present in the patch (without 0 unless `include_background`), and the other classes of
/// `label_set`, both in ascending order (the order of Python's small-int sets in MONAI).
fn split_classes(
    present: &[i64],
    label_set: &[i64],
    include_background: bool,
) -> (Vec<i64>, Vec<i64>) {
    let mut set: Vec<i64> = label_set.to_vec();
    set.sort_unstable();
    set.dedup();
    let foreground: Vec<i64> = set
        .iter()
        .copied()
        .filter(|c| present.contains(c) && (include_background || *c != 0))
        .collect();
    let background: Vec<i64> = set
        .iter()
        .copied()
        .filter(|c| !foreground.contains(c))
        .collect();
    (foreground, background)
}

/// Trims the prompt lists as MONAI does: background to `max_backprompt`, foreground to `max_foreprompt` (random
/// subsets), then the total to `max_prompt` (foreground first).
fn trim_prompts<R: Rng>(
    foreground: &mut Vec<i64>,
    background: &mut Vec<i64>,
    s: &SamplerSettings,
    rng: &mut R,
) {
    if let Some(m) = s.max_backprompt {
        if background.len() > m {
            background.shuffle(rng);
            background.truncate(m);
        }
    }
    if let Some(m) = s.max_foreprompt {
        if foreground.len() > m {
            foreground.shuffle(rng);
            foreground.truncate(m);
        }
    }
    if let Some(m) = s.max_prompt {
        if foreground.len() + background.len() > m {
            if foreground.len() > m {
                *foreground = foreground.choose_multiple(rng, m).copied().collect();
                background.clear();
            } else {
                let keep = m - foreground.len();
                *background = background.choose_multiple(rng, keep).copied().collect();
            }
        }
    }
}

/// Draws the numbers of positive and negative points, shared by every object of the call:
/// `min(max_point, int(|N(0, max_point // 2)|) + 1)` and `min(max_point, int(|N(0, max_point // 2)|))`.
fn point_counts<R: Rng>(max_point: usize, rng: &mut R) -> (usize, usize) {
    let sigma = (max_point / 2) as f64;
    let mut draw = || -> usize {
        if sigma == 0.0 {
            return 0;
        }
        let normal = Normal::new(0.0, sigma).expect("finite positive sigma");
        normal.sample(rng).abs() as usize
    };
    let num_p = max_point.min(draw() + 1);
    let num_n = max_point.min(draw());
    (num_p, num_n)
}

/// The `k`-th (0-based) voxel index that is not in the sorted list `positives`.
fn kth_negative(positives: &[usize], k: usize) -> usize {
    // The positives before the answer are those with p_i - i <= k (non-decreasing in i): binary search.
    let (mut lo, mut hi) = (0, positives.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if positives[mid] - mid <= k {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    k + lo
}

/// Points of one foreground object: `num_p` positives drawn with replacement from the object's voxels, `num_n`
/// negatives from the other voxels of the patch, then padding (0, 0, 0) with label -1 up to `num_p + num_n`.
fn object_points<R: Rng>(
    labels: &HostLabels,
    class: i64,
    num_p: usize,
    num_n: usize,
    rng: &mut R,
) -> (Vec<[f32; 3]>, Vec<i64>) {
    let positives: Vec<usize> = labels
        .values
        .iter()
        .enumerate()
        .filter_map(|(i, &v)| (v == class).then_some(i))
        .collect();
    let n_neg_total = labels.values.len() - positives.len();
    let num_pa = positives.len().min(num_p);
    let num_na = n_neg_total.min(num_n);
    let (neg_label, pos_label) = point_label_pair(class);
    let mut coords = Vec::with_capacity(num_p + num_n);
    let mut point_labels = Vec::with_capacity(num_p + num_n);
    let as_f32 = |c: [usize; 3]| c.map(|v| v as f32);
    for _ in 0..num_pa {
        let index = positives[rng.gen_range(0..positives.len())];
        coords.push(as_f32(labels.coords(index)));
        point_labels.push(pos_label);
    }
    for _ in 0..num_na {
        let index = kth_negative(&positives, rng.gen_range(0..n_neg_total));
        coords.push(as_f32(labels.coords(index)));
        point_labels.push(neg_label);
    }
    while coords.len() < num_p + num_n {
        coords.push([0.0; 3]);
        point_labels.push(-1);
    }
    (coords, point_labels)
}

/// MONAI `sample_prompt_pairs` with regular point sampling, for one label patch (`[X, Y, Z]` or `[1, 1, X, Y, Z]`,
/// global class ids). Returns `None` when there is no prompt at all (the trainer skips the step).
pub fn sample_prompt_pairs<R: Rng>(
    labels: &Tensor,
    label_set: &[i64],
    settings: &SamplerSettings,
    rng: &mut R,
) -> Result<Option<PromptPairs>> {
    let host = HostLabels::from_tensor(labels)?;
    let device = labels.device();
    let mut present: Vec<i64> = host.values.clone();
    present.sort_unstable();
    present.dedup();
    let (mut foreground, mut background) =
        split_classes(&present, label_set, settings.include_background);
    trim_prompts(&mut foreground, &mut background, settings, rng);

    let (num_p, num_n) = point_counts(settings.max_point, rng);
    let width = num_p + num_n;
    let mut coords: Vec<f32> = Vec::new();
    let mut point_labels: Vec<i64> = Vec::new();
    for &class in &foreground {
        let (c, l) = object_points(&host, class, num_p, num_n, rng);
        coords.extend(c.iter().flatten());
        point_labels.extend(l);
    }
    for _ in &background {
        coords.extend(std::iter::repeat_n(0.0, width * 3));
        point_labels.extend(std::iter::repeat_n(-1, width));
    }
    if foreground.is_empty() && background.is_empty() {
        return Ok(None);
    }
    let mut classes: Vec<i64> = foreground.iter().chain(&background).copied().collect();
    let mut rows = classes.len();
    let mut label_prompt = Some(());
    let mut with_points = true;
    if rng.gen::<f64>() < settings.drop_label_prob && !foreground.is_empty() {
        // Class prompts dropped: the background rows (all padding) go too.
        label_prompt = None;
        rows = foreground.len();
        classes.truncate(rows);
        coords.truncate(rows * width * 3);
        point_labels.truncate(rows * width);
    } else if rng.gen::<f64>() < settings.drop_point_prob {
        with_points = false;
    }
    let column = |v: &[i64]| Tensor::from_slice(v).view([-1, 1]).to_device(device);
    let (points, point_labels) = if with_points {
        (
            Some(
                Tensor::from_slice(&coords)
                    .view([rows as i64, width as i64, 3])
                    .to_device(device),
            ),
            Some(
                Tensor::from_slice(&point_labels)
                    .view([rows as i64, width as i64])
                    .to_device(device),
            ),
        )
    } else {
        (None, None)
    };
    Ok(Some(PromptPairs {
        label_prompt: label_prompt.map(|()| column(&classes)),
        points,
        point_labels,
        prompt_class: column(&classes),
        classes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// A 12 x 10 x 8 patch: background 0, a block of class 3 and a small block of special class 25.
    fn patch() -> Tensor {
        let labels = Tensor::zeros([12, 10, 8], (Kind::Uint8, Device::Cpu));
        let _ = labels
            .narrow(0, 2, 5)
            .narrow(1, 1, 4)
            .narrow(2, 0, 3)
            .fill_(3);
        let _ = labels
            .narrow(0, 8, 2)
            .narrow(1, 6, 2)
            .narrow(2, 5, 2)
            .fill_(25);
        labels
    }

    fn settings(drop_label: f64, drop_point: f64) -> SamplerSettings {
        SamplerSettings {
            max_point: 5,
            drop_label_prob: drop_label,
            drop_point_prob: drop_point,
            ..Default::default()
        }
    }

    fn value_at(labels: &Tensor, p: &[f32]) -> i64 {
        labels.int64_value(&[p[0] as i64, p[1] as i64, p[2] as i64])
    }

    #[test]
    fn points_lie_inside_and_outside_their_objects() {
        let labels = patch();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut seen_negative = false;
        for _ in 0..200 {
            let pairs = sample_prompt_pairs(&labels, &[0, 3, 25, 7], &settings(0.0, 0.0), &mut rng)
                .unwrap()
                .unwrap();
            // Foreground 3 and 25 first (ascending), then background 0 and 7.
            assert_eq!(pairs.classes, vec![3, 25, 0, 7]);
            assert_eq!(
                Vec::<i64>::try_from(pairs.label_prompt.unwrap().flatten(0, -1)).unwrap(),
                pairs.classes
            );
            let points = pairs.points.unwrap();
            let plabels = pairs.point_labels.unwrap();
            let (b, n) = (points.size()[0], points.size()[1]);
            assert_eq!(b, 4);
            assert_eq!(points.size()[2], 3);
            assert_eq!(plabels.size(), vec![b, n]);
            assert!(
                (1..=10).contains(&n),
                "num_p in 1..=5 plus num_n in 0..=5, got {n}"
            );
            let coords: Vec<f32> = Vec::try_from(points.flatten(0, -1)).unwrap();
            let pl: Vec<i64> = Vec::try_from(plabels.flatten(0, -1)).unwrap();
            for row in 0..b as usize {
                let class = pairs.classes[row];
                let (neg, pos) = point_label_pair(class);
                let mut positives = 0;
                for i in 0..n as usize {
                    let label = pl[row * n as usize + i];
                    let p = &coords[(row * n as usize + i) * 3..][..3];
                    if row >= 2 {
                        // Background prompts: all padding.
                        assert_eq!(label, -1);
                        assert_eq!(p, &[0.0, 0.0, 0.0]);
                    } else if label == pos {
                        positives += 1;
                        assert_eq!(
                            value_at(&labels, p),
                            class,
                            "positive point {p:?} of class {class}"
                        );
                    } else if label == neg {
                        seen_negative = true;
                        assert_ne!(
                            value_at(&labels, p),
                            class,
                            "negative point {p:?} of class {class}"
                        );
                    } else {
                        assert_eq!(label, -1);
                        assert_eq!(p, &[0.0, 0.0, 0.0]);
                    }
                }
                if row < 2 {
                    assert!(
                        positives >= 1,
                        "every foreground object has a positive point"
                    );
                }
            }
            // Special class 25 uses labels 2/3, class 3 uses 0/1.
            assert!(pl[..n as usize].iter().all(|l| [-1, 0, 1].contains(l)));
            assert!(pl[n as usize..2 * n as usize]
                .iter()
                .all(|l| [-1, 2, 3].contains(l)));
        }
        assert!(seen_negative);
    }

    #[test]
    fn padding_when_the_object_is_smaller_than_the_point_count() {
        let labels = Tensor::zeros([6, 6, 6], (Kind::Int64, Device::Cpu));
        let _ = labels.get(2).get(3).get(4).fill_(5);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut padded = false;
        for _ in 0..100 {
            let pairs = sample_prompt_pairs(&labels, &[5], &settings(0.0, 0.0), &mut rng)
                .unwrap()
                .unwrap();
            let pl: Vec<i64> = Vec::try_from(pairs.point_labels.unwrap().flatten(0, -1)).unwrap();
            let coords: Vec<f32> = Vec::try_from(pairs.points.unwrap().flatten(0, -1)).unwrap();
            // Only one positive voxel: at most one positive point, then negatives, then padding.
            assert_eq!(pl.iter().filter(|&&l| l == 1).count(), 1);
            assert_eq!(&coords[..3], &[2.0, 3.0, 4.0]);
            if pl.contains(&-1) {
                padded = true;
                let first_pad = pl.iter().position(|&l| l == -1).unwrap();
                assert!(pl[first_pad..].iter().all(|&l| l == -1));
                assert!(coords[first_pad * 3..].iter().all(|&c| c == 0.0));
            }
        }
        assert!(padded, "num_p > 1 happens and pads with -1");
    }

    #[test]
    fn drops_follow_their_probabilities() {
        let labels = patch();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (mut no_label, mut no_points, trials) = (0, 0, 2000);
        for _ in 0..trials {
            let pairs = sample_prompt_pairs(&labels, &[0, 3, 25], &settings(0.25, 0.25), &mut rng)
                .unwrap()
                .unwrap();
            match (&pairs.label_prompt, &pairs.points) {
                (None, Some(points)) => {
                    no_label += 1;
                    // Background rows are removed with the class prompts.
                    assert_eq!(pairs.classes, vec![3, 25]);
                    assert_eq!(points.size()[0], 2);
                    assert_eq!(pairs.prompt_class.size(), vec![2, 1]);
                }
                (Some(_), None) => {
                    no_points += 1;
                    assert!(pairs.point_labels.is_none());
                    assert_eq!(pairs.classes, vec![3, 25, 0]);
                }
                (Some(_), Some(_)) => assert_eq!(pairs.classes, vec![3, 25, 0]),
                (None, None) => panic!("both prompts dropped"),
            }
        }
        let p_label = no_label as f64 / trials as f64;
        let p_points = no_points as f64 / trials as f64;
        assert!((p_label - 0.25).abs() < 0.04, "label drop rate {p_label}");
        // Points are dropped in 0.75 * 0.25 of the calls.
        assert!(
            (p_points - 0.1875).abs() < 0.04,
            "point drop rate {p_points}"
        );
    }

    #[test]
    fn label_prompts_are_kept_without_foreground_and_background_can_be_included() {
        let labels = Tensor::zeros([4, 4, 4], (Kind::Uint8, Device::Cpu));
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..50 {
            let pairs = sample_prompt_pairs(&labels, &[0, 3], &settings(1.0, 0.0), &mut rng)
                .unwrap()
                .unwrap();
            // No foreground: the class-prompt drop does not apply.
            assert!(pairs.label_prompt.is_some());
            assert_eq!(pairs.classes, vec![0, 3]);
        }
        let s = SamplerSettings {
            include_background: true,
            ..settings(0.0, 0.0)
        };
        let pairs = sample_prompt_pairs(&labels, &[0, 3], &s, &mut rng)
            .unwrap()
            .unwrap();
        // Class 0 is now a foreground object with real points.
        assert_eq!(pairs.classes, vec![0, 3]);
        let pl: Vec<i64> = Vec::try_from(pairs.point_labels.unwrap().get(0)).unwrap();
        assert_eq!(pl[0], 1);
        // Nothing to prompt at all.
        let none = SamplerSettings {
            max_backprompt: Some(0),
            ..settings(0.0, 0.0)
        };
        assert!(sample_prompt_pairs(&labels, &[0, 3], &none, &mut rng)
            .unwrap()
            .is_none());
    }

    #[test]
    fn prompt_limits() {
        let labels = Tensor::arange(64, (Kind::Int64, Device::Cpu))
            .view([4, 4, 4])
            .remainder(6);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let s = SamplerSettings {
            max_foreprompt: Some(3),
            max_backprompt: Some(1),
            ..settings(0.0, 0.0)
        };
        let pairs = sample_prompt_pairs(&labels, &[1, 2, 3, 4, 5, 9, 10], &s, &mut rng)
            .unwrap()
            .unwrap();
        assert_eq!(pairs.classes.len(), 4);
        assert!(pairs.classes[..3].iter().all(|c| (1..=5).contains(c)));
        assert!([9, 10].contains(&pairs.classes[3]));
        let s = SamplerSettings {
            max_prompt: Some(2),
            ..settings(0.0, 0.0)
        };
        let pairs = sample_prompt_pairs(&labels, &[1, 2, 3, 9], &s, &mut rng)
            .unwrap()
            .unwrap();
        assert_eq!(pairs.classes.len(), 2);
        assert!(
            pairs.classes.iter().all(|c| (1..=3).contains(c)),
            "foreground first"
        );
    }

    #[test]
    fn kth_negative_skips_positives() {
        let positives = [0, 1, 4, 5, 9];
        let negatives: Vec<usize> = (0..12).filter(|i| !positives.contains(i)).collect();
        for (k, &expected) in negatives.iter().enumerate() {
            assert_eq!(kth_negative(&positives, k), expected);
        }
    }

    #[test]
    fn point_counts_are_bounded() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..500 {
            let (p, n) = point_counts(5, &mut rng);
            assert!((1..=5).contains(&p) && n <= 5);
        }
        assert_eq!(point_counts(1, &mut rng), (1, 0));
    }
}
