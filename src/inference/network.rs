//! [`WindowNetwork`]: what a sliding window runs through. The plain network implements it; so does
//! `engines::runner::WindowRunner` (an engine for the class path with a fallback to libtorch).

use anyhow::Result;
use tch::Tensor;

use crate::model::{ForwardArgs, Vista3d};

/// Something that runs one sliding window (MONAI `VISTA3D.forward` semantics): the plain network or an
/// engine-backed runner.
pub trait WindowNetwork {
    /// Same contract as [`Vista3d::forward`].
    fn forward_window(&self, input: &Tensor, args: &ForwardArgs) -> Result<Tensor>;

    /// Whether the windows are computed in 16-bit floats (amp, bf16, a TensorRT fp16 engine), whose logits
    /// carry no more precision than float16 stitching sums.
    fn reduced_precision(&self) -> bool {
        false
    }
}

impl WindowNetwork for Vista3d {
    fn forward_window(&self, input: &Tensor, args: &ForwardArgs) -> Result<Tensor> {
        self.forward(input, args)
    }
}
