//! Instance normalization fused with what follows it in VISTA3D's residual blocks (an optional residual and ReLU
//! or LeakyReLU), on CPUs with AVX2 and FMA: one pass for each channel's statistics and one that normalizes,
//! adds and activates, where libtorch makes two passes for the statistics and one more each for the
//! normalization, the addition and the activation.
//!
//! It runs where the thread's switch for vista3d's own CPU kernels is on ([`super::winograd::enable`], the
//! request's `cpu_convolution`): results differ from libtorch's by rounding alone (statistics accumulated in
//! float64; tests below), so libtorch's path stays the reference elsewhere.

use tch::{Device, Kind, Tensor};

use super::openmp::{for_each_share, SharedPtr};
use super::winograd;

/// The activation after the normalization (and the residual, if any).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// `max(x, 0)` (NaN stays NaN, as libtorch's).
    Relu,
    /// `x` where `x > 0`, else `slope * x`.
    LeakyRelu(f32),
}

/// `act(instance_norm(x) [* weight + bias] [+ residual])` for `x` `[N, C, ...]` with the statistics of each
/// `(n, c)` over the spatial dims (biased variance, `eps` inside the square root, as `InstanceNorm3d`), written
/// over `x` itself when `in_place` (the caller's tensor must then share its storage with nothing that is read
/// later), else into a new tensor. `None` where the fused path does not apply (switch off, CPU without AVX2/FMA,
/// not contiguous float32 CPU tensors of matching shapes, autograd): the caller then runs libtorch's operators.
pub fn instance_norm_act(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    residual: Option<&Tensor>,
    act: Activation,
    in_place: bool,
) -> Option<Tensor> {
    if !winograd::enabled() || !winograd::available() {
        return None;
    }
    let size = x.size();
    let plain_f32 = |t: &Tensor| {
        t.device() == Device::Cpu
            && t.kind() == Kind::Float
            && t.is_contiguous()
            && !t.requires_grad()
    };
    if size.len() < 3 || !plain_f32(x) {
        return None;
    }
    let (planes, channels) = ((size[0] * size[1]) as usize, size[1] as usize);
    let plane = size[2..].iter().product::<i64>() as usize;
    if plane == 0 || planes == 0 {
        return None;
    }
    let affine = |t: Option<&Tensor>, default: f32| -> Option<Vec<f32>> {
        match t {
            None => Some(vec![default; channels]),
            // Parameters may require grad: they are only read (the switch is off wherever autograd runs).
            Some(t)
                if t.device() == Device::Cpu
                    && t.kind() == Kind::Float
                    && t.numel() == channels =>
            {
                Vec::<f32>::try_from(&t.detach()).ok()
            }
            Some(_) => None,
        }
    };
    let (gamma, beta) = (affine(weight, 1.0)?, affine(bias, 0.0)?);
    if let Some(r) = residual {
        if !plain_f32(r) || r.size() != size {
            return None;
        }
    }
    let out = if in_place {
        x.shallow_clone()
    } else {
        x.empty_like()
    };
    let (from, to) = (
        SharedPtr(x.data_ptr() as *mut f32),
        SharedPtr(out.data_ptr() as *mut f32),
    );
    let residual = residual.map(|r| SharedPtr(r.data_ptr() as *mut f32));
    let threads = tch::get_num_threads().max(1) as usize;
    for_each_share((0..planes).collect(), threads, |p| {
        let offset = p * plane;
        let c = p % channels;
        // SAFETY: `x`, `out` and the residual are contiguous float32 CPU tensors of `planes * plane` elements
        // that outlive this call; each share reads and writes only its own plane (in place: the same plane of
        // the same buffer, read before it is written element by element).
        unsafe {
            let x = std::slice::from_raw_parts(from.ptr().add(offset), plane);
            let (mean, variance) = avx2::statistics(x);
            let scale = f64::from(gamma[c]) / (variance + eps).sqrt();
            avx2::normalize(
                from.ptr().add(offset),
                residual.as_ref().map(|r| r.ptr().add(offset) as *const f32),
                to.ptr().add(offset),
                plane,
                [mean as f32, scale as f32, beta[c]],
                act,
            );
        }
    });
    Some(out)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Activation;

    /// Mean and biased variance of `x`, accumulated in float64.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn statistics(x: &[f32]) -> (f64, f64) {
        let mut sums = [_mm256_setzero_pd(); 4];
        let mut squares = [_mm256_setzero_pd(); 4];
        let chunks = x.chunks_exact(16);
        let tail = chunks.remainder();
        for chunk in chunks {
            let p = chunk.as_ptr();
            let (a, b) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
            let halves = [
                _mm256_cvtps_pd(_mm256_castps256_ps128(a)),
                _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(a)),
                _mm256_cvtps_pd(_mm256_castps256_ps128(b)),
                _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(b)),
            ];
            for (i, h) in halves.into_iter().enumerate() {
                sums[i] = _mm256_add_pd(sums[i], h);
                squares[i] = _mm256_fmadd_pd(h, h, squares[i]);
            }
        }
        let mut lanes = [0f64; 4];
        let (mut sum, mut square) = (0f64, 0f64);
        for i in 0..4 {
            _mm256_storeu_pd(lanes.as_mut_ptr(), sums[i]);
            sum += lanes.iter().sum::<f64>();
            _mm256_storeu_pd(lanes.as_mut_ptr(), squares[i]);
            square += lanes.iter().sum::<f64>();
        }
        for &v in tail {
            let v = f64::from(v);
            sum += v;
            square += v * v;
        }
        let n = x.len() as f64;
        let mean = sum / n;
        (mean, (square / n - mean * mean).max(0.0))
    }

    /// `to[i] = act((from[i] - mean) * scale + shift [+ residual[i]])` for `i < len` (the mean subtracted first: a
    /// constant input gives exactly `shift`); `to` may be `from`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the pointers hold `len` floats; `to` is `from` or overlaps neither input.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn normalize(
        from: *const f32,
        residual: Option<*const f32>,
        to: *mut f32,
        len: usize,
        [mean, scale, shift]: [f32; 3],
        act: Activation,
    ) {
        let (vmean, vscale, vshift) = (
            _mm256_set1_ps(mean),
            _mm256_set1_ps(scale),
            _mm256_set1_ps(shift),
        );
        let zero = _mm256_setzero_ps();
        let slope = match act {
            Activation::LeakyRelu(slope) => slope,
            _ => 0.0,
        };
        let vslope = _mm256_set1_ps(slope);
        let activate = |y: __m256| match act {
            // max(0, y) returns y where y is NaN (the second operand), as libtorch's ReLU.
            Activation::Relu => _mm256_max_ps(zero, y),
            Activation::LeakyRelu(_) => _mm256_blendv_ps(
                _mm256_mul_ps(y, vslope),
                y,
                _mm256_cmp_ps::<_CMP_GT_OQ>(y, zero),
            ),
        };
        let vectors = len / 8;
        for v in 0..vectors {
            let i = 8 * v;
            let centred = _mm256_sub_ps(_mm256_loadu_ps(from.add(i)), vmean);
            let mut y = _mm256_fmadd_ps(centred, vscale, vshift);
            if let Some(r) = residual {
                y = _mm256_add_ps(y, _mm256_loadu_ps(r.add(i)));
            }
            _mm256_storeu_ps(to.add(i), activate(y));
        }
        for i in 8 * vectors..len {
            let mut y = (*from.add(i) - mean).mul_add(scale, shift);
            if let Some(r) = residual {
                y += *r.add(i);
            }
            *to.add(i) = match act {
                Activation::Relu => {
                    if y.is_nan() {
                        y
                    } else {
                        y.max(0.0)
                    }
                }
                Activation::LeakyRelu(slope) => {
                    if y > 0.0 {
                        y
                    } else {
                        y * slope
                    }
                }
            };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    use super::Activation;

    pub(super) unsafe fn statistics(_: &[f32]) -> (f64, f64) {
        unreachable!("the fused path runs only where winograd::available() is true")
    }

    pub(super) unsafe fn normalize(
        _: *const f32,
        _: Option<*const f32>,
        _: *mut f32,
        _: usize,
        _: [f32; 3],
        _: Activation,
    ) {
        unreachable!("the fused path runs only where winograd::available() is true")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libtorch's operators, as the model runs them without the fused path.
    fn reference(
        x: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        residual: Option<&Tensor>,
        act: Activation,
    ) -> Tensor {
        let mut y = x.instance_norm(
            weight,
            bias,
            None::<&Tensor>,
            None::<&Tensor>,
            true,
            0.1,
            1e-5,
            true,
        );
        if let Some(r) = residual {
            y += r;
        }
        match act {
            Activation::Relu => y.relu(),
            Activation::LeakyRelu(slope) => {
                assert_eq!(slope, 0.01, "libtorch's default slope");
                y.leaky_relu()
            }
        }
    }

    fn max_relative(a: &Tensor, b: &Tensor) -> f64 {
        f64::try_from((a - b).abs().max()).unwrap() / f64::try_from(b.abs().max()).unwrap()
    }

    #[test]
    fn matches_libtorch_within_rounding() {
        if !winograd::available() {
            eprintln!("skipped: this CPU has no AVX2/FMA");
            return;
        }
        tch::manual_seed(11);
        let _on = winograd::enable(true);
        let opts = (Kind::Float, Device::Cpu);
        // A plane that is not a multiple of 8 or 16 (tails), a large mean next to a small spread, batch 2.
        for (shape, offset) in [
            ([2, 3, 5, 6, 7], 0.0),
            ([1, 8, 16, 16, 16], 0.0),
            ([1, 4, 9, 9, 9], 300.0),
        ] {
            let x = Tensor::randn(shape, opts) * 2.5 + offset;
            let c = shape[1];
            let weight = Tensor::rand([c], opts) + 0.5;
            let bias = Tensor::randn([c], opts);
            let residual = Tensor::randn(shape, opts);
            for act in [Activation::Relu, Activation::LeakyRelu(0.01)] {
                for (w, b, r) in [
                    (None, None, None),
                    (Some(&weight), Some(&bias), None),
                    (None, None, Some(&residual)),
                ] {
                    let want = reference(&x, w, b, r, act);
                    let got = instance_norm_act(&x, w, b, 1e-5, r, act, false).expect("applies");
                    let rel = max_relative(&got, &want);
                    assert!(rel < 1e-5, "{shape:?} + {offset} {act:?}: {rel:e}");
                }
            }
        }
    }

    #[test]
    fn in_place_overwrites_the_input_and_a_new_tensor_leaves_it() {
        if !winograd::available() {
            return;
        }
        let _on = winograd::enable(true);
        let x = Tensor::randn([1, 2, 4, 4, 5], (Kind::Float, Device::Cpu));
        let before = x.copy();
        let fresh = instance_norm_act(&x, None, None, 1e-5, None, Activation::Relu, false).unwrap();
        assert!(x.equal(&before), "the input is left as it was");
        let same = instance_norm_act(&x, None, None, 1e-5, None, Activation::Relu, true).unwrap();
        assert_eq!(same.data_ptr(), x.data_ptr());
        assert!(x.equal(&fresh), "written over the input, same values");
    }

    #[test]
    fn nan_propagates_and_constant_planes_give_zero() {
        if !winograd::available() {
            return;
        }
        let _on = winograd::enable(true);
        let opts = (Kind::Float, Device::Cpu);
        let constant = Tensor::full([1, 1, 3, 3, 3], 7.0, opts);
        let y = instance_norm_act(
            &constant,
            None,
            None,
            1e-5,
            None,
            Activation::LeakyRelu(0.01),
            false,
        )
        .unwrap();
        assert_eq!(f64::try_from(y.abs().max()).unwrap(), 0.0);
        let x = Tensor::randn([1, 1, 4, 4, 4], opts);
        let _ = x.get(0).get(0).get(0).get(0).get(0).fill_(f64::NAN);
        for act in [Activation::Relu, Activation::LeakyRelu(0.01)] {
            let y = instance_norm_act(&x, None, None, 1e-5, None, act, false).unwrap();
            assert!(
                bool::try_from(y.isnan().all()).unwrap(),
                "{act:?}: NaN statistics make every value NaN"
            );
        }
    }

    #[test]
    fn applies_only_where_switched_on_and_supported() {
        let opts = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([1, 8, 4, 4, 4], opts);
        let norm = |x: &Tensor, r: Option<&Tensor>| {
            instance_norm_act(x, None, None, 1e-5, r, Activation::Relu, false)
        };
        assert!(norm(&x, None).is_none(), "off unless switched on");
        let _on = winograd::enable(true);
        assert_eq!(norm(&x, None).is_some(), winograd::available());
        assert!(norm(&x.to_kind(Kind::Double), None).is_none());
        assert!(norm(&x.transpose(2, 3), None).is_none(), "not contiguous");
        assert!(
            norm(&x, Some(&Tensor::randn([1, 8, 4, 4, 3], opts))).is_none(),
            "residual of another shape"
        );
        let weight = Tensor::ones([4], opts);
        assert!(
            instance_norm_act(&x, Some(&weight), None, 1e-5, None, Activation::Relu, false)
                .is_none()
        );
        assert!(norm(&x.set_requires_grad(true), None).is_none());
    }
}
