//! TensorRT on a machine without TensorRT or a GPU (every development and CI machine): the shim is compiled when
//! headers were given, `build-engines` fails with a clear error and writes nothing, and loading reports why, as
//! an "unavailable" engine error (what `auto` skips quietly). Keys, staleness, `max_prompt_size` selection and
//! chunking are unit-tested in `src/engines/tensorrt/{cache,engine}.rs`; the shim's failure paths in
//! `src/engines/tensorrt/handles.rs`.

use std::path::Path;
use std::process::{Command, Output};

use tch::{nn, Device};
use vista3d::engines::fingerprint::weights_fingerprint;
use vista3d::engines::onnx::{export_onnx, OnnxManifest, WeightsSource};
use vista3d::engines::tensorrt::{self as trt, TrtEngine, TrtLibrary};
use vista3d::engines::{EngineContext, EngineErrorKind, Method};
use vista3d::{Vista3d, Vista3dConfig};

fn vista3d(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vista3d"))
        .args(args)
        // No TensorRT from the environment: the test is about its absence.
        .env_remove("VISTA3D_TRT_LIB")
        .env_remove("TENSORRT_ROOT")
        .output()
        .expect("run vista3d")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A full export folder of seeded random width-8 weights, as `vista3d export-onnx` writes it; returns the
/// weights fingerprint.
fn onnx_export(dir: &Path) -> String {
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = Vista3d::new(&vs.root(), Vista3dConfig::with_width(8)).unwrap();
    export_onnx(&vs, &WeightsSource::random(8, 1), dir).unwrap();
    weights_fingerprint(&vs)
}

/// True when this machine really has TensorRT (then the "unavailable" tests do not apply).
fn tensorrt_present() -> bool {
    TrtLibrary::load().is_ok()
}

#[test]
fn shim_is_compiled_when_headers_are_given() {
    // scripts/test.sh fetches the headers and exports TENSORRT_INCLUDE_DIR before building.
    match option_env!("TENSORRT_INCLUDE_DIR") {
        Some(dir) if Path::new(dir).join("NvInfer.h").is_file() => assert!(
            trt::shim_compiled(),
            "TensorRT headers were given at build time ({dir}) but the shim was not compiled"
        ),
        other => eprintln!(
            "no TensorRT headers at build time ({other:?}): shim_compiled() = {}",
            trt::shim_compiled()
        ),
    }
}

#[test]
fn library_load_names_what_is_missing() {
    if tensorrt_present() {
        eprintln!("TensorRT is installed here: nothing to check");
        return;
    }
    let err = format!("{:#}", TrtLibrary::load().unwrap_err());
    if trt::shim_compiled() {
        assert!(err.contains("libnvinfer.so.10/11 not found"), "{err}");
    } else {
        assert!(err.contains("built without TensorRT headers"), "{err}");
        assert!(err.contains("TENSORRT_INCLUDE_DIR"), "{err}");
    }
}

#[test]
fn build_engines_without_tensorrt_fails_cleanly_and_writes_nothing() {
    if tensorrt_present() {
        eprintln!("TensorRT is installed here: nothing to check");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let onnx = dir.path().join("onnx");
    onnx_export(&onnx);
    let out = dir.path().join("engines");
    let o = vista3d(&[
        "build-engines",
        "--onnx",
        onnx.to_str().unwrap(),
        "--precision",
        "fp16,tf32",
        "--max-prompt-size",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "exit code, stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("error: cannot build TensorRT engines"),
        "{err}"
    );
    assert!(err.contains("TensorRT unavailable"), "{err}");
    assert!(!out.exists(), "build-engines created {}", out.display());
}

#[test]
fn build_engines_rejects_bad_arguments_before_looking_for_tensorrt() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("engines");
    let cases: [(&[&str], &str); 4] = [
        (
            &["--precision", "int8"],
            "unknown TensorRT precision 'int8'",
        ),
        (&["--patch", "128,128"], "--patch must be H,W,D"),
        (
            &["--max-prompt-size", "0"],
            "max_prompt_size must be at least 1",
        ),
        (
            &["--onnx", "/nonexistent/onnx"],
            "/nonexistent/onnx/manifest.json",
        ),
    ];
    let onnx = dir.path().join("onnx");
    onnx_export(&onnx);
    for (args, expected) in cases {
        let mut all = vec!["build-engines", "--out", out.to_str().unwrap()];
        if !args.contains(&"--onnx") {
            all.extend_from_slice(&["--onnx", onnx.to_str().unwrap()]);
        }
        all.extend_from_slice(args);
        let o = vista3d(&all);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(expected),
            "{args:?}: expected '{expected}' in {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists());
    }
}

#[test]
fn engine_load_without_tensorrt_is_an_error_for_the_fallback() {
    if tensorrt_present() {
        eprintln!("TensorRT is installed here: nothing to check");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let onnx = dir.path().join("onnx");
    let fingerprint = onnx_export(&onnx);
    let manifest = OnnxManifest::read(&onnx).unwrap();
    assert_eq!(manifest.weights_fingerprint, fingerprint);
    for device in [Device::Cuda(0), Device::Cpu] {
        let ctx = EngineContext {
            onnx_dir: onnx.clone(),
            engines_dir: dir.path().join("engines"),
            weights_fingerprint: fingerprint.clone(),
            device,
            patch_size: [128, 128, 128],
            max_prompt_size: 4,
            sw_batch_size: 1,
        };
        for method in trt::TRT_METHODS {
            let err = TrtEngine::load(&ctx, method).unwrap_err();
            assert_eq!(err.kind(), EngineErrorKind::Unavailable, "{err}");
            let expected = if device.is_cuda() {
                "TensorRT unavailable"
            } else {
                "needs a CUDA device"
            };
            assert!(format!("{err:#}").contains(expected), "{err:#}");
        }
    }
    // The ONNX models TensorRT would compile are the export's manifest entries.
    for (part, file) in [
        (trt::Part::Encoder, "encoder"),
        (trt::Part::ClassHead, "class_head"),
    ] {
        let fp16 = trt::onnx_source(&manifest, &onnx, part, Method::TrtFp16).unwrap();
        assert!(fp16.fp16_model);
        assert_eq!(fp16.path, onnx.join(format!("{file}_fp16.onnx")));
        assert!(fp16.path.is_file());
        let tf32 = trt::onnx_source(&manifest, &onnx, part, Method::TrtTf32).unwrap();
        assert!(!tf32.fp16_model);
        assert_eq!(tf32.path, onnx.join(format!("{file}.onnx")));
    }
}

#[test]
fn build_engines_refuses_a_damaged_export_before_loading_tensorrt() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = dir.path().join("onnx");
    onnx_export(&onnx);
    let out = dir.path().join("engines");
    let build = |precision: &str| {
        vista3d(&[
            "build-engines",
            "--onnx",
            onnx.to_str().unwrap(),
            "--precision",
            precision,
            "--out",
            out.to_str().unwrap(),
        ])
    };
    // A truncated float16 class head: named, whether or not TensorRT is installed.
    let path = onnx.join("class_head_fp16.onnx");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let o = build("fp16");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("corrupt ONNX export"), "{err}");
    assert!(err.contains("class_head_fp16.onnx"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists());
    // A manifest that is not one.
    std::fs::write(onnx.join("manifest.json"), b"{\"weights_fingerprint\": 3}").unwrap();
    let o = build("tf32");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("not a valid ONNX export manifest"), "{err}");
    assert!(!out.exists());
}

#[test]
fn info_engines_says_what_runs_here_and_why_not() {
    if tensorrt_present() {
        eprintln!("TensorRT is installed here: nothing to check");
        return;
    }
    let o = vista3d(&["info", "--engines"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}{}", stderr(&o));
    // No GPU and no TensorRT library on this machine: both TensorRT methods say why; ONNX Runtime is found
    // beside libtorch (the test environment installs it there) and `auto` on the CPU runs it.
    for method in ["trt_fp16", "trt_tf32"] {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(method))
            .unwrap_or_else(|| panic!("{method} missing: {out}"));
        assert!(line.contains(" no "), "{line}");
        assert!(line.contains("TensorRT unavailable"), "{line}");
    }
    let ort = out
        .lines()
        .find(|l| l.trim_start().starts_with("ort "))
        .unwrap();
    assert!(
        ort.contains(" yes ") && ort.contains("libonnxruntime"),
        "{ort}"
    );
    // auto_cpu = detect: ONNX Runtime where the CPU has AVX-512, libtorch fp32 elsewhere (with Winograd's
    // convolutions where the CPU has AVX2 and FMA).
    let avx512 = vista3d::runtime::cpu_has_avx512();
    let auto = if avx512 { "ort" } else { "fp32" };
    let winograd = !avx512 && vista3d::model::winograd::available();
    let said = if winograd {
        format!("auto on the CPU: {auto} with Winograd's 3x3x3 convolutions")
    } else {
        format!("auto on the CPU: {auto} (")
    };
    assert!(out.contains(&said), "{out}");
    // JSON for scripts.
    let o = vista3d(&["info", "--engines", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["auto_cpu"], auto);
    assert_eq!(json["auto_cpu_winograd"], winograd);
    assert_eq!(json["cpu_avx512"], vista3d::runtime::cpu_has_avx512());
    assert_eq!(json["tensorrt_shim_compiled"], trt::shim_compiled());
    let methods = json["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 7);
    // bf16 runs on the CPU exactly where the CPU has native bfloat16.
    let bf16 = methods.iter().find(|m| m["method"] == "bf16").unwrap();
    assert_eq!(
        bf16["available"],
        vista3d::runtime::cpu_has_native_bf16(),
        "{bf16}"
    );
    // Without --engines a checkpoint is still required.
    let o = vista3d(&["info"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--checkpoint"), "{}", stderr(&o));
}
