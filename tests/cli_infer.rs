//! `vista3d infer` and `vista3d batch` end to end on a real CT, with the demo (random) weights and small
//! windows: outputs where the bundle puts them, the input geometry kept, and bad input rejected cleanly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vista3d::io::read_nifti;

mod common;
use common::data;

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cli_infer")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Small and fast: 3 mm resampling, 32^3 windows, demo weights, 2 threads.
const FAST: [&str; 7] = [
    "--demo-weights",
    "--set",
    "resample_spacing=[3,3,3]",
    "--set",
    "patch_size=[32,32,32]",
    "--threads",
    "2",
];

fn vista3d(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vista3d"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
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
    let mut args = vec![
        "infer",
        "--image",
        ct.to_str().unwrap(),
        "--label-prompt",
        "3,1",
        "--output-dir",
        out8.to_str().unwrap(),
        "--set",
        "output_dtype=uint8",
    ];
    args.extend(FAST);
    let o = vista3d(&args);
    assert!(o.status.success(), "{}", text(&o));
    let p8 = out8.join("example_ct_sm/example_ct_sm_trans.nii.gz");
    assert_eq!(read_nifti(&p8).unwrap().volume.data, labels.volume.data);
    assert!(std::fs::metadata(&p8).unwrap().len() <= std::fs::metadata(&label_path).unwrap().len());
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
