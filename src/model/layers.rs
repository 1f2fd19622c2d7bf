//! Building blocks shared by the VISTA3D modules, named and computed exactly as MONAI's.

use tch::nn::{self, Module};
use tch::Tensor;

use super::fused_norm::{instance_norm_act, Activation};

/// Conv3d with a cubic kernel, MONAI/PyTorch parameter names (`weight`, optional `bias`).
pub fn conv3d(
    p: nn::Path,
    c_in: i64,
    c_out: i64,
    k: i64,
    stride: i64,
    padding: i64,
    bias: bool,
) -> nn::Conv3D {
    let cfg = nn::ConvConfig {
        stride,
        padding,
        bias,
        ..Default::default()
    };
    nn::conv3d(p, c_in, c_out, k, cfg)
}

/// A 3x3x3 convolution, stride 1, padding 1, no bias (the residual blocks' convolutions, most of a window's
/// arithmetic): libtorch's, or Winograd's where the running thread enabled it (see [`super::winograd`]).
#[derive(Debug)]
pub struct Conv3x3 {
    conv: nn::Conv3D,
    winograd: super::winograd::Filters,
}

impl Conv3x3 {
    pub fn new(p: nn::Path, c_in: i64, c_out: i64) -> Self {
        Self {
            conv: conv3d(p, c_in, c_out, 3, 1, 1, false),
            winograd: Default::default(),
        }
    }
}

impl Module for Conv3x3 {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.winograd
            .conv3x3(x, &self.conv.ws)
            .unwrap_or_else(|| self.conv.forward(x))
    }
}

/// ConvTranspose3d with kernel 3, stride 2, padding 1, output padding 1: doubles every spatial dim.
pub fn upsample_conv3d(p: nn::Path, c_in: i64, c_out: i64, bias: bool) -> nn::ConvTranspose3D {
    let cfg = nn::ConvTransposeConfig {
        stride: 2,
        padding: 1,
        output_padding: 1,
        bias,
        ..Default::default()
    };
    nn::conv_transpose3d(p, c_in, c_out, 3, cfg)
}

/// Linear layer with PyTorch's names.
pub fn linear(p: nn::Path, c_in: i64, c_out: i64) -> nn::Linear {
    nn::linear(p, c_in, c_out, Default::default())
}

/// InstanceNorm (eps 1e-5, statistics of the input, no running stats), with or without an affine transform.
#[derive(Debug)]
pub struct InstanceNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
}

impl InstanceNorm {
    /// `affine=True`: parameters `weight` (ones) and `bias` (zeros) under `p`.
    pub fn affine(p: nn::Path, channels: i64) -> Self {
        let weight = p.var("weight", &[channels], nn::Init::Const(1.0));
        let bias = p.var("bias", &[channels], nn::Init::Const(0.0));
        Self {
            weight: Some(weight),
            bias: Some(bias),
        }
    }

    /// `affine=False`: no parameters.
    pub fn plain() -> Self {
        Self {
            weight: None,
            bias: None,
        }
    }
}

impl InstanceNorm {
    const EPS: f64 = 1e-5;

    /// `act(norm(x))` into a new tensor: fused where the thread runs vista3d's own CPU kernels
    /// ([`super::fused_norm`]), else libtorch's operators as MONAI's (activation in place).
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Tensor {
        instance_norm_act(
            x,
            self.weight.as_ref(),
            self.bias.as_ref(),
            Self::EPS,
            None,
            act,
            false,
        )
        .unwrap_or_else(|| activate(self.forward(x), act))
    }

    /// `act(norm(x) + residual)` written over `x`, which the caller hands over (nothing else reads its
    /// storage): fused as [`InstanceNorm::forward_act`], else libtorch's operators as MONAI's.
    pub fn forward_act_over(
        &self,
        x: Tensor,
        residual: Option<&Tensor>,
        act: Activation,
    ) -> Tensor {
        instance_norm_act(
            &x,
            self.weight.as_ref(),
            self.bias.as_ref(),
            Self::EPS,
            residual,
            act,
            true,
        )
        .unwrap_or_else(|| {
            let mut y = self.forward(&x);
            if let Some(r) = residual {
                y += r;
            }
            activate(y, act)
        })
    }
}

/// `act` applied in place.
fn activate(mut y: Tensor, act: Activation) -> Tensor {
    match act {
        Activation::Relu => {
            let _ = y.relu_();
        }
        Activation::LeakyRelu(slope) => {
            let _ = y.leaky_relu_();
            debug_assert_eq!(slope, 0.01, "libtorch's leaky_relu_ has slope 0.01");
        }
    }
    y
}

impl Module for InstanceNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.instance_norm(
            self.weight.as_ref(),
            self.bias.as_ref(),
            None::<&Tensor>,
            None::<&Tensor>,
            true,
            0.1,
            Self::EPS,
            true,
        )
    }
}

/// MONAI `SegResBlock`: pre-activation residual block IN -> ReLU -> conv3 -> IN -> ReLU -> conv3, plus input.
#[derive(Debug)]
pub struct SegResBlock {
    norm1: InstanceNorm,
    conv1: Conv3x3,
    norm2: InstanceNorm,
    conv2: Conv3x3,
}

impl SegResBlock {
    pub fn new(p: nn::Path, channels: i64) -> Self {
        Self {
            norm1: InstanceNorm::affine(&p / "norm1", channels),
            conv1: Conv3x3::new(&p / "conv1", channels, channels),
            norm2: InstanceNorm::affine(&p / "norm2", channels),
            conv2: Conv3x3::new(&p / "conv2", channels, channels),
        }
    }
}

impl Module for SegResBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        // In-place activations and residual as MONAI (ReLU(inplace=True), `x += identity`): same values, less
        // memory traffic.
        let y = self.norm1.forward_act(x, Activation::Relu);
        let y = self
            .norm2
            .forward_act_over(self.conv1.forward(&y), None, Activation::Relu);
        let mut y = self.conv2.forward(&y);
        y += x;
        y
    }
}

/// MONAI's LeakyReLU (negative slope 0.01, libtorch's default).
const LEAKY: Activation = Activation::LeakyRelu(0.01);

/// MONAI `UnetResBlock` (inside `UnetrBasicBlock(res_block=True)`, same in/out channels, stride 1):
/// conv -> IN -> LeakyReLU(0.01) -> conv -> IN, plus input, LeakyReLU(0.01).
#[derive(Debug)]
pub struct UnetResBlock {
    conv1: Conv3x3,
    conv2: Conv3x3,
    norm: InstanceNorm,
}

impl UnetResBlock {
    /// `p` is the `UnetrBasicBlock`; parameters live under `layer.conv1.conv` and `layer.conv2.conv`.
    pub fn new(p: nn::Path, channels: i64) -> Self {
        let layer = &p / "layer";
        Self {
            conv1: Conv3x3::new(&layer / "conv1" / "conv", channels, channels),
            conv2: Conv3x3::new(&layer / "conv2" / "conv", channels, channels),
            norm: InstanceNorm::plain(),
        }
    }
}

impl Module for UnetResBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        // In place as MONAI (LeakyReLU(inplace=True), `out += residual`).
        let y = self
            .norm
            .forward_act_over(self.conv1.forward(x), None, LEAKY);
        self.norm
            .forward_act_over(self.conv2.forward(&y), Some(x), LEAKY)
    }
}
