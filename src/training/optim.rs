//! AdamW exactly as `torch.optim.AdamW` (single-tensor path, `amsgrad=False`, `maximize=False`), on tch
//! tensors, with a state that can be saved into and restored from a checkpoint so training resumes exactly.
//!
//! Per parameter with a gradient, at step `t`:
//! `p *= 1 - lr wd; m.lerp_(g, 1 - b1); v = v b2 + (1 - b2) g^2;`
//! `p += -lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`. Parameters without a gradient are skipped
//! (their state is created on their first gradient), as in PyTorch.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use tch::{Kind, Tensor};

use crate::checkpoint::{DType, RawTensor};

/// Prefix of the optimizer tensors inside a training checkpoint.
pub const STATE_PREFIX: &str = "optimizer.";

/// AdamW hyper-parameters (PyTorch defaults except where the config says otherwise).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWSettings {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (PyTorch's AdamW default 0.01; `train.json` uses 1e-5).
    pub weight_decay: f64,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Moments of one parameter.
#[derive(Debug)]
struct ParamState {
    step: f64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// The optimizer: settings, current learning rate and per-parameter state keyed by parameter name.
#[derive(Debug)]
pub struct AdamW {
    pub settings: AdamWSettings,
    /// The learning rate of the next step (the schedule sets it per epoch).
    pub lr: f64,
    state: BTreeMap<String, ParamState>,
}

impl AdamW {
    pub fn new(settings: AdamWSettings) -> Self {
        Self {
            settings,
            lr: settings.lr,
            state: BTreeMap::new(),
        }
    }

    /// Number of parameters that have a state (received a gradient at least once).
    pub fn len(&self) -> usize {
        self.state.len()
    }

    /// True before the first step.
    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }

    /// The step count of one parameter (0 when it never had a gradient).
    pub fn step_count(&self, name: &str) -> f64 {
        self.state.get(name).map_or(0.0, |s| s.step)
    }

    /// One AdamW step over `params` (name, parameter); parameters whose gradient is undefined are skipped.
    pub fn step(&mut self, params: &[(String, Tensor)]) {
        let AdamWSettings {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.settings;
        let lr = self.lr;
        tch::no_grad(|| {
            for (name, param) in params {
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                let state = self
                    .state
                    .entry(name.clone())
                    .or_insert_with(|| ParamState {
                        step: 0.0,
                        exp_avg: param.zeros_like(),
                        exp_avg_sq: param.zeros_like(),
                    });
                state.step += 1.0;
                let mut p = param.shallow_clone();
                if weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * weight_decay);
                }
                let _ = state.exp_avg.lerp_(&grad, 1.0 - beta1);
                let _ = state.exp_avg_sq.g_mul_scalar_(beta2);
                // addcmul_(g, g, value=1-b2) computes value * g * g: the same products in the same order.
                let _ = state.exp_avg_sq.addcmul_(&(&grad * (1.0 - beta2)), &grad);
                let bias_correction1 = 1.0 - beta1.powf(state.step);
                let bias_correction2 = 1.0 - beta2.powf(state.step);
                let step_size = lr / bias_correction1;
                let bias_correction2_sqrt = bias_correction2.powf(0.5);
                let mut denom = state.exp_avg_sq.sqrt() / bias_correction2_sqrt;
                let _ = denom.g_add_scalar_(eps);
                // addcdiv_(m, denom, value=-step_size) computes (value * m) / denom.
                let _ = p.addcdiv_(&(&state.exp_avg * -step_size), &denom);
            }
        });
    }

    /// The state as named tensors (`optimizer.<param>.exp_avg`, `.exp_avg_sq`, `.step` as a float64 scalar), on
    /// the host, for a checkpoint.
    pub fn state_tensors(&self) -> Result<Vec<(String, RawTensor)>> {
        let mut out = Vec::with_capacity(self.state.len() * 3);
        for (name, s) in &self.state {
            out.push((
                format!("{STATE_PREFIX}{name}.exp_avg"),
                raw_f32(&s.exp_avg)?,
            ));
            out.push((
                format!("{STATE_PREFIX}{name}.exp_avg_sq"),
                raw_f32(&s.exp_avg_sq)?,
            ));
            out.push((
                format!("{STATE_PREFIX}{name}.step"),
                RawTensor::new(DType::F64, vec![], s.step.to_le_bytes().to_vec())?,
            ));
        }
        Ok(out)
    }

    /// Restores the state written by [`AdamW::state_tensors`] for the parameters `params`; other tensors of
    /// `tensors` are ignored. Shapes must match the parameters.
    pub fn load_state<'a>(
        &mut self,
        tensors: impl IntoIterator<Item = (&'a str, &'a RawTensor)>,
        params: &[(String, Tensor)],
    ) -> Result<()> {
        let by_name: BTreeMap<&str, &Tensor> =
            params.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut parts: BTreeMap<String, [Option<&RawTensor>; 3]> = BTreeMap::new();
        for (key, raw) in tensors {
            let Some(rest) = key.strip_prefix(STATE_PREFIX) else {
                continue;
            };
            let (name, slot) = if let Some(n) = rest.strip_suffix(".exp_avg_sq") {
                (n, 1)
            } else if let Some(n) = rest.strip_suffix(".exp_avg") {
                (n, 0)
            } else if let Some(n) = rest.strip_suffix(".step") {
                (n, 2)
            } else {
                bail!("unknown optimizer state tensor '{key}'");
            };
            parts.entry(name.to_string()).or_default()[slot] = Some(raw);
        }
        let mut state = BTreeMap::new();
        for (name, [m, v, step]) in parts {
            let param = by_name
                .get(name.as_str())
                .with_context(|| format!("optimizer state for unknown parameter '{name}'"))?;
            let (Some(m), Some(v), Some(step)) = (m, v, step) else {
                bail!("incomplete optimizer state for parameter '{name}'");
            };
            let to_param = |raw: &RawTensor, what: &str| -> Result<Tensor> {
                let t = crate::model::to_tensor(raw);
                ensure!(
                    t.size() == param.size(),
                    "optimizer {what} of '{name}' has shape {:?}, the parameter {:?}",
                    t.size(),
                    param.size()
                );
                Ok(t.to_kind(param.kind()).to_device(param.device()))
            };
            let step = crate::model::to_tensor(step)
                .to_kind(Kind::Double)
                .double_value(&[]);
            state.insert(
                name.clone(),
                ParamState {
                    step,
                    exp_avg: to_param(m, "exp_avg")?,
                    exp_avg_sq: to_param(v, "exp_avg_sq")?,
                },
            );
        }
        self.state = state;
        Ok(())
    }
}

