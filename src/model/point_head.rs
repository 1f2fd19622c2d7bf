//! The point head: MONAI `PointMappingSAM` (a 3-D SAM mask decoder) with its `TwoWayTransformer`.

use std::f64::consts::PI;

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::layers::{conv3d, linear, upsample_conv3d, InstanceNorm};

/// Objects decoded per transformer pass (`max_prompt`).
pub const MAX_PROMPT: i64 = 32;
const NUM_HEADS: i64 = 4;
const MLP_DIM: i64 = 512;
const DEPTH: usize = 2;

/// Attention with optional down-projection of the internal dimension (SAM's `Attention`).
#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
}

impl Attention {
    fn new(p: nn::Path, dim: i64, downsample_rate: i64) -> Self {
        let internal = dim / downsample_rate;
        Self {
            q_proj: linear(&p / "q_proj", dim, internal),
            k_proj: linear(&p / "k_proj", dim, internal),
            v_proj: linear(&p / "v_proj", dim, internal),
            out_proj: linear(&p / "out_proj", internal, dim),
        }
    }

    fn separate_heads(x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().expect("attention input must be [B, N, C]");
        x.reshape([b, n, NUM_HEADS, c / NUM_HEADS]).transpose(1, 2)
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let q = Self::separate_heads(&self.q_proj.forward(q));
        let k = Self::separate_heads(&self.k_proj.forward(k));
        let v = Self::separate_heads(&self.v_proj.forward(v));
        let c_per_head = q.size()[3];
        let attn = q.matmul(&k.permute([0, 1, 3, 2])) / (c_per_head as f64).sqrt();
        let attn = attn.softmax(-1, q.kind());
        let out = attn.matmul(&v);
        let (b, heads, n, c) = out.size4().expect("attention output must be 4-D");
        let out = out.transpose(1, 2).reshape([b, n, heads * c]);
        self.out_proj.forward(&out)
    }
}

/// One `TwoWayAttentionBlock`.
#[derive(Debug)]
struct TwoWayBlock {
    self_attn: Attention,
    norm1: nn::LayerNorm,
    cross_attn_token_to_image: Attention,
    norm2: nn::LayerNorm,
    mlp_linear1: nn::Linear,
    mlp_linear2: nn::Linear,
    norm3: nn::LayerNorm,
    norm4: nn::LayerNorm,
    cross_attn_image_to_token: Attention,
    skip_first_layer_pe: bool,
}

fn layer_norm(p: nn::Path, dim: i64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![dim], Default::default())
}

impl TwoWayBlock {
    fn new(p: nn::Path, dim: i64, skip_first_layer_pe: bool) -> Self {
        Self {
            self_attn: Attention::new(&p / "self_attn", dim, 1),
            norm1: layer_norm(&p / "norm1", dim),
            cross_attn_token_to_image: Attention::new(&p / "cross_attn_token_to_image", dim, 2),
            norm2: layer_norm(&p / "norm2", dim),
            mlp_linear1: linear(&p / "mlp" / "linear1", dim, MLP_DIM),
            mlp_linear2: linear(&p / "mlp" / "linear2", MLP_DIM, dim),
            norm3: layer_norm(&p / "norm3", dim),
            norm4: layer_norm(&p / "norm4", dim),
            cross_attn_image_to_token: Attention::new(&p / "cross_attn_image_to_token", dim, 2),
            skip_first_layer_pe,
        }
    }

    fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        query_pe: &Tensor,
        key_pe: &Tensor,
    ) -> (Tensor, Tensor) {
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward(queries, queries, queries)
        } else {
            let q = queries + query_pe;
            queries + self.self_attn.forward(&q, &q, queries)
        };
        let queries = self.norm1.forward(&queries);

        let q = &queries + query_pe;
        let k = keys + key_pe;
        let queries = &queries + self.cross_attn_token_to_image.forward(&q, &k, keys);
        let queries = self.norm2.forward(&queries);

        let mlp_out = self
            .mlp_linear2
            .forward(&self.mlp_linear1.forward(&queries).relu());
        let queries = self.norm3.forward(&(&queries + mlp_out));

        let q = &queries + query_pe;
        let k = keys + key_pe;
        let keys = keys + self.cross_attn_image_to_token.forward(&k, &q, &queries);
        let keys = self.norm4.forward(&keys);
        (queries, keys)
    }
}

