//! DICOM SEG out: a SEG written by vista3d passes dicom3tools' `dciodvfy` without errors, and highdicom reads it
//! back into masks equal to the label map voxel for voxel at the right slices (tests/fixtures/read_dicom_seg.py).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::Array3;
use serde_json::Value;
use vista3d::io::dicom::{
    read_series, write_seg, DicomError, DicomOptions, DicomVolume, SegOptions, SegmentationKind,
};
use vista3d::io::read_nifti;
use vista3d::prompts::LabelTable;

fn cases() -> PathBuf {
    common::fixtures("dicom", ".done")
}

fn python() -> String {
    std::env::var("VISTA3D_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// dciodvfy's errors (lines starting with "Error"), and its whole output.
fn dciodvfy(seg: &Path) -> (Vec<String>, String) {
    let out = Command::new("dciodvfy").arg(seg).output().expect(
        "dciodvfy not found: run `bash scripts/test.sh` (it installs Debian's dicom3tools)",
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let errors = text
        .lines()
        .filter(|l| l.starts_with("Error"))
        .map(str::to_string)
        .collect();
    (errors, text)
}

/// highdicom's label map (in vista3d's `[x, y, z]` grid) and the pydicom summary of the SEG.
fn read_back(seg: &Path, source: &Path) -> (Array3<f32>, Value) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("labels.nii");
    let summary = tmp.path().join("summary.json");
    let status = Command::new(python())
        .arg(script("read_dicom_seg.py"))
        .args(["--seg".as_ref(), seg.as_os_str()])
        .args(["--source".as_ref(), source.as_os_str()])
        .args(["--out".as_ref(), out.as_os_str()])
        .args(["--summary".as_ref(), summary.as_os_str()])
        .output()
        .expect("python (VISTA3D_PYTHON) not found");
    assert!(
        status.status.success(),
        "read_dicom_seg.py failed (run `bash scripts/test.sh` to install highdicom): {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let labels = read_nifti(&out).unwrap().volume.data;
    let summary = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    (labels, summary)
}

/// Writes the SEG of `labels`, validates it (BINARY: dciodvfy; its 2022 build does not know LABELMAP), reads
/// it back, and checks masks, references and codes.
fn round_trip(
    source: &Path,
    series: &DicomVolume,
    labels: &Array3<f32>,
    kind: SegmentationKind,
) -> Value {
    let tmp = tempfile::tempdir().unwrap();
    let seg = tmp.path().join("out").join("seg.dcm");
    let options = SegOptions {
        kind,
        ..SegOptions::default()
    };
    write_seg(
        &seg,
        labels,
        &series.series,
        &LabelTable::bundle(),
        &options,
    )
    .unwrap();
    if kind == SegmentationKind::Binary {
        let (errors, text) = dciodvfy(&seg);
        assert!(errors.is_empty(), "dciodvfy reports errors:\n{text}");
    }
    // VISTA3D_KEEP_SEG=path keeps a copy of the SEG for inspection (e.g. in a viewer).
    if let Some(keep) = std::env::var_os("VISTA3D_KEEP_SEG") {
        std::fs::copy(&seg, keep).unwrap();
    }
    let (back, summary) = read_back(&seg, source);
    let expected = labels.mapv(|v| if v == 255.0 { 0.0 } else { v });
    assert_eq!(back.shape(), expected.shape());
    let differ = back
        .iter()
        .zip(expected.iter())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differ, 0,
        "{differ} voxels of highdicom's masks differ from the label map"
    );

    let binary = kind == SegmentationKind::Binary;
    let sop_class = if binary {
        "1.2.840.10008.5.1.4.1.1.66.4"
    } else {
        "1.2.840.10008.5.1.4.1.1.66.7"
    };
    assert_eq!(summary["sop_class_uid"], sop_class);
    assert_eq!(
        summary["segmentation_type"],
        if binary { "BINARY" } else { "LABELMAP" }
    );
    assert_eq!(summary["bits_allocated"], if binary { 1 } else { 8 });
    assert!(summary["series_description"]
        .as_str()
        .unwrap()
        .contains("vista3d"));
    assert!(summary["series_description"]
        .as_str()
        .unwrap()
        .contains("research"));
    // Frames: BINARY one per (segment, slice) holding the segment, LABELMAP one per slice holding any; empty
    // ones omitted.
    let n = labels.shape()[2];
    let mut frames = 0;
    let mut slices_with_any = 0;
    for k in 0..n {
        let plane = labels.index_axis(ndarray::Axis(2), k);
        let mut ids: Vec<i64> = plane
            .iter()
            .filter(|&&v| v != 0.0 && v != 255.0)
            .map(|&v| v as i64)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        frames += ids.len();
        slices_with_any += usize::from(!ids.is_empty());
        assert_eq!(
            summary["frames_per_slice"][k.to_string()],
            ids.len(),
            "slice {k}"
        );
    }
    assert_eq!(
        summary["number_of_frames"],
        if binary { frames } else { slices_with_any }
    );
    // References: the source series, all its instances; frames reference the slices they segment.
    assert_eq!(
        summary["referenced_series"][0],
        series.series.series_instance_uid.as_str()
    );
    let instances: Vec<&str> = series
        .series
        .slices
        .iter()
        .map(|s| s.sop_instance_uid.as_str())
        .collect();
    assert_eq!(
        summary["referenced_instances"].as_array().unwrap().len(),
        instances.len()
    );
    for uid in summary["source_images"].as_array().unwrap() {
        assert!(instances.contains(&uid.as_str().unwrap()));
    }
    assert!(summary["series_instance_uid"]
        .as_str()
        .unwrap()
        .starts_with("2.25."));
    assert!(summary["sop_instance_uid"]
        .as_str()
        .unwrap()
        .starts_with("2.25."));
    if let Some(f) = &series.series.frame_of_reference_uid {
        assert_eq!(summary["frame_of_reference_uid"], f.as_str());
    }
    if let Some(s) = &series.series.study_instance_uid {
        assert_eq!(summary["study_instance_uid"], s.as_str());
    }
    summary
}

#[test]
fn seg_of_a_crafted_series_validates_and_reads_back_voxel_for_voxel() {
    let source = cases().join("oblique");
    let series = read_series(&source, &DicomOptions::default()).unwrap();
    let [x, y, z] = series.volume.dims();
    // Liver on slices 1..=3 (a block touching the edges), spleen on slice 4, right kidney (laterality) on
    // slice 1 beside the liver, "not computed" (255) on slice 5, nothing on slice 0.
    let mut labels = Array3::<f32>::zeros((x, y, z));
    for k in 1..=3 {
        for i in 0..20 {
            for j in 0..10 {
                labels[[i, j, k]] = 1.0;
            }
        }
    }
    labels[[x - 1, y - 1, 4]] = 3.0;
    labels[[30, 5, 4]] = 3.0;
    labels[[40, 30, 1]] = 5.0;
    labels[[10, 40, 5]] = 255.0;
    let summary = round_trip(&source, &series, &labels, SegmentationKind::Binary);
    let segments = summary["segments"].as_array().unwrap();
    let names: Vec<&str> = segments
        .iter()
        .map(|s| s["label"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["liver", "spleen", "right kidney"]);
    let labelmap = round_trip(&source, &series, &labels, SegmentationKind::Labelmap);
    assert_eq!(labelmap["segments"], summary["segments"]);
    assert_eq!(
        segments[0]["type"][0],
        serde_json::json!(["SCT", "10200004", "Liver"])
    );
    assert_eq!(segments[0]["category"][0][1], "91723000");
    assert_eq!(segments[2]["type"][0][1], "64033007");
    assert_eq!(
        segments[2]["modifier"][0],
        serde_json::json!(["SCT", "24028007", "Right"])
    );
    assert_eq!(
        summary["patient_id"], "1CT1",
        "patient module copied from the source"
    );
}

#[test]
fn seg_of_the_real_example_series_validates_and_reads_back() {
    let source = common::data(
        "totalsegmentator/example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016573",
    )
    .parent()
    .unwrap()
    .to_path_buf();
    let series = read_series(&source, &DicomOptions::default()).unwrap();
    // A label map from thresholds: bone (21) and, inside a box, liver (1) and a hepatic tumour (26, coded as a
    // neoplasm with the liver as anatomic region).
    let labels = series.volume.data.indexed_map(|(i, j, k), &hu| {
        if hu > 300.0 {
            21.0
        } else if (100..250).contains(&i) && (150..300).contains(&j) && k >= 5 && hu > 0.0 {
            if k == 10 && i < 120 {
                26.0
            } else {
                1.0
            }
        } else {
            0.0
        }
    });
    let summary = round_trip(&source, &series, &labels, SegmentationKind::Binary);
    let segments = summary["segments"].as_array().unwrap();
    let names: Vec<&str> = segments
        .iter()
        .map(|s| s["label"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["liver", "bone", "hepatic tumor"]);
    assert_eq!(segments[2]["category"][0][1], "49755003");
    assert_eq!(segments[2]["region"][0][1], "10200004");
    // The anonymised source has no SeriesInstanceUID / StudyInstanceUID: the SEG references the derived series
    // UID and gets a study UID of its own.
    assert!(series.series.series_uid_synthesized && series.series.study_instance_uid.is_none());
    assert!(summary["study_instance_uid"]
        .as_str()
        .unwrap()
        .starts_with("2.25."));
}

trait IndexedMap {
    fn indexed_map(&self, f: impl Fn((usize, usize, usize), &f32) -> f32) -> Array3<f32>;
}

impl IndexedMap for Array3<f32> {
    fn indexed_map(&self, f: impl Fn((usize, usize, usize), &f32) -> f32) -> Array3<f32> {
        let mut out = Array3::zeros(self.raw_dim());
        for (idx, v) in self.indexed_iter() {
            out[idx] = f(idx, v);
        }
        out
    }
}

#[test]
fn bad_label_maps_are_refused_and_nothing_is_written() {
    let series = read_series(&cases().join("axial"), &DicomOptions::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let seg = tmp.path().join("seg.dcm");
    let table = LabelTable::bundle();
    let [x, y, z] = series.volume.dims();
    let refuse = |labels: &Array3<f32>, needle: &str| {
        let err =
            write_seg(&seg, labels, &series.series, &table, &SegOptions::default()).unwrap_err();
        assert!(matches!(err, DicomError::Seg { .. }), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
        assert!(!seg.exists());
    };
    refuse(&Array3::zeros((x, y, z + 1)), "shape");
    refuse(&Array3::zeros((x, y, z)), "no class");
    let mut fractional = Array3::zeros((x, y, z));
    fractional[[1, 1, 1]] = 2.5;
    refuse(&fractional, "2.5");
    let mut negative = Array3::zeros((x, y, z));
    negative[[1, 1, 1]] = -1.0;
    refuse(&negative, "-1");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "no temporary file left"
    );
}

#[test]
fn segment_codes_agree_with_dicom_ps3_16() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python())
        .arg(script("check_segment_codes.py"))
        .arg(root.join("configs/segment_codes.json"))
        .arg(root.join("configs/labels.json"))
        .output()
        .expect("python (VISTA3D_PYTHON) not found");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
