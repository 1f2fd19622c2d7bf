//! The bundle's inference on one volume: preprocessing, prompts in the processed grid, sliding-window or
//! point-window inference, postprocessing, and inversion to the original grid.

pub mod memory;
pub mod network;
pub mod point_window;
pub mod postprocess;
pub mod window;

use std::ops::Range;

use anyhow::{Context, Result};
use ndarray::Array3;
use tch::{Device, Kind, Tensor};

use crate::prompts::{Prompts, LAST_SUPPORTED};
use crate::transforms::SpatialTrace;
use crate::volume::Volume;
pub use network::{WindowNetwork, WindowSlab};
use point_window::{point_window_inference, PointWindowPrompts};
use window::{Accumulator, BlendMode, CellSink, StitchPlan, Stitcher, WindowGrid};

/// Sliding-window and point-window settings (the bundle's `patch_size`, `overlap`, ... keys).
#[derive(Debug, Clone)]
pub struct WindowSettings {
    pub patch_size: [usize; 3],
    /// Effective bundle value 0.25 (the config's 0.3 never reaches MONAI's inferer).
    pub overlap: f64,
    pub mode: BlendMode,
    pub sw_batch_size: usize,
    /// Run point prompts in windows centred on the points (the bundle's default).
    pub use_point_window: bool,
    /// Element type of the stitching sums (float32: MONAI's results bit for bit).
    pub accumulator: Accumulator,
    /// Keep the stitching sums in host memory even when the network runs on a GPU.
    pub stitch_on_host: bool,
    /// Bytes of logits one network call hands over at a time ([`WINDOW_OUTPUT_BYTES`]).
    pub window_output_bytes: u64,
    /// Network calls computed at once where the network allows it ([`WindowNetwork::concurrent`]), each on its
    /// share of libtorch's threads; 1 runs them one at a time.
    pub window_workers: usize,
}

impl Default for WindowSettings {
    fn default() -> Self {
        Self {
            patch_size: [128; 3],
            overlap: 0.25,
            mode: BlendMode::Constant,
            sw_batch_size: 1,
            use_point_window: true,
            accumulator: Accumulator::Float32,
            stitch_on_host: false,
            window_output_bytes: WINDOW_OUTPUT_BYTES,
            window_workers: 1,
        }
    }
}

/// Prompts as the network takes them, in the processed grid.
pub struct NetworkPrompts {
    /// `[B, 1]` ids for the class head (`None` for point-only and zero-shot requests).
    pub class_vector: Option<Tensor>,
    /// `[B, 1]` ids for the point head and the output mapping.
    pub prompt_class: Option<Tensor>,
    /// `[1, N, 3]` float64 coordinates in the processed grid.
    pub point_coords: Option<Tensor>,
    /// `[1, N]` labels.
    pub point_labels: Option<Tensor>,
    /// Ids naming the output channels.
    pub label_prompt: Option<Vec<i64>>,
    /// Points in the processed grid (for postprocessing).
    pub points: Vec<[f64; 3]>,
}

impl NetworkPrompts {
    /// Maps resolved prompts into the processed grid (`M = inv(A_processed) * A_original`, not rounded, with
    /// numpy's rounding as the bundle computes it) and
    /// applies the inferer's zero-shot rule: any id above 132 turns the class head off.
    pub fn new(prompts: &Prompts, trace: &SpatialTrace) -> Self {
        let ids = prompts.label_prompt.clone();
        let as_column = |v: &[i64]| Tensor::from_slice(v).view([-1, 1]);
        let prompt_class = ids.as_deref().map(as_column);
        let class_vector = ids
            .as_deref()
            .filter(|v| v.iter().all(|&c| c <= LAST_SUPPORTED))
            .map(as_column);
        let points: Vec<[f64; 3]> = prompts
            .points
            .iter()
            .flatten()
            .map(|p| trace.map_point(*p))
            .collect();
        let point_coords = prompts.points.as_ref().map(|_| {
            let flat: Vec<f64> = points.iter().flatten().copied().collect();
            Tensor::from_slice(&flat).view([1, -1, 3])
        });
        let point_labels = prompts
            .point_labels
            .as_deref()
            .map(|l| Tensor::from_slice(l).view([1, -1]));
        Self {
            class_vector,
            prompt_class,
            point_coords,
            point_labels,
            label_prompt: ids,
            points,
        }
    }

