//! The VISTA3D class path as ONNX graphs, node for node what `src/model` computes on libtorch, split where the
//! prompts come in: `encoder.onnx` = `image_encoder.encoder` + `image_encoder.up_layers_auto` +
//! `class_head.image_post_mapping` (everything computed once per window, whatever the prompts), `class_head.onnx`
//! = the rest of `class_head` (class embeddings, MLP, and the per-voxel product with the mapped features: the only
//! prompt-dependent part, run once per chunk of prompts).
//!
//! Only standard opset-17 operators (no `Gelu`: the exact GELU is written with `Erf`), so TensorRT 10/11 parses
//! the graphs as they are.
//!
//! Each graph is built in float32 or float16 ([`FloatType`], from the [`GraphBuilder`]): the float16 graph
//! has float16 weights and compute, float32 inputs and outputs (`Cast` at the boundaries), and computes every
//! `InstanceNormalization` in float32 with float32 scale and bias.

use anyhow::{ensure, Result};

use super::builder::{attr_float, attr_int, attr_ints, GraphBuilder};
use super::manifest::{Dim, FloatType, TensorSpec};
use super::proto::GraphProto;
use crate::model::BLOCKS_DOWN;

/// InstanceNorm epsilon (PyTorch/MONAI default).
const NORM_EPS: f32 = 1e-5;
/// LeakyReLU slope of MONAI's `UnetResBlock`.
const LEAKY_SLOPE: f32 = 0.01;

/// Prefix of the encoder's down path.
const ENCODER: &str = "image_encoder.encoder";
/// Prefix of the class-branch decoder.
const DECODER_AUTO: &str = "image_encoder.up_layers_auto";
/// Prefix of the class head.
const CLASS_HEAD: &str = "class_head";

fn sym(s: &str) -> Dim {
    Dim::Symbolic(s.into())
}

/// A float32 batch of windows `[b, channels, H, W, D]` (batch and spatial dims dynamic).
fn windows(name: &str, channels: i64) -> TensorSpec {
    TensorSpec::float32(
        name,
        vec![sym("b"), Dim::Fixed(channels), sym("H"), sym("W"), sym("D")],
    )
}

/// Input and output declarations of `encoder.onnx` for `in_channels` image channels and width `embed_dim`.
pub fn encoder_io(in_channels: i64, embed_dim: i64) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
    (
        vec![windows("image", in_channels)],
        vec![windows("features", embed_dim)],
    )
}

/// Input and output declarations of `class_head.onnx` for width `embed_dim`.
pub fn class_head_io(embed_dim: i64) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
    let features = windows("features", embed_dim);
    let class_ids = TensorSpec {
        name: "class_ids".into(),
        dtype: "int64".into(),
        dims: vec![sym("B"), Dim::Fixed(1)],
    };
    let logits = TensorSpec::float32(
        "logits",
        vec![sym("B"), sym("b"), sym("H"), sym("W"), sym("D")],
    );
    (vec![features, class_ids], vec![logits])
}

/// A cubic `Conv` (no groups, no dilation) with the named weight and optional bias.
fn conv(
    g: &mut GraphBuilder,
    x: &str,
    weight: &str,
    bias: Option<&str>,
    stride: i64,
    pad: i64,
) -> Result<String> {
    let shape = g.weight_shape(weight)?;
    ensure!(
        shape.len() == 5,
        "{weight}: a 3-D convolution weight, got shape {shape:?}"
    );
    let k = shape[2];
    let w = g.weight(weight)?;
    let mut inputs = vec![x.to_string(), w];
    if let Some(b) = bias {
        inputs.push(g.weight(b)?);
    }
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let hint = weight.trim_end_matches(".weight");
    Ok(g.op(
        "Conv",
        &inputs,
        vec![
            attr_ints("kernel_shape", &[k, k, k]),
            attr_ints("strides", &[stride; 3]),
            attr_ints("pads", &[pad; 6]),
            attr_ints("dilations", &[1; 3]),
            attr_int("group", 1),
        ],
        hint,
    ))
}

/// MONAI's upsampling `ConvTranspose3d(kernel 3, stride 2, padding 1, output_padding 1)`, no bias.
fn upsample(g: &mut GraphBuilder, x: &str, weight: &str) -> Result<String> {
    let w = g.weight(weight)?;
    Ok(g.op(
        "ConvTranspose",
        &[x, &w],
        vec![
            attr_ints("kernel_shape", &[3; 3]),
            attr_ints("strides", &[2; 3]),
            attr_ints("pads", &[1; 6]),
            attr_ints("output_padding", &[1; 3]),
            attr_ints("dilations", &[1; 3]),
            attr_int("group", 1),
        ],
        weight.trim_end_matches(".weight"),
    ))
}

