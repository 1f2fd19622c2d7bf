//! Learning-rate schedules, stepped once per epoch as the bundle's `LrScheduleHandler`: MONAI
//! `WarmupCosineSchedule` (train.json) or a constant rate (`lr_schedule#activate: false`, train_continual.json).

/// The learning rate of each epoch.
#[derive(Debug, Clone, PartialEq)]
pub enum LrSchedule {
    /// The base rate throughout.
    Constant { base_lr: f64 },
    /// MONAI `WarmupCosineSchedule(t_total, warmup_steps, warmup_multiplier, end_lr=0, cycles=0.5)`.
    WarmupCosine {
        base_lr: f64,
        t_total: usize,
        warmup_steps: usize,
        warmup_multiplier: f64,
        end_lr: f64,
        cycles: f64,
    },
}

impl LrSchedule {
    /// The bundle's schedule for `epochs` epochs: warm-up 3 epochs from 0.1 of the rate, then half a cosine.
    pub fn bundle_cosine(base_lr: f64, epochs: usize) -> Self {
        Self::WarmupCosine {
            base_lr,
            t_total: epochs,
            warmup_steps: 3.min(epochs),
            warmup_multiplier: 0.1,
            end_lr: 0.0,
            cycles: 0.5,
        }
    }

    /// The learning rate used during epoch `epoch` (0-based; the scheduler has stepped `epoch` times).
    pub fn lr(&self, epoch: usize) -> f64 {
        match *self {
            Self::Constant { base_lr } => base_lr,
            Self::WarmupCosine {
                base_lr,
                t_total,
                warmup_steps,
                warmup_multiplier,
                end_lr,
                cycles,
            } => {
                let warmup = warmup_steps.min(t_total);
                if epoch < warmup {
                    let f = epoch as f64 / (warmup as f64).max(1.0);
                    return base_lr * (warmup_multiplier + (1.0 - warmup_multiplier) * f);
                }
                let progress =
                    (epoch - warmup) as f64 / (t_total.saturating_sub(warmup).max(1)) as f64;
                let factor =
                    (0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * progress).cos())).max(0.0);
                (base_lr * factor).max(end_lr)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_schedule_values() {
        let s = LrSchedule::bundle_cosine(1e-4, 5);
        let lrs: Vec<f64> = (0..5).map(|e| s.lr(e)).collect();
        // Warm-up 0.1, 0.4, 0.7 of the rate; then cosine over the remaining 2 epochs: 1.0, 0.5.
        let expected = [0.1e-4, 0.4e-4, 0.7e-4, 1e-4, 0.5e-4];
        for (a, b) in lrs.iter().zip(expected) {
            assert!((a - b).abs() < 1e-15, "{lrs:?}");
        }
        assert_eq!(LrSchedule::Constant { base_lr: 5e-5 }.lr(100), 5e-5);
        // Fewer epochs than warm-up steps: warm-up is cut to t_total.
        let short = LrSchedule::bundle_cosine(1.0, 2);
        assert!((short.lr(0) - 0.1).abs() < 1e-15 && (short.lr(1) - 0.55).abs() < 1e-15);
    }
}