    /// Class prompts only (no points), all supported ids: what the automatic segmentation sends.
    pub fn from_labels(ids: &[i64]) -> Self {
        let column = Tensor::from_slice(ids).view([-1, 1]);
        let supported = ids.iter().all(|&c| c <= LAST_SUPPORTED);
        Self {
            class_vector: supported.then(|| column.shallow_clone()),
            prompt_class: Some(column),
            point_coords: None,
            point_labels: None,
            label_prompt: Some(ids.to_vec()),
            points: Vec::new(),
        }
    }

    fn labels(&self) -> Vec<i64> {
        self.point_labels
            .as_ref()
            .map(|t| Vec::<i64>::try_from(t.flatten(0, -1)).unwrap_or_default())
            .unwrap_or_default()
    }
}

/// What inference on the processed grid produced.
pub enum Stitched {
    /// Final label ids `[X, Y, Z]` (NaN where not computed), already postprocessed.
    Labels(Tensor),
    /// Raw stitched logits `[B, X, Y, Z]` (NaN where not computed).
    Logits(Tensor),
}

/// Writes finished cells into a full-size tensor, either as labels (postprocessed per cell) or as logits.
struct FullSink<'a> {
    out: Tensor,
    pad: [(usize, usize); 3],
    size: [usize; 3],
    labels: Option<&'a [i64]>,
    as_labels: bool,
}

impl CellSink for FullSink<'_> {
    fn finish(&mut self, region: [Range<usize>; 3], logits: Tensor) -> Result<()> {
        // Keep the part of the cell that lies inside the unpadded volume (cells only in padding are dropped
        // before any postprocessing).
        let mut src = logits;
        let mut dst = self.out.shallow_clone();
        for (a, r) in region.iter().enumerate() {
            let (before, _) = self.pad[a];
            let lo = r.start.max(before);
            let hi = r.end.min(before + self.size[a]);
            if lo >= hi {
                return Ok(());
            }
            src = src.narrow(1 + a as i64, (lo - r.start) as i64, (hi - lo) as i64);
            dst = dst.narrow(1 + a as i64, (lo - before) as i64, (hi - lo) as i64);
        }
        if self.as_labels {
            src = postprocess::logits_to_labels(&src, self.labels).unsqueeze(0);
        }
        // copy_ converts to the output's type (labels are whole numbers, exact in uint8 when they fit) and device.
        dst.copy_(&src);
        Ok(())
    }
}

/// The type of a label map during stitching: uint8 when every id fits (a quarter of float32's memory), else
/// float32.
fn label_kind(labels: Option<&[i64]>) -> Kind {
    match labels {
        Some(ids) if ids.iter().all(|&i| (0..=255).contains(&i)) => Kind::Uint8,
        _ => Kind::Float,
    }
}

/// Bytes of float32 window logits one network call hands over at a time: class prompts beyond it come in slabs
/// along x (a window's 117 "everything" classes at 128^3 would be 0.98 GB at once).
pub const WINDOW_OUTPUT_BYTES: u64 = 256 << 20;

/// Voxels along x of the slabs in which a call on `batch` windows of `roi` with `channels` outputs hands over its
/// logits: at most `bytes` of float32 (at least one voxel; the whole window when it fits).
pub fn slab_thickness(bytes: u64, batch: usize, channels: usize, roi: &[usize; 3]) -> usize {
    let per_x = 4 * (batch.max(1) * channels.max(1) * roi[1] * roi[2]) as u64;
    ((bytes / per_x.max(1)) as usize).clamp(1, roi[0].max(1))
}

/// A slab of window logits as float32 on the stitching device. From a GPU to host sums it goes through pinned
/// memory (libtorch's caching host allocator, reused from slab to slab) by an asynchronous copy, rather than a
/// pageable copy staged by the driver; the host then waits for the device once per slab before adding it.
fn to_stitch_device(logits: &Tensor, stitch_device: Device) -> Result<Tensor> {
    let logits = logits.f_to_kind(Kind::Float)?;
    Ok(match (logits.device(), stitch_device) {
        (Device::Cuda(index), Device::Cpu) => {
            let host = logits.f_to_device_(Device::Cpu, Kind::Float, true, false)?;
            tch::Cuda::synchronize(index as i64);
            host
        }
        _ => logits.f_to_device(stitch_device)?,
    })
}

