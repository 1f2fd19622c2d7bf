//! The bundle's training loss: MONAI `DiceCELoss(sigmoid=True, squared_pred=True, ...)` applied per prompt.
//!
//! The Dice term follows MONAI 1.6's `compute_tp_fp_fn`: with `squared_pred` it works on squared L2 norms
//! (`|p|^2`, `|t|^2`, `|p - t|^2`), which equals `1 - (2 sum(p t) + nr) / (sum(p^2) + sum(t^2) + dr)` for binary
//! targets and has the same autograd graph as MONAI's. The cross-entropy term is `BCEWithLogits` (one channel).

use anyhow::{ensure, Result};
use tch::{Kind, Reduction, Tensor};

/// `DiceCELoss` options (the bundle's `loss` keys).
#[derive(Debug, Clone, PartialEq)]
pub struct DiceCeSettings {
    /// Added to the Dice numerator.
    pub smooth_nr: f64,
    /// Added to the Dice denominator.
    pub smooth_dr: f64,
    /// Squares in the denominator (`squared_pred`).
    pub squared_pred: bool,
    /// Keep channel 0 (always the case with one channel).
    pub include_background: bool,
    pub lambda_dice: f64,
    pub lambda_ce: f64,
}

impl Default for DiceCeSettings {
    /// `train.json`'s loss.
    fn default() -> Self {
        Self {
            smooth_nr: 0.0,
            smooth_dr: 1e-5,
            squared_pred: true,
            include_background: true,
            lambda_dice: 1.0,
            lambda_ce: 1.0,
        }
    }
}

/// MONAI `DiceLoss(sigmoid=True)` with mean reduction over batch and channels: logits and targets `[B, C, ...]`.
pub fn dice_loss(logits: &Tensor, target: &Tensor, s: &DiceCeSettings) -> Tensor {
    let mut input = logits.sigmoid();
    let mut target = target.to_kind(input.kind());
    if !s.include_background && input.size()[1] > 1 {
        input = input.narrow(1, 1, input.size()[1] - 1);
        target = target.narrow(1, 1, target.size()[1] - 1);
    }
    let dims: Vec<i64> = (2..input.dim() as i64).collect();
    let (tp, fp, fn_) = if s.squared_pred {
        let norm2 = |t: &Tensor| {
            // `torch.norm(p=2, dim)` runs the same kernel and backward as `linalg.vector_norm`.
            t.norm_scalaropt_dim(2, dims.as_slice(), false)
                .pow_tensor_scalar(2)
        };
        let pred_o = norm2(&input);
        let ground_o = norm2(&target);
        let difference = norm2(&(&input - &target));
        let tp: Tensor = (&pred_o + &ground_o - difference) / 2;
        let fp = &pred_o - &tp;
        let fn_ = &ground_o - &tp;
        (tp, fp, fn_)
    } else {
        let tp = (&input * &target).sum_dim_intlist(dims.as_slice(), false, None::<Kind>);
        let fp = input.sum_dim_intlist(dims.as_slice(), false, None::<Kind>) - &tp;
        let fn_ = target.sum_dim_intlist(dims.as_slice(), false, None::<Kind>) - &tp;
        (tp, fp, fn_)
    };
    let fp = fp * 0.5;
    let fn_ = fn_ * 0.5;
    let numerator = &tp * 2 + s.smooth_nr;
    let denominator = (&tp + fp + fn_) * 2 + s.smooth_dr;
    let f: Tensor = 1 - numerator / denominator;
    f.mean(Kind::Float)
}

