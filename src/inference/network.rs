//! [`WindowNetwork`]: what a sliding window runs through. The plain network implements it; so does
//! `engines::runner::WindowRunner` (an engine for the class path with a fallback to libtorch).

use std::ops::Range;

use anyhow::Result;
use tch::Tensor;

use crate::model::{ForwardArgs, Vista3d};

/// A slab along x of one network call's output: `logits` `[b, C, x.len(), W, D]` (windows first, as with
/// `transpose`) for voxels `x` of the window along x.
pub struct WindowSlab {
    pub x: Range<usize>,
    pub logits: Tensor,
}

/// Receives a network call's output slab by slab.
pub type SlabSink<'s> = dyn FnMut(WindowSlab) -> Result<()> + 's;

/// Something that runs one sliding window (MONAI `VISTA3D.forward` semantics): the plain network or an
/// engine-backed runner.
pub trait WindowNetwork {
    /// Same contract as [`Vista3d::forward`].
    fn forward_window(&self, input: &Tensor, args: &ForwardArgs) -> Result<Tensor>;

    /// As [`WindowNetwork::forward_window`] with `transpose`, handing the logits to `sink` in slabs of at most
    /// `slab_x` voxels along x where the network can make them so (class prompts through libtorch: the image
    /// features are computed once, the class head's product per slab), whole otherwise. Slabs hold the whole
    /// output's values bit for bit.
    fn forward_window_in_slabs(
        &self,
        input: &Tensor,
        args: &ForwardArgs,
        slab_x: usize,
        sink: &mut SlabSink<'_>,
    ) -> Result<()> {
        let _ = slab_x;
        whole(self.forward_window(input, args)?, sink)
    }

    /// Whether the windows are computed in 16-bit floats (amp, bf16, a TensorRT fp16 engine), whose logits
    /// carry no more precision than float16 stitching sums.
    fn reduced_precision(&self) -> bool {
        false
    }

    /// This network as one that several threads may run windows on at once (libtorch fp32 on the CPU: the
    /// `window_workers` setting), or `None` where windows run one at a time on the calling thread (engines, GPUs,
    /// autocast, a server's batching).
    fn concurrent(&self) -> Option<Box<dyn WindowNetwork + Sync + '_>> {
        None
    }
}

/// [`Vista3d`] on the CPU, shared by the threads of [`WindowNetwork::concurrent`].
struct SharedCpuNetwork<'a>(&'a Vista3d);

// SAFETY: `Vista3d` is not `Sync` only because `tch::Tensor` is not (tch leaves it to the caller). A forward
// pass only reads the weights (no interior mutability in the model, no autograd under `no_grad`), and libtorch's
// CPU kernels may read one tensor from several threads at once (its reference counts are atomic), as
// PyTorch's own multi-threaded inference does with a shared module.
unsafe impl Sync for SharedCpuNetwork<'_> {}

impl WindowNetwork for SharedCpuNetwork<'_> {
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

/// Hands `logits` `[b, C, H, W, D]` to `sink` as one slab.
pub fn whole(logits: Tensor, sink: &mut SlabSink<'_>) -> Result<()> {
    let x = logits.size().get(2).copied().unwrap_or(0).max(0) as usize;
    sink(WindowSlab { x: 0..x, logits })
}

/// `0..total` in pieces of at most `max`, as even as possible.
pub fn even_pieces(total: usize, max: usize) -> Vec<Range<usize>> {
    let max = max.max(1);
    let n = total.div_ceil(max).max(1);
    (0..n)
        .map(|i| (i * total / n)..((i + 1) * total / n))
        .filter(|r| !r.is_empty())
        .collect()
}

/// The class prompts of a call that runs in slabs: class prompts only (no points), transposed output, and
/// windows thicker than `slab_x`.
pub fn class_slabs<'a>(
    args: &ForwardArgs<'a>,
    input: &Tensor,
    slab_x: usize,
) -> Option<&'a Tensor> {
    let x = input.size().get(2).copied().unwrap_or(0);
    match (args.point_coords, args.class_vector) {
        (None, Some(cv)) if args.transpose && (slab_x as i64) < x => Some(cv),
        _ => None,
    }
}

/// Runs a piece of the network under a precision policy (autocast or none), float32 out.
pub type Precision<'p> = dyn Fn(&dyn Fn() -> Result<Tensor>) -> Result<Tensor> + 'p;

/// The class path of `net` for `slabs` along x (features and class embeddings once, the product per slab),
/// each computed inside `compute` (the caller's precision policy).
pub fn class_path_in_slabs(
    net: &Vista3d,
    input: &Tensor,
    class_vector: &Tensor,
    slabs: &[Range<usize>],
    compute: &Precision<'_>,
    sink: &mut SlabSink<'_>,
) -> Result<()> {
    let features = compute(&|| net.class_features(input))?;
    let embedding = compute(&|| Ok(net.class_head.class_embedding(class_vector)))?;
    for slab in slabs.iter().cloned() {
        let logits = compute(&|| {
            // Contiguous, as the whole features are, so that the product takes the same kernel (a batch of
            // windows sliced in place would take another, whose rounding differs).
            let part = features
                .narrow(2, slab.start as i64, slab.len() as i64)
                .contiguous();
            Ok(net.class_head.masks(&part, &embedding).transpose(1, 0))
        })?;
        sink(WindowSlab { x: slab, logits })?;
    }
    Ok(())
}

impl WindowNetwork for Vista3d {
    fn forward_window(&self, input: &Tensor, args: &ForwardArgs) -> Result<Tensor> {
        self.forward(input, args)
    }

    fn forward_window_in_slabs(
        &self,
        input: &Tensor,
        args: &ForwardArgs,
        slab_x: usize,
        sink: &mut SlabSink<'_>,
    ) -> Result<()> {
        match class_slabs(args, input, slab_x) {
            Some(cv) => {
                let slabs = even_pieces(input.size()[2] as usize, slab_x);
                class_path_in_slabs(self, input, cv, &slabs, &|f| f(), sink)
            }
            None => whole(self.forward(input, args)?, sink),
        }
    }

    fn concurrent(&self) -> Option<Box<dyn WindowNetwork + Sync + '_>> {
        (self.device() == tch::Device::Cpu)
            .then(|| Box::new(SharedCpuNetwork(self)) as Box<dyn WindowNetwork + Sync + '_>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_everything_once_and_evenly() {
        for total in 1..80 {
            for max in 1..40 {
                let pieces = even_pieces(total, max);
                let mut next = 0;
                for p in &pieces {
                    assert_eq!(p.start, next);
                    assert!(p.len() <= max && !p.is_empty());
                    next = p.end;
                }
                assert_eq!(next, total);
                let sizes: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(hi - lo <= 1, "{total} by {max}: {sizes:?}");
            }
        }
    }
}
