//! Raw little-endian bytes of a tensor's values: what the weights fingerprint hashes and what ONNX initializers
//! hold. Shared by [`super::fingerprint`] and [`super::onnx`] (neither imports the other for it).

use tch::{Device, Kind, Tensor};

/// Raw little-endian f32 bytes of a tensor (any device or float kind), in row-major order.
pub(crate) fn f32_bytes(t: &Tensor) -> Vec<u8> {
    float_bytes(t, Kind::Float)
}

/// Raw little-endian bytes of a tensor converted to `kind` (`Float` or `Half`), in row-major order.
pub(crate) fn float_bytes(t: &Tensor, kind: Kind) -> Vec<u8> {
    let t = t.detach().to_device(Device::Cpu).to_kind(kind).contiguous();
    let numel = t.numel();
    let width = kind.elt_size_in_bytes();
    let mut bytes = vec![0u8; numel * width];
    t.copy_data_u8(&mut bytes, numel);
    if cfg!(target_endian = "big") {
        for chunk in bytes.chunks_exact_mut(width) {
            chunk.reverse();
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_little_endian_values() {
        let t = Tensor::from_slice(&[1.0f32, -2.5]);
        let mut expected = 1.0f32.to_le_bytes().to_vec();
        expected.extend((-2.5f32).to_le_bytes());
        assert_eq!(f32_bytes(&t), expected);
        let half = float_bytes(&t, Kind::Half);
        assert_eq!(half, [0x00, 0x3c, 0x00, 0xc1]);
    }
}
