//! The Rust network's forward, timed per module on the CPU, for comparison with MONAI's
//! (benches/monai_forward.py; benches/compare_monai.sh runs both on the same weights and input).
//!
//!     cargo bench --bench network_forward -- --weights W.pt --input X.safetensors --threads 2 --reps 3
//!
//! Median of `--reps` runs after one warm-up run, fp32, no autograd.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};
use vista3d::checkpoint::read_checkpoint;
use vista3d::model::to_tensor;

const EVERYTHING_EXCLUDED: [i64; 15] = [
    2, 16, 18, 20, 21, 23, 24, 25, 26, 27, 128, 129, 130, 131, 132,
];

fn timed(reps: usize, mut f: impl FnMut() -> Tensor) -> f64 {
    let _ = f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            let _ = f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut weights, mut input, mut threads, mut reps, mut json) =
        (None, None, 2i32, 3usize, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--weights" => weights = args.next().map(PathBuf::from),
            "--input" => input = args.next().map(PathBuf::from),
            "--threads" => threads = args.next().context("--threads N")?.parse()?,
            "--reps" => reps = args.next().context("--reps N")?.parse()?,
            "--json" => json = args.next().map(PathBuf::from),
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    let (Some(weights), Some(input)) = (weights, input) else {
        eprintln!("usage: network_forward --weights W.pt --input X.safetensors [--threads N] [--reps N] [--json F]");
        eprintln!("(benches/compare_monai.sh prepares both and runs MONAI on the same data)");
        return Ok(());
    };
    tch::set_num_threads(threads);
    let model = vista3d::load_model(&weights, Device::Cpu, &Default::default())?;
    let net = &model.net;
    let sd = read_checkpoint(&input)?;
    let x = to_tensor(sd.get("input").context("input tensor missing")?);
    let p = x.size()[4] as f64;
    let enc = &net.image_encoder;
    let mut results = serde_json::Map::new();
    tch::no_grad(|| -> Result<()> {
        let skips = enc.encoder.forward(&x);
        let feats = enc.up_layers_auto.forward(&skips);
        let cv1 = Tensor::from_slice(&[3i64]).view([1, 1]);
        let ids: Vec<i64> = (1..=132)
            .filter(|i| !EVERYTHING_EXCLUDED.contains(i))
            .collect();
        let cv117 = Tensor::from_slice(&ids).view([-1, 1]);
        let pts = Tensor::from_slice(&[
            p / 2.,
            p / 2.,
            p / 2.,
            p / 4.,
            p / 3.,
            p / 2.,
            p / 2. + 3.,
            p / 3.,
            p / 5.,
        ])
        .view([1, 3, 3]);
        let pl = Tensor::from_slice(&[1i64, 1, 0]).view([1, 3]);
        let mut record = |name: &str, secs: f64| {
            println!("{name:<18} {secs:>9.3} s");
            results.insert(name.to_string(), secs.into());
        };
        record(
            "encoder_down",
            timed(reps, || enc.encoder.forward(&x).pop().unwrap()),
        );
        record(
            "decoder_auto",
            timed(reps, || enc.up_layers_auto.forward(&skips)),
        );
        record(
            "decoder_point",
            timed(reps, || enc.up_layers.forward(&skips)),
        );
        record(
            "class_head_1",
            timed(reps, || net.class_head.forward(&feats, &cv1)),
        );
        record(
            "class_head_117",
            timed(reps, || net.class_head.forward(&feats, &cv117)),
        );
        record(
            "point_head_1x3",
            timed(reps, || net.point_head.forward(&feats, &pts, &pl, None)),
        );
        let args = vista3d::ForwardArgs {
            class_vector: Some(&cv1),
            ..Default::default()
        };
        record(
            "forward_class_1",
            timed(reps, || {
                net.forward(&x, &args)
                    .unwrap_or_else(|_| Tensor::zeros([1], (Kind::Float, Device::Cpu)))
            }),
        );
        Ok(())
    })?;
    let out = serde_json::json!({
        "impl": "vista3d-rust", "width": net.config.embed_dim, "patch": x.size()[2..].to_vec(),
        "threads": threads, "reps": reps, "seconds": results,
    });
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}
