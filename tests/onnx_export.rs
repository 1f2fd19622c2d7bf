//! ONNX export and the ONNX Runtime engine: outputs against the libtorch model, fingerprints, and clear
//! errors for stale or broken exports and a missing ONNX Runtime.
//!
//! Needs ONNX Runtime: `ORT_DYLIB_PATH` as `. scripts/env.sh` exports it (the tests fail, naming it, without).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tch::{nn, Device, Kind, Tensor};
use vista3d::engines::fingerprint::weights_fingerprint;
use vista3d::engines::onnx::proto::{ModelProto, NodeProto, DTYPE_FLOAT, DTYPE_FLOAT16};
use vista3d::engines::onnx::{export_onnx, FloatType, OnnxManifest, WeightsSource};
use vista3d::engines::ort_engine::OrtEngine;
use vista3d::engines::{split, EngineErrorKind, Method, WindowEngine};
use vista3d::fsutil::sha256_file;
use vista3d::{Vista3d, Vista3dConfig};

mod common;

const TOLERANCE: f64 = 1e-4;
/// Relative error allowed for the float16 export against libtorch float32.
const FP16_TOLERANCE: f64 = 1e-2;

fn tmp(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("onnx_export")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    dir
}

/// A seeded random network of width `width` and its variables.
fn random_net(width: i64, seed: i64) -> (nn::VarStore, Vista3d) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Vista3d::new(&vs.root(), Vista3dConfig::with_width(width)).unwrap();
    (vs, net)
}

/// An export of seeded random weights in a fresh directory.
fn exported(name: &str, width: i64, seed: i64) -> (nn::VarStore, Vista3d, PathBuf) {
    let (vs, net) = random_net(width, seed);
    let dir = tmp(name);
    export_onnx(&vs, &WeightsSource::random(width, seed), &dir).unwrap();
    (vs, net, dir)
}

