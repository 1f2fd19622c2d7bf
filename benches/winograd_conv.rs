//! Winograd's 3x3x3 convolutions (`vista3d::model::winograd`) against libtorch's on the CPU, on the shapes of
//! VISTA3D's residual blocks: median of `--reps` runs after a warm-up, both fp32, no autograd, and the largest
//! relative difference.
//!
//!     cargo bench --bench winograd_conv -- [--threads 1] [--reps 7]

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use vista3d::model::winograd::{self, Filters};

fn median_ms(reps: usize, mut f: impl FnMut() -> Tensor) -> (f64, Tensor) {
    let mut out = f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            out = f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    (times[times.len() / 2], out)
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let (threads, reps) = (arg("--threads", 1), arg("--reps", 7));
    if !winograd::available() {
        eprintln!("this CPU has no AVX2/FMA: nothing to compare");
        return;
    }
    tch::set_num_threads(threads as i32);
    let _no_grad = tch::no_grad_guard();
    println!("threads {threads}, median of {reps}");
    println!(
        "| channels at size | libtorch, ms | Winograd, ms | speed-up | max relative difference |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (c, s) in [
        (24, 64),
        (48, 32),
        (96, 16),
        (192, 8),
        (384, 4),
        (8, 128),
        (16, 128),
        (48, 64),
        (48, 128),
    ] {
        tch::manual_seed(0);
        let x = Tensor::randn([1, c, s, s, s], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([c, c, 3, 3, 3], (Kind::Float, Device::Cpu)) * 0.05;
        let (direct, want) = median_ms(reps, || {
            x.conv3d(&w, None::<&Tensor>, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1)
        });
        let filters = Filters::default();
        let _on = winograd::enable(true);
        let (fast, got) = median_ms(reps, || filters.conv3x3(&x, &w).expect("the path applies"));
        let rel = f64::try_from((&got - &want).abs().max()).unwrap_or(f64::NAN)
            / f64::try_from(want.abs().max()).unwrap_or(f64::NAN);
        println!(
            "| {c} at {s}^3 | {direct:.1} | {fast:.1} | {:.2}x | {rel:.1e} |",
            direct / fast
        );
    }
}