/// MONAI's sliding-window inference over `image` `[1, 1, X, Y, Z]`. With `as_labels`, cells are
/// postprocessed as they finish and only the label map `[X, Y, Z]` is kept (bounded memory); otherwise the
/// logits `[B, X, Y, Z]` are returned. Returns the result and the peak accumulator voxels (per channel) live.
pub fn sliding_window(
    net: &dyn WindowNetwork,
    image: &Tensor,
    prompts: &NetworkPrompts,
    settings: &WindowSettings,
    as_labels: bool,
) -> Result<(Stitched, u64)> {
    let size_i = image.size();
    let size: [usize; 3] = std::array::from_fn(|a| size_i[2 + a] as usize);
    let grid = WindowGrid::new(size, settings.patch_size, settings.overlap)?;
    let p = grid.pad;
    let padded = if p.iter().any(|&(a, b)| a > 0 || b > 0) {
        image.replication_pad3d([p[2].0, p[2].1, p[1].0, p[1].1, p[0].0, p[0].1].map(|v| v as i64))
    } else {
        image.shallow_clone()
    };
    let device = image.device();
    let dev = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(device));
    let (class_vector, prompt_class) = (dev(&prompts.class_vector), dev(&prompts.prompt_class));
    let (point_coords, point_labels) = (dev(&prompts.point_coords), dev(&prompts.point_labels));
    let n_out = class_vector
        .as_ref()
        .or(prompt_class.as_ref())
        .map_or(1, |t| t.size()[0]);
    let out_shape: Vec<i64> = if as_labels {
        size.iter().map(|&s| s as i64).collect()
    } else {
        std::iter::once(n_out)
            .chain(size.iter().map(|&s| s as i64))
            .collect()
    };
    let (fill, out_kind) = if as_labels {
        (0.0, label_kind(prompts.label_prompt.as_deref()))
    } else {
        (f64::NAN, Kind::Float)
    };
    let stitch_device = if settings.stitch_on_host {
        Device::Cpu
    } else {
        device
    };
    // A label map stays beside the sums (on a GPU: written there, copied to the host once at the end, never
    // stalling the device per cell); logits go to the host as they finish.
    let out_device = if as_labels {
        stitch_device
    } else {
        Device::Cpu
    };
    let mut sink = FullSink {
        out: Tensor::full(out_shape.as_slice(), fill, (out_kind, out_device)),
        pad: p,
        size,
        labels: prompts.label_prompt.as_deref(),
        as_labels,
    };
    if as_labels {
        sink.out = sink.out.unsqueeze(0);
    }
    // Points make the batch size 1 (MONAI localises points with the first window of a batch only).
    let batch = if point_coords.is_some() {
        1
    } else {
        settings.sw_batch_size.max(1)
    };
    // Batches of several windows keep MONAI's order, so that each batch holds the windows MONAI's does.
    let plan = StitchPlan::new(&grid, settings.accumulator, batch);
    let mut stitcher = Stitcher::new(&grid, settings.mode, settings.accumulator, stitch_device);
    let windows = plan.windows;
    log::debug!(
        "sliding window over {size:?} (padded {:?}): {} windows of {:?} in {} order, {} prompts, batch {batch}, \
         {} sums on {stitch_device:?}, at most {} voxels per channel live",
        grid.padded,
        windows.len(),
        grid.roi,
        plan.order,
        n_out,
        settings.accumulator,
        plan.peak_voxels
    );
    let slab_x = slab_thickness(
        settings.window_output_bytes,
        batch,
        n_out as usize,
        &grid.roi,
    );
    let calls: Vec<&[[usize; 3]]> = windows.chunks(batch).collect();
    let window_inputs = |call: &[[usize; 3]]| -> Tensor {
        let inputs: Vec<Tensor> = call
            .iter()
            .map(|&index| {
                let r = grid.ranges(index);
                padded
                    .narrow(2, r[0].start as i64, grid.roi[0] as i64)
                    .narrow(3, r[1].start as i64, grid.roi[1] as i64)
                    .narrow(4, r[2].start as i64, grid.roi[2] as i64)
            })
            .collect();
        Tensor::cat(&inputs, 0)
    };
    // Class prompts come from the network in slabs along x, each added to the sums as it comes, so that a
    // window's logits for every class never exist at once (a call's windows at different x come whole).
    let call_slab_x = |call: &[[usize; 3]]| {
        if Stitcher::slabs_allowed(call) {
            slab_x
        } else {
            grid.roi[0]
        }
    };
    let call_prompts = CallPrompts {
        point_coords,
        point_labels,
        class_vector,
        prompt_class,
    };
    let stitch_slab =
        |stitcher: &mut Stitcher, call: &[[usize; 3]], slab: WindowSlab| -> Result<()> {
            let logits = to_stitch_device(&slab.logits, stitch_device)?;
            for (i, &index) in call.iter().enumerate() {
                stitcher.add_slab(index, slab.x.clone(), &logits.get(i as i64))?;
            }
            Ok(())
        };
    let threads = tch::get_num_threads().max(1) as usize;
    let workers = settings.window_workers.min(calls.len());
    let shared = if workers > 1 { net.concurrent() } else { None };
    match shared {
        Some(shared) => {
            let worker_threads = (threads / workers).max(1);
            log::debug!("{workers} window workers with {worker_threads} threads each");
            let ran = concurrent_calls(
                &*shared,
                &calls,
                workers,
                worker_threads as i32,
                &ConcurrentCalls {
                    grid: &grid,
                    prompts: &call_prompts,
                    slab_x: &call_slab_x,
                },
                &window_inputs,
                &mut |call, message| match message {
                    Some(slab) => stitch_slab(&mut stitcher, call, slab),
                    None => call
                        .iter()
                        .try_for_each(|&index| stitcher.end(index, &mut sink)),
                },
            );
            // Setting a thread's count also sets libtorch's process-wide default, which threads made later
            // start from: back to this thread's.
            tch::set_num_threads(threads as i32);
            ran?;
        }
        None => {
            for &call in &calls {
                let input = window_inputs(call);
                let t = std::time::Instant::now();
                tch::no_grad(|| {
                    net.forward_window_in_slabs(
                        &input,
                        &call_prompts.args(&grid, call),
                        call_slab_x(call),
                        &mut |slab| stitch_slab(&mut stitcher, call, slab),
                    )
                })?;
                for &index in call {
                    stitcher.end(index, &mut sink)?;
                }
                log::trace!(
                    "windows from {:?}: network and stitching {:.3} s",
                    call[0],
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
    let peak = stitcher.peak_voxels();
    let out = if as_labels {
        sink.out.squeeze_dim(0).to_device(Device::Cpu)
    } else {
        sink.out
    };
    Ok((
        if as_labels {
            Stitched::Labels(out)
        } else {
            Stitched::Logits(out)
        },
        peak,
    ))
}

/// The prompts of every network call of a sliding window, on the network's device.
struct CallPrompts {
    point_coords: Option<Tensor>,
    point_labels: Option<Tensor>,
    class_vector: Option<Tensor>,
    prompt_class: Option<Tensor>,
}

impl CallPrompts {
    /// The network's arguments for `call` (its first window's position localises points, as in MONAI).
    fn args(&self, grid: &WindowGrid, call: &[[usize; 3]]) -> crate::model::ForwardArgs<'_> {
        let r = grid.ranges(call[0]);
        crate::model::ForwardArgs {
            point_coords: self.point_coords.as_ref(),
            point_labels: self.point_labels.as_ref(),
            class_vector: self.class_vector.as_ref(),
            prompt_class: self.prompt_class.as_ref(),
            patch_coords: Some(r.map(|r| r.start as i64..r.end as i64)),
            prev_mask: None,
            radius: None,
            transpose: true,
        }
    }

    /// A copy for another thread (the same storage).
    fn shallow_clone(&self) -> Self {
        let c = |t: &Option<Tensor>| t.as_ref().map(Tensor::shallow_clone);
        Self {
            point_coords: c(&self.point_coords),
            point_labels: c(&self.point_labels),
            class_vector: c(&self.class_vector),
            prompt_class: c(&self.prompt_class),
        }
    }
}

/// What the threads of [`concurrent_calls`] share.
struct ConcurrentCalls<'c> {
    grid: &'c WindowGrid,
    prompts: &'c CallPrompts,
    slab_x: &'c (dyn Fn(&[[usize; 3]]) -> usize + Sync),
}

/// What a window worker hands back: a slab of its call's logits, the end of the call, or the call's error.
enum WorkerMessage {
    Slab(WindowSlab),
    End,
    Failed(anyhow::Error),
}

/// Receives a call's output on the stitching thread: `Some(slab)` for each slab, then `None` when it has ended.
type CallStitch<'s> = dyn FnMut(&[[usize; 3]], Option<WindowSlab>) -> Result<()> + 's;

/// Runs `calls` on `workers` threads of `threads` libtorch threads each (call `i` on worker `i % workers`, its
/// input made at most two calls ahead of the stitching) and hands their output to `stitch` on this thread in the
/// calls' order. The stitched result is the one of running the calls one after the other with `threads` threads
/// each. Stops at the first error; the workers end before it returns.
fn concurrent_calls(
    net: &(dyn WindowNetwork + Sync),
    calls: &[&[[usize; 3]]],
    workers: usize,
    threads: i32,
    shared: &ConcurrentCalls<'_>,
    inputs: &dyn Fn(&[[usize; 3]]) -> Tensor,
    stitch: &mut CallStitch<'_>,
) -> Result<()> {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
    /// Calls given to a worker before the stitching asks for them.
    const AHEAD: usize = 2;
    std::thread::scope(|scope| {
        let mut jobs: Vec<SyncSender<(usize, Tensor)>> = Vec::with_capacity(workers);
        let mut results: Vec<Receiver<WorkerMessage>> = Vec::with_capacity(workers);
        for worker in 0..workers {
            let (job_tx, job_rx) = sync_channel::<(usize, Tensor)>(AHEAD);
            // One slab waits for the stitching while the worker makes the next (the memory estimate counts both).
            let (out_tx, out_rx) = sync_channel::<WorkerMessage>(1);
            let prompts = shared.prompts.shallow_clone();
            let (grid, slab_x) = (shared.grid, shared.slab_x);
            scope.spawn(move || {
                // libtorch's thread count and grad mode are per thread.
                tch::set_num_threads(threads);
                let _no_grad = tch::no_grad_guard();
                for (i, input) in job_rx {
                    let call = calls[i];
                    // A panic (libtorch's errors in tch's infallible calls) fails this request with its message
                    // instead of ending the worker silently.
                    let ran = catch_unwind(AssertUnwindSafe(|| {
                        net.forward_window_in_slabs(
                            &input,
                            &prompts.args(grid, call),
                            slab_x(call),
                            &mut |slab| {
                                out_tx
                                    .send(WorkerMessage::Slab(slab))
                                    .map_err(|_| anyhow::anyhow!("the stitching stopped"))
                            },
                        )
                    }))
                    .unwrap_or_else(|payload| {
                        Err(anyhow::anyhow!(
                            "window worker {worker} panicked: {}",
                            crate::runtime::panic_message(payload.as_ref())
                        ))
                    });
                    let last = match ran {
                        Ok(()) => WorkerMessage::End,
                        Err(e) => WorkerMessage::Failed(e),
                    };
                    if out_tx.send(last).is_err() {
                        break;
                    }
                }
            });
            jobs.push(job_tx);
            results.push(out_rx);
        }
        // Dropping `jobs` and `results` on return (error or not) lets every worker end.
        let give = |jobs: &[SyncSender<(usize, Tensor)>], i: usize| -> Result<()> {
            jobs[i % workers]
                .send((i, inputs(calls[i])))
                .map_err(|_| anyhow::anyhow!("internal: window worker {} stopped", i % workers))
        };
        for i in 0..calls.len().min(AHEAD * workers) {
            give(&jobs, i)?;
        }
        for (i, &call) in calls.iter().enumerate() {
            loop {
                let message = results[i % workers].recv().map_err(|_| {
                    anyhow::anyhow!("internal: window worker {} stopped", i % workers)
                })?;
                match message {
                    WorkerMessage::Slab(slab) => stitch(call, Some(slab))?,
                    WorkerMessage::End => break,
                    WorkerMessage::Failed(e) => return Err(e),
                }
            }
            stitch(call, None)?;
            if i + AHEAD * workers < calls.len() {
                give(&jobs, i + AHEAD * workers)?;
            }
        }
        Ok(())
    })
}

/// Runs the network on a preprocessed image `[1, 1, X, Y, Z]` as the bundle's inferer does and returns
/// the raw stitched logits `[B, X, Y, Z]` (NaN where not computed). Used for parity checks.
pub fn infer_logits(
    net: &dyn WindowNetwork,
    image: &Tensor,
    prompts: &NetworkPrompts,
    settings: &WindowSettings,
) -> Result<Tensor> {
    if settings.use_point_window && prompts.point_coords.is_some() {
        let out = point_window_inference(
            net,
            image,
            settings.patch_size,
            &point_window_prompts(prompts),
        )?;
        return Ok(out.squeeze_dim(0));
    }
    match sliding_window(net, image, prompts, settings, false)?.0 {
        Stitched::Logits(l) | Stitched::Labels(l) => Ok(l),
    }
}

fn point_window_prompts(prompts: &NetworkPrompts) -> PointWindowPrompts<'_> {
    PointWindowPrompts {
        point_coords: prompts.point_coords.as_ref().expect("point prompts"),
        point_labels: prompts
            .point_labels
            .as_ref()
            .expect("point labels with points"),
        class_vector: prompts.class_vector.as_ref(),
        prompt_class: prompts.prompt_class.as_ref(),
        prev_mask: None,
    }
}

