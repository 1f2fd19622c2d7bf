//! Where engines split the class path of a window, written in libtorch: [`encode`] is what an encoder engine
//! computes once per window (the image encoder, the automatic decoder and the class head's `image_post_mapping`,
//! four full-resolution convolutions that do not depend on the prompts), [`classify`] what a class-head engine
//! computes for each chunk of prompts (class embeddings, MLP, and the per-voxel product with the mapped
//! features). `classify(encode(x))` is the network's class path (`Vista3d::forward` with class prompts only).
//!
//! The ONNX export ([`super::onnx`]) writes the same split, so ONNX Runtime and TensorRT engines compute these
//! two functions; tests compare the engines with them, and test fakes are made of them.

use tch::Tensor;

use super::EngineError;
use crate::model::Vista3d;

/// Image windows `[b, 1, H, W, D]` -> mapped features `[b, E, H, W, D]`: encoder, automatic decoder and
/// `class_head.image_post_mapping`.
pub fn encode(net: &Vista3d, image: &Tensor) -> Result<Tensor, EngineError> {
    let (_, auto) = net.image_encoder.forward(image, false, true);
    let features = auto.ok_or_else(|| {
        EngineError::Runtime("the image encoder returned no automatic-branch features".into())
    })?;
    Ok(net.class_head.post_mapping(&features))
}

/// Mapped features `[b, E, H, W, D]` and global class ids `[B, 1]` -> logits `[B, b, H, W, D]`.
pub fn classify(net: &Vista3d, mapped: &Tensor, class_ids: &Tensor) -> Tensor {
    net.class_head.logits(mapped, class_ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ForwardArgs;
    use crate::Vista3dConfig;
    use tch::{nn, Device, Kind};

    #[test]
    fn the_split_is_the_class_path() {
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Vista3d::new(&vs.root(), Vista3dConfig::with_width(8)).unwrap();
        let image = Tensor::randn([1, 1, 32, 32, 32], (Kind::Float, Device::Cpu));
        let ids = Tensor::from_slice(&[3i64, 1, 14]).view([3, 1]);
        let whole = tch::no_grad(|| {
            net.forward(
                &image,
                &ForwardArgs {
                    class_vector: Some(&ids),
                    ..Default::default()
                },
            )
        })
        .unwrap();
        let split = tch::no_grad(|| classify(&net, &encode(&net, &image).unwrap(), &ids));
        // [B, b, ...] from the split, [B, 1, ...] from the network: the same numbers, bit for bit.
        assert_eq!(split.size(), whole.size());
        assert!(split.equal(&whole));
    }
}
