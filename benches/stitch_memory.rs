//! Peak memory of "everything" at CT sizes where the real network would run for hours on a CPU: the whole
//! request path of `vista3d infer` (read, resample, crop, intensity, windows, stitching, inversion, write) with
//! only the network replaced by a stand-in, a fixed cheap function of each window. A benchmark mode, never used
//! for results (benches/memory_everything.sh runs it under `/usr/bin/time -v`).
//!
//!     cargo bench --bench stitch_memory -- --image CT.nii.gz --out labels.nii.gz [--threads N]
//!         [--stitch-memory-gb G] [--patch N]
//!
//! The stand-in's logits for class k are `sin((k + 1) x / 200)` of the window's intensities x: 117 channels of
//! the same shape and type as the network's, so the stitching, argmax and memory are those of a real run.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};
use vista3d::config::InferenceConfig;
use vista3d::engines::runner::MethodReport;
use vista3d::engines::Method;
use vista3d::inference::network::{even_pieces, SlabSink, WindowSlab};
use vista3d::inference::WindowNetwork;
use vista3d::io::{read_image, write_nifti, OutputDtype};
use vista3d::prompts::RequestPrompts;
use vista3d::segmenter::{Computed, Pipeline, Request, RequestPath, SegmentError, WindowBackend};
use vista3d::ForwardArgs;

/// The stand-in network: one fixed function per class prompt.
struct StandIn;

impl WindowNetwork for StandIn {
    fn forward_window(&self, input: &Tensor, args: &ForwardArgs) -> Result<Tensor> {
        let classes = args.class_vector.context("class prompts")?.size()[0];
        let k = Tensor::arange_start(1, classes + 1, (Kind::Float, input.device()))
            .view([1, classes, 1, 1, 1]);
        Ok((input * k / 200.0).sin())
    }

    /// In slabs along x, as the real network makes class prompts.
    fn forward_window_in_slabs(
        &self,
        input: &Tensor,
        args: &ForwardArgs,
        slab_x: usize,
        sink: &mut SlabSink<'_>,
    ) -> Result<()> {
        for x in even_pieces(input.size()[2] as usize, slab_x) {
            let part = input.narrow(2, x.start as i64, x.len() as i64);
            let logits = self.forward_window(&part, args)?;
            sink(WindowSlab { x, logits })?;
        }
        Ok(())
    }
}

/// Runs every window through [`StandIn`] on the CPU.
struct StandInBackend;

impl WindowBackend for StandInBackend {
    fn input_device(&self) -> Device {
        Device::Cpu
    }

    fn run_windows(
        &self,
        method: Method,
        f: &mut dyn FnMut(&dyn WindowNetwork) -> Result<Computed, SegmentError>,
    ) -> Result<(Computed, MethodReport), SegmentError> {
        let computed = f(&StandIn)?;
        let report = MethodReport {
            requested: Some(method),
            used: vec![Method::Fp32],
            ..Default::default()
        };
        Ok((computed, report))
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut image, mut out, mut threads, mut budget, mut patch) =
        (None, None, 2i32, None, 128usize);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--image" => image = args.next().map(PathBuf::from),
            "--out" => out = args.next().map(PathBuf::from),
            "--threads" => threads = args.next().context("--threads N")?.parse()?,
            "--stitch-memory-gb" => {
                budget = Some(args.next().context("--stitch-memory-gb G")?.parse()?)
            }
            "--patch" => patch = args.next().context("--patch N")?.parse()?,
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    let (Some(image), Some(out)) = (image, out) else {
        eprintln!("usage: stitch_memory --image CT.nii.gz --out labels.nii.gz [--threads N] [--stitch-memory-gb G] [--patch N]");
        return Ok(());
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    tch::set_num_threads(threads);
    let mut config = InferenceConfig::defaults();
    config.stitch_memory_gb = budget;
    config.patch_size.0 = [patch; 3];
    config.output_dtype = OutputDtype::Uint8;
    let t = Instant::now();
    let input = read_image(&image, &config.dicom_options())?;
    let path = RequestPath::new(config, Pipeline::Bundle);
    let name = image.display().to_string();
    let request = Request {
        name: &name,
        image: &input.volume,
        prompts: RequestPrompts::default(),
        precision: Some(Method::Fp32),
        image_kept: false,
    };
    // As `vista3d infer` runs an item: the voxels as read are released once the network's input is made.
    let prepared = path.prepare(&request)?;
    let dims = input.volume.dims();
    let mut input = input;
    input.volume.data = ndarray::Array3::zeros((0, 0, 0));
    let inferred = path.infer(&StandInBackend, prepared)?;
    let seg = path.finish(inferred)?;
    write_nifti(&out, &seg.labels, &input.header, OutputDtype::Uint8)?;
    println!(
        "{name}: {dims:?} -> processed {:?}, stages {:?}, {:.1} s in all",
        seg.processed_shape,
        seg.timings,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