/// MONAI `DiceCELoss` for one-channel logits `[B, 1, ...]` and a binary target of the same shape.
pub fn dice_ce_loss(logits: &Tensor, target: &Tensor, s: &DiceCeSettings) -> Result<Tensor> {
    ensure!(
        logits.size() == target.size(),
        "loss: logits {:?} and target {:?} differ in shape",
        logits.size(),
        target.size()
    );
    ensure!(
        logits.size().get(1) == Some(&1),
        "loss: one output channel per prompt expected, got {:?}",
        logits.size()
    );
    let dice = dice_loss(logits, target, s);
    let target = target.to_kind(logits.kind());
    let ce = logits.binary_cross_entropy_with_logits(
        &target,
        None::<Tensor>,
        None::<Tensor>,
        Reduction::Mean,
    );
    Ok(dice * s.lambda_dice + ce * s.lambda_ce)
}

/// The bundle trainer's loss: for every prompt `k`, `DiceCE(logits[k], labels == classes[k])`, summed from 0 and
/// divided by the number of prompts. `logits` `[B, 1, X, Y, Z]` (computed in float32), `labels`
/// `[1, 1, X, Y, Z]` (or `[1, X, Y, Z]`) with global class ids.
pub fn per_prompt_loss(
    logits: &Tensor,
    labels: &Tensor,
    classes: &[i64],
    s: &DiceCeSettings,
) -> Result<Tensor> {
    let b = logits.size()[0];
    ensure!(
        b == classes.len() as i64,
        "loss: {b} output channels for {} prompts",
        classes.len()
    );
    let spatial = &logits.size()[2..];
    let labels = labels.view([1, 1, spatial[0], spatial[1], spatial[2]]);
    let mut total = Tensor::zeros([], (Kind::Float, logits.device()));
    for (k, &class) in classes.iter().enumerate() {
        let target = labels.eq(class);
        let out = logits.narrow(0, k as i64, 1).to_kind(Kind::Float);
        total += dice_ce_loss(&out, &target, s)?;
    }
    Ok(total / (classes.len().max(1) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn matches_the_closed_form() {
        tch::manual_seed(0);
        let logits = Tensor::randn([1, 1, 4, 5, 6], (Kind::Float, Device::Cpu));
        let target = Tensor::rand([1, 1, 4, 5, 6], (Kind::Float, Device::Cpu)).gt(0.6);
        let s = DiceCeSettings {
            smooth_nr: 1e-4,
            smooth_dr: 1e-2,
            ..Default::default()
        };
        let got = dice_ce_loss(&logits, &target, &s)
            .unwrap()
            .double_value(&[]);
        let p = logits.to_kind(Kind::Double).sigmoid();
        let t = target.to_kind(Kind::Double);
        let dice = 1.0
            - ((&p * &t).sum(Kind::Double) * 2.0 + 1e-4).double_value(&[])
                / ((&p * &p).sum(Kind::Double) + t.sum(Kind::Double) + 1e-2).double_value(&[]);
        let x = logits.to_kind(Kind::Double);
        // BCE with logits: max(x, 0) - x t + log(1 + exp(-|x|)).
        let bce = (x.clamp_min(0.0) - &x * &t + (x.abs().neg().exp() + 1.0).log())
            .mean(Kind::Double)
            .double_value(&[]);
        assert!((got - (dice + bce)).abs() < 1e-5, "{got} vs {}", dice + bce);
    }

    #[test]
    fn perfect_prediction_has_small_dice_and_gradients_flow() {
        let labels = Tensor::zeros([1, 1, 4, 4, 4], (Kind::Uint8, Device::Cpu));
        let _ = labels.narrow(2, 0, 2).fill_(3);
        let target = labels.eq(3).to_kind(Kind::Float);
        let logits = ((target * 2.0 - 1.0) * 20.0)
            .repeat([2, 1, 1, 1, 1])
            .set_requires_grad(true);
        let loss = per_prompt_loss(&logits, &labels, &[3, 3], &DiceCeSettings::default()).unwrap();
        assert!(loss.double_value(&[]) < 1e-6);
        let wrong = per_prompt_loss(&logits, &labels, &[3, 0], &DiceCeSettings::default()).unwrap();
        assert!(wrong.double_value(&[]) > 5.0);
        wrong.backward();
        assert!(logits.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
