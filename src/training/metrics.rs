//! Dice with MONAI's semantics (`DiceMetric` / `MeanDice`: `include_background=False`, `ignore_empty=True` -> NaN
//! for an empty ground truth, NaN excluded from means) and MONAI's `MetricsSaver` report files
//! (`monai/handlers/utils.py: write_metrics_reports`).
//!
//! Report format, as MONAI writes it with the bundle's settings (`metric_details "*"`, `summary_ops "*"`):
//! - `metrics.csv`: `<name>,<value>` per line, the value as Python prints a float (`str(float)`);
//! - `<name>_raw.csv`: `filename,class0,...,mean`, one row per image, values as numpy prints a float32 (`str`);
//!   `mean` is the NaN-excluding mean of the row;
//! - `<name>_summary.csv`: `class,mean,median,max,min,90percentile,std,notnans`, one row per class column and one
//!   for `mean`, NaN-excluding, formatted `{:.4f}`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

use crate::fsutil::write_atomic;

/// Dice `2|P ∩ G| / (|P| + |G|)` of two masks of the same shape (non-zero = inside); NaN when the ground truth is
/// empty (MONAI `ignore_empty=True`).
pub fn dice(pred: &Tensor, gt: &Tensor) -> f64 {
    let p = pred.ne(0);
    let g = gt.ne(0);
    let g_sum = g.sum(Kind::Int64).int64_value(&[]);
    if g_sum == 0 {
        return f64::NAN;
    }
    let p_sum = p.sum(Kind::Int64).int64_value(&[]);
    let inter = p.logical_and(&g).sum(Kind::Int64).int64_value(&[]);
    2.0 * inter as f64 / (g_sum + p_sum) as f64
}

/// The classes MONAI's `DiceHelper(include_background=False, num_classes)` evaluates: `1..num_classes`, or `[1]`
/// when `num_classes <= 1`.
pub fn evaluated_classes(num_classes: usize) -> Vec<usize> {
    if num_classes > 1 {
        (1..num_classes).collect()
    } else {
        vec![1]
    }
}

/// `MeanDice(include_background=False, num_classes=K)` on one image: a multi-channel binary prediction `[K, ...]`
/// (channel `c` = class `c`) against a sequential ground truth (`[...]` or `[1, ...]`, values `0..K`). Returns one
/// value per evaluated class ([`evaluated_classes`]), NaN where the ground truth lacks the class.
pub fn per_class_dice(
    pred_channels: &Tensor,
    gt_sequential: &Tensor,
    num_classes: usize,
) -> Vec<f64> {
    let gt = squeeze_channel(gt_sequential);
    evaluated_classes(num_classes)
        .into_iter()
        .map(|c| {
            if (c as i64) < pred_channels.size()[0] {
                dice(&pred_channels.get(c as i64), &gt.eq(c as i64))
            } else {
                // No channel for this class: an empty prediction.
                dice(&gt.eq(c as i64).zeros_like(), &gt.eq(c as i64))
            }
        })
        .collect()
}

/// As [`per_class_dice`] for a single-channel label map prediction (class ids `0..K`, e.g. the evaluation's
/// relabelled prediction; 255 = not computed counts as no class).
pub fn per_class_dice_labels(
    pred_labels: &Tensor,
    gt_sequential: &Tensor,
    num_classes: usize,
) -> Vec<f64> {
    let pred = squeeze_channel(pred_labels);
    let gt = squeeze_channel(gt_sequential);
    evaluated_classes(num_classes)
        .into_iter()
        .map(|c| dice(&pred.eq(c as i64), &gt.eq(c as i64)))
        .collect()
}

fn squeeze_channel(t: &Tensor) -> Tensor {
    if t.dim() == 4 && t.size()[0] == 1 {
        t.squeeze_dim(0)
    } else {
        t.shallow_clone()
    }
}