/// SAM's `TwoWayTransformer` (depth 2, 4 heads, MLP 512, attention downsample 2).
#[derive(Debug)]
struct TwoWayTransformer {
    layers: Vec<TwoWayBlock>,
    final_attn_token_to_image: Attention,
    norm_final_attn: nn::LayerNorm,
}

impl TwoWayTransformer {
    fn new(p: nn::Path, dim: i64) -> Self {
        Self {
            layers: (0..DEPTH)
                .map(|i| TwoWayBlock::new(&p / "layers" / i, dim, i == 0))
                .collect(),
            final_attn_token_to_image: Attention::new(&p / "final_attn_token_to_image", dim, 2),
            norm_final_attn: layer_norm(&p / "norm_final_attn", dim),
        }
    }

    /// `image` and `image_pe` `[B, C, h, w, d]`, `tokens` `[B, T, C]` -> (tokens, image tokens `[B, hwd, C]`).
    fn forward(&self, image: &Tensor, image_pe: &Tensor, tokens: &Tensor) -> (Tensor, Tensor) {
        let image = image.flatten(2, -1).permute([0, 2, 1]);
        let image_pe = image_pe.flatten(2, -1).permute([0, 2, 1]);
        let mut queries = tokens.shallow_clone();
        let mut keys = image;
        for layer in &self.layers {
            (queries, keys) = layer.forward(&queries, &keys, tokens, &image_pe);
        }
        let q = &queries + tokens;
        let k = &keys + &image_pe;
        let queries = &queries + self.final_attn_token_to_image.forward(&q, &k, &keys);
        (self.norm_final_attn.forward(&queries), keys)
    }
}

/// Random-Fourier positional encoding (`PositionEmbeddingRandom`); its 3 x C/2 matrix is a checkpoint buffer.
#[derive(Debug)]
struct PositionEmbeddingRandom {
    gaussian_matrix: Tensor,
}

impl PositionEmbeddingRandom {
    fn new(p: nn::Path, num_pos_feats: i64) -> Self {
        // A buffer, not a parameter: it is in the state dict but never trained.
        let mut gaussian_matrix =
            p.zeros_no_train("positional_encoding_gaussian_matrix", &[3, num_pos_feats]);
        tch::no_grad(|| {
            gaussian_matrix.copy_(&Tensor::randn(
                [3, num_pos_feats],
                (Kind::Float, p.device()),
            ))
        });
        Self { gaussian_matrix }
    }

    /// Encodes coordinates normalised to [0, 1] (last dim 3) into `[..., C]`.
    fn encode(&self, coords: &Tensor) -> Tensor {
        let coords = coords * 2 - 1;
        let coords = coords.matmul(&self.gaussian_matrix);
        let coords = coords * (2.0 * PI);
        Tensor::cat(&[coords.sin(), coords.cos()], -1)
    }

    /// Encoding of every voxel centre of an `h x w x d` grid: `[C, h, w, d]`.
    fn grid(&self, (h, w, d): (i64, i64, i64)) -> Tensor {
        let grid = Tensor::ones([h, w, d], (Kind::Float, self.gaussian_matrix.device()));
        let x = (grid.cumsum(0, Kind::Float) - 0.5) / h as f64;
        let y = (grid.cumsum(1, Kind::Float) - 0.5) / w as f64;
        let z = (grid.cumsum(2, Kind::Float) - 0.5) / d as f64;
        self.encode(&Tensor::stack(&[x, y, z], -1))
            .permute([3, 0, 1, 2])
    }

