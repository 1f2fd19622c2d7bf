//! ONNX export of the class path, written in Rust: `encoder.onnx` (`image_encoder.encoder` +
//! `up_layers_auto` + the class head's `image_post_mapping`: everything computed once per window),
//! `class_head.onnx` (the prompt-dependent rest of the class head) and `manifest.json`, generated from the
//! model's named parameters.
//!
//! Every export also writes the float16 variants `encoder_fp16.onnx` and `class_head_fp16.onnx` (always, so
//! any export can feed an FP16 TensorRT build: TensorRT 11 builds strongly typed networks only and takes the
//! precision from the model). They have the same inputs and outputs (float32, cast at the boundaries), float16
//! weights and compute, and every InstanceNormalization in float32 (as MONAI's `trt_compile`). The manifest
//! ([`manifest`], the one reader of `manifest.json` for ONNX Runtime and TensorRT alike) lists them as
//! `encoder_fp16` / `class_head_fp16` with their size, sha256 and float type.
//!
//! The protobuf is encoded with `prost` from the subset of `onnx.proto` in [`proto`]; the graphs
//! ([`vista`]) use opset 17 with dynamic batch, prompt count and spatial dims.

mod builder;
mod command;
pub mod manifest;
pub mod proto;
mod vista;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use prost::Message;
use sha2::{Digest, Sha256};
use tch::nn::VarStore;

pub use command::{export_command, ExportRequest, VERIFY_FP16_TOLERANCE, VERIFY_TOLERANCE};
pub use manifest::{
    Dim, FloatType, ModelEntry, OnnxManifest, Part, TensorSpec, WeightsSource, MANIFEST_FILE,
};

use super::fingerprint::weights_fingerprint;
use crate::fsutil::hex;
use builder::GraphBuilder;
use proto::{ModelProto, OperatorSetIdProto, StringStringEntryProto};

/// ONNX default-domain opset of the exported graphs (TensorRT 10/11 parse it; it has no `Gelu`).
pub const OPSET: i64 = 17;
/// ONNX IR version matching [`OPSET`] (ONNX 1.12).
pub const IR_VERSION: i64 = 8;
/// File name of the exported encoder (automatic branch).
pub const ENCODER_FILE: &str = "encoder.onnx";
/// File name of the exported class head.
pub const CLASS_HEAD_FILE: &str = "class_head.onnx";
/// File name of the float16 encoder.
pub const ENCODER_FP16_FILE: &str = "encoder_fp16.onnx";
/// File name of the float16 class head.
pub const CLASS_HEAD_FP16_FILE: &str = "class_head_fp16.onnx";
/// Protobuf's hard limit for one message.
const PROTOBUF_LIMIT: usize = 2 << 30;

/// What [`export_onnx`] wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub manifest: OnnxManifest,
    pub dir: PathBuf,
    pub seconds: f64,
}

/// The widths the exported graphs are built for, read from the parameters.
struct Widths {
    in_channels: i64,
    embed_dim: i64,
    n_classes: i64,
}

fn widths(weights: &BTreeMap<String, tch::Tensor>) -> Result<Widths> {
    let shape = |name: &str| -> Result<Vec<i64>> {
        Ok(weights
            .get(name)
            .with_context(|| format!("not a VISTA3D model: no parameter '{name}'"))?
            .size())
    };
    let conv_init = shape("image_encoder.encoder.conv_init.weight")?;
    let table = shape("class_head.class_embeddings.weight")?;
    ensure!(
        conv_init.len() == 5 && table.len() == 2 && table[1] == conv_init[0],
        "inconsistent VISTA3D parameters: conv_init {conv_init:?}, class_embeddings {table:?}"
    );
    Ok(Widths {
        in_channels: conv_init[1],
        embed_dim: conv_init[0],
        n_classes: table[0],
    })
}

/// Wraps a graph into a model with the export's metadata.
fn model_proto(graph: proto::GraphProto, part: &str, metadata: &[(String, String)]) -> ModelProto {
    let mut props: Vec<StringStringEntryProto> = metadata
        .iter()
        .map(|(k, v)| StringStringEntryProto {
            key: k.clone(),
            value: v.clone(),
        })
        .collect();
    props.push(StringStringEntryProto {
        key: "part".into(),
        value: part.into(),
    });
    ModelProto {
        ir_version: IR_VERSION,
        producer_name: "vista3d".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        domain: "org.vista3d".into(),
        model_version: 1,
        doc_string: format!("VISTA3D {part} (class path), exported by vista3d"),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        metadata_props: props,
    }
}