/// `InstanceNormalization` of `x` with float32 `scale` and `bias`, always computed in float32: in an fp16 graph
/// `x` is cast to float32 before and the result back to float16 after (as MONAI's `trt_compile`
/// `add_casts_around_norms`), so the statistics never overflow or lose precision in float16.
fn instance_norm(g: &mut GraphBuilder, x: &str, scale: &str, bias: &str, hint: &str) -> String {
    let attrs = vec![attr_float("epsilon", NORM_EPS)];
    match g.float_type() {
        FloatType::F32 => g.op("InstanceNormalization", &[x, scale, bias], attrs, hint),
        FloatType::F16 => {
            let x32 = g.cast(x, FloatType::F32, hint);
            let y = g.op("InstanceNormalization", &[&x32, scale, bias], attrs, hint);
            g.cast(&y, FloatType::F16, hint)
        }
    }
}

/// `InstanceNormalization` with the affine parameters under `prefix` (`prefix.weight`, `prefix.bias`).
fn instance_norm_affine(g: &mut GraphBuilder, x: &str, prefix: &str) -> Result<String> {
    let scale = g.weight_f32(&format!("{prefix}.weight"))?;
    let bias = g.weight_f32(&format!("{prefix}.bias"))?;
    Ok(instance_norm(g, x, &scale, &bias, prefix))
}

/// `InstanceNormalization` without affine transform (scale 1, bias 0) over `channels` channels.
fn instance_norm_plain(g: &mut GraphBuilder, x: &str, channels: i64, hint: &str) -> String {
    let n = channels as usize;
    let scale = g.const_f32(
        &format!("const/ones_{channels}"),
        &[channels],
        &vec![1.0; n],
    );
    let bias = g.const_f32(
        &format!("const/zeros_{channels}"),
        &[channels],
        &vec![0.0; n],
    );
    instance_norm(g, x, &scale, &bias, hint)
}

/// MONAI `SegResBlock`: IN -> ReLU -> conv3 -> IN -> ReLU -> conv3, plus the input.
fn seg_res_block(g: &mut GraphBuilder, x: &str, p: &str) -> Result<String> {
    let y = instance_norm_affine(g, x, &format!("{p}.norm1"))?;
    let y = g.op("Relu", &[&y], vec![], p);
    let y = conv(g, &y, &format!("{p}.conv1.weight"), None, 1, 1)?;
    let y = instance_norm_affine(g, &y, &format!("{p}.norm2"))?;
    let y = g.op("Relu", &[&y], vec![], p);
    let y = conv(g, &y, &format!("{p}.conv2.weight"), None, 1, 1)?;
    Ok(g.op("Add", &[&y, x], vec![], p))
}

/// MONAI `UnetResBlock` (inside `UnetrBasicBlock`): conv -> IN -> LeakyReLU -> conv -> IN, plus the input,
/// LeakyReLU; the last LeakyReLU writes the graph output `output` when given.
fn unet_res_block(
    g: &mut GraphBuilder,
    x: &str,
    p: &str,
    channels: i64,
    output: Option<&str>,
) -> Result<String> {
    let leaky = || vec![attr_float("alpha", LEAKY_SLOPE)];
    let y = conv(g, x, &format!("{p}.layer.conv1.conv.weight"), None, 1, 1)?;
    let y = instance_norm_plain(g, &y, channels, p);
    let y = g.op("LeakyRelu", &[&y], leaky(), p);
    let y = conv(g, &y, &format!("{p}.layer.conv2.conv.weight"), None, 1, 1)?;
    let y = instance_norm_plain(g, &y, channels, p);
    let y = g.op("Add", &[&y, x], vec![], p);
    Ok(match output {
        Some(name) => g.op_output("LeakyRelu", &[&y], leaky(), p, name),
        None => g.op("LeakyRelu", &[&y], leaky(), p),
    })
}

/// The graph of `encoder.onnx`: `image` -> SegResEncoder -> `up_layers_auto` decoder -> the class head's
/// `image_post_mapping` -> `features` (the mapped features the class head multiplies with its class embeddings).
pub fn encoder_graph(g: GraphBuilder, in_channels: i64, embed_dim: i64) -> Result<GraphProto> {
    let mut g = g;
    let (inputs, outputs) = encoder_io(in_channels, embed_dim);
    let image = g.float_input("image");
    let mut x = conv(
        &mut g,
        &image,
        &format!("{ENCODER}.conv_init.weight"),
        None,
        1,
        1,
    )?;
    let mut skips = Vec::with_capacity(BLOCKS_DOWN.len());
    for (level, &n_blocks) in BLOCKS_DOWN.iter().enumerate() {
        for block in 0..n_blocks {
            x = seg_res_block(
                &mut g,
                &x,
                &format!("{ENCODER}.layers.{level}.blocks.{block}"),
            )?;
        }
        skips.push(x.clone());
        if level + 1 < BLOCKS_DOWN.len() {
            let w = format!("{ENCODER}.layers.{level}.downsample.weight");
            x = conv(&mut g, &x, &w, None, 2, 1)?;
        }
    }
    let n_up = BLOCKS_DOWN.len() - 1;
    for i in 0..n_up {
        let p = format!("{DECODER_AUTO}.{i}");
        let up = upsample(&mut g, &x, &format!("{p}.upsample.deconv.weight"))?;
        x = g.op("Add", &[&up, &skips[n_up - 1 - i]], vec![], &p);
        x = seg_res_block(&mut g, &x, &format!("{p}.blocks.0"))?;
    }
    // The 1x1x1 head with bias of the last level: the automatic branch's features.
    let head = format!("{DECODER_AUTO}.{}.head", n_up - 1);
    let x = conv(
        &mut g,
        &x,
        &format!("{head}.weight"),
        Some(&format!("{head}.bias")),
        1,
        0,
    )?;
    // The class head's image post mapping (prompt-independent); its last block writes the graph output.
    let x = unet_res_block(
        &mut g,
        &x,
        &format!("{CLASS_HEAD}.image_post_mapping.0"),
        embed_dim,
        None,
    )?;
    unet_res_block(
        &mut g,
        &x,
        &format!("{CLASS_HEAD}.image_post_mapping.1"),
        embed_dim,
        Some("features"),
    )?;
    g.finish("vista3d_encoder_auto", &inputs, &outputs)
}