    /// Encoding of voxel coordinates `[B, N, 3]` in an image of the given size: `[B, N, C]`.
    fn points(&self, coords: &Tensor, size: [i64; 3]) -> Tensor {
        let scale = Tensor::from_slice(&size.map(|s| s as f64))
            .to_kind(coords.kind())
            .to_device(coords.device());
        let coords = (coords / scale).to_kind(Kind::Float);
        self.encode(&coords)
    }
}

/// `point_head`: PointMappingSAM.
#[derive(Debug)]
pub struct PointHead {
    feat_downsample_0: nn::Conv3D,
    feat_downsample_3: nn::Conv3D,
    _mask_downsample: nn::Conv3D,
    transformer: TwoWayTransformer,
    pe_layer: PositionEmbeddingRandom,
    point_embeddings: [Tensor; 2],
    not_a_point_embed: Tensor,
    special_class_embed: Tensor,
    mask_tokens: Tensor,
    output_upscaling_0: nn::ConvTranspose3D,
    output_upscaling_3: nn::Conv3D,
    output_hypernetworks_mlps: [nn::Linear; 3],
    _class_embeddings: Tensor,
    zeroshot_embed: Tensor,
    supported_embed: Tensor,
    last_supported: i64,
}

fn embedding_weight(p: nn::Path, rows: i64, dim: i64) -> Tensor {
    p.var(
        "weight",
        &[rows, dim],
        nn::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        },
    )
}

impl PointHead {
    pub fn new(p: nn::Path, feature_size: i64, n_classes: i64, last_supported: i64) -> Self {
        let dim = feature_size;
        let hyper = &p / "output_hypernetworks_mlps" / "layers";
        Self {
            feat_downsample_0: conv3d(&p / "feat_downsample" / 0, dim, dim, 3, 2, 1, true),
            feat_downsample_3: conv3d(&p / "feat_downsample" / 3, dim, dim, 3, 1, 1, true),
            _mask_downsample: conv3d(&p / "mask_downsample", 2, 2, 3, 2, 1, true),
            transformer: TwoWayTransformer::new(&p / "transformer", dim),
            pe_layer: PositionEmbeddingRandom::new(&p / "pe_layer", dim / 2),
            point_embeddings: [
                embedding_weight(&p / "point_embeddings" / 0, 1, dim),
                embedding_weight(&p / "point_embeddings" / 1, 1, dim),
            ],
            not_a_point_embed: embedding_weight(&p / "not_a_point_embed", 1, dim),
            special_class_embed: embedding_weight(&p / "special_class_embed", 1, dim),
            mask_tokens: embedding_weight(&p / "mask_tokens", 1, dim),
            output_upscaling_0: upsample_conv3d(&p / "output_upscaling" / 0, dim, dim, true),
            output_upscaling_3: conv3d(&p / "output_upscaling" / 3, dim, dim, 3, 1, 1, true),
            output_hypernetworks_mlps: [
                linear(&hyper / 0, dim, dim),
                linear(&hyper / 1, dim, dim),
                linear(&hyper / 2, dim, dim),
            ],
            _class_embeddings: embedding_weight(&p / "class_embeddings", n_classes, feature_size),
            zeroshot_embed: embedding_weight(&p / "zeroshot_embed", 1, dim),
            supported_embed: embedding_weight(&p / "supported_embed", 1, dim),
            last_supported,
        }
    }

