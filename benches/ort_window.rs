//! One sliding window of the class path on the CPU: libtorch fp32 against ONNX Runtime on the exported
//! ONNX files, same seeded random weights and input.
//!
//!     cargo bench --bench ort_window -- --width 16 --size 64 --threads 2 --reps 3 --prompts 117
//!
//! Median of `--reps` runs after one warm-up run; needs ORT_DYLIB_PATH (`. scripts/env.sh`).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{nn, Device, Kind, Tensor};
use vista3d::engines::fingerprint::weights_fingerprint;
use vista3d::engines::onnx::{export_onnx, WeightsSource};
use vista3d::engines::ort_engine::OrtEngine;
use vista3d::engines::WindowEngine;
use vista3d::numerics::relative_error;
use vista3d::{Vista3d, Vista3dConfig};

fn median(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut width, mut size, mut threads, mut reps, mut prompts) =
        (16i64, 64i64, 2usize, 3usize, 117i64);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--width" => width = value()?.parse()?,
            "--size" => size = value()?.parse()?,
            "--threads" => threads = value()?.parse()?,
            "--reps" => reps = value()?.parse()?,
            "--prompts" => prompts = value()?.parse()?,
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    tch::set_num_threads(threads as i32);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Vista3d::new(&vs.root(), Vista3dConfig::with_width(width))?;
    let dir = std::env::temp_dir().join(format!("vista3d_ort_bench_e{width}"));
    let export = export_onnx(&vs, &WeightsSource::random(width, 0), &dir)?;
    let mut engine = OrtEngine::load(&dir, &weights_fingerprint(&vs), threads)?;
    let image = Tensor::randn([1, 1, size, size, size], (Kind::Float, Device::Cpu));
    let ids = Tensor::arange_start(1, prompts + 1, (Kind::Int64, Device::Cpu)).view([-1, 1]);

    let features = tch::no_grad(|| net.image_encoder.forward(&image, false, true).1.unwrap());
    let t_torch_enc = median(reps, || {
        let _ = tch::no_grad(|| net.image_encoder.forward(&image, false, true));
        Ok(())
    })?;
    let t_torch_head = median(reps, || {
        let _ = tch::no_grad(|| net.class_head.forward(&features, &ids));
        Ok(())
    })?;
    let t_ort_enc = median(reps, || Ok(engine.encode(&image).map(|_| ())?))?;
    let t_ort_head = median(reps, || Ok(engine.classify(&features, &ids).map(|_| ())?))?;
    let err_f = relative_error(&engine.encode(&image)?, &features);
    let logits = tch::no_grad(|| net.class_head.forward(&features, &ids));
    let err_l = relative_error(&engine.classify(&features, &ids)?, &logits);

    println!(
        "width {width}, window {size}^3, {prompts} prompts, {threads} threads, median of {reps} (export {:.2} s)",
        export.seconds
    );
    println!("              encoder+auto   class head   total");
    println!(
        "libtorch fp32 {:>10.3} s {:>10.3} s {:>7.3} s",
        t_torch_enc,
        t_torch_head,
        t_torch_enc + t_torch_head
    );
    println!(
        "ONNX Runtime  {:>10.3} s {:>10.3} s {:>7.3} s",
        t_ort_enc,
        t_ort_head,
        t_ort_enc + t_ort_head
    );
    println!("relative error ORT vs libtorch: features {err_f:.2e}, logits {err_l:.2e}");
    Ok(())
}