/// Mean of the non-NaN values; NaN when there are none.
pub fn nanmean(v: &[f64]) -> f64 {
    let (s, n) = v
        .iter()
        .filter(|x| !x.is_nan())
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

/// MONAI's `do_metric_reduction(MEAN)` over images x classes: the NaN-excluding mean of each image's classes, then
/// the mean over images that have one; 0 when no value is defined.
pub fn mean_reduction(rows: &[Vec<f64>]) -> f64 {
    let per_image: Vec<f64> = rows
        .iter()
        .map(|r| nanmean(r))
        .filter(|m| !m.is_nan())
        .collect();
    if per_image.is_empty() {
        0.0
    } else {
        per_image.iter().sum::<f64>() / per_image.len() as f64
    }
}

/// `np.nanpercentile(x, q)` (linear interpolation between closest ranks); NaN when all values are NaN.
pub fn nanpercentile(v: &[f64], q: f64) -> f64 {
    let mut x: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if x.is_empty() {
        return f64::NAN;
    }
    x.sort_by(f64::total_cmp);
    let pos = (x.len() - 1) as f64 * q / 100.0;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(x.len() - 1);
    let t = pos - lo as f64;
    let (a, b) = (x[lo], x[hi]);
    // numpy's _lerp: a + (b - a) * t, computed from b for t >= 0.5
    if t >= 0.5 {
        b - (b - a) * (1.0 - t)
    } else {
        a + (b - a) * t
    }
}

/// `np.nanstd` (population standard deviation) of the non-NaN values; NaN when there are none.
pub fn nanstd(v: &[f64]) -> f64 {
    let m = nanmean(v);
    if m.is_nan() {
        return f64::NAN;
    }
    let x: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    (x.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / x.len() as f64).sqrt()
}

/// `np.nanmedian`.
pub fn nanmedian(v: &[f64]) -> f64 {
    nanpercentile(v, 50.0)
}

/// Formats like Python's `repr(float)` / `str(float)`: shortest round-trip digits, `.0` on integers, exponent
/// form below 1e-4 and from 1e16 (`1e-05`), `nan` / `inf`.
pub fn python_float(x: f64) -> String {
    shortest_repr(x, format!("{x:e}"))
}

/// Formats like numpy's `str(np.float32(x))`: shortest digits that round-trip in float32, with Python's layout.
pub fn numpy_f32(x: f32) -> String {
    shortest_repr(x as f64, format!("{x:e}"))
}

fn shortest_repr(x: f64, sci: String) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // `sci` is Rust's shortest round-trip form "d.ddde[-]N".
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let neg = mant.starts_with('-');
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if neg { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let s = if exp >= 0 {
            if n > exp + 1 {
                format!(
                    "{}.{}",
                    &digits[..(exp + 1) as usize],
                    &digits[(exp + 1) as usize..]
                )
            } else {
                format!("{}{}.0", digits, "0".repeat((exp + 1 - n) as usize))
            }
        } else {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.clone()
        };
        let es = if exp < 0 { "-" } else { "+" };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    }
}

/// `f'{x:.4f}'` of a float (Python prints `nan` for NaN).
fn fixed4(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else {
        format!("{x:.4}")
    }
}

/// Per-image metric values of one metric, as `MetricsSaver` receives them.
#[derive(Debug, Clone)]
pub struct MetricDetails {
    /// Metric name, e.g. `val_mean_dice`.
    pub name: String,
    /// Image names (the `filename` column: the image path as given).
    pub images: Vec<String>,
    /// One row per image, one value per evaluated class (float32 in MONAI).
    pub values: Vec<Vec<f64>>,
}

impl MetricDetails {
    /// The aggregated metric (MONAI `MEAN` reduction), as MONAI's float32 result.
    pub fn aggregate(&self) -> f64 {
        mean_reduction(&self.values) as f32 as f64
    }
}