/// Encodes `model` and writes it atomically to `dir/file`; returns its manifest entry.
fn write_model(
    dir: &Path,
    file: &str,
    float_type: FloatType,
    model: &ModelProto,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
) -> Result<ModelEntry> {
    let len = model.encoded_len();
    ensure!(
        len < PROTOBUF_LIMIT,
        "{file} would be {len} bytes, over protobuf's 2 GiB limit"
    );
    let bytes = model.encode_to_vec();
    crate::fsutil::write_atomic(&dir.join(file), &bytes)?;
    Ok(ModelEntry {
        file: file.into(),
        float_type,
        bytes: bytes.len() as u64,
        sha256: hex(&Sha256::digest(&bytes)),
        inputs,
        outputs,
    })
}

/// Builds and writes the encoder and class head of `float_type`; returns their manifest entries.
fn export_pair(
    weights: &BTreeMap<String, tch::Tensor>,
    w: &Widths,
    float_type: FloatType,
    metadata: &[(String, String)],
    out_dir: &Path,
) -> Result<(ModelEntry, ModelEntry)> {
    let mut metadata = metadata.to_vec();
    metadata.push(("precision".into(), float_type.name().into()));
    let (encoder_file, class_head_file) = match float_type {
        FloatType::F32 => (ENCODER_FILE, CLASS_HEAD_FILE),
        FloatType::F16 => (ENCODER_FP16_FILE, CLASS_HEAD_FP16_FILE),
    };
    let builder = GraphBuilder::with_float_type(weights, float_type);
    let graph = vista::encoder_graph(builder, w.in_channels, w.embed_dim)
        .with_context(|| format!("building the {float_type} encoder graph"))?;
    let (inputs, outputs) = vista::encoder_io(w.in_channels, w.embed_dim);
    let model = model_proto(graph, Part::Encoder.name(), &metadata);
    let encoder = write_model(out_dir, encoder_file, float_type, &model, inputs, outputs)?;
    drop(model);

    let builder = GraphBuilder::with_float_type(weights, float_type);
    let graph = vista::class_head_graph(builder, w.embed_dim)
        .with_context(|| format!("building the {float_type} class-head graph"))?;
    let (inputs, outputs) = vista::class_head_io(w.embed_dim);
    let model = model_proto(graph, Part::ClassHead.name(), &metadata);
    let class_head = write_model(
        out_dir,
        class_head_file,
        float_type,
        &model,
        inputs,
        outputs,
    )?;
    Ok((encoder, class_head))
}

/// Exports the class path of the VISTA3D model whose parameters are in `vs` into `out_dir`
/// (`encoder.onnx`, `class_head.onnx`, their float16 variants `encoder_fp16.onnx`, `class_head_fp16.onnx`,
/// then `manifest.json`). Each file is written atomically; an older
/// manifest is removed first, so a directory with a manifest always holds a complete export.
pub fn export_onnx(vs: &VarStore, source: &WeightsSource, out_dir: &Path) -> Result<ExportSummary> {
    let t0 = Instant::now();
    let weights: BTreeMap<String, tch::Tensor> = vs.variables().into_iter().collect();
    let w = widths(&weights)?;
    let fingerprint = weights_fingerprint(vs);
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let manifest_path = out_dir.join(MANIFEST_FILE);
    if manifest_path.exists() {
        std::fs::remove_file(&manifest_path)
            .with_context(|| format!("cannot replace {}", manifest_path.display()))?;
    }
    let mut metadata = vec![
        (
            "producer".to_string(),
            format!("vista3d {}", env!("CARGO_PKG_VERSION")),
        ),
        ("weights_fingerprint".into(), fingerprint.clone()),
        ("embed_dim".into(), w.embed_dim.to_string()),
        ("opset".into(), OPSET.to_string()),
        ("weights".into(), source.describe()),
    ];
    if let WeightsSource::Checkpoint { sha256, .. } = source {
        metadata.push(("checkpoint_sha256".into(), sha256.clone()));
    }

    let (encoder, class_head) = export_pair(&weights, &w, FloatType::F32, &metadata, out_dir)?;
    let (encoder_fp16, class_head_fp16) =
        export_pair(&weights, &w, FloatType::F16, &metadata, out_dir)?;
    let manifest = OnnxManifest {
        format: manifest::MANIFEST_FORMAT.into(),
        format_version: manifest::MANIFEST_VERSION,
        vista3d_version: env!("CARGO_PKG_VERSION").into(),
        opset: OPSET,
        ir_version: IR_VERSION,
        weights_fingerprint: fingerprint,
        embed_dim: w.embed_dim,
        n_classes: w.n_classes,
        weights: source.clone(),
        encoder,
        class_head,
        encoder_fp16: Some(encoder_fp16),
        class_head_fp16: Some(class_head_fp16),
    };
    crate::fsutil::write_atomic(
        &manifest_path,
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    Ok(ExportSummary {
        manifest,
        dir: out_dir.to_path_buf(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}