/// `Linear` on the last axis: `x @ weight^T + bias`.
fn linear(g: &mut GraphBuilder, x: &str, prefix: &str) -> Result<String> {
    let w = g.weight(&format!("{prefix}.weight"))?;
    let b = g.weight(&format!("{prefix}.bias"))?;
    let wt = g.op("Transpose", &[&w], vec![attr_ints("perm", &[1, 0])], prefix);
    let y = g.op("MatMul", &[x, &wt], vec![], prefix);
    Ok(g.op("Add", &[&y, &b], vec![], prefix))
}

/// Exact GELU, `0.5 * x * (1 + erf(x / sqrt(2)))`.
fn gelu(g: &mut GraphBuilder, x: &str, hint: &str) -> String {
    let sqrt2 = g.const_float("const/sqrt2", &[], &[std::f32::consts::SQRT_2]);
    let one = g.const_float("const/one", &[], &[1.0]);
    let half = g.const_float("const/half", &[], &[0.5]);
    let y = g.op("Div", &[x, &sqrt2], vec![], hint);
    let y = g.op("Erf", &[&y], vec![], hint);
    let y = g.op("Add", &[&y, &one], vec![], hint);
    let y = g.op("Mul", &[x, &y], vec![], hint);
    g.op("Mul", &[&y, &half], vec![], hint)
}

/// The graph of `class_head.onnx`: (mapped `features`, `class_ids`) -> `logits` `[B, b, H, W, D]`, as
/// `ClassHead::logits` (MONAI `ClassMappingClassify.forward` after its `image_post_mapping`), including B = 1.
pub fn class_head_graph(g: GraphBuilder, embed_dim: i64) -> Result<GraphProto> {
    let mut g = g;
    let e = embed_dim;
    let (inputs, outputs) = class_head_io(e);
    let src = g.float_input("features");
    // Class embeddings [B, 1, E] -> Linear -> InstanceNorm1d (one channel) -> GELU -> Linear.
    let table = g.weight(&format!("{CLASS_HEAD}.class_embeddings.weight"))?;
    let emb = g.op(
        "Gather",
        &[&table, "class_ids"],
        vec![attr_int("axis", 0)],
        "class_head.class_embeddings",
    );
    let emb = linear(&mut g, &emb, &format!("{CLASS_HEAD}.mlp.0"))?;
    let emb = instance_norm_plain(&mut g, &emb, 1, "class_head.mlp.1");
    let emb = gelu(&mut g, &emb, "class_head.mlp.2");
    let emb = linear(&mut g, &emb, &format!("{CLASS_HEAD}.mlp.3"))?;
    // [B, E] @ [b, E, H*W*D] -> [b, B, N] -> [B, b, N] -> [B, b, H, W, D].
    let hint = "class_head.logits";
    let to_rows = g.const_i64("const/shape_rows", &[-1, e]);
    let emb = g.op("Reshape", &[&emb, &to_rows], vec![], hint);
    let to_flat = g.const_i64("const/shape_flat", &[0, e, -1]);
    let src = g.op("Reshape", &[&src, &to_flat], vec![], hint);
    let masks = g.op("MatMul", &[&emb, &src], vec![], hint);
    let masks = g.op(
        "Transpose",
        &[&masks],
        vec![attr_ints("perm", &[1, 0, 2])],
        hint,
    );
    let spatial = g.op("Shape", &["features"], vec![attr_int("start", 2)], hint);
    let keep = g.const_i64("const/keep_two", &[0, 0]);
    let shape = g.op(
        "Concat",
        &[&keep, &spatial],
        vec![attr_int("axis", 0)],
        hint,
    );
    g.op_output("Reshape", &[&masks, &shape], vec![], hint, "logits");
    g.finish("vista3d_class_head", &inputs, &outputs)
}
