//! `vista3d bench`: the bundle's benchmark table — model computation (one window, random input) and end to end
//! (sliding window over a random volume of a CT's processed size, postprocessed to labels) per method, with
//! speedups against torch fp32 and amp against TensorRT fp16.

use std::time::Instant;

use anyhow::{ensure, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::engines::Method;
use crate::inference::WindowNetwork;
use crate::model::ForwardArgs;
use crate::numerics::relative_error;
use crate::prompts::{LabelSpec, RequestPrompts};
use crate::segmenter::{device_name, Request, SegmentError, Segmenter};
use crate::volume::{Volume, IDENTITY};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Methods in table order.
    pub methods: Vec<Method>,
    /// Processed volume size of the end-to-end run (`None`: model computation only).
    pub volume: Option<[usize; 3]>,
    /// Label prompts per request.
    pub labels: Vec<i64>,
    /// Timed runs of the model computation (median reported).
    pub runs: usize,
    /// Timed end-to-end runs.
    pub e2e_runs: usize,
    /// Untimed runs first.
    pub warmup: usize,
}

/// Timings of one method, or why it cannot run here.
#[derive(Debug, Clone, Serialize)]
pub struct MethodResult {
    pub method: Method,
    /// `None` when the method cannot run on this machine.
    pub model_ms: Option<Stats>,
    pub end_to_end_s: Option<Stats>,
    /// What actually ran (a method falls back when an engine fails mid-run).
    pub ran: Vec<Method>,
    pub unavailable: Option<String>,
    /// max |logits - fp32 logits| / max |fp32 logits| on the timed window (when fp32 ran first).
    pub rel_error_vs_fp32: Option<f64>,
}

/// Median, min and max of timed runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Stats {
    fn of(mut v: Vec<f64>) -> Option<Stats> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            0.5 * (v[n / 2 - 1] + v[n / 2])
        };
        Some(Stats {
            median,
            min: v[0],
            max: v[n - 1],
            runs: n,
        })
    }
}

/// The whole benchmark: where it ran and one row per method.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub threads: i32,
    pub width: i64,
    pub patch_size: [usize; 3],
    pub volume: Option<[usize; 3]>,
    pub labels: Vec<i64>,
    pub results: Vec<MethodResult>,
}

fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Runs the benchmark through the segmenter: the model computation on one window through the request's network,
/// and end to end as a request on a random volume of the processed size (at `resample_spacing`, so
/// preprocessing keeps its size): preprocessing, sliding window, postprocessing and inversion.
pub fn run(segmenter: &Segmenter, opts: &BenchOptions) -> Result<BenchReport> {
    ensure!(opts.runs >= 1, "--runs must be at least 1");
    ensure!(
        !opts.labels.is_empty(),
        "--labels needs at least one class id"
    );
    let model = segmenter.model();
    let device = model.device;
    let config = segmenter.config();
    let patch = config.window().patch_size;
    tch::manual_seed(0);
    let window = Tensor::randn(
        [1, 1, patch[0] as i64, patch[1] as i64, patch[2] as i64],
        (Kind::Float, device),
    );
    let cv = Tensor::from_slice(&opts.labels)
        .view([opts.labels.len() as i64, 1])
        .to_device(device);
    let volume = opts
        .volume
        .map(|v| random_volume(v, config.resample_spacing));
    let prompts = RequestPrompts {
        label_prompt: Some(opts.labels.iter().map(|&id| LabelSpec::Id(id)).collect()),
        ..Default::default()
    };

    let windows_per_volume = opts.volume.map_or(0, |v| {
        crate::inference::window::WindowGrid::new(v, patch, config.overlap)
            .map_or(0, |g| g.windows().len())
    });
    let mut estimated = false;
    let mut results = Vec::new();
    let mut reference: Option<Tensor> = None;
    for &method in &opts.methods {
        let status = segmenter.method_status(method);
        if status.runs_as != method {
            let reason = status.notes.join("; ");
            log::info!("{method}: not run ({reason})");
            results.push(MethodResult {
                method,
                model_ms: None,
                end_to_end_s: None,
                ran: Vec::new(),
                unavailable: Some(reason),
                rel_error_vs_fp32: None,
            });
            continue;
        }
        let args = ForwardArgs {
            class_vector: Some(&cv),
            transpose: true,
            ..Default::default()
        };
        let ((times, last), report) = segmenter.with_runner(method, |runner| {
            let mut times = Vec::new();
            let mut last = None;
            for i in 0..opts.warmup + opts.runs {
                synchronize(device);
                let t = Instant::now();
                let out = tch::no_grad(|| runner.forward_window(&window, &args))
                    .map_err(SegmentError::Failed)?;
                synchronize(device);
                if i >= opts.warmup {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
                last = Some(out);
            }
            Ok((times, last))
        })?;
        let mut ran = report.used;
        let logits = last.map(|t| t.to_device(Device::Cpu).to_kind(Kind::Double));
        let rel_error_vs_fp32 = match (&reference, &logits) {
            (Some(r), Some(l)) => Some(relative_error(l, r)),
            _ => None,
        };
        if method == Method::Fp32 && reference.is_none() {
            reference = logits;
        }
        if let Some(st) = Stats::of(times.clone()) {
            log::info!("{method}: model computation {:.1} ms (median)", st.median);
        }
        if !estimated {
            estimated = true;
            if let Some(st) = Stats::of(times.clone()) {
                let secs = estimate_seconds(st.median / 1e3, opts, windows_per_volume);
                let text = format!(
                    "the whole benchmark will take about {} ({} method(s); {} window(s) per end-to-end run)",
                    humantime::format_duration(std::time::Duration::from_secs(secs as u64)),
                    opts.methods.len(),
                    windows_per_volume
                );
                if device == Device::Cpu && secs > 300.0 {
                    log::warn!(
                        "{text}: this is a CPU; for a quick look use --volume none, fewer --runs, or a smaller \
                         --random-width"
                    );
                } else {
                    log::info!("{text}");
                }
            }
        }
        let mut e2e = Vec::new();
        if let Some(vol) = &volume {
            for _ in 0..opts.e2e_runs {
                synchronize(device);
                let t = Instant::now();
                let seg = segmenter.segment(&Request {
                    name: "bench volume",
                    image: vol,
                    prompts: prompts.clone(),
                    precision: Some(method),
                    image_kept: true,
                })?;
                synchronize(device);
                e2e.push(t.elapsed().as_secs_f64());
                for m in seg.method.used {
                    if !ran.contains(&m) {
                        ran.push(m);
                    }
                }
            }
            if let Some(st) = Stats::of(e2e.clone()) {
                log::info!("{method}: end to end {:.2} s (median)", st.median);
            }
        }
        results.push(MethodResult {
            method,
            model_ms: Stats::of(times),
            end_to_end_s: Stats::of(e2e),
            ran,
            unavailable: None,
            rel_error_vs_fp32,
        });
    }
    Ok(BenchReport {
        device: device_name(device),
        threads: tch::get_num_threads(),
        width: model.width(),
        patch_size: patch,
        volume: opts.volume,
        labels: opts.labels.clone(),
        results,
    })
}

/// Seconds the whole benchmark takes when one window takes `window_s`: every method's warm-up and timed windows,
/// and its end-to-end runs over `windows_per_volume` windows each.
fn estimate_seconds(window_s: f64, opts: &BenchOptions, windows_per_volume: usize) -> f64 {
    let per_method = (opts.warmup + opts.runs) as f64 * window_s
        + (opts.e2e_runs * windows_per_volume) as f64 * window_s;
    per_method * opts.methods.len() as f64
}

/// A seeded random CT-like volume (HU in about -1000..1000) of `dims` voxels at `spacing` mm (RAS).
fn random_volume(dims: [usize; 3], spacing: [f64; 3]) -> Volume {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let data = ndarray::Array3::from_shape_simple_fn((dims[0], dims[1], dims[2]), || {
        rng.gen_range(-1000.0f32..1000.0)
    });
    let mut affine = IDENTITY;
    for (a, row) in affine.iter_mut().take(3).enumerate() {
        row[a] = if spacing[a] > 0.0 { spacing[a] } else { 1.0 };
    }
    Volume { data, affine }
}

/// The table as the bundle's README prints it, plus speedups.
pub fn format_table(r: &BenchReport) -> String {
    let base = |f: fn(&MethodResult) -> Option<f64>| {
        r.results
            .iter()
            .find(|m| m.method == Method::Fp32)
            .and_then(f)
    };
    let model_of = |m: &MethodResult| m.model_ms.map(|s| s.median);
    let e2e_of = |m: &MethodResult| m.end_to_end_s.map(|s| s.median);
    let (base_model, base_e2e) = (base(model_of), base(e2e_of));
    let mut s = format!(
        "device {}, {} CPU threads, width {}, window {:?}, {} label prompt(s){}\n",
        r.device,
        r.threads,
        r.width,
        r.patch_size,
        r.labels.len(),
        r.volume
            .map(|v| format!(", end to end on a {}x{}x{} volume", v[0], v[1], v[2]))
            .unwrap_or_default()
    );
    s += &format!(
        "{:<12} {:>18} {:>10} {:>18} {:>10} {:>14}\n",
        "method", "model comp. (ms)", "speedup", "end to end (s)", "speedup", "rel. err vs fp32"
    );
    let speedup = |b: Option<f64>, v: Option<f64>| match (b, v) {
        (Some(b), Some(v)) if v > 0.0 => format!("{:.2}x", b / v),
        _ => "-".into(),
    };
    for m in &r.results {
        match &m.unavailable {
            Some(reason) => {
                s += &format!("{:<12} not run: {reason}\n", m.method.name());
            }
            None => {
                let name = if m.ran.iter().all(|&r| r == m.method) {
                    m.method.name().to_string()
                } else {
                    let ran: Vec<&str> = m.ran.iter().map(|r| r.name()).collect();
                    format!("{} (ran {})", m.method.name(), ran.join("+"))
                };
                s += &format!(
                    "{:<12} {:>18} {:>10} {:>18} {:>10} {:>14}\n",
                    name,
                    model_of(m).map_or("-".into(), |v| format!("{v:.1}")),
                    speedup(base_model, model_of(m)),
                    e2e_of(m).map_or("-".into(), |v| format!("{v:.2}")),
                    speedup(base_e2e, e2e_of(m)),
                    m.rel_error_vs_fp32
                        .map_or("-".into(), |v| format!("{v:.1e}")),
                );
            }
        }
    }
    let get = |meth: Method| {
        r.results
            .iter()
            .find(|m| m.method == meth && m.unavailable.is_none())
    };
    if let (Some(amp), Some(fp16)) = (get(Method::Amp), get(Method::TrtFp16)) {
        s += &format!(
            "amp vs trt_fp16: model computation {}, end to end {}\n",
            speedup(model_of(amp), model_of(fp16)),
            speedup(e2e_of(amp), e2e_of(fp16))
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median() {
        let s = Stats::of(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.runs), (2.0, 1.0, 3.0, 3));
        assert_eq!(Stats::of(vec![1.0, 2.0, 4.0, 3.0]).unwrap().median, 2.5);
        assert!(Stats::of(vec![]).is_none());
    }

    #[test]
    fn the_estimate_counts_every_window() {
        let opts = BenchOptions {
            methods: vec![Method::Fp32, Method::Ort],
            volume: Some([64, 64, 64]),
            labels: vec![1],
            runs: 5,
            e2e_runs: 3,
            warmup: 2,
        };
        // (2 + 5) windows + 3 runs x 8 windows, per method, at 0.5 s a window.
        assert_eq!(estimate_seconds(0.5, &opts, 8), 2.0 * (7.0 + 24.0) * 0.5);
    }

    #[test]
    fn the_table_prints_what_ran() {
        let row = |method, ran: Vec<Method>| MethodResult {
            method,
            model_ms: Stats::of(vec![10.0]),
            end_to_end_s: None,
            ran,
            unavailable: None,
            rel_error_vs_fp32: None,
        };
        let report = BenchReport {
            device: "cpu".into(),
            threads: 2,
            width: 8,
            patch_size: [32; 3],
            volume: None,
            labels: vec![1],
            results: vec![
                row(Method::Fp32, vec![Method::Fp32]),
                row(Method::Ort, vec![Method::Ort, Method::Fp32]),
            ],
        };
        let t = format_table(&report);
        assert!(t.contains("ort (ran ort+fp32)"), "{t}");
        assert!(t.lines().any(|l| l.starts_with("fp32 ")), "{t}");
    }
}
