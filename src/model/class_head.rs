//! The class head: MONAI `ClassMappingClassify(n_classes=512, use_mlp=True)`.

use tch::nn::{self, Module};
use tch::Tensor;

use super::layers::{linear, InstanceNorm, UnetResBlock};

/// Per-voxel dot product of an MLP-mapped class embedding with post-mapped image features.
#[derive(Debug)]
pub struct ClassHead {
    image_post_mapping: [UnetResBlock; 2],
    class_embeddings: nn::Embedding,
    mlp_in: nn::Linear,
    mlp_out: nn::Linear,
}

impl ClassHead {
    pub fn new(p: nn::Path, n_classes: i64, feature_size: i64) -> Self {
        let post = &p / "image_post_mapping";
        Self {
            image_post_mapping: [
                UnetResBlock::new(&post / 0, feature_size),
                UnetResBlock::new(&post / 1, feature_size),
            ],
            class_embeddings: nn::embedding(
                &p / "class_embeddings",
                n_classes,
                feature_size,
                Default::default(),
            ),
            mlp_in: linear(&p / "mlp" / 0, feature_size, feature_size),
            mlp_out: linear(&p / "mlp" / 3, feature_size, feature_size),
        }
    }

    /// The class embeddings after the MLP, `[B, 1, C]`, for `class_vector` `[B, 1]` (global class ids).
    pub fn class_embedding(&self, class_vector: &Tensor) -> Tensor {
        let e = self.class_embeddings.forward(class_vector);
        let e = InstanceNorm::plain()
            .forward(&self.mlp_in.forward(&e))
            .gelu("none");
        self.mlp_out.forward(&e)
    }

    /// The image features after the two post-mapping blocks, `[b, C, H, W, D]`.
    pub fn post_mapping(&self, features: &Tensor) -> Tensor {
        let x = self.image_post_mapping[0].forward(features);
        self.image_post_mapping[1].forward(&x)
    }

    /// Logits `[B, b, H, W, D]` for features `[b, C, H, W, D]` and `class_vector` `[B, 1]`.
    pub fn forward(&self, features: &Tensor, class_vector: &Tensor) -> Tensor {
        self.logits(&self.post_mapping(features), class_vector)
    }

    /// The prompt-dependent part of [`ClassHead::forward`]: logits `[B, b, H, W, D]` from features already
    /// through [`ClassHead::post_mapping`] (what engines split off: the post mapping runs once per window,
    /// this once per prompt chunk).
    pub fn logits(&self, src: &Tensor, class_vector: &Tensor) -> Tensor {
        self.masks(src, &self.class_embedding(class_vector))
    }

    /// Logits `[B, b, H, W, D]` from post-mapped features `[b, C, H, W, D]` and class embeddings `[B, 1, C]`
    /// (from [`ClassHead::class_embedding`]; any slice of its rows gives those rows of the whole product).
    pub fn masks(&self, src: &Tensor, embedding: &Tensor) -> Tensor {
        let (b, c, h, w, d) = src.size5().expect("class head features must be 5-D");
        let masks = embedding.squeeze().matmul(&src.view([b, c, h * w * d]));
        masks.view([b, -1, h, w, d]).transpose(0, 1)
    }
}