/// A float tensor copied to the host as float32 raw bytes.
pub fn raw_f32(t: &Tensor) -> Result<RawTensor> {
    let host = t
        .detach()
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let shape: Vec<usize> = host.size().iter().map(|&d| d as usize).collect();
    let values: Vec<f32> = Vec::try_from(host.flatten(0, -1))?;
    Ok(RawTensor::from_f32(shape, &values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The reference update in float64 by hand.
    #[test]
    fn matches_the_adamw_formula_over_three_steps() {
        let s = AdamWSettings {
            lr: 0.1,
            weight_decay: 0.05,
            ..Default::default()
        };
        let mut opt = AdamW::new(s);
        let p = Tensor::from_slice(&[1.0f64, -2.0, 0.5]).set_requires_grad(true);
        let frozen = Tensor::from_slice(&[3.0f64]).set_requires_grad(true);
        let params = vec![
            ("p".to_string(), p.shallow_clone()),
            ("frozen".to_string(), frozen.shallow_clone()),
        ];
        let (mut x, mut m, mut v) = (vec![1.0f64, -2.0, 0.5], [0.0f64; 3], [0.0f64; 3]);
        for t in 1..=3 {
            p.shallow_clone().zero_grad();
            let loss = (&p * &p * (t as f64)).sum(Kind::Double);
            loss.backward();
            opt.step(&params);
            for i in 0..3 {
                let g = 2.0 * x[i] * t as f64;
                x[i] *= 1.0 - 0.1 * 0.05;
                m[i] = m[i] + (g - m[i]) * 0.1;
                v[i] = v[i] * 0.999 + 0.001 * g * g;
                let bc1 = 1.0 - 0.9f64.powi(t);
                let bc2 = 1.0 - 0.999f64.powi(t);
                x[i] -= 0.1 / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + 1e-8);
            }
            let got: Vec<f64> = Vec::try_from(p.detach()).unwrap();
            for i in 0..3 {
                assert!((got[i] - x[i]).abs() < 1e-12, "step {t}: {got:?} vs {x:?}");
            }
        }
        // No gradient, no update and no state.
        assert_eq!(frozen.double_value(&[0]), 3.0);
        assert_eq!(opt.len(), 1);
        assert_eq!(opt.step_count("p"), 3.0);
    }

    #[test]
    fn state_round_trip_resumes_identically() {
        let make = || {
            Tensor::from_slice(&[0.3f32, -0.7, 1.1, 2.0])
                .view([2, 2])
                .set_requires_grad(true)
        };
        let run = |p: &Tensor, opt: &mut AdamW, steps: std::ops::Range<i32>| {
            let params = vec![("w".to_string(), p.shallow_clone())];
            for t in steps {
                p.shallow_clone().zero_grad();
                ((p * p).sum(Kind::Float) * (t as f64 + 1.0)).backward();
                opt.step(&params);
            }
        };
        let s = AdamWSettings::default();
        let a = make();
        let mut opt_a = AdamW::new(s);
        run(&a, &mut opt_a, 0..4);

        let b = make();
        let mut opt_b = AdamW::new(s);
        run(&b, &mut opt_b, 0..2);
        let saved = opt_b.state_tensors().unwrap();
        let mut opt_c = AdamW::new(s);
        let params = vec![("w".to_string(), b.shallow_clone())];
        opt_c
            .load_state(saved.iter().map(|(n, r)| (n.as_str(), r)), &params)
            .unwrap();
        run(&b, &mut opt_c, 2..4);
        assert!(a.detach().equal(&b.detach()), "{a:?} vs {b:?}");

        // Wrong shapes are refused.
        let other = vec![(
            "w".to_string(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        )];
        let err = AdamW::new(s)
            .load_state(saved.iter().map(|(n, r)| (n.as_str(), r)), &other)
            .unwrap_err();
        assert!(format!("{err:#}").contains("shape"), "{err:#}");
    }
}
