//! DistributedDataParallel's gradient averaging, as the bundle configures it (`find_unused_parameters=True`).
//!
//! After every rank's backward pass, [`GradientReducer::reduce`] makes the gradients equal on all ranks:
//! 1. a small all-reduce of the step's bookkeeping: loss, whether the rank had a prompt (a patch without one
//!    contributes nothing), whether Ctrl-C was pressed, and which parameters have a gradient;
//! 2. the gradients, flattened into buckets of `bucket_cap_mb` (DDP's 25 MiB by default, parameters in reverse
//!    order as DDP fills them), each divided by the number of contributing ranks *before* the sum (what DDP's
//!    default hook does with the world size) and all-reduced in place.
//!
//! A parameter that has a gradient on some rank but not on this one gets the others' average (DDP marks it ready
//! with zeros); a parameter without a gradient on every rank keeps none, so AdamW skips it everywhere, as with
//! DDP. The ring all-reduce leaves the same bits on every rank, so the ranks' parameters stay identical.
//!
//! Overlapping the all-reduce with the backward pass (DDP's autograd hooks) is not possible through tch, which
//! exposes no gradient hooks: the buckets are reduced after the backward pass (the share of the step it costs
//! is in benches/RESULTS.md).

use std::time::Instant;

use tch::{Kind, Tensor};

use super::{DistError, ProcessGroup};

/// What one rank brings to a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalStep {
    /// The rank's loss; `None` when its patch gave no prompt (no forward/backward on this rank).
    pub loss: Option<f64>,
    /// Ctrl-C was pressed on this rank: all ranks stop after this step.
    pub stop: bool,
}

/// What the ranks did together in a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlobalStep {
    /// Ranks that had a prompt (0: nobody steps the optimizer).
    pub contributors: usize,
    /// Mean loss over the contributing ranks.
    pub mean_loss: Option<f64>,
    /// Some rank asked to stop.
    pub stop: bool,
    /// Seconds spent in the all-reduces (bookkeeping and gradients).
    pub seconds: f64,
}

/// Averages gradients across the ranks of a process group (see the module documentation).
pub struct GradientReducer {
    params: Vec<(String, Tensor)>,
    /// Indices into `params`, per bucket.
    buckets: Vec<Vec<usize>>,
}

impl GradientReducer {
    /// Buckets `params` (name, trainable tensor) by `bucket_cap_mb`, in reverse order.
    pub fn new(params: &[(String, Tensor)], bucket_cap_mb: f64) -> GradientReducer {
        let cap = (bucket_cap_mb * 1024.0 * 1024.0).max(1.0) as usize;
        let mut buckets: Vec<Vec<usize>> = Vec::new();
        let mut current = Vec::new();
        let mut bytes = 0usize;
        for i in (0..params.len()).rev() {
            let size = params[i].1.numel() * params[i].1.kind().elt_size_in_bytes();
            if !current.is_empty() && bytes + size > cap {
                buckets.push(std::mem::take(&mut current));
                bytes = 0;
            }
            current.push(i);
            bytes += size;
        }
        if !current.is_empty() {
            buckets.push(current);
        }
        GradientReducer {
            params: params
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            buckets,
        }
    }