/// Label ids on the processed grid `[X, Y, Z]` (NaN where not computed): inference plus the bundle's
/// postprocessing. Class-only requests stream through the stitcher and never hold all logits.
pub fn infer_labels(
    net: &dyn WindowNetwork,
    image: &Tensor,
    prompts: &NetworkPrompts,
    settings: &WindowSettings,
) -> Result<Tensor> {
    let point_only = prompts.label_prompt.is_none() && prompts.point_coords.is_some();
    let logits = if settings.use_point_window && prompts.point_coords.is_some() {
        point_window_inference(
            net,
            image,
            settings.patch_size,
            &point_window_prompts(prompts),
        )?
        .squeeze_dim(0)
    } else {
        match sliding_window(net, image, prompts, settings, !point_only)?.0 {
            Stitched::Labels(labels) => return Ok(labels),
            Stitched::Logits(logits) => logits,
        }
    };
    labels_from_logits(&logits, prompts)
}

/// The bundle's postprocessing of stitched logits `[B, X, Y, Z]` into label ids `[X, Y, Z]`: point-only
/// requests first drop positive components without a positive point, then argmax/threshold and id mapping.
pub fn labels_from_logits(logits: &Tensor, prompts: &NetworkPrompts) -> Result<Tensor> {
    let logits = if prompts.label_prompt.is_none() && prompts.point_coords.is_some() {
        postprocess::keep_components_with_positive_points(
            logits,
            &prompts.points,
            &prompts.labels(),
        )?
    } else {
        logits.shallow_clone()
    };
    Ok(postprocess::logits_to_labels(
        &logits,
        prompts.label_prompt.as_deref(),
    ))
}