/// Writes `metrics.csv`, `<name>_raw.csv` and `<name>_summary.csv` into `dir` as MONAI's `write_metrics_reports`
/// (each file atomically).
pub fn write_metrics_reports(dir: &Path, details: &MetricDetails) -> Result<()> {
    ensure!(
        details.images.len() == details.values.len(),
        "{} image names for {} metric rows",
        details.images.len(),
        details.values.len()
    );
    let n_cls = details.values.first().map_or(1, Vec::len);
    ensure!(
        details.values.iter().all(|r| r.len() == n_cls),
        "metric rows have different numbers of classes"
    );
    write_atomic(
        &dir.join("metrics.csv"),
        format!("{},{}\n", details.name, python_float(details.aggregate())).as_bytes(),
    )?;
    // float32 values plus their row mean (np.nanmean over a float32 array stays float32)
    let rows: Vec<Vec<f32>> = details
        .values
        .iter()
        .map(|r| {
            let mut r32: Vec<f32> = r.iter().map(|&x| x as f32).collect();
            let m = nanmean(&r32.iter().map(|&x| x as f64).collect::<Vec<_>>());
            r32.push(m as f32);
            r32
        })
        .collect();
    let mut labels: Vec<String> = (0..n_cls).map(|i| format!("class{i}")).collect();
    labels.push("mean".into());
    let mut raw = format!("filename,{}\n", labels.join(","));
    for (name, r) in details.images.iter().zip(&rows) {
        let cells: Vec<String> = r.iter().map(|&x| numpy_f32(x)).collect();
        let _ = writeln!(raw, "{name},{}", cells.join(","));
    }
    write_atomic(
        &dir.join(format!("{}_raw.csv", details.name)),
        raw.as_bytes(),
    )?;
    let ops = [
        "mean",
        "median",
        "max",
        "min",
        "90percentile",
        "std",
        "notnans",
    ];
    let mut summary = format!("class,{}\n", ops.join(","));
    for (c, label) in labels.iter().enumerate() {
        let col: Vec<f64> = rows.iter().map(|r| r[c] as f64).collect();
        let valid: Vec<f64> = col.iter().copied().filter(|x| !x.is_nan()).collect();
        let vals: Vec<String> = ops
            .iter()
            .map(|op| {
                let v = match *op {
                    "mean" => nanmean(&col),
                    "median" => nanmedian(&col),
                    "max" => valid.iter().copied().fold(f64::NAN, f64::max),
                    "min" => valid.iter().copied().fold(f64::NAN, f64::min),
                    "90percentile" => nanpercentile(&col, 90.0),
                    "std" => nanstd(&col),
                    _ => valid.len() as f64,
                };
                // numpy computes on float32
                fixed4(if *op == "notnans" { v } else { v as f32 as f64 })
            })
            .collect();
        let _ = writeln!(summary, "{label},{}", vals.join(","));
    }
    write_atomic(
        &dir.join(format!("{}_summary.csv", details.name)),
        summary.as_bytes(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dice_of_identical_masks_is_one_and_empty_gt_is_nan() {
        let a = Tensor::from_slice(&[0u8, 1, 1, 0, 1]).view([1, 5]);
        assert_eq!(dice(&a, &a), 1.0);
        let b = Tensor::from_slice(&[0u8, 1, 0, 0, 0]).view([1, 5]);
        assert!((dice(&a, &b) - 2.0 / 4.0).abs() < 1e-12);
        assert!(dice(&a, &a.zeros_like()).is_nan());
        // empty prediction, non-empty gt: 0
        assert_eq!(dice(&a.zeros_like(), &a), 0.0);
    }

    #[test]
    fn per_class_follows_monai_dice_helper() {
        // GT classes 0, 1, 2 (sequential), 3 channels; class 2 absent from gt -> NaN
        let gt = Tensor::from_slice(&[0i64, 1, 1, 0, 0, 0]).view([1, 1, 6]);
        let pred = Tensor::from_slice(&[1u8, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0])
            .view([3, 1, 6]);
        let d = per_class_dice(&pred, &gt, 3);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0], 1.0);
        assert!(d[1].is_nan());
        // single-channel label prediction, num_classes 1 -> class 1 only
        let pl = Tensor::from_slice(&[0i64, 1, 0, 0, 0, 255]).view([1, 1, 6]);
        let d = per_class_dice_labels(&pl, &gt, 1);
        assert!((d[0] - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(per_class_dice_labels(&gt, &gt, 2), vec![1.0]);
        assert_eq!(evaluated_classes(1), vec![1]);
        assert_eq!(evaluated_classes(3), vec![1, 2]);
    }

    #[test]
    fn reductions() {
        let nan = f64::NAN;
        assert_eq!(nanmean(&[1.0, nan, 0.5]), 0.75);
        assert!(nanmean(&[nan]).is_nan());
        // per image: [1.0, 0.5] -> 0.75, [nan] dropped, [0.25] -> 0.25 => 0.5
        assert_eq!(
            mean_reduction(&[vec![1.0, 0.5], vec![nan, nan], vec![0.25, nan]]),
            0.5
        );
        assert_eq!(mean_reduction(&[vec![nan]]), 0.0);
        // np.percentile([1, 2, 3, 4], 90) = 3.7
        assert!((nanpercentile(&[4.0, nan, 1.0, 2.0, 3.0], 90.0) - 3.7).abs() < 1e-12);
        assert_eq!(nanmedian(&[1.0, 3.0, 2.0, 10.0]), 2.5);
        assert!((nanstd(&[1.0, 3.0, nan]) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn float_formatting_matches_python_and_numpy() {
        assert_eq!(python_float(0.5), "0.5");
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.12345679104328156), "0.12345679104328156");
        assert_eq!(python_float(9.999999747378752e-06), "9.999999747378752e-06");
        assert_eq!(python_float(0.00025), "0.00025");
        assert_eq!(python_float(1e16), "1e+16");
        assert_eq!(python_float(123.0), "123.0");
        assert_eq!(python_float(f64::NAN), "nan");
        assert_eq!(numpy_f32(0.123_456_79), "0.12345679");
        assert_eq!(numpy_f32(1e-5), "1e-05");
        assert_eq!(numpy_f32(1.0), "1.0");
        assert_eq!(numpy_f32(0.99999994), "0.99999994");
        assert_eq!(numpy_f32(0.0), "0.0");
        assert_eq!(numpy_f32(f32::NAN), "nan");
        assert_eq!(fixed4(0.03125), "0.0312");
    }

    #[test]
    fn reports_have_monai_layout() {
        let dir = std::env::temp_dir().join(format!("vista3d_metrics_{}", std::process::id()));
        let d = MetricDetails {
            name: "val_mean_dice".into(),
            images: vec!["/a/x.nii.gz".into(), "/a/y.nii.gz".into()],
            values: vec![vec![0.5], vec![f64::NAN]],
        };
        write_metrics_reports(&dir, &d).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("metrics.csv"), "val_mean_dice,0.5\n");
        assert_eq!(
            read("val_mean_dice_raw.csv"),
            "filename,class0,mean\n/a/x.nii.gz,0.5,0.5\n/a/y.nii.gz,nan,nan\n"
        );
        assert_eq!(
            read("val_mean_dice_summary.csv"),
            "class,mean,median,max,min,90percentile,std,notnans\n\
             class0,0.5000,0.5000,0.5000,0.5000,0.5000,0.0000,1.0000\n\
             mean,0.5000,0.5000,0.5000,0.5000,0.5000,0.0000,1.0000\n"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
