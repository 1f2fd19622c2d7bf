//! DICOM through the CLI: `infer` on a series folder writes the NIfTI label map on the series' grid and a DICOM
//! SEG beside it; `batch --dicom` makes one item per series, named by folder and SeriesInstanceUID; a SEG asked for
//! later is made from the label map without running the network; `dicom-seg` on a NIfTI input is refused.

use std::path::{Path, PathBuf};

use vista3d::io::dicom::{read_series, DicomOptions};
use vista3d::io::read_nifti;

mod common;
use common::{output_text as text, vista3d, FAST};

fn tmp(name: &str) -> PathBuf {
    common::scratch("dicom_cli", name)
}

fn series_dir() -> PathBuf {
    common::data("totalsegmentator/example_ct.nii.gz")
        .parent()
        .unwrap()
        .join("example_ct_dicom")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn infer_on_a_series_writes_nifti_and_seg() {
    let work = tmp("infer");
    let series = series_dir();
    let out = work.join("out");
    let mut args = vec![
        "infer",
        "--image",
        series.to_str().unwrap(),
        "--label-prompt",
        "3,1",
        "--output-format",
        "both",
        "--output-dir",
        out.to_str().unwrap(),
    ];
    args.extend(FAST);
    let o = vista3d(&args);
    assert!(o.status.success(), "{}", text(&o));
    let stem = "example_ct_dicom";
    let nii = out.join(format!("{stem}/{stem}_trans.nii.gz"));
    let labels = read_nifti(&nii).unwrap();
    let dicom = read_series(&series, &DicomOptions::default()).unwrap();
    assert_eq!(labels.volume.dims(), dicom.volume.dims());
    for (a, b) in labels
        .volume
        .affine
        .iter()
        .flatten()
        .zip(dicom.volume.affine.iter().flatten())
    {
        assert!(
            (a - b).abs() < 1e-4,
            "{:?} vs {:?}",
            labels.volume.affine,
            dicom.volume.affine
        );
    }
    let rec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join(format!("{stem}/{stem}_trans.json"))).unwrap(),
    )
    .unwrap();
    let found = labels.volume.data.iter().any(|&v| v == 3.0 || v == 1.0);
    let seg = out.join(format!("{stem}/{stem}_trans.dcm"));
    if found {
        assert!(seg.is_file(), "{rec}");
        assert_eq!(rec["outputs"]["dicom_seg"], seg.display().to_string());
        let bytes = std::fs::read(&seg).unwrap();
        assert_eq!(&bytes[128..132], b"DICM");
    } else {
        assert!(!seg.exists());
        assert!(rec["outputs"]["dicom_seg_skipped"].is_string(), "{rec}");
    }

    // A SEG needs a DICOM input: refused before any work, nothing written.
    let ct = common::data("totalsegmentator/example_ct_sm.nii.gz");
    let out2 = work.join("out_nifti");
    let mut args = vec![
        "infer",
        "--image",
        ct.to_str().unwrap(),
        "--output-format",
        "dicom-seg",
        "--output-dir",
        out2.to_str().unwrap(),
    ];
    args.extend(FAST);
    let o = vista3d(&args);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("needs a DICOM input"), "{}", text(&o));
    assert!(std::fs::read_dir(&out2).map_or(true, |mut d| d.next().is_none()));
}

#[test]
fn batch_makes_one_item_per_series_and_adds_a_seg_later_without_rerunning() {
    let work = tmp("batch");
    let tree = work.join("in");
    copy_dir(&series_dir(), &tree.join("patient1/ct"));
    copy_dir(&series_dir(), &tree.join("patient2/ct"));
    let out = work.join("out");
    let run = |format: &str| {
        let mut args = vec![
            "batch",
            "--input-dir",
            tree.to_str().unwrap(),
            "--dicom",
            "--label-prompt",
            "3",
            "--output-format",
            format,
            "--output-dir",
            out.to_str().unwrap(),
        ];
        args.extend(FAST);
        let o = vista3d(&args);
        assert!(o.status.success(), "{}", text(&o));
        text(&o)
    };
    let t = run("nifti");
    assert!(t.contains("2 segmented"), "{t}");
    let uid = read_series(&series_dir(), &DicomOptions::default())
        .unwrap()
        .series
        .series_instance_uid;
    let niftis: Vec<PathBuf> = ["patient1", "patient2"]
        .iter()
        .map(|p| out.join(format!("{p}/ct/{uid}/{uid}_trans.nii.gz")))
        .collect();
    for n in &niftis {
        assert!(n.is_file(), "{} missing: {t}", n.display());
    }
    let before: Vec<_> = niftis
        .iter()
        .map(|n| std::fs::metadata(n).unwrap().modified().unwrap())
        .collect();
    // The SEG asked for afterwards: made from the label maps, the network does not run again.
    let t = run("both");
    assert!(
        t.contains("0 segmented") && t.contains("missing extras written"),
        "{t}"
    );
    for (n, b) in niftis.iter().zip(&before) {
        assert_eq!(std::fs::metadata(n).unwrap().modified().unwrap(), *b);
        let labels = read_nifti(n).unwrap().volume.data;
        let seg = n.with_extension("").with_extension("dcm");
        assert_eq!(
            seg.is_file(),
            labels.iter().any(|&v| v == 3.0),
            "{}",
            seg.display()
        );
    }
    let t = run("both");
    assert!(t.contains("2 skipped"), "{t}");
}
