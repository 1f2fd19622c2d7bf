//! `vista3d bench`: the bundle's benchmark table — model computation (one window, random input) and end to end
//! (sliding window over a random volume of a CT's processed size, postprocessed to labels) per method, with
//! speedups against torch fp32 and amp against TensorRT fp16.

use std::time::Instant;

use anyhow::{ensure, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::engines::runner::WindowRunner;
use crate::engines::{self, Method};
use crate::inference::WindowNetwork;
use crate::inference::{self, NetworkPrompts};
use crate::model::ForwardArgs;
use crate::numerics::relative_error;
use crate::pipeline::{Model, Settings};

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

/// Why `method` cannot run as itself here (`None` when it can).
fn unavailable_reason(
    method: Method,
    torch: Method,
    has_engine: bool,
    notes: &[String],
) -> Option<String> {
    if method.uses_engine() && !has_engine {
        return Some(notes.join("; "));
    }
    if !method.uses_engine() && torch != method {
        return Some(notes.join("; "));
    }
    None
}

/// Runs the benchmark.
pub fn run(model: &Model, settings: &Settings, opts: &BenchOptions) -> Result<BenchReport> {
    ensure!(opts.runs >= 1, "--runs must be at least 1");
    ensure!(
        !opts.labels.is_empty(),
        "--labels needs at least one class id"
    );
    let device = model.device;
    let patch = settings.window.patch_size;
    tch::manual_seed(0);
    let window = Tensor::randn(
        [1, 1, patch[0] as i64, patch[1] as i64, patch[2] as i64],
        (Kind::Float, device),
    );
    let cv = Tensor::from_slice(&opts.labels)
        .view([opts.labels.len() as i64, 1])
        .to_device(device);
    let volume = opts.volume.map(|v| {
        Tensor::randn(
            [1, 1, v[0] as i64, v[1] as i64, v[2] as i64],
            (Kind::Float, Device::Cpu),
        )
    });
    let prompts = NetworkPrompts::from_labels(&opts.labels);

    let mut results = Vec::new();
    let mut reference: Option<Tensor> = None;
    for &method in &opts.methods {
        let choice = engines::choose(method, device.is_cuda(), &mut |m| {
            model.engine_context_checked(m, settings)
        });
        let notes: Vec<String> = choice.fallbacks.iter().map(|f| f.to_string()).collect();
        if let Some(reason) =
            unavailable_reason(method, choice.torch, choice.engine.is_some(), &notes)
        {
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
        let runner = WindowRunner::new(&model.net, device, method, choice);
        let args = ForwardArgs {
            class_vector: Some(&cv),
            transpose: true,
            ..Default::default()
        };
        let mut times = Vec::new();
        let mut last = None;
        for i in 0..opts.warmup + opts.runs {
            synchronize(device);
            let t = Instant::now();
            let out = tch::no_grad(|| runner.forward_window(&window, &args))?;
            synchronize(device);
            if i >= opts.warmup {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            last = Some(out);
        }
        let logits = last.map(|t| t.to_device(Device::Cpu).to_kind(Kind::Double));
        let rel_error_vs_fp32 = match (&reference, &logits) {
            (Some(r), Some(l)) => Some(relative_error(l, r)),
            _ => None,
        };
        if method == Method::Fp32 && reference.is_none() {
            reference = logits;
        }
        log::info!(
            "{method}: model computation {:?} ms",
            Stats::of(times.clone()).map(|s| s.median)
        );
        let mut e2e = Vec::new();
        if let Some(vol) = &volume {
            for _ in 0..opts.e2e_runs {
                synchronize(device);
                let t = Instant::now();
                let image = vol.to_device(device);
                let labels = inference::infer_labels(&runner, &image, &prompts, &settings.window)?;
                let _ = labels.to_device(Device::Cpu);
                e2e.push(t.elapsed().as_secs_f64());
            }
            log::info!(
                "{method}: end to end {:?} s",
                Stats::of(e2e.clone()).map(|s| s.median)
            );
        }
        let (_, report) = runner.into_parts();
        results.push(MethodResult {
            method,
            model_ms: Stats::of(times),
            end_to_end_s: Stats::of(e2e),
            ran: report.used,
            unavailable: None,
            rel_error_vs_fp32,
        });
    }
    Ok(BenchReport {
        device: format!("{device:?}"),
        threads: tch::get_num_threads(),
        width: model.net.config.embed_dim,
        patch_size: patch,
        volume: opts.volume,
        labels: opts.labels.clone(),
        results,
    })
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
                s += &format!(
                    "{:<12} {:>18} {:>10} {:>18} {:>10} {:>14}\n",
                    m.method.name(),
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
    fn unavailable_methods_say_why() {
        let notes = vec!["trt_fp16 unavailable: no libnvinfer".to_string()];
        assert!(
            unavailable_reason(Method::TrtFp16, Method::Amp, false, &notes)
                .unwrap()
                .contains("libnvinfer")
        );
        assert!(unavailable_reason(Method::TrtFp16, Method::Amp, true, &[]).is_none());
        assert!(unavailable_reason(Method::Amp, Method::Fp32, false, &notes).is_some());
        assert!(unavailable_reason(Method::Fp32, Method::Fp32, false, &[]).is_none());
    }
}