    /// Number of buckets.
    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Makes the gradients the average over the contributing ranks (see the module documentation).
    pub fn reduce(&self, group: &ProcessGroup, local: LocalStep) -> Result<GlobalStep, DistError> {
        let t0 = Instant::now();
        let device = group.device();
        let n = self.params.len();
        let mut meta = vec![0f64; 3 + n];
        if let Some(l) = local.loss {
            meta[0] = l;
            meta[1] = 1.0;
        }
        meta[2] = f64::from(u8::from(local.stop));
        for (i, (_, p)) in self.params.iter().enumerate() {
            if p.grad().defined() {
                meta[3 + i] = 1.0;
            }
        }
        let mut meta_t = Tensor::from_slice(&meta).to_device(device);
        group.all_reduce_sum(&mut meta_t)?;
        let meta: Vec<f64> = Vec::<f64>::try_from(meta_t.to_device(tch::Device::Cpu))
            .map_err(|e| DistError::Collective(format!("reading the step bookkeeping: {e}")))?;
        let contributors = meta[1].round() as usize;
        let stop = meta[2] > 0.0;
        if contributors == 0 {
            return Ok(GlobalStep {
                contributors,
                mean_loss: None,
                stop,
                seconds: t0.elapsed().as_secs_f64(),
            });
        }
        let used: Vec<bool> = (0..n).map(|i| meta[3 + i] > 0.0).collect();
        tch::no_grad(|| self.materialize(&used));
        for bucket in &self.buckets {
            let members: Vec<usize> = bucket.iter().copied().filter(|&i| used[i]).collect();
            if members.is_empty() {
                continue;
            }
            let mut flat = tch::no_grad(|| {
                let parts: Vec<Tensor> = members
                    .iter()
                    .map(|&i| self.params[i].1.grad().to_kind(Kind::Float).reshape([-1]))
                    .collect();
                Tensor::cat(&parts, 0) / contributors as f64
            });
            group.all_reduce_sum(&mut flat)?;
            tch::no_grad(|| {
                let mut offset = 0i64;
                for &i in &members {
                    let mut g = self.params[i].1.grad();
                    let len = g.numel() as i64;
                    let part = flat.narrow(0, offset, len).view_as(&g);
                    g.copy_(&part);
                    offset += len;
                }
            });
        }
        Ok(GlobalStep {
            contributors,
            mean_loss: Some(meta[0] / contributors as f64),
            stop,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// Gives a zero gradient to every parameter that is used on some rank but has none here.
    fn materialize(&self, used: &[bool]) {
        let missing: Vec<&Tensor> = self
            .params
            .iter()
            .enumerate()
            .filter(|(i, (_, p))| used[*i] && !p.grad().defined())
            .map(|(_, (_, p))| p)
            .collect();
        give_zero_gradients(&missing);
    }
}

/// Gives every tensor of `params` that has no gradient a zero-filled one (a backward pass of zero: tch has no way
/// to assign a gradient directly). Tensors that have one keep it.
pub fn give_zero_gradients(params: &[&Tensor]) {
    let missing: Vec<&&Tensor> = params.iter().filter(|p| !p.grad().defined()).collect();
    if missing.is_empty() {
        return;
    }
    tch::with_grad(|| {
        let total = missing.iter().map(|p| p.sum(Kind::Float)).fold(
            Tensor::zeros([], (Kind::Float, missing[0].device())),
            |a, b| a + b,
        );
        (total * 0.0).backward();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_respect_the_cap_in_reverse_order() {
        let p = |n: i64| Tensor::zeros([n], (Kind::Float, tch::Device::Cpu));
        // 4-byte floats: 256 KiB each for n = 65536.
        let params: Vec<(String, Tensor)> = (0..5).map(|i| (format!("p{i}"), p(65536))).collect();
        let r = GradientReducer::new(&params, 0.5); // 512 KiB: two parameters per bucket
        assert_eq!(r.buckets, vec![vec![4, 3], vec![2, 1], vec![0]]);
        let r = GradientReducer::new(&params, 25.0);
        assert_eq!(r.bucket_count(), 1);
        // A parameter larger than the cap gets a bucket of its own.
        let r = GradientReducer::new(&params, 0.1);
        assert_eq!(r.bucket_count(), 5);
    }

    #[test]
    fn missing_gradients_are_materialized_as_zeros() {
        let a = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let b = Tensor::ones([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        (a.sum(Kind::Float) * 2.0).backward();
        let r = GradientReducer::new(
            &[
                ("a".into(), a.shallow_clone()),
                ("b".into(), b.shallow_clone()),
            ],
            25.0,
        );
        assert!(!b.grad().defined());
        r.materialize(&[true, true]);
        assert_eq!(Vec::<f32>::try_from(b.grad()).unwrap(), vec![0.0, 0.0]);
        assert_eq!(Vec::<f32>::try_from(a.grad()).unwrap(), vec![2.0, 2.0, 2.0]);
    }
}
