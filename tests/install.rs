//! `scripts/install.sh`: a relocatable install runs from another folder with a bare environment (no
//! LD_LIBRARY_PATH, no ORT_DYLIB_PATH), libtorch and ONNX Runtime found through the binary's run path.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{data, output_text as text};

/// Runs `bin` with only PATH and HOME set.
fn bare(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env(
            "HOME",
            std::env::var("HOME").unwrap_or_else(|_| "/tmp".into()),
        )
        .output()
        .unwrap()
}

#[test]
fn an_installed_binary_runs_after_being_copied_elsewhere() {
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("install");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let prefix = work.join("prefix");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new("bash")
        .arg(root.join("scripts/install.sh"))
        .arg(&prefix)
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_vista3d"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // Copy the install and remove the original: the copy must stand on its own.
    let moved = work.join("elsewhere/vista3d");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    let o = Command::new("cp")
        .arg("-a")
        .arg(&prefix)
        .arg(&moved)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    std::fs::remove_dir_all(&prefix).unwrap();
    let bin: PathBuf = moved.join("bin/vista3d");

    // libtorch from the copy: the process maps libtorch_cpu.so from moved/lib, nothing from the build's venv.
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "env -i PATH=/usr/bin:/bin LD_DEBUG=libs {} --version 2>&1 | grep 'calling init:' | grep libtorch_cpu",
            bin.display()
        ))
        .output()
        .unwrap();
    let loaded = text(&o);
    // The loader names it through the run path ($ORIGIN/../lib).
    assert!(
        loaded.contains(&moved.join("lib/libtorch_cpu.so").display().to_string())
            || loaded.contains(
                &moved
                    .join("bin/../lib/libtorch_cpu.so")
                    .display()
                    .to_string()
            ),
        "libtorch_cpu.so not loaded from the copy: {loaded}"
    );

    let ckpt = work.join("w8.safetensors");
    let o = bare(
        &bin,
        &[
            "init-checkpoint",
            "--width",
            "8",
            "--out",
            ckpt.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = bare(&bin, &["info", "--checkpoint", ckpt.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("encoder_embed_dim: 8"), "{}", text(&o));

    // ONNX Runtime from the copy, insisted upon: an ORT request that may not fall back succeeds.
    let onnx = work.join("onnx");
    let o = bare(
        &bin,
        &[
            "export-onnx",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--out",
            onnx.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let ct = data("totalsegmentator/example_ct_sm.nii.gz");
    let out = work.join("out");
    let o = bare(
        &bin,
        &[
            "infer",
            "--image",
            ct.to_str().unwrap(),
            "--label-prompt",
            "3",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--precision",
            "ort",
            "--precision-fallback",
            "deny",
            "--onnx-dir",
            onnx.to_str().unwrap(),
            "--cache-dir",
            work.join("cache").to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--set",
            "resample_spacing=[3,3,3]",
            "--set",
            "patch_size=[32,32,32]",
            "--threads",
            "2",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let rec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("example_ct_sm/example_ct_sm_trans.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        rec["precision"]["used"],
        serde_json::json!(["ort"]),
        "{rec}"
    );
}