/// A volume as a `[1, 1, X, Y, Z]` CPU tensor.
pub fn volume_to_tensor(v: &Volume) -> Result<Tensor> {
    let d = v.dims();
    let data = v.data.as_slice().context("volume data is not contiguous")?;
    Ok(Tensor::from_slice(data).view([1, 1, d[0] as i64, d[1] as i64, d[2] as i64]))
}

/// A `[X, Y, Z]` tensor as an array.
pub fn tensor_to_array(t: &Tensor) -> Result<Array3<f32>> {
    let s = t.size();
    anyhow::ensure!(s.len() == 3, "expected a 3-D tensor, got {s:?}");
    let data: Vec<f32> = Vec::try_from(
        t.to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous()
            .flatten(0, -1),
    )?;
    Ok(Array3::from_shape_vec(
        (s[0] as usize, s[1] as usize, s[2] as usize),
        data,
    )?)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::thread::ThreadId;

    use super::network::{even_pieces, SlabSink};
    use super::*;
    use crate::model::{ForwardArgs, Vista3d, Vista3dConfig};

    /// A network whose logits depend on the whole window (as instance norm makes them), so that stitching in
    /// another order would show; it notes the threads it ran on and can fail at one call.
    struct Fake {
        threads: Mutex<HashSet<ThreadId>>,
        calls: AtomicUsize,
        fail_at: Option<usize>,
        /// Fail by panicking (as tch does on libtorch's errors) rather than by returning an error.
        panics: bool,
        concurrent: bool,
    }

    impl Fake {
        fn new(fail_at: Option<usize>, concurrent: bool) -> Self {
            Self {
                threads: Mutex::new(HashSet::new()),
                calls: AtomicUsize::new(0),
                fail_at,
                panics: false,
                concurrent,
            }
        }
    }

    impl WindowNetwork for Fake {
        fn forward_window(&self, input: &Tensor, args: &ForwardArgs) -> Result<Tensor> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            self.threads
                .lock()
                .unwrap()
                .insert(std::thread::current().id());
            if self.fail_at == Some(call) {
                if self.panics {
                    panic!("simulated panic at call {call}");
                }
                anyhow::bail!("simulated failure at call {call}");
            }
            let classes = args.class_vector.map_or(1, |c| c.size()[0]);
            let scale =
                Tensor::arange(classes, (Kind::Float, Device::Cpu)).view([1, -1, 1, 1, 1]) + 1.0;
            let mean = input.mean_dim(&[2i64, 3, 4][..], true, Kind::Float);
            let logits = ((input * &scale).sin() + mean * 0.37 - 0.1).to_kind(Kind::Float);
            // `[b, C, ...]` is the transposed layout (windows first); the network's own is classes first.
            Ok(if args.transpose {
                logits
            } else {
                logits.transpose(1, 0)
            })
        }

        fn forward_window_in_slabs(
            &self,
            input: &Tensor,
            args: &ForwardArgs,
            slab_x: usize,
            sink: &mut SlabSink<'_>,
        ) -> Result<()> {
            let whole = self.forward_window(input, args)?;
            for x in even_pieces(input.size()[2] as usize, slab_x) {
                let logits = whole.narrow(2, x.start as i64, x.len() as i64).contiguous();
                sink(WindowSlab { x, logits })?;
            }
            Ok(())
        }

        fn concurrent(&self) -> Option<Box<dyn WindowNetwork + Sync + '_>> {
            struct Shared<'a>(&'a Fake);
            impl WindowNetwork for Shared<'_> {
                fn forward_window(&self, input: &Tensor, args: &ForwardArgs) -> Result<Tensor> {
                    self.0.forward_window(input, args)
                }
                fn forward_window_in_slabs(
                    &self,
                    input: &Tensor,
                    args: &ForwardArgs,
                    slab_x: usize,
                    sink: &mut SlabSink<'_>,
                ) -> Result<()> {
                    self.0.forward_window_in_slabs(input, args, slab_x, sink)
                }
            }
            self.concurrent
                .then(|| Box::new(Shared(self)) as Box<dyn WindowNetwork + Sync + '_>)
        }
    }

    fn image(size: [i64; 3]) -> Tensor {
        tch::manual_seed(11);
        Tensor::randn(
            [1, 1, size[0], size[1], size[2]],
            (Kind::Float, Device::Cpu),
        )
    }

    fn settings(workers: usize, batch: usize, slab_bytes: u64, mode: BlendMode) -> WindowSettings {
        WindowSettings {
            patch_size: [16, 16, 16],
            overlap: 0.5,
            mode,
            sw_batch_size: batch,
            window_workers: workers,
            window_output_bytes: slab_bytes,
            ..WindowSettings::default()
        }
    }

    fn logits(net: &dyn WindowNetwork, image: &Tensor, settings: &WindowSettings) -> Tensor {
        let prompts = NetworkPrompts::from_labels(&[1, 3, 5]);
        match sliding_window(net, image, &prompts, settings, false)
            .unwrap()
            .0
        {
            Stitched::Logits(l) => l,
            Stitched::Labels(_) => unreachable!("asked for logits"),
        }
    }

    #[test]
    fn window_workers_stitch_what_one_thread_does_bit_for_bit() {
        let image = image([40, 33, 29]);
        for mode in [BlendMode::Constant, BlendMode::Gaussian] {
            for batch in [1, 2] {
                // Whole windows, and slabs of one voxel along x (several messages per call).
                for slab_bytes in [WINDOW_OUTPUT_BYTES, 1] {
                    let one = Fake::new(None, true);
                    let expected = logits(&one, &image, &settings(1, batch, slab_bytes, mode));
                    assert_eq!(
                        one.threads.lock().unwrap().len(),
                        1,
                        "one worker: this thread"
                    );
                    for workers in [2, 3] {
                        let many = Fake::new(None, true);
                        let got =
                            logits(&many, &image, &settings(workers, batch, slab_bytes, mode));
                        assert!(
                            got.equal(&expected),
                            "{mode:?}, batch {batch}, slab bytes {slab_bytes}, {workers} workers differ"
                        );
                        let threads = many.threads.lock().unwrap();
                        assert_eq!(
                            threads.len(),
                            workers,
                            "windows ran on {} threads",
                            threads.len()
                        );
                        assert!(!threads.contains(&std::thread::current().id()));
                    }
                }
            }
        }
    }

    #[test]
    fn window_workers_stream_labels_as_one_thread_does() {
        let image = image([37, 30, 34]);
        let prompts = NetworkPrompts::from_labels(&[2, 7]);
        let labels = |workers| {
            let net = Fake::new(None, true);
            match sliding_window(
                &net,
                &image,
                &prompts,
                &settings(workers, 1, 1, BlendMode::Gaussian),
                true,
            )
            .unwrap()
            .0
            {
                Stitched::Labels(l) => l,
                Stitched::Logits(_) => unreachable!("asked for labels"),
            }
        };
        let (one, two) = (labels(1), labels(2));
        assert!(one.equal(&two));
        // Not a trivial map: both classes and the background occur.
        let (lo, hi) = (
            f64::try_from(one.min()).unwrap(),
            f64::try_from(one.max()).unwrap(),
        );
        assert!(lo < hi, "labels from {lo} to {hi}");
    }

    #[test]
    fn a_failing_window_fails_the_request_and_stops_the_workers() {
        let image = image([40, 33, 29]);
        for fail_at in [0, 5] {
            let net = Fake::new(Some(fail_at), true);
            let prompts = NetworkPrompts::from_labels(&[1]);
            let err = sliding_window(
                &net,
                &image,
                &prompts,
                &settings(2, 1, 1, BlendMode::Constant),
                true,
            )
            .err()
            .expect("the failure reaches the caller");
            assert!(
                format!("{err:#}").contains(&format!("simulated failure at call {fail_at}")),
                "{err:#}"
            );
            // The workers stopped at most a few calls after the failure instead of running every window.
            let windows = WindowGrid::new([40, 33, 29], [16; 3], 0.5)
                .unwrap()
                .windows()
                .len();
            let calls = net.calls.load(Ordering::SeqCst);
            assert!(
                calls <= fail_at + 2 * 2 + 2 && calls < windows,
                "{calls} calls of {windows}"
            );
        }
    }

    #[test]
    fn a_panicking_window_fails_the_request_with_its_message() {
        let image = image([40, 33, 29]);
        let mut net = Fake::new(Some(3), true);
        net.panics = true;
        let prompts = NetworkPrompts::from_labels(&[1]);
        let err = sliding_window(
            &net,
            &image,
            &prompts,
            &settings(2, 1, 1, BlendMode::Constant),
            true,
        )
        .err()
        .expect("the panic reaches the caller as an error");
        let message = format!("{err:#}");
        // Which worker starts the fourth call depends on timing.
        assert!(
            message.contains("window worker ")
                && message.contains(" panicked: simulated panic at call 3"),
            "{message}"
        );
    }

    #[test]
    fn networks_that_cannot_share_run_windows_on_this_thread() {
        let image = image([40, 33, 29]);
        let net = Fake::new(None, false);
        let _ = logits(
            &net,
            &image,
            &settings(3, 1, WINDOW_OUTPUT_BYTES, BlendMode::Constant),
        );
        let threads = net.threads.lock().unwrap();
        assert_eq!(threads.len(), 1);
        assert!(threads.contains(&std::thread::current().id()));
    }

    #[test]
    fn the_network_on_window_workers_matches_one_thread() {
        tch::manual_seed(5);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let net = Vista3d::new(&vs.root(), Vista3dConfig::with_width(8)).unwrap();
        assert!(
            net.concurrent().is_some(),
            "libtorch on the CPU shares its windows"
        );
        let image = image([40, 36, 34]);
        let settings = |workers| WindowSettings {
            patch_size: [32, 32, 32],
            overlap: 0.25,
            window_workers: workers,
            ..WindowSettings::default()
        };
        let threads = tch::get_num_threads();
        let one = logits(&net, &image, &settings(1));
        let two = logits(&net, &image, &settings(2));
        // The workers' thread counts leave neither this thread's nor that of threads made later changed.
        assert_eq!(tch::get_num_threads(), threads);
        let later = std::thread::spawn(tch::get_num_threads).join().unwrap();
        assert_eq!(later, threads, "a thread made after the workers");
        // Each window on a share of the threads rounds a little differently: within the parity tolerance.
        let err = f64::try_from((&two - &one).abs().max()).unwrap()
            / f64::try_from(one.abs().max()).unwrap();
        assert!(err <= 1e-5, "relative error {err:e}");
        // The engine runner shares its libtorch fp32 path, and says it ran.
        let runner = crate::engines::runner::WindowRunner::torch(&net, Device::Cpu);
        let again = logits(&runner, &image, &settings(2));
        assert!(again.equal(&two));
        assert_eq!(runner.report().used, vec![crate::engines::Method::Fp32]);
    }
}
