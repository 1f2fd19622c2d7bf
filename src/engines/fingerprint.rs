//! A fingerprint of a network's weights: what exported ONNX files and TensorRT engines are keyed by.

use sha2::{Digest, Sha256};
use tch::{nn, Device, Kind};

/// sha256 over the sorted parameter names, shapes, dtypes and f32 values; 16 hex characters.
pub fn weights_fingerprint(vs: &nn::VarStore) -> String {
    let mut vars: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    for (name, t) in vars {
        h.update(name.as_bytes());
        h.update(format!("{:?}{:?}", t.size(), t.kind()).as_bytes());
        let values: Vec<f32> = Vec::try_from(
            t.detach()
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .contiguous()
                .flatten(0, -1),
        )
        .unwrap_or_default();
        for v in values {
            h.update(v.to_le_bytes());
        }
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}