    /// Point tokens `[B, N, C]`: positional encoding of the points plus the embedding of each point label
    /// (-1 padding, 0/1 negative/positive, 2/3 negative/positive for special classes).
    fn point_tokens(&self, point_coords: &Tensor, point_labels: &Tensor, size: [i64; 3]) -> Tensor {
        let pe = self.pe_layer.points(&(point_coords + 0.5), size);
        let is = |v: i64| point_labels.eq(v).unsqueeze(-1);
        let pad = is(-1);
        let pe = pe.masked_fill(&pad, 0.0);
        let pe = pe.where_self(&pad.logical_not(), &(&pe + &self.not_a_point_embed));
        let pe = pe.where_self(&is(0).logical_not(), &(&pe + &self.point_embeddings[0]));
        let pe = pe.where_self(&is(1).logical_not(), &(&pe + &self.point_embeddings[1]));
        let neg_special = &self.point_embeddings[0] + &self.special_class_embed;
        let pe = pe.where_self(&is(2).logical_not(), &(&pe + neg_special));
        let pos_special = &self.point_embeddings[1] + &self.special_class_embed;
        pe.where_self(&is(3).logical_not(), &(&pe + pos_special))
    }

    /// Mask logits `[B, 1, H, W, D]` for point features `[1, C, H, W, D]`, points `[B, N, 3]` (voxel
    /// coordinates in the features' grid) and labels `[B, N]`. `class_vector` `[B, 1]` selects the zero-shot
    /// token for ids above `last_supported`; `None` uses the supported token for every object.
    pub fn forward(
        &self,
        features: &Tensor,
        point_coords: &Tensor,
        point_labels: &Tensor,
        class_vector: Option<&Tensor>,
    ) -> Tensor {
        let low = self.feat_downsample_0.forward(features);
        let low = InstanceNorm::plain().forward(&low).gelu("none");
        let low = InstanceNorm::plain().forward(&self.feat_downsample_3.forward(&low));
        let size = features.size();
        let size = [size[2], size[3], size[4]];

        let point_embedding = self.point_tokens(point_coords, point_labels, size);
        let n_obj = point_embedding.size()[0];
        let output_tokens = self.mask_tokens.unsqueeze(0).expand([n_obj, -1, -1], false);
        let class_tokens = match class_vector {
            None => self
                .supported_embed
                .unsqueeze(0)
                .expand([n_obj, -1, -1], false),
            Some(cv) => {
                let zero_shot = cv.reshape([-1, 1, 1]).gt(self.last_supported);
                self.zeroshot_embed
                    .unsqueeze(0)
                    .where_self(&zero_shot, &self.supported_embed.unsqueeze(0))
            }
        };
        let tokens_all = Tensor::cat(&[output_tokens, point_embedding, class_tokens], 1);

        let low_size = low.size();
        let image_pe = self
            .pe_layer
            .grid((low_size[2], low_size[3], low_size[4]))
            .unsqueeze(0);
        let mut masks = Vec::new();
        let mut start = 0;
        while start < n_obj {
            let n = MAX_PROMPT.min(n_obj - start);
            let tokens = tokens_all.narrow(0, start, n);
            let src = low.repeat_interleave_self_int(n, 0, None);
            let pos_src = image_pe.repeat_interleave_self_int(n, 0, None);
            let (b, c, h, w, d) = src.size5().expect("point features must be 5-D");
            let (hs, src) = self.transformer.forward(&src, &pos_src, &tokens);
            let mut hyper = hs.narrow(1, 0, 1);
            for (i, layer) in self.output_hypernetworks_mlps.iter().enumerate() {
                hyper = layer.forward(&hyper);
                if i + 1 < self.output_hypernetworks_mlps.len() {
                    hyper = hyper.relu();
                }
            }
            let src = src.transpose(1, 2).reshape([b, c, h, w, d]);
            let up = self.output_upscaling_0.forward(&src);
            let up = InstanceNorm::plain().forward(&up).gelu("none");
            let up = self.output_upscaling_3.forward(&up);
            let (b, c, h, w, d) = up.size5().expect("upscaled features must be 5-D");
            let mask = hyper.matmul(&up.view([b, c, h * w * d]));
            masks.push(mask.view([-1, 1, h, w, d]));
            start += n;
        }
        Tensor::cat(&masks, 0)
    }
}