fn vista3d_cli(args: &[&str], env: &[(&str, Option<&str>)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vista3d"));
    cmd.args(args);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.output().expect("run vista3d")
}

fn check(what: &str, actual: &Tensor, expected: &Tensor) {
    let err = common::rel_error(actual, expected).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(err <= TOLERANCE, "{what}: relative error {err:e}");
    eprintln!("{what}: relative error {err:.2e}");
}

#[test]
fn ort_matches_libtorch_for_encoder_and_class_head() {
    let (vs, net, dir) = exported("parity_e16", 16, 7);
    let mut engine = OrtEngine::load(&dir, &weights_fingerprint(&vs), 2).unwrap();
    assert_eq!(engine.method(), Method::Ort);
    tch::manual_seed(11);
    let image = Tensor::randn([1, 1, 32, 48, 32], (Kind::Float, Device::Cpu));
    let torch_features = tch::no_grad(|| split::encode(&net, &image).unwrap());
    let features = engine.encode(&image).unwrap();
    assert_eq!(features.kind(), Kind::Float);
    check("encoder (mapped) features", &features, &torch_features);

    let everything = vista3d::prompts::everything_labels();
    assert_eq!(everything.len(), 117);
    let one = vec![5];
    let four = vec![1, 3, 6, 132];
    for ids in [&one, &four, &everything] {
        let ids = Tensor::from_slice(ids).view([-1, 1]);
        let expected = tch::no_grad(|| split::classify(&net, &torch_features, &ids));
        let logits = engine.classify(&torch_features, &ids).unwrap();
        check(
            &format!("logits, {} prompts", ids.size()[0]),
            &logits,
            &expected,
        );
    }

    // Batched windows (sw_batch_size 2): logits are [B, b, H, W, D].
    let batch = Tensor::randn([2, 16, 16, 32, 16], (Kind::Float, Device::Cpu));
    let ids = Tensor::from_slice(&four).view([-1, 1]);
    let expected = tch::no_grad(|| split::classify(&net, &batch, &ids));
    assert_eq!(expected.size(), [4, 2, 16, 32, 16]);
    check(
        "logits, 2 windows x 4 prompts",
        &engine.classify(&batch, &ids).unwrap(),
        &expected,
    );

    let images = Tensor::randn([2, 1, 32, 32, 32], (Kind::Float, Device::Cpu));
    let expected = tch::no_grad(|| split::encode(&net, &images).unwrap());
    check(
        "encoder features, 2 windows",
        &engine.encode(&images).unwrap(),
        &expected,
    );
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let (vs, _, dir) = exported("bad_inputs_e8", 8, 1);
    let mut engine = OrtEngine::load(&dir, &weights_fingerprint(&vs), 1).unwrap();
    let features = Tensor::zeros([1, 8, 16, 16, 16], (Kind::Float, Device::Cpu));
    let wrong_width = Tensor::zeros([1, 16, 16, 16, 16], (Kind::Float, Device::Cpu));
    let ids = Tensor::from_slice(&[1i64]).view([1, 1]);
    assert!(engine.classify(&wrong_width, &ids).is_err());
    assert!(engine
        .classify(&features, &Tensor::from_slice(&[1i64]))
        .is_err());
    for bad in [600i64, -1] {
        let out_of_table = Tensor::from_slice(&[bad]).view([1, 1]);
        let msg = format!(
            "{:#}",
            engine.classify(&features, &out_of_table).unwrap_err()
        );
        assert!(msg.contains("class ids must be in 0..512"), "{msg}");
    }
    assert!(engine
        .encode(&Tensor::zeros([16, 16, 16], (Kind::Float, Device::Cpu)))
        .is_err());
}

#[test]
fn checkpoint_export_keeps_the_fingerprint_and_checksum() {
    let dir = tmp("from_checkpoint");
    std::fs::create_dir_all(&dir).unwrap();
    let ckpt = dir.join("weights_e8.safetensors");
    let o = vista3d_cli(
        &[
            "init-checkpoint",
            "--width",
            "8",
            "--seed",
            "3",
            "--out",
            ckpt.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.join("onnx");
    let o = vista3d_cli(
        &[
            "export-onnx",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let manifest = OnnxManifest::read(&out).unwrap();
    let model = vista3d::load_model(&ckpt, Device::Cpu, &Default::default()).unwrap();
    assert_eq!(manifest.weights_fingerprint, weights_fingerprint(&model.vs));
    assert_eq!(
        manifest.weights,
        WeightsSource::Checkpoint {
            path: ckpt.display().to_string(),
            sha256: sha256_file(&ckpt).unwrap()
        }
    );
    assert_eq!(
        (manifest.embed_dim, manifest.opset, manifest.n_classes),
        (8, 17, 512)
    );
    for entry in [&manifest.encoder, &manifest.class_head] {
        assert_eq!(sha256_file(&out.join(&entry.file)).unwrap(), entry.sha256);
    }
    // The metadata inside the ONNX files carries the same keys.
    let encoder_bytes = std::fs::read(out.join("encoder.onnx")).unwrap();
    for needle in [
        manifest.weights_fingerprint.as_str(),
        "checkpoint_sha256",
        "vista3d 0.1.0",
    ] {
        assert!(
            encoder_bytes
                .windows(needle.len())
                .any(|w| w == needle.as_bytes()),
            "encoder.onnx metadata lacks {needle}"
        );
    }
    // The export reloads and runs for the reloaded model.
    OrtEngine::load(&out, &weights_fingerprint(&model.vs), 1).unwrap();

    // Exporting the same weights again gives byte-identical files.
    let again = dir.join("onnx_again");
    export_onnx(&model.vs, &manifest.weights, &again).unwrap();
    let manifest2 = OnnxManifest::read(&again).unwrap();
    assert_eq!(manifest2, manifest);
}

#[test]
fn random_export_is_labelled_and_fingerprint_tracks_weights() {
    let (vs, _, dir) = exported("labelled_e8", 8, 5);
    let manifest = OnnxManifest::read(&dir).unwrap();
    assert!(matches!(
        manifest.weights,
        WeightsSource::Random {
            width: 8,
            seed: 5,
            ..
        }
    ));
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    assert!(text.contains("\"random\"") && text.contains("not a trained model"));
    assert_eq!(manifest.weights_fingerprint, weights_fingerprint(&vs));
    let (other, _) = random_net(8, 6);
    assert_ne!(weights_fingerprint(&other), manifest.weights_fingerprint);
}

#[test]
fn stale_export_is_rejected() {
    let (_, _, dir) = exported("stale_e8", 8, 2);
    let (other, _) = random_net(8, 9);
    let err = OrtEngine::load(&dir, &weights_fingerprint(&other), 1)
        .err()
        .expect("a stale export must be refused");
    assert_eq!(err.kind(), EngineErrorKind::Stale);
    let msg = format!("{err:#}");
    assert!(msg.contains("stale ONNX export"), "{msg}");
    assert!(msg.contains(&weights_fingerprint(&other)), "{msg}");
}

#[test]
fn broken_exports_are_clear_errors() {
    let (vs, _, good) = exported("broken_src_e8", 8, 4);
    let fp = weights_fingerprint(&vs);
    let load_err = |dir: &Path| -> String {
        format!(
            "{:#}",
            OrtEngine::load(dir, &fp, 1).err().expect("must fail")
        )
    };
    let load_kind = |dir: &Path| {
        OrtEngine::load(dir, &fp, 1)
            .err()
            .expect("must fail")
            .kind()
    };
    let copy = |name: &str| -> PathBuf {
        let dir = tmp(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["encoder.onnx", "class_head.onnx", "manifest.json"] {
            std::fs::copy(good.join(f), dir.join(f)).unwrap();
        }
        dir
    };

    let msg = load_err(&tmp("does_not_exist"));
    assert!(msg.contains("does not exist"), "{msg}");
    assert_eq!(
        load_kind(&tmp("does_not_exist")),
        EngineErrorKind::Unavailable
    );

    let dir = copy("no_manifest");
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("manifest.json") && msg.contains("not a complete ONNX export"),
        "{msg}"
    );
    assert_eq!(load_kind(&dir), EngineErrorKind::Unavailable);

    let dir = copy("garbage_manifest");
    std::fs::write(dir.join("manifest.json"), b"{\"format\": 3").unwrap();
    assert!(load_err(&dir).contains("not a valid ONNX export manifest"));
    assert_eq!(load_kind(&dir), EngineErrorKind::Corrupt);

    let dir = copy("missing_file");
    std::fs::remove_file(dir.join("class_head.onnx")).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("corrupt ONNX export") && msg.contains("missing"),
        "{msg}"
    );
    assert_eq!(load_kind(&dir), EngineErrorKind::Corrupt);

    let dir = copy("truncated");
    let bytes = std::fs::read(dir.join("encoder.onnx")).unwrap();
    std::fs::write(dir.join("encoder.onnx"), &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("corrupt ONNX export") && msg.contains("bytes"),
        "{msg}"
    );
    assert_eq!(load_kind(&dir), EngineErrorKind::Corrupt);

    let dir = copy("bit_flip");
    let mut bytes = std::fs::read(dir.join("encoder.onnx")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(dir.join("encoder.onnx"), &bytes).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("sha256"), "{msg}");
    assert_eq!(load_kind(&dir), EngineErrorKind::Corrupt);

    // A file that is not ONNX at all (manifest updated to match it): ONNX Runtime's refusal is reported.
    let dir = copy("not_onnx");
    let junk = vec![0xffu8; 4096];
    std::fs::write(dir.join("class_head.onnx"), &junk).unwrap();
    let mut manifest = OnnxManifest::read(&dir).unwrap();
    manifest.class_head.bytes = junk.len() as u64;
    manifest.class_head.sha256 = sha256_file(&dir.join("class_head.onnx")).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("cannot load") && msg.contains("class_head.onnx"),
        "{msg}"
    );
    assert_eq!(load_kind(&dir), EngineErrorKind::Corrupt);
}

#[test]
fn cli_without_onnx_runtime_fails_clearly() {
    // An explicit ORT_DYLIB_PATH is honoured or refused, never replaced by the library found beside libtorch.
    let ort = Some("/nonexistent/libonnxruntime.so.1.31.1");
    let out = tmp("no_ort");
    let o = vista3d_cli(
        &[
            "export-onnx",
            "--random-width",
            "8",
            "--out",
            out.to_str().unwrap(),
            "--verify",
        ],
        &[("ORT_DYLIB_PATH", ort)],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("error: ONNX Runtime not found"), "{err}");
    assert!(err.contains("ORT_DYLIB_PATH"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !out.exists(),
        "nothing may be written when ONNX Runtime is missing"
    );
    // Not a shared library at all.
    let dir = tmp("fake_ort");
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("libonnxruntime.so");
    std::fs::write(&fake, b"not a library").unwrap();
    let o = vista3d_cli(
        &[
            "export-onnx",
            "--random-width",
            "8",
            "--out",
            dir.join("x").to_str().unwrap(),
            "--verify",
        ],
        &[("ORT_DYLIB_PATH", Some(fake.to_str().unwrap()))],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("ONNX Runtime not usable") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn cli_export_and_verify() {
    let out = tmp("cli_verify");
    let o = vista3d_cli(
        &[
            "export-onnx",
            "--random-width",
            "8",
            "--seed",
            "2",
            "--out",
            out.to_str().unwrap(),
            "--verify",
            "--threads",
            "1",
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("relative error"), "{stdout}");
    assert!(stdout.contains("random"), "{stdout}");
    assert!(
        stdout.contains("float16 export on ONNX Runtime"),
        "{stdout}"
    );
    assert!(stdout.contains("encoder_fp16.onnx (fp16"), "{stdout}");
    let o = vista3d_cli(&["export-onnx", "--out", out.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no weights"), "{err}");
}

fn check_fp16(what: &str, actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.kind(), Kind::Float, "{what}: outputs stay float32");
    let err = common::rel_error(actual, expected).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(err <= FP16_TOLERANCE, "{what}: relative error {err:e}");
    eprintln!("{what} (fp16 export): relative error {err:.2e}");
    err
}

#[test]
fn fp16_export_on_ort_matches_libtorch_fp32_within_fp16_tolerance() {
    let (vs, net, dir) = exported("fp16_parity_e16", 16, 7);
    let fp = weights_fingerprint(&vs);
    let mut engine = OrtEngine::load_models(&dir, &fp, 2, FloatType::F16).unwrap();
    tch::manual_seed(11);
    let image = Tensor::randn([1, 1, 32, 32, 32], (Kind::Float, Device::Cpu));
    let torch_features = tch::no_grad(|| split::encode(&net, &image).unwrap());
    let features = engine.encode(&image).unwrap();
    let feature_err = check_fp16("encoder features", &features, &torch_features);
    for ids in [vec![5i64], vec![1, 3, 6, 132]] {
        let ids = Tensor::from_slice(&ids).view([-1, 1]);
        let expected = tch::no_grad(|| split::classify(&net, &torch_features, &ids));
        let logits = engine.classify(&torch_features, &ids).unwrap();
        check_fp16(
            &format!("logits, {} prompts", ids.size()[0]),
            &logits,
            &expected,
        );
    }
    // The fp16 files really are a different (less exact) computation than the fp32 ones.
    let mut fp32 = OrtEngine::load(&dir, &fp, 2).unwrap();
    let exact = common::rel_error(&fp32.encode(&image).unwrap(), &torch_features).unwrap();
    assert!(
        exact < feature_err,
        "fp32 {exact:e} vs fp16 {feature_err:e}"
    );
}

#[test]
fn manifest_lists_the_fp16_files_with_their_sha256() {
    let (_, _, dir) = exported("fp16_manifest_e8", 8, 3);
    let manifest = OnnxManifest::read(&dir).unwrap();
    let encoder = manifest.encoder_fp16.as_ref().expect("encoder_fp16 entry");
    let class_head = manifest.class_head_fp16.as_ref().expect("class_head_fp16");
    assert_eq!(encoder.file, "encoder_fp16.onnx");
    assert_eq!(class_head.file, "class_head_fp16.onnx");
    assert_eq!(manifest.encoder.float_type, FloatType::F32);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    for (key, entry, precision) in [
        ("encoder", &manifest.encoder, "fp32"),
        ("class_head", &manifest.class_head, "fp32"),
        ("encoder_fp16", encoder, "fp16"),
        ("class_head_fp16", class_head, "fp16"),
    ] {
        let sha = sha256_file(&dir.join(&entry.file)).unwrap();
        assert_eq!(entry.sha256, sha, "{key}");
        assert_eq!(json[key]["precision"], precision, "{key}");
        // The entries are the one index of the files (the derived `files` map is gone: one manifest reader).
        assert_eq!(json[key]["file"], entry.file.as_str(), "{key}");
        assert_eq!(json[key]["sha256"], sha.as_str(), "{key}");
        assert!(json.get("files").is_none());
    }
    // float16 weights: the fp16 encoder is about half the size of the fp32 one.
    let ratio = encoder.bytes as f64 / manifest.encoder.bytes as f64;
    assert!((0.45..0.6).contains(&ratio), "size ratio {ratio}");
    // TensorRT builds FP16 engines from the fp16 files, TF32 ones from the fp32 files (same manifest reader).
    use vista3d::engines::tensorrt::{self as trt, Part};
    for (part, file) in [(Part::Encoder, "encoder"), (Part::ClassHead, "class_head")] {
        let fp16 = trt::onnx_source(&manifest, &dir, part, Method::TrtFp16).unwrap();
        assert!(fp16.fp16_model);
        assert_eq!(fp16.path, dir.join(format!("{file}_fp16.onnx")));
        let tf32 = trt::onnx_source(&manifest, &dir, part, Method::TrtTf32).unwrap();
        assert!(!tf32.fp16_model);
        assert_eq!(tf32.path, dir.join(format!("{file}.onnx")));
    }
}

/// The graph of an exported file.
fn graph_of(path: &Path) -> vista3d::engines::onnx::proto::GraphProto {
    use prost::Message;
    let bytes = std::fs::read(path).unwrap();
    ModelProto::decode(bytes.as_slice()).unwrap().graph.unwrap()
}

fn cast_target(node: &NodeProto) -> Option<i64> {
    (node.op_type == "Cast")
        .then(|| node.attribute.iter().find(|a| a.name == "to").map(|a| a.i))
        .flatten()
}

#[test]
fn fp16_export_computes_every_norm_in_fp32_and_keeps_a_float32_interface() {
    let (_, _, dir) = exported("fp16_graph_e8", 8, 2);
    for (file, n_norms) in [("encoder_fp16.onnx", 38), ("class_head_fp16.onnx", 1)] {
        let graph = graph_of(&dir.join(file));
        let producer = |name: &str| {
            graph
                .node
                .iter()
                .find(|n| n.output.iter().any(|o| o == name))
        };
        let init_type = |name: &str| {
            graph
                .initializer
                .iter()
                .find(|t| t.name == name)
                .map(|t| t.data_type)
        };
        let norms: Vec<&NodeProto> = graph
            .node
            .iter()
            .filter(|n| n.op_type == "InstanceNormalization")
            .collect();
        assert_eq!(norms.len(), n_norms, "{file}");
        for norm in &norms {
            let x = producer(&norm.input[0]).expect("norm input produced by a node");
            assert_eq!(
                cast_target(x),
                Some(DTYPE_FLOAT as i64),
                "{file}: {}",
                norm.name
            );
            for p in &norm.input[1..] {
                assert_eq!(init_type(p), Some(DTYPE_FLOAT), "{file}: {} {p}", norm.name);
            }
            let consumers: Vec<&NodeProto> = graph
                .node
                .iter()
                .filter(|n| n.input.contains(&norm.output[0]))
                .collect();
            assert_eq!(consumers.len(), 1, "{file}: {}", norm.name);
            assert_eq!(cast_target(consumers[0]), Some(DTYPE_FLOAT16 as i64));
        }
        // Every other float initializer is float16 (the convolution, linear and embedding weights).
        let norm_params: Vec<&String> = norms.iter().flat_map(|n| &n.input[1..]).collect();
        let mut half = 0;
        for t in &graph.initializer {
            if norm_params.contains(&&t.name)
                || t.data_type != DTYPE_FLOAT && t.data_type != DTYPE_FLOAT16
            {
                continue;
            }
            assert_eq!(t.data_type, DTYPE_FLOAT16, "{file}: {}", t.name);
            half += 1;
        }
        assert!(half > 0, "{file}: no float16 weights");
        // Float32 at the boundaries: inputs cast to float16, outputs cast back.
        for input in graph.input.iter().filter(|i| i.name != "class_ids") {
            let elem = input
                .r#type
                .as_ref()
                .unwrap()
                .tensor_type
                .as_ref()
                .unwrap()
                .elem_type;
            assert_eq!(elem, DTYPE_FLOAT, "{file}: input {}", input.name);
            assert!(graph
                .node
                .iter()
                .any(|n| n.input.contains(&input.name)
                    && cast_target(n) == Some(DTYPE_FLOAT16 as i64)));
        }
        for output in &graph.output {
            let elem = output
                .r#type
                .as_ref()
                .unwrap()
                .tensor_type
                .as_ref()
                .unwrap()
                .elem_type;
            assert_eq!(elem, DTYPE_FLOAT, "{file}: output {}", output.name);
            assert_eq!(
                cast_target(producer(&output.name).unwrap()),
                Some(DTYPE_FLOAT as i64)
            );
        }
    }
    // The float32 export has no casts at all.
    let graph = graph_of(&dir.join("encoder.onnx"));
    assert!(graph.node.iter().all(|n| n.op_type != "Cast"));
}

#[test]
fn image_post_mapping_is_in_the_encoder_graph_only() {
    // The split (engines::split): the class head's prompt-independent image_post_mapping runs once per window in
    // the encoder; the class-head graph holds only the prompt-dependent part.
    let (_, _, dir) = exported("split_e8", 8, 3);
    for suffix in ["", "_fp16"] {
        let params = |part: &str| -> Vec<String> {
            graph_of(&dir.join(format!("{part}{suffix}.onnx")))
                .initializer
                .iter()
                .map(|t| t.name.clone())
                .collect()
        };
        let (encoder, class_head) = (params("encoder"), params("class_head"));
        let mapping = |names: &[String]| {
            names
                .iter()
                .filter(|n| n.contains("class_head.image_post_mapping."))
                .count()
        };
        // Four convolutions (conv1, conv2 of two UnetResBlocks; their instance norms have no parameters).
        assert_eq!(mapping(&encoder), 4, "{suffix}: {encoder:?}");
        assert_eq!(mapping(&class_head), 0, "{suffix}: {class_head:?}");
        assert!(
            class_head.iter().any(|n| n.contains("class_embeddings")),
            "{suffix}: {class_head:?}"
        );
    }
    let manifest = OnnxManifest::read(&dir).unwrap();
    assert_eq!(manifest.format_version, 2);
}

#[test]
fn auto_on_a_cpu_exports_into_the_cache_on_first_use_and_runs_onnx_runtime() {
    let ct = common::data("totalsegmentator/example_ct_sm.nii.gz");
    let work = tmp("auto_first_use");
    let cache = work.join("cache");
    // `auto_cpu = ort` makes auto take ONNX Runtime whatever the CPU (detect takes it only with AVX-512).
    let run_with = |out: &str, precision: &str, auto_cpu: &str| {
        let out = work.join(out);
        let auto_cpu = format!("auto_cpu={auto_cpu}");
        let o = vista3d_cli(
            &[
                "infer",
                "--set",
                &auto_cpu,
                "--image",
                ct.to_str().unwrap(),
                "--label-prompt",
                "3,1",
                "--precision",
                precision,
                "--demo-weights",
                "--set",
                "resample_spacing=[3,3,3]",
                "--set",
                "patch_size=[32,32,32]",
                "--threads",
                "2",
                "--cache-dir",
                cache.to_str().unwrap(),
                "--output-dir",
                out.to_str().unwrap(),
            ],
            // Found without the variable: beside libtorch, in the same Python environment.
            &[("ORT_DYLIB_PATH", None), ("RUST_LOG", Some("info"))],
        );
        let log = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{log}");
        let rec: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("example_ct_sm/example_ct_sm_trans.json")).unwrap(),
        )
        .unwrap();
        (rec, log)
    };
    let run = |out: &str, precision: &str| run_with(out, precision, "ort");
    let (rec, log) = run("first", "auto");
    assert_eq!(
        rec["precision"]["used"],
        serde_json::json!(["ort"]),
        "{log}"
    );
    assert!(log.contains("exporting the weights to ONNX"), "{log}");
    // The export is keyed by the weights fingerprint (demo weights: random width 16, seed 0).
    let (vs, _) = random_net(16, 0);
    let dir = cache.join(weights_fingerprint(&vs)).join("onnx");
    let manifest = OnnxManifest::read(&dir).unwrap();
    assert_eq!(manifest.weights_fingerprint, weights_fingerprint(&vs));
    // Later runs use it as it is; `ort` too.
    let (rec, log) = run("second", "ort");
    assert_eq!(
        rec["precision"]["used"],
        serde_json::json!(["ort"]),
        "{log}"
    );
    assert!(!log.contains("exporting the weights to ONNX"), "{log}");
    // An export of the older layout (manifest v1) in the cache is replaced, not used.
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let mut old: serde_json::Value = serde_json::from_str(&text).unwrap();
    old["format_version"] = 1.into();
    std::fs::write(dir.join("manifest.json"), old.to_string()).unwrap();
    let (rec, log) = run("third", "auto");
    assert_eq!(
        rec["precision"]["used"],
        serde_json::json!(["ort"]),
        "{log}"
    );
    assert!(log.contains("replacing the cached ONNX export"), "{log}");
    assert_eq!(OnnxManifest::read(&dir).unwrap().format_version, 2);
    // auto_cpu = fp32: libtorch, though the export is there; detect: as the CPU's flags say.
    let (rec, log) = run_with("fourth", "auto", "fp32");
    assert_eq!(
        rec["precision"]["used"],
        serde_json::json!(["fp32"]),
        "{log}"
    );
    let (rec, log) = run_with("fifth", "auto", "detect");
    let detected = if vista3d::runtime::cpu_has_avx512() {
        "ort"
    } else {
        "fp32"
    };
    assert_eq!(
        rec["precision"]["used"],
        serde_json::json!([detected]),
        "{log}"
    );
}
