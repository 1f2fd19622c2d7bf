//! The project's numeric comparison: the parity metric used by tests, `export-onnx --verify` and `bench`.

use tch::{Device, Kind, Tensor};

/// `max |actual - expected| / max |expected|` in double precision (the absolute difference when `expected` is
/// all zeros). NaN positions must be handled by the caller.
pub fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    let a = actual.to_device(Device::Cpu).to_kind(Kind::Double);
    let b = expected.to_device(Device::Cpu).to_kind(Kind::Double);
    let scale = b.abs().max().double_value(&[]);
    let diff = (a - &b).abs().max().double_value(&[]);
    if scale > 0.0 {
        diff / scale
    } else {
        diff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_is_max_abs_over_max_abs() {
        let b = Tensor::from_slice(&[1.0f32, -4.0, 2.0]);
        let a = Tensor::from_slice(&[1.5f32, -4.0, 2.0]);
        assert!((relative_error(&a, &b) - 0.125).abs() < 1e-12);
        let z = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        assert!((relative_error(&a, &z) - 4.0).abs() < 1e-12);
    }
}
