//! TensorRT on a machine without TensorRT or a GPU (every development and CI machine): the shim is compiled when
//! headers were given, `build-engines` fails with a clear error and writes nothing, and loading reports why.

use std::path::Path;
use std::process::{Command, Output};

use vista3d::engines::tensorrt::{self as trt, OnnxManifest, Precision, TrtEngine, TrtLibrary};

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

/// An export folder as `vista3d export-onnx` writes it (the models are placeholders: nothing parses them here).
fn onnx_export(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        r#"{"weights_fingerprint": "0123456789abcdef", "embed_dim": 16, "opset": 17,
            "files": {"encoder": "encoder.onnx", "class_head": "class_head.onnx"}}"#,
    )
    .unwrap();
    std::fs::write(dir.join("encoder.onnx"), b"placeholder encoder").unwrap();
    std::fs::write(dir.join("class_head.onnx"), b"placeholder class head").unwrap();
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
    onnx_export(&dir.path().join("onnx"));
    let manifest = OnnxManifest::read(&dir.path().join("onnx")).unwrap();
    for precision in [Precision::Fp16, Precision::Tf32] {
        let err = TrtEngine::load(
            &dir.path().join("engines"),
            &manifest,
            precision,
            [128, 128, 128],
            0,
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("TensorRT unavailable"),
            "{err:#}"
        );
    }
}
