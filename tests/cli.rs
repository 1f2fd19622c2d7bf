//! The `vista3d` binary on good and bad checkpoints: clear errors and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vista3d(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vista3d"))
        .args(args)
        .output()
        .expect("run vista3d")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

mod common;

fn fixture_dir() -> PathBuf {
    common::fixtures("network", "manifest.json")
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A failing run: exit code 1, one `error:` line naming the problem, and no panic.
fn assert_clean_failure(o: &Output, expect_in_message: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit code, stderr: {err}");
    assert!(err.contains("error:"), "no error line: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(
        err.to_lowercase()
            .contains(&expect_in_message.to_lowercase()),
        "message should mention '{expect_in_message}': {err}"
    );
}

#[test]
fn info_reports_width_and_monai_parameter_counts() {
    let dir = fixture_dir();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    for (format, file_key) in [("PyTorch", "pt"), ("safetensors", "safetensors")] {
        let file = dir.join(manifest["weights"]["16"][file_key].as_str().unwrap());
        let o = vista3d(&["info", "--checkpoint", file.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(info["encoder_embed_dim"], 16);
        assert!(
            info["format"].as_str().unwrap().contains(format),
            "{}",
            info["format"]
        );
        assert_eq!(info["tensors"], 259);
        let monai = &manifest["weights"]["16"]["parameters"];
        for m in info["modules"].as_array().unwrap() {
            let name = m["module"].as_str().unwrap();
            if let Some(expected) = monai.get(name) {
                assert_eq!(&m["parameters"], expected, "{name}");
            }
        }
        assert_eq!(info["modules"][0]["parameters"], monai["total"]);
    }
    // The human-readable table too.
    let file = dir.join(manifest["weights"]["16"]["pt"].as_str().unwrap());
    let o = vista3d(&["info", "--checkpoint", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("encoder_embed_dim: 16"), "{out}");
    assert!(out.contains("image_encoder.encoder"), "{out}");
}

#[test]
fn info_rejects_bad_files_cleanly() {
    let missing = vista3d(&["info", "--checkpoint", "/nonexistent/model.pt"]);
    assert_clean_failure(&missing, "/nonexistent/model.pt");

    let empty = temp_file("empty.pt", b"");
    assert_clean_failure(
        &vista3d(&["info", "--checkpoint", empty.to_str().unwrap()]),
        "empty.pt",
    );

    let text = temp_file("notes.pt", b"this is not a checkpoint at all\n");
    assert_clean_failure(
        &vista3d(&["info", "--checkpoint", text.to_str().unwrap()]),
        "notes.pt",
    );

    // A real checkpoint cut in half.
    let dir = fixture_dir();
    let bytes = std::fs::read(dir.join("weights_e16.pt")).unwrap();
    let truncated = temp_file("truncated.pt", &bytes[..bytes.len() / 2]);
    assert_clean_failure(
        &vista3d(&["info", "--checkpoint", truncated.to_str().unwrap()]),
        "truncated.pt",
    );
    let st = std::fs::read(dir.join("weights_e16.safetensors")).unwrap();
    let truncated = temp_file("truncated.safetensors", &st[..st.len() - 1000]);
    assert_clean_failure(
        &vista3d(&["info", "--checkpoint", truncated.to_str().unwrap()]),
        "truncated.safetensors",
    );

    // A valid checkpoint of something else.
    let other = dir.join("e16_class_one.safetensors");
    assert_clean_failure(
        &vista3d(&["info", "--checkpoint", other.to_str().unwrap()]),
        "not a VISTA3D checkpoint",
    );
}

#[test]
fn info_rejects_a_checkpoint_of_another_width() {
    let file = fixture_dir().join("weights_e16.pt");
    let o = vista3d(&[
        "info",
        "--checkpoint",
        file.to_str().unwrap(),
        "--width",
        "48",
    ]);
    assert_clean_failure(&o, "encoder_embed_dim is 16, but 48");
}

#[test]
fn init_checkpoint_writes_a_loadable_random_model() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli");
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["random_e8.safetensors", "random_e8.pt"] {
        let out = dir.join(name);
        let o = vista3d(&[
            "init-checkpoint",
            "--width",
            "8",
            "--seed",
            "3",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let o = vista3d(&["info", "--checkpoint", out.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(info["encoder_embed_dim"], 8);
        assert_eq!(info["loaded"], 259);
    }
}
