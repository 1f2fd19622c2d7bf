//! `vista3d infer` and `vista3d batch` end to end on a real CT, with the demo (random) weights and small
//! windows: outputs where the bundle puts them, the input geometry kept, and bad input rejected cleanly.

use std::path::{Path, PathBuf};

use vista3d::io::read_nifti;

mod common;
use common::data;
use common::{files_under, output_text as text, vista3d, FAST};

fn tmp(name: &str) -> PathBuf {
    common::scratch("cli_infer", name)
}

#[test]
fn infer_writes_the_label_map_with_the_input_geometry() {
    let ct = data("totalsegmentator/example_ct_sm.nii.gz");
    let out = tmp("infer");
    let mut args = vec![
        "infer",
        "--image",
        ct.to_str().unwrap(),
        "--label-prompt",
        "spleen,liver",
        "--output-dir",
        out.to_str().unwrap(),
    ];
    args.extend(FAST);
    let o = vista3d(&args);
    assert!(o.status.success(), "{}", text(&o));
    let label_path = out.join("example_ct_sm/example_ct_sm_trans.nii.gz");
    let labels = read_nifti(&label_path).unwrap();
    let input = read_nifti(&ct).unwrap();
    assert_eq!(labels.volume.affine, input.volume.affine);
    assert_eq!(labels.volume.dims(), input.volume.dims());
    assert!(
        labels
            .volume
            .data
            .iter()
            .all(|&v| v == 0.0 || v == 3.0 || v == 1.0),
        "ids are the prompts' (3, 1) or 0"
    );
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("example_ct_sm/example_ct_sm_trans.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["label_prompt"], serde_json::json!([3, 1]));
    assert_eq!(record["weights"]["random"], true);

    // uint8 output: same labels, smaller file.
    let out8 = tmp("infer_u8");
    // The same request with one setting more.
    let infer_with = |labels: &str, out: &Path, set: &str| {
        let mut args = vec![
            "infer",
            "--image",
            ct.to_str().unwrap(),
            "--label-prompt",
            labels,
            "--output-dir",
            out.to_str().unwrap(),
            "--set",
            set,
        ];
        args.extend(FAST);
        vista3d(&args)
    };
    let o = infer_with("3,1", &out8, "output_dtype=uint8");
    assert!(o.status.success(), "{}", text(&o));
    let p8 = out8.join("example_ct_sm/example_ct_sm_trans.nii.gz");
    assert_eq!(read_nifti(&p8).unwrap().volume.data, labels.volume.data);
    assert!(std::fs::metadata(&p8).unwrap().len() <= std::fs::metadata(&label_path).unwrap().len());
    assert!(record["request"]["settings"]
        .get("window_workers")
        .is_none());

    // Two windows at once on the CPU: the same labels within the parity tolerance, and the setting recorded in the
    // request's identity (a window on one thread rounds differently from one on two).
    let out_ww = tmp("infer_window_workers");
    let o = infer_with("3,1", &out_ww, "window_workers=2");
    assert!(o.status.success(), "{}", text(&o));
    let ww = read_nifti(&out_ww.join("example_ct_sm/example_ct_sm_trans.nii.gz")).unwrap();
    let same = ww
        .volume
        .data
        .iter()
        .zip(labels.volume.data.iter())
        .filter(|(a, b)| a == b)
        .count();
    assert!(
        same as f64 >= 0.9999 * labels.volume.data.len() as f64,
        "{same} of {} voxels equal",
        labels.volume.data.len()
    );
    let rec = crate::record(&out_ww, "example_ct_sm");
    assert_eq!(rec["request"]["settings"]["window_workers"], 2);
    assert_eq!(rec["precision"]["used"], serde_json::json!(["fp32"]));

    // Winograd's convolutions (what `auto` takes on a CPU with AVX2 and no AVX-512) against libtorch's: labels
    // within the parity tolerance, and the choice recorded in the report and the request's identity.
    let out_fp32 = tmp("infer_auto_cpu_fp32");
    let o = infer_with("3,1", &out_fp32, "auto_cpu=fp32");
    assert!(o.status.success(), "{}", text(&o));
    let out_wg = tmp("infer_auto_cpu_winograd");
    let o = infer_with("3,1", &out_wg, "auto_cpu=winograd");
    assert!(o.status.success(), "{}", text(&o));
    let path = |out: &Path| out.join("example_ct_sm/example_ct_sm_trans.nii.gz");
    let (fp32, wg) = (
        read_nifti(&path(&out_fp32)).unwrap().volume.data,
        read_nifti(&path(&out_wg)).unwrap().volume.data,
    );
    let same = fp32.iter().zip(wg.iter()).filter(|(a, b)| a == b).count();
    assert!(
        same as f64 >= 0.9999 * fp32.len() as f64,
        "{same} of {} voxels equal",
        fp32.len()
    );
    let (rec_fp32, rec_wg) = (
        crate::record(&out_fp32, "example_ct_sm"),
        crate::record(&out_wg, "example_ct_sm"),
    );
    assert!(
        rec_fp32["precision"].get("winograd").is_none(),
        "{rec_fp32}"
    );
    assert!(rec_fp32["request"]["settings"]
        .get("convolutions")
        .is_none());
    if vista3d::model::winograd::available() {
        assert_eq!(rec_wg["precision"]["winograd"], true, "{rec_wg}");
        assert_eq!(rec_wg["request"]["settings"]["convolutions"], "winograd");
    }

    // Out of range: refused before any work, naming the key.
    let out_bad = tmp("infer_window_workers_0");
    let o = infer_with("3", &out_bad, "window_workers=0");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("window_workers"), "{}", text(&o));
    assert!(!out_bad.join("example_ct_sm").exists());
}

