//! The image encoder: MONAI `SegResNetDS2` with `blocks_down=(1,2,2,4,4)`, instance norm, ReLU,
//! deconvolution upsampling, `dsdepth=1`, and two decoders (`up_layers` for the point branch,
//! `up_layers_auto` for the class branch).

use tch::nn::{self, Module};
use tch::Tensor;

use super::layers::{conv3d, upsample_conv3d, SegResBlock};

/// Number of SegResBlocks per encoder level.
pub const BLOCKS_DOWN: [usize; 5] = [1, 2, 2, 4, 4];

/// Every spatial dim of the encoder input must be a multiple of this (2^(levels-1)).
pub const SHAPE_FACTOR: i64 = 16;

#[derive(Debug)]
struct EncoderLevel {
    blocks: Vec<SegResBlock>,
    downsample: Option<nn::Conv3D>,
}

/// The down path (`image_encoder.encoder`, a MONAI `SegResEncoder`).
#[derive(Debug)]
pub struct SegResEncoder {
    conv_init: nn::Conv3D,
    levels: Vec<EncoderLevel>,
}

impl SegResEncoder {
    pub fn new(p: nn::Path, in_channels: i64, filters: i64) -> Self {
        let conv_init = conv3d(&p / "conv_init", in_channels, filters, 3, 1, 1, false);
        let mut levels = Vec::new();
        let mut c = filters;
        for (i, &n_blocks) in BLOCKS_DOWN.iter().enumerate() {
            let lp = &p / "layers" / i;
            let blocks = (0..n_blocks)
                .map(|b| SegResBlock::new(&lp / "blocks" / b, c))
                .collect();
            let downsample = (i + 1 < BLOCKS_DOWN.len())
                .then(|| conv3d(&lp / "downsample", c, 2 * c, 3, 2, 1, false));
            levels.push(EncoderLevel { blocks, downsample });
            c *= 2;
        }
        Self { conv_init, levels }
    }

    /// Where the weights are.
    pub fn device(&self) -> tch::Device {
        self.conv_init.ws.device()
    }

    /// Output of every level's blocks, before its downsample: full resolution first.
    pub fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        let mut x = self.conv_init.forward(x);
        let mut outputs = Vec::with_capacity(self.levels.len());
        for level in &self.levels {
            for block in &level.blocks {
                x = block.forward(&x);
            }
            outputs.push(x.shallow_clone());
            if let Some(ds) = &level.downsample {
                x = ds.forward(&x);
            }
        }
        outputs
    }
}

#[derive(Debug)]
struct DecoderLevel {
    upsample: nn::ConvTranspose3D,
    block: SegResBlock,
    head: Option<nn::Conv3D>,
}

/// One decoder (`up_layers` or `up_layers_auto`): 4 levels of deconv, skip addition and one SegResBlock,
/// and a 1x1x1 head with bias on the last level.
#[derive(Debug)]
pub struct Decoder {
    levels: Vec<DecoderLevel>,
}

impl Decoder {
    pub fn new(p: nn::Path, filters: i64, out_channels: i64) -> Self {
        let n_up = BLOCKS_DOWN.len() - 1;
        let mut c = filters << n_up;
        let mut levels = Vec::new();
        for i in 0..n_up {
            c /= 2;
            let lp = &p / i;
            let head =
                (i + 1 == n_up).then(|| conv3d(&lp / "head", c, out_channels, 1, 1, 0, true));
            levels.push(DecoderLevel {
                upsample: upsample_conv3d(&lp / "upsample" / "deconv", 2 * c, c, false),
                block: SegResBlock::new(&lp / "blocks" / 0, c),
                head,
            });
        }
        Self { levels }
    }

    /// `skips` are the encoder outputs, full resolution first (as [`SegResEncoder::forward`] returns them).
    pub fn forward(&self, skips: &[Tensor]) -> Tensor {
        let n = skips.len();
        let mut x = skips[n - 1].shallow_clone();
        for (i, level) in self.levels.iter().enumerate() {
            x = level.upsample.forward(&x) + &skips[n - 2 - i];
            x = level.block.forward(&x);
            if let Some(head) = &level.head {
                x = head.forward(&x);
            }
        }
        x
    }
}

/// `image_encoder`: SegResNetDS2.
#[derive(Debug)]
pub struct ImageEncoder {
    pub encoder: SegResEncoder,
    pub up_layers: Decoder,
    pub up_layers_auto: Decoder,
}

impl ImageEncoder {
    pub fn new(p: nn::Path, in_channels: i64, embed_dim: i64) -> Self {
        Self {
            encoder: SegResEncoder::new(&p / "encoder", in_channels, embed_dim),
            up_layers: Decoder::new(&p / "up_layers", embed_dim, embed_dim),
            up_layers_auto: Decoder::new(&p / "up_layers_auto", embed_dim, embed_dim),
        }
    }

    /// Returns `(point_features, auto_features)`; a branch that is not asked for is `None`.
    pub fn forward(
        &self,
        x: &Tensor,
        with_point: bool,
        with_label: bool,
    ) -> (Option<Tensor>, Option<Tensor>) {
        let skips = self.encoder.forward(x);
        let point = with_point.then(|| self.up_layers.forward(&skips));
        let auto = with_label.then(|| self.up_layers_auto.forward(&skips));
        (point, auto)
    }
}
