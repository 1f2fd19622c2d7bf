//! `vista3d evaluate` end to end on the real CT (TotalSegmentator's example_ct_sm with its spleen as ground
//! truth), seeded random width-8 weights: predictions where the bundle's SaveImaged puts them, with the image's
//! geometry, and MetricsSaver reports identical to the ones pip monai writes from the same prediction and ground
//! truth (DiceMetric / write_metrics_reports run by tests/fixtures/monai_metrics_check.py), an empty class giving
//! NaN, and the Dice recomputed here from the written files.

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::Array3;
use vista3d::io::{read_nifti, write_nifti, OutputDtype};

mod common;
use common::data;
use common::{output_text as text, vista3d};

fn tmp(name: &str) -> PathBuf {
    common::scratch("evaluate_cli", name)
}

fn python() -> PathBuf {
    std::env::var_os("VISTA3D_PYTHON")
        .map(PathBuf::from)
        .expect(
            "VISTA3D_PYTHON is not set: run through scripts/test.sh (or `. scripts/env.sh test`)",
        )
}

fn config(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
        .display()
        .to_string()
}

/// Two validation items on the real CT: `spleen` (TotalSegmentator id 1 kept as 1, everything else 0) and `empty`
/// (no spleen: its Dice must be NaN), plus one training item (fold 1).
fn make_dataset(dir: &Path) -> PathBuf {
    let ct = data("totalsegmentator/example_ct_sm.nii.gz");
    let seg = read_nifti(&data("totalsegmentator/example_seg.nii.gz")).unwrap();
    for d in ["images", "labels"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let spleen: Array3<f32> = seg.volume.data.mapv(|v| (v == 1.0) as u8 as f32);
    assert!(
        spleen.sum() > 100.0,
        "the example segmentation has a spleen"
    );
    write_nifti(
        &dir.join("labels/spleen.nii.gz"),
        &spleen,
        &seg.header,
        OutputDtype::Uint8,
    )
    .unwrap();
    write_nifti(
        &dir.join("labels/empty.nii.gz"),
        &Array3::zeros(spleen.raw_dim()),
        &seg.header,
        OutputDtype::Uint8,
    )
    .unwrap();
    for n in ["spleen", "empty"] {
        std::fs::copy(&ct, dir.join(format!("images/{n}.nii.gz"))).unwrap();
    }
    let list = serde_json::json!({"training": [
        {"image": "images/spleen.nii.gz", "label": "labels/spleen.nii.gz", "fold": 0},
        {"image": "images/empty.nii.gz", "label": "labels/empty.nii.gz", "fold": 0},
        {"image": "images/spleen.nii.gz", "label": "labels/spleen.nii.gz", "fold": 1}
    ]});
    let p = dir.join("datalist.json");
    std::fs::write(&p, serde_json::to_string_pretty(&list).unwrap()).unwrap();
    p
}

fn evaluate_args<'a>(list: &'a str, root: &'a str, ckpt: &'a str, out: &'a str) -> Vec<String> {
    let mut a: Vec<String> = vec!["evaluate".into()];
    for c in ["train.json", "train_continual.json", "evaluate.json"] {
        a.push("--config".into());
        a.push(config(c));
    }
    for s in [
        format!("data_list_file_path={list}"),
        format!("dataset_dir={root}"),
        "patch_size=[32,32,32]".into(),
        "resample_to_spacing=[4,4,4]".into(),
    ] {
        a.push("--set".into());
        a.push(s);
    }
    a.extend(["--checkpoint", ckpt, "--output-dir", out, "--device", "cpu"].map(String::from));
    a
}

fn csv_value(line: &str, col: usize) -> f64 {
    let v = line.split(',').nth(col).unwrap();
    if v == "nan" {
        f64::NAN
    } else {
        v.parse().unwrap()
    }
}