#[test]
fn point_prompts_mark_uncomputed_voxels_255() {
    let ct = data("totalsegmentator/example_ct_sm.nii.gz");
    let out = tmp("points");
    let mut args = vec![
        "infer",
        "--image",
        ct.to_str().unwrap(),
        "--points",
        "61,50,15",
        "--point-labels",
        "1",
        "--output-dir",
        out.to_str().unwrap(),
    ];
    args.extend(FAST);
    let o = vista3d(&args);
    assert!(o.status.success(), "{}", text(&o));
    let labels = read_nifti(&out.join("example_ct_sm/example_ct_sm_trans.nii.gz")).unwrap();
    let n255 = labels.volume.data.iter().filter(|&&v| v == 255.0).count();
    assert!(
        n255 > 0 && n255 < labels.volume.data.len(),
        "a point window covers part of the image only"
    );
}

#[test]
fn bad_requests_fail_cleanly_and_write_nothing() {
    let ct = data("totalsegmentator/example_ct_sm.nii.gz");
    let out = tmp("bad");
    let o_dir = out.to_str().unwrap();
    let check = |args: &[&str], expect: &str| {
        let mut a = args.to_vec();
        a.extend(["--output-dir", o_dir]);
        a.extend(FAST);
        let o = vista3d(&a);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {t}");
        assert!(t.contains(expect), "{args:?}: expected '{expect}' in: {t}");
        assert!(!t.contains("panicked"), "{t}");
        assert!(
            files_under(&out).is_empty(),
            "{args:?} left files: {:?}",
            files_under(&out)
        );
    };
    let img = ct.to_str().unwrap();
    check(
        &["infer", "--image", "/nonexistent/ct.nii.gz"],
        "/nonexistent/ct.nii.gz",
    );
    check(
        &[
            "infer",
            "--image",
            img,
            "--label-prompt",
            "300",
            "--points",
            "1,2,3",
            "--point-labels",
            "1",
        ],
        "below 255",
    );
    check(
        &["infer", "--image", img, "--label-prompt", "splen"],
        "did you mean: spleen",
    );
    check(
        &[
            "infer",
            "--image",
            img,
            "--points",
            "500,2,3",
            "--point-labels",
            "1",
        ],
        "outside the image",
    );
    check(
        &["infer", "--image", img, "--points", "1,2,3"],
        "without point labels",
    );
    let corrupt = Path::new(env!("CARGO_TARGET_TMPDIR")).join("corrupt_ct.nii.gz");
    let bytes = std::fs::read(&ct).unwrap();
    std::fs::write(&corrupt, &bytes[..bytes.len() / 3]).unwrap();
    check(
        &["infer", "--image", corrupt.to_str().unwrap()],
        "corrupt_ct.nii.gz",
    );
    // A tiny image whose sform is sheared by kilometres (as a fuzzed header): its 1.5 mm grid would hold
    // billions of voxels; refused before any work, naming the limit.
    let sheared = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sheared_sform.nii.gz");
    let mut header = read_nifti(&ct).unwrap().header;
    header.sform_code = 1;
    header.srow_x = [1.0, 0.0, 40000.0, 0.0];
    header.srow_y = [0.0, 1.0, 40000.0, 0.0];
    header.srow_z = [0.0, 0.0, 1.0, 0.0];
    let data = ndarray::Array3::<f32>::from_elem((8, 8, 8), 100.0);
    vista3d::io::write_nifti(&sheared, &data, &header, vista3d::io::OutputDtype::Float32).unwrap();
    check(
        &["infer", "--image", sheared.to_str().unwrap()],
        "max_resampled_voxels",
    );
    // No checkpoint at all.
    let o = vista3d(&["infer", "--image", img]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("no checkpoint"), "{}", text(&o));
}

