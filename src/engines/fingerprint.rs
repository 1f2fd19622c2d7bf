//! A short, stable identity of a model's weights, used to key exported ONNX files and TensorRT engines.

use sha2::{Digest, Sha256};
use tch::nn::VarStore;

use super::tensor_bytes::f32_bytes;
use crate::fsutil::hex;

/// sha256 over every variable of `vs`, sorted by name: name, shape, dtype and the values as raw f32 bytes;
/// the first 16 hex characters. Any change of a single weight changes it; it does not depend on the device
/// or on the order variables were created in.
pub fn weights_fingerprint(vs: &VarStore) -> String {
    let mut vars: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    for (name, t) in &vars {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        let dims = t.size();
        h.update((dims.len() as u64).to_le_bytes());
        for d in dims {
            h.update(d.to_le_bytes());
        }
        h.update(format!("{:?}", t.kind()).as_bytes());
        h.update(f32_bytes(t));
    }
    hex(&h.finalize())[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device};

    /// Two variables with values derived from `seed` (no global RNG: tests run in parallel).
    fn store(seed: i64) -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let w = (&root / "b").var("weight", &[3, 4], nn::Init::Const(0.0));
        let b = (&root / "a").var("bias", &[4], nn::Init::Const(0.0));
        tch::no_grad(|| {
            for (mut t, n) in [(w, 12), (b, 4)] {
                let values: Vec<f32> = (0..n).map(|i| (i * 7 + seed) as f32 * 0.1).collect();
                let src = tch::Tensor::from_slice(&values).view(t.size().as_slice());
                t.copy_(&src);
            }
        });
        vs
    }

    #[test]
    fn stable_across_calls_and_stores() {
        let fp = weights_fingerprint(&store(1));
        assert_eq!(fp.len(), 16);
        assert!(fp.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(weights_fingerprint(&store(1)), fp);
        assert_ne!(weights_fingerprint(&store(2)), fp);
    }

    #[test]
    fn changes_with_one_weight() {
        let vs = store(1);
        let before = weights_fingerprint(&vs);
        tch::no_grad(|| {
            let w = vs.variables()["b.weight"].shallow_clone();
            let _ = w.get(1).get(2).fill_(0.5);
        });
        assert_ne!(weights_fingerprint(&vs), before);
    }

    #[test]
    fn changes_with_a_name_or_shape() {
        let vs = VarStore::new(Device::Cpu);
        let _ = vs.root().var("x", &[2, 3], nn::Init::Const(1.0));
        let vs2 = VarStore::new(Device::Cpu);
        let _ = vs2.root().var("x", &[3, 2], nn::Init::Const(1.0));
        let vs3 = VarStore::new(Device::Cpu);
        let _ = vs3.root().var("y", &[2, 3], nn::Init::Const(1.0));
        let fps = [&vs, &vs2, &vs3].map(weights_fingerprint);
        assert_ne!(fps[0], fps[1]);
        assert_ne!(fps[0], fps[2]);
    }
}