#[test]
fn evaluate_writes_predictions_and_monai_identical_reports() {
    let dir = tmp("real_ct");
    let list = make_dataset(&dir);
    let ckpt = dir.join("w8.safetensors");
    let o = vista3d(&[
        "init-checkpoint",
        "--width",
        "8",
        "--seed",
        "0",
        "--out",
        ckpt.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = dir.join("eval");
    let args = evaluate_args(
        list.to_str().unwrap(),
        dir.to_str().unwrap(),
        ckpt.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = vista3d(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("val_mean_dice"), "{}", text(&o));
    eprintln!("{}", text(&o));

    // Predictions: the image's grid, float32 class ids (0, 3; 255 only where not computed).
    let image = read_nifti(&dir.join("images/spleen.nii.gz")).unwrap();
    let mut preds = Vec::new();
    for n in ["spleen", "empty"] {
        let p = out.join(format!("{n}/{n}_trans.nii.gz"));
        let pred = read_nifti(&p).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(pred.volume.dims(), image.volume.dims());
        assert_eq!(pred.volume.affine, image.volume.affine);
        assert_eq!(pred.header.datatype, 16, "float32 as SaveImaged writes");
        assert!(
            pred.volume.data.iter().all(|&v| v == 0.0 || v == 3.0),
            "ids other than 0/3"
        );
        preds.push(pred.volume.data);
    }

    // Reports in MONAI's layout.
    let read =
        |f: &str| std::fs::read_to_string(out.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    let raw = read("val_mean_dice_raw.csv");
    let lines: Vec<&str> = raw.lines().collect();
    assert_eq!(lines[0], "filename,class0,mean");
    assert_eq!(lines.len(), 3);
    assert!(lines[1].starts_with(&dir.join("images/spleen.nii.gz").display().to_string()));
    assert!(
        lines[2].ends_with(",nan,nan"),
        "empty ground truth -> NaN: {}",
        lines[2]
    );

    // Dice recomputed here from the written prediction and the ground truth (spleen = 1 -> 3 -> 1).
    let gt = read_nifti(&dir.join("labels/spleen.nii.gz"))
        .unwrap()
        .volume
        .data;
    let (mut inter, mut p_sum, mut g_sum) = (0usize, 0usize, 0usize);
    for (p, g) in preds[0].iter().zip(gt.iter()) {
        let (p, g) = (*p == 3.0, *g == 1.0);
        inter += (p && g) as usize;
        p_sum += p as usize;
        g_sum += g as usize;
    }
    let expect = 2.0 * inter as f64 / (p_sum + g_sum) as f64;
    let got = csv_value(lines[1], 1);
    assert!(
        (got - expect).abs() < 1e-6,
        "raw csv {got} vs recomputed {expect}"
    );
    let metrics = read("metrics.csv");
    let mean: f64 = metrics
        .trim()
        .strip_prefix("val_mean_dice,")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (mean - expect).abs() < 1e-6,
        "mean over images with a spleen: {mean} vs {expect}"
    );

    // pip monai on the same files: identical report files.
    let items: Vec<serde_json::Value> = ["spleen", "empty"]
        .iter()
        .map(|n| {
            serde_json::json!({
                "image": dir.join(format!("images/{n}.nii.gz")).display().to_string(),
                "prediction": out.join(format!("{n}/{n}_trans.nii.gz")).display().to_string(),
                "label": dir.join(format!("labels/{n}.nii.gz")).display().to_string(),
            })
        })
        .collect();
    let spec = serde_json::json!({
        "items": items,
        "label_mappings": {"default": [[1, 3]]},
        "label_set": [3],
        "num_classes": 2,
    });
    let spec_path = dir.join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let monai_out = dir.join("monai");
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/monai_metrics_check.py");
    let o = Command::new(python())
        .arg(&script)
        .arg("--spec")
        .arg(&spec_path)
        .arg("--out")
        .arg(&monai_out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    for f in [
        "metrics.csv",
        "val_mean_dice_raw.csv",
        "val_mean_dice_summary.csv",
    ] {
        let ours = read(f);
        let theirs = std::fs::read_to_string(monai_out.join(f)).unwrap();
        assert_eq!(ours, theirs, "{f} differs from MONAI's");
    }
    let check: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(monai_out.join("check.json")).unwrap())
            .unwrap();
    for it in check["items"].as_array().unwrap() {
        assert_eq!(it["affine_equal"], true, "{it}");
        assert_eq!(it["pred_shape"], it["image_shape"], "{it}");
        assert_eq!(it["pred_dtype"], "float32", "{it}");
    }
    eprintln!("spleen Dice of the random width-8 model: {expect:.4} ({p_sum} predicted, {g_sum} true voxels)");
}

#[test]
fn evaluate_rejects_bad_input_without_partial_reports() {
    let dir = tmp("bad");
    let list = make_dataset(&dir);
    let ckpt = dir.join("w8.safetensors");
    let o = vista3d(&[
        "init-checkpoint",
        "--width",
        "8",
        "--seed",
        "0",
        "--out",
        ckpt.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // A label on another grid.
    let seg = read_nifti(&dir.join("labels/spleen.nii.gz")).unwrap();
    write_nifti(
        &dir.join("labels/spleen.nii.gz"),
        &Array3::zeros((4, 4, 4)),
        &seg.header,
        OutputDtype::Uint8,
    )
    .unwrap();
    let out = dir.join("eval");
    let args = evaluate_args(
        list.to_str().unwrap(),
        dir.to_str().unwrap(),
        ckpt.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = vista3d(&args);
    assert!(!o.status.success());
    assert!(text(&o).contains("must share a grid"), "{}", text(&o));
    assert!(!out.join("metrics.csv").exists());
    // A missing image.
    std::fs::remove_file(dir.join("images/empty.nii.gz")).unwrap();
    let o = vista3d(&args);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("do not exist") && text(&o).contains("empty.nii.gz"),
        "{}",
        text(&o)
    );
    // A label id out of range in the mapping.
    let mut bad = args.clone();
    bad.extend(["--set", "label_mappings={\"default\": [[1, 300]]}"]);
    let o = vista3d(&bad);
    assert!(!o.status.success());
    assert!(text(&o).contains("300"), "{}", text(&o));
}

#[test]
fn evaluate_honours_precision_and_runs_onnx_runtime() {
    let dir = tmp("precision_ort");
    let list = make_dataset(&dir);
    let ckpt = dir.join("w8.safetensors");
    let onnx = dir.join("onnx");
    for args in [
        vec![
            "init-checkpoint",
            "--width",
            "8",
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
        let o = vista3d(&args);
        assert!(o.status.success(), "{}", text(&o));
    }
    let run = |precision: &str, out: &Path| {
        let mut args = evaluate_args(
            list.to_str().unwrap(),
            dir.to_str().unwrap(),
            ckpt.to_str().unwrap(),
            out.to_str().unwrap(),
        );
        args.extend(
            [
                "--precision",
                precision,
                "--set",
                &format!("onnx_dir={}", onnx.display()),
                "--set",
                &format!("cache_dir={}", dir.join("cache").display()),
            ]
            .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = vista3d(&args);
        assert!(o.status.success(), "{}", text(&o));
        let rec: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("spleen/spleen_trans.json")).unwrap(),
        )
        .unwrap();
        let pred = read_nifti(&out.join("spleen/spleen_trans.nii.gz"))
            .unwrap()
            .volume
            .data;
        (rec, pred)
    };
    let (ort, ort_pred) = run("ort", &dir.join("eval_ort"));
    assert_eq!(ort["precision"]["requested"], "ort", "{ort}");
    assert_eq!(
        ort["precision"]["used"],
        serde_json::json!(["ort"]),
        "{ort}"
    );
    let (fp32, fp32_pred) = run("fp32", &dir.join("eval_fp32"));
    assert_eq!(
        fp32["precision"]["used"],
        serde_json::json!(["fp32"]),
        "{fp32}"
    );
    let same = ort_pred
        .iter()
        .zip(fp32_pred.iter())
        .filter(|(a, b)| a == b)
        .count();
    assert!(
        same as f64 >= 0.9999 * ort_pred.len() as f64,
        "ORT and fp32 predictions agree on {same} of {} voxels",
        ort_pred.len()
    );
}