#[test]
fn batch_reports_bad_files_and_skips_finished_ones() {
    let input = tmp("batch_in");
    let ct = data("totalsegmentator/example_ct_sm.nii.gz");
    std::fs::copy(&ct, input.join("a.nii.gz")).unwrap();
    std::fs::write(input.join("b.nii.gz"), b"not a nifti file").unwrap();
    std::fs::write(input.join("notes.txt"), b"ignored").unwrap();
    let out = tmp("batch_out");
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
    let o = vista3d(&args);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("1 segmented") && t.contains("1 failed") && t.contains("b.nii.gz"),
        "{t}"
    );
    assert!(out.join("a/a_trans.nii.gz").is_file());
    assert!(!out.join("b").exists());
    // Second run: a is skipped, b fails again.
    let o = vista3d(&args);
    let t = text(&o);
    assert!(t.contains("0 segmented") && t.contains("1 skipped"), "{t}");
}

fn record(out: &Path, stem: &str) -> serde_json::Value {
    let p = out.join(format!("{stem}/{stem}_trans.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

#[test]
fn unavailable_precisions_fall_back_to_libtorch_and_are_recorded() {
    let ct = data("totalsegmentator/example_ct_sm.nii.gz");
    let run = |precision: &str, dir: &str| {
        let out = tmp(dir);
        let mut args = vec![
            "infer",
            "--image",
            ct.to_str().unwrap(),
            "--label-prompt",
            "3",
            "--precision",
            precision,
            "--output-dir",
            out.to_str().unwrap(),
        ];
        args.extend(FAST);
        let o = vista3d(&args);
        (o, out)
    };
    let (o, fp32_dir) = run("fp32", "precision_fp32");
    assert!(o.status.success(), "{}", text(&o));
    let rec = record(&fp32_dir, "example_ct_sm");
    assert_eq!(rec["precision"]["requested"], "fp32");
    assert_eq!(rec["precision"]["used"], serde_json::json!(["fp32"]));

    // No TensorRT here: the request succeeds through libtorch, says so, and gives the same labels.
    let (o, trt_dir) = run("trt_fp16", "precision_trt");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("trt_fp16 unavailable"), "{}", text(&o));
    let rec = record(&trt_dir, "example_ct_sm");
    assert_eq!(rec["precision"]["requested"], "trt_fp16");
    assert_eq!(rec["precision"]["used"], serde_json::json!(["fp32"]));
    let why = rec["precision"]["fallbacks"][0].as_str().unwrap();
    assert!(why.starts_with("trt_fp16 unavailable"), "{why}");
    let a = read_nifti(&fp32_dir.join("example_ct_sm/example_ct_sm_trans.nii.gz")).unwrap();
    let b = read_nifti(&trt_dir.join("example_ct_sm/example_ct_sm_trans.nii.gz")).unwrap();
    assert_eq!(a.volume.data, b.volume.data);

    let (o, bad_dir) = run("fp8", "precision_bad");
    assert!(!o.status.success());
    assert!(text(&o).contains("unknown precision 'fp8'"), "{}", text(&o));
    assert!(files_under(&bad_dir).is_empty());
}

#[test]
fn batch_items_choose_their_precision() {
    let ct = data("totalsegmentator/example_ct_sm.nii.gz");
    let work = tmp("batch_precision");
    let first = work.join("a.nii.gz");
    let second = work.join("b.nii.gz");
    std::fs::copy(&ct, &first).unwrap();
    std::fs::copy(&ct, &second).unwrap();
    let list = work.join("list.json");
    std::fs::write(
        &list,
        serde_json::json!([
            {"image": "a.nii.gz", "label_prompt": [3], "precision": "amp"},
            {"image": "b.nii.gz", "label_prompt": [3]},
        ])
        .to_string(),
    )
    .unwrap();
    let out = work.join("out");
    let mut args = vec![
        "batch",
        "--input-list",
        list.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
    ];
    args.extend(FAST);
    let o = vista3d(&args);
    assert!(o.status.success(), "{}", text(&o));
    let a = record(&out, "a");
    assert_eq!(a["precision"]["requested"], "amp");
    assert_eq!(a["precision"]["used"], serde_json::json!(["fp32"]));
    assert!(a["precision"]["fallbacks"][0]
        .as_str()
        .unwrap()
        .contains("only on CUDA"));
    let b = record(&out, "b");
    assert_eq!(b["precision"]["requested"], "auto");

    std::fs::write(&list, r#"[{"image": "a.nii.gz", "precision": "int4"}]"#).unwrap();
    let o = vista3d(&args);
    assert!(!o.status.success());
    assert!(text(&o).contains("item 0"), "{}", text(&o));
}

#[test]
fn precision_ort_runs_the_class_path_through_onnx_runtime() {
    let ct = data("totalsegmentator/example_ct_sm.nii.gz");
    let work = tmp("precision_ort");
    // The demo weights are width 16, seed 0: export the same, and another seed (a stale export).
    let export = |seed: &str, dir: &Path| {
        let o = vista3d(&[
            "export-onnx",
            "--random-width",
            "16",
            "--seed",
            seed,
            "--out",
            dir.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
    };
    let (fresh, stale) = (work.join("onnx"), work.join("onnx_stale"));
    export("0", &fresh);
    export("1", &stale);
    let run = |precision: &str, onnx: &Path, out: &Path| {
        let set_onnx = format!("onnx_dir={}", serde_json::json!(onnx.to_str().unwrap()));
        let mut args = vec![
            "infer",
            "--image",
            ct.to_str().unwrap(),
            "--label-prompt",
            "3,1",
            "--precision",
            precision,
            "--set",
            &set_onnx,
            "--output-dir",
            out.to_str().unwrap(),
        ];
        args.extend(FAST);
        let o = vista3d(&args);
        assert!(o.status.success(), "{}", text(&o));
        record(out, "example_ct_sm")
    };
    let labels = |out: &Path| {
        read_nifti(&out.join("example_ct_sm/example_ct_sm_trans.nii.gz"))
            .unwrap()
            .volume
            .data
    };
    let rec = run("ort", &fresh, &work.join("ort"));
    assert_eq!(
        rec["precision"]["used"],
        serde_json::json!(["ort"]),
        "{rec}"
    );
    let rec = run("fp32", &fresh, &work.join("fp32"));
    assert_eq!(rec["precision"]["used"], serde_json::json!(["fp32"]));
    // ONNX Runtime's logits differ from libtorch's by ~1e-6 relative: labels agree except at exact ties.
    let (a, b) = (labels(&work.join("ort")), labels(&work.join("fp32")));
    let same = a.iter().zip(b.iter()).filter(|(x, y)| x == y).count();
    assert!(
        same as f64 >= 0.9999 * a.len() as f64,
        "{same} of {}",
        a.len()
    );
    // auto on a CPU (auto_cpu = detect) takes ONNX Runtime when the CPU has AVX-512 and an export of the same
    // weights exists, libtorch fp32 on other CPUs (where ONNX Runtime measured slower).
    let rec = run("auto", &fresh, &work.join("auto"));
    let auto = if vista3d::runtime::cpu_has_avx512() {
        "ort"
    } else {
        "fp32"
    };
    assert_eq!(rec["precision"]["used"], serde_json::json!([auto]), "{rec}");
    // An export of other weights is never used: libtorch runs, and the record says why.
    let rec = run("ort", &stale, &work.join("stale"));
    assert_eq!(rec["precision"]["used"], serde_json::json!(["fp32"]));
    let why = rec["precision"]["fallbacks"][0].as_str().unwrap();
    assert!(why.contains("stale ONNX export"), "{why}");
    assert_eq!(labels(&work.join("stale")), b);
}

/// `--precision bf16` on the CPU: libtorch autocast to bfloat16 where the CPU computes bf16 natively (the record
/// says bf16 ran, and the label map differs from fp32's in a few voxels only), fp32 with the reason elsewhere.
#[test]
fn bf16_runs_cpu_autocast_where_the_cpu_has_native_bf16() {
    let ct = data("totalsegmentator/example_ct_sm.nii.gz");
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo_e8.safetensors");
    let run = |precision: &str| {
        let out = tmp(&format!("bf16_{precision}"));
        let mut args = vec![
            "infer",
            "--image",
            ct.to_str().unwrap(),
            "--checkpoint",
            demo.to_str().unwrap(),
            "--precision",
            precision,
            "--output-dir",
            out.to_str().unwrap(),
        ];
        // FAST without its --demo-weights: the trained demo model gives meaningful logits.
        args.extend(&FAST[1..]);
        let o = vista3d(&args);
        assert!(o.status.success(), "{}", text(&o));
        let labels = read_nifti(&out.join("example_ct_sm/example_ct_sm_trans.nii.gz"))
            .unwrap()
            .volume
            .data;
        (record(&out, "example_ct_sm"), labels, text(&o))
    };
    let (_, fp32, _) = run("fp32");
    let (rec, bf16, log) = run("bf16");
    assert_eq!(rec["precision"]["requested"], "bf16");
    if vista3d::runtime::cpu_has_native_bf16() {
        assert_eq!(
            rec["precision"]["used"],
            serde_json::json!(["bf16"]),
            "{log}"
        );
        let differ = fp32.iter().zip(bf16.iter()).filter(|(a, b)| a != b).count();
        let agreement = 1.0 - differ as f64 / fp32.len() as f64;
        // Autocast really ran (bf16 rounds some logits across the argmax), and agrees on >= 99% of voxels
        // (99.82% measured at 64^3 windows: benches/RESULTS.md).
        assert!(
            differ > 0,
            "bf16 gave fp32's labels exactly: autocast did not run"
        );
        assert!(agreement >= 0.99, "bf16 agrees with fp32 on {agreement}");
    } else {
        assert_eq!(
            rec["precision"]["used"],
            serde_json::json!(["fp32"]),
            "{log}"
        );
        assert!(log.contains("no native bfloat16"), "{log}");
        assert!(fp32 == bf16);
    }
}
