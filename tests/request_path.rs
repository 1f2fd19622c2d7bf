//! The one request path (`Segmenter`) as the CLI uses it: nothing reloaded or re-hashed per request, a panic in
//! one image failing only that image, batch identity (mirrored outputs, recompute on a changed request), strict
//! configuration, `precision_fallback: deny`, and quiet broken pipes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vista3d::io::read_nifti;

mod common;
use common::data;
use common::{files_under, output_text as text, vista3d_with_env as vista3d, FAST};

fn tmp(name: &str) -> PathBuf {
    common::scratch("request_path", name)
}

fn record(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn later_requests_neither_reload_nor_rehash_the_weights() {
    let work = tmp("no_rehash");
    let ct = data("totalsegmentator/example_ct_sm.nii.gz");
    let input = work.join("in");
    std::fs::create_dir_all(&input).unwrap();
    for n in ["a", "b", "c"] {
        std::fs::copy(&ct, input.join(format!("{n}.nii.gz"))).unwrap();
    }
    let ckpt = work.join("w16.safetensors");
    let onnx = work.join("onnx");
    for args in [
        vec![
            "init-checkpoint",
            "--width",
            "16",
            "--seed",
            "0",
            "--out",
            ckpt.to_str().unwrap(),
        ],
        vec![
            "export-onnx",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--out",
            onnx.to_str().unwrap(),
        ],
    ] {
        let o = vista3d(&args, &[]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let cache = work.join("cache");
    let run = |out: &str| {
        let out = work.join(out);
        let o = vista3d(
            &[
                "batch",
                "--input-dir",
                input.to_str().unwrap(),
                "--output-dir",
                out.to_str().unwrap(),
                "--label-prompt",
                "3",
                "--checkpoint",
                ckpt.to_str().unwrap(),
                "--precision",
                "ort",
                "--onnx-dir",
                onnx.to_str().unwrap(),
                "--cache-dir",
                cache.to_str().unwrap(),
                "--set",
                "resample_spacing=[3,3,3]",
                "--set",
                "patch_size=[32,32,32]",
                "--threads",
                "2",
            ],
            &[("RUST_LOG", "info")],
        );
        assert!(o.status.success(), "{}", text(&o));
        for n in ["a", "b", "c"] {
            let rec = record(&out.join(format!("{n}/{n}_trans.json")));
            assert_eq!(
                rec["precision"]["used"],
                serde_json::json!(["ort"]),
                "{rec}"
            );
        }
        text(&o)
    };
    let t = run("out1");
    let count = |needle: &str| t.matches(needle).count();
    assert_eq!(count("loading weights from"), 1, "{t}");
    assert_eq!(count("computing the weights fingerprint"), 1, "{t}");
    // A second process finds the fingerprint in the cache: no hashing of the tensors at all.
    let t = run("out2");
    assert_eq!(
        t.matches("computing the weights fingerprint").count(),
        0,
        "{t}"
    );
}

#[test]
fn a_panic_in_one_image_fails_only_that_image() {
    let work = tmp("panic");
    let ct = data("totalsegmentator/example_ct_sm.nii.gz");
    let input = work.join("in");
    std::fs::create_dir_all(&input).unwrap();
    for n in ["a", "b_poisoned", "c"] {
        std::fs::copy(&ct, input.join(format!("{n}.nii.gz"))).unwrap();
    }
    let out = work.join("out");
    let mut args = vec![
        "batch",
        "--input-dir",
        input.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--label-prompt",
        "3",
    ];
    args.extend(FAST);
    let o = vista3d(&args, &[("VISTA3D_TEST_PANIC", "b_poisoned")]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("2 segmented") && t.contains("1 failed"), "{t}");
    assert!(
        t.contains("internal error") && t.contains("b_poisoned"),
        "{t}"
    );
    assert!(out.join("a/a_trans.nii.gz").is_file());
    assert!(out.join("c/c_trans.nii.gz").is_file());
    assert!(!out.join("b_poisoned").exists(), "{:?}", files_under(&out));
}

#[test]
fn batch_identity_mirrors_folders_and_recomputes_changed_requests() {
    let work = tmp("identity");
    let ct = data("totalsegmentator/example_ct_sm.nii.gz");
    let input = work.join("in");
    for p in ["patient1", "patient2"] {
        std::fs::create_dir_all(input.join(p)).unwrap();
        std::fs::copy(&ct, input.join(p).join("ct.nii.gz")).unwrap();
    }
    let out = work.join("out");
    let run = |label: &str, extra: &[&str]| {
        let mut args = vec![
            "batch",
            "--input-dir",
            input.to_str().unwrap(),
            "--recursive",
            "--output-dir",
            out.to_str().unwrap(),
            "--label-prompt",
            label,
        ];
        args.extend(FAST);
        args.extend(extra);
        let o = vista3d(&args, &[]);
        assert!(o.status.success(), "{}", text(&o));
        text(&o)
    };
    let t = run("3", &[]);
    assert!(t.contains("2 segmented"), "{t}");
    let outputs = [
        out.join("patient1/ct/ct_trans.nii.gz"),
        out.join("patient2/ct/ct_trans.nii.gz"),
    ];
    for o in &outputs {
        assert!(o.is_file(), "{}", o.display());
    }
    // Same request: skipped.
    let t = run("3", &[]);
    assert!(t.contains("0 segmented") && t.contains("2 skipped"), "{t}");
    // Other prompts: recomputed, and the record names what it replaced.
    let t = run("1", &[]);
    assert!(t.contains("2 segmented") && t.contains("0 skipped"), "{t}");
    let rec = record(&out.join("patient1/ct/ct_trans.json"));
    assert_eq!(rec["label_prompt"], serde_json::json!([1]));
    assert_eq!(
        rec["replaced"]["prompts"]["label_prompt"],
        serde_json::json!([3]),
        "{rec}"
    );
    // Another output setting is another request too.
    let t = run("1", &["--set", "output_dtype=uint8"]);
    assert!(t.contains("2 segmented"), "{t}");
    assert_eq!(read_nifti(&outputs[0]).unwrap().header.datatype, 2);

    // Two inputs that would write the same output: refused before any work, nothing written.
    let flat = work.join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    std::fs::copy(&ct, flat.join("x.nii.gz")).unwrap();
    std::fs::copy(input.join("patient1/ct.nii.gz"), flat.join("x.nii")).unwrap();
    let out2 = work.join("out_clash");
    let mut args = vec![
        "batch",
        "--input-dir",
        flat.to_str().unwrap(),
        "--input-suffix",
        ".nii",
        "--output-dir",
        out2.to_str().unwrap(),
    ];
    args.extend(FAST);
    // ".nii" matches x.nii only; a list naming both collides.
    let list = work.join("list.txt");
    std::fs::write(&list, "flat/x.nii.gz\nflat/x.nii\n").unwrap();
    args[1] = "--input-list";
    args[2] = list.to_str().unwrap();
    args.drain(3..5);
    let o = vista3d(&args, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("would both be written"), "{}", text(&o));
    assert!(files_under(&out2).is_empty(), "{:?}", files_under(&out2));
}

#[test]
fn unknown_keys_are_errors_in_every_layer() {
    let work = tmp("strict");
    let ct = data("totalsegmentator/example_ct_sm.nii.gz");
    let out = work.join("out");
    let base = [
        "infer",
        "--image",
        ct.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--demo-weights",
    ];
    let fails_with = |extra: &[&str], needles: &[&str]| {
        let mut args = base.to_vec();
        args.extend(extra);
        let o = vista3d(&args, &[]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{t}");
        for n in needles {
            assert!(t.contains(n), "missing {n:?} in: {t}");
        }
        assert!(files_under(&out).is_empty());
    };
    fails_with(
        &["--set", "label_prompt=[3]"],
        &[
            "unknown key 'label_prompt'",
            "--set label_prompt=[3]",
            "did you mean 'input_dict#label_prompt'",
        ],
    );
    let cfg = work.join("bad.json");
    std::fs::write(&cfg, r#"{"input_dict": {"lable_prompt": [3]}}"#).unwrap();
    fails_with(
        &["--config", cfg.to_str().unwrap()],
        &[
            "'input_dict#lable_prompt'",
            "bad.json",
            "did you mean 'input_dict#label_prompt'",
        ],
    );
    // Batch list items.
    let list = work.join("list.json");
    std::fs::write(
        &list,
        serde_json::json!([{"image": ct.to_str().unwrap(), "lable_prompt": [3]}]).to_string(),
    )
    .unwrap();
    let o = vista3d(
        &[
            "batch",
            "--input-list",
            list.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--demo-weights",
        ],
        &[],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("'lable_prompt'")
            && t.contains("item 0 of")
            && t.contains("did you mean 'label_prompt'"),
        "{t}"
    );
    // Training configurations.
    let o = vista3d(&["train", "--set", "epoch=1"], &[]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("unknown key 'epoch'") && t.contains("did you mean 'epochs'"),
        "{t}"
    );
    assert!(files_under(&out).is_empty());
}

#[test]
fn precision_fallback_deny_fails_without_output() {
    let work = tmp("deny");
    let ct = data("totalsegmentator/example_ct_sm.nii.gz");
    let out = work.join("out");
    let mut args = vec![
        "infer",
        "--image",
        ct.to_str().unwrap(),
        "--label-prompt",
        "3",
        "--output-dir",
        out.to_str().unwrap(),
        "--precision",
        "trt_fp16",
        "--precision-fallback",
        "deny",
    ];
    args.extend(FAST);
    let o = vista3d(&args, &[]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("precision_fallback is deny") && t.contains("trt_fp16"),
        "{t}"
    );
    assert!(files_under(&out).is_empty(), "{:?}", files_under(&out));
    // The same through a configuration key; fp32 never needs a fallback.
    args[9] = "--set";
    args[10] = "precision_fallback=deny";
    args[8] = "fp32";
    let o = vista3d(&args, &[]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn broken_pipes_end_quietly() {
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; {} info --help | head -1",
            env!("CARGO_BIN_EXE_vista3d")
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // A reader that has gone away before anything is written: exit 0, no panic message.
    let work = tmp("pipe");
    let ckpt = work.join("w8.safetensors");
    let o = vista3d(
        &[
            "init-checkpoint",
            "--width",
            "8",
            "--out",
            ckpt.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = Command::new(env!("CARGO_BIN_EXE_vista3d"))
        .args(["info", "--checkpoint", ckpt.to_str().unwrap()])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{:?} {err}", o.status);
    assert!(!err.contains("panicked"), "{err}");
}
