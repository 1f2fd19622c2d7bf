//! DICOM series in: vista3d's reader against dcm2niix itself (Debian's `dcm2niix`, installed by
//! scripts/test.sh) and against the dcm2niix-way reference computed with pydicom + numpy
//! (tests/fixtures/make_dicom_cases.py), on TotalSegmentator's real JPEG 2000 series, pydicom's CT_small, crafted
//! series in every transfer syntax, and crafted refusals.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use vista3d::io::dicom::{is_dicom_input, read_series, scan_series, DicomError, DicomOptions};
use vista3d::io::{read_nifti, write_nifti, OutputDtype};
use vista3d::volume::{Affine, Volume};

/// The crafted cases (scripts/test.sh generates them with pydicom).
fn cases() -> PathBuf {
    common::fixtures("dicom", ".done")
}

fn example() -> PathBuf {
    common::data("totalsegmentator/example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016573")
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(path: &Path) -> Result<vista3d::io::dicom::DicomVolume, DicomError> {
    read_series(path, &DicomOptions::default())
}

/// dcm2niix's NIfTI of `input`, read back (nibabel-exact reader).
fn dcm2niix(input: &Path) -> Volume {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new("dcm2niix")
        .args(["-z", "n", "-b", "n", "-f", "out", "-o"])
        .arg(out.path())
        .arg(input)
        .output()
        .expect("dcm2niix not found: run `bash scripts/test.sh` (it installs Debian's dcm2niix) or apt-get install dcm2niix");
    assert!(
        status.status.success(),
        "dcm2niix failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    read_nifti(&out.path().join("out.nii")).unwrap().volume
}

fn max_affine_diff(a: &Affine, b: &Affine) -> f64 {
    (0..4)
        .flat_map(|r| (0..4).map(move |c| (r, c)))
        .map(|(r, c)| (a[r][c] - b[r][c]).abs())
        .fold(0.0, f64::max)
}

/// Same shape, identical voxels, affines within 1e-4 mm.
fn assert_same(what: &str, got: &Volume, want: &Volume) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let d = max_affine_diff(&got.affine, &want.affine);
    assert!(
        d <= 1e-4,
        "{what}: affine differs by {d} mm\n{:?}\nvs\n{:?}",
        got.affine,
        want.affine
    );
    let diff = got
        .data
        .iter()
        .zip(want.data.iter())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(diff, 0, "{what}: {diff} voxels differ");
}

#[test]
fn example_series_matches_dcm2niix_and_the_numpy_reference() {
    let dir = example();
    assert!(is_dicom_input(&dir));
    let d = read(&dir).unwrap();
    assert_eq!(d.volume.dims(), [512, 512, 20]);
    assert_same("example vs dcm2niix", &d.volume, &dcm2niix(&dir));
    let reference = read_nifti(&cases().join("expected/example.nii"))
        .unwrap()
        .volume;
    assert_same("example vs pydicom+numpy", &d.volume, &reference);
    // The real series is anonymised without a SeriesInstanceUID: one is derived, stably.
    assert!(d.series.series_uid_synthesized);
    assert!(d.series.series_instance_uid.starts_with("2.25."));
    assert_eq!(
        read(&dir).unwrap().series.series_instance_uid,
        d.series.series_instance_uid
    );
    assert_eq!(
        d.series.transfer_syntaxes,
        vec!["1.2.840.10008.1.2.4.90".to_string()]
    );
    assert_eq!(d.series.slices.len(), 20);
    assert!((d.series.slice_spacing - 2.0).abs() < 1e-9);
    // Positions ascend along the normal (z here) in volume order.
    assert!(d
        .series
        .slices
        .windows(2)
        .all(|w| w[1].position[2] > w[0].position[2]));
    // The header writes outputs with that geometry: a label map written and read back has the same affine.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("labels.nii.gz");
    let labels = d.volume.data.mapv(|v| if v > 300.0 { 21.0 } else { 0.0 });
    write_nifti(&p, &labels, &d.header, OutputDtype::Uint8).unwrap();
    let back = read_nifti(&p).unwrap();
    assert!(max_affine_diff(&back.volume.affine, &d.volume.affine) < 1e-4);
    assert_eq!((back.header.sform_code, back.header.qform_code), (1, 1));
    assert!(max_affine_diff(&back.header.qform().unwrap(), &d.volume.affine) < 1e-4);
}

#[test]
fn crafted_geometries_match_dcm2niix_and_the_numpy_reference() {
    for case in ["axial", "oblique", "sagittal"] {
        let dir = cases().join(case);
        let d = read(&dir).unwrap();
        assert_same(&format!("{case} vs dcm2niix"), &d.volume, &dcm2niix(&dir));
        let reference = read_nifti(&cases().join(format!("expected/{case}.nii")))
            .unwrap()
            .volume;
        assert_same(&format!("{case} vs numpy"), &d.volume, &reference);
        assert_eq!(d.series.modality, "CT");
        assert!(!d.series.series_uid_synthesized);
    }
    // Without SeriesInstanceUID (the files are one series all the same).
    let d = read(&cases().join("no_series_uid")).unwrap();
    let reference = read_nifti(&cases().join("expected/no_series_uid.nii"))
        .unwrap()
        .volume;
    assert_same("no_series_uid", &d.volume, &reference);
    assert!(d.series.series_uid_synthesized);
}

#[test]
fn ct_small_single_file_matches_dcm2niix() {
    let file = common::data("pydicom/CT_small.dcm");
    assert!(is_dicom_input(&file));
    let d = read(&file).unwrap();
    assert_eq!(d.volume.dims(), [128, 128, 1]);
    assert_same("CT_small vs dcm2niix", &d.volume, &dcm2niix(&file));
    // Signed data, rescale intercept -1024.
    let min = d.volume.data.iter().copied().fold(f32::INFINITY, f32::min);
    assert_eq!(min, 128.0 - 1024.0);
}

#[test]
fn every_compiled_transfer_syntax_decodes_losslessly() {
    let axial = read(&cases().join("axial")).unwrap();
    for ts in ["implicit", "deflate", "rle", "jpeg_lossless", "j2k"] {
        let d = read(&cases().join(format!("ts_{ts}"))).unwrap_or_else(|e| panic!("ts_{ts}: {e}"));
        assert_same(&format!("ts_{ts}"), &d.volume, &axial.volume);
        assert_eq!(d.series.transfer_syntaxes.len(), 1, "{ts}");
        assert_ne!(
            d.series.transfer_syntaxes, axial.series.transfer_syntaxes,
            "{ts} really re-encoded"
        );
    }
    // JPEG-LS needs CharLS (C++, built with CMake): the `jpegls` feature. Without it the series is refused with a
    // message naming the syntax and the file.
    let jpegls = read(&cases().join("ts_jpegls"));
    if cfg!(feature = "jpegls") {
        assert_same("ts_jpegls", &jpegls.unwrap().volume, &axial.volume);
    } else {
        let err = jpegls.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DicomError::Unsupported { .. }), "{msg}");
        assert!(
            msg.contains("JPEG-LS") && msg.contains("ts_jpegls"),
            "{msg}"
        );
        assert!(msg.contains("--features jpegls"), "{msg}");
    }
}

#[test]
fn jpeg_baseline_matches_pydicoms_decoding_within_rounding() {
    let d = read(&cases().join("ts_jpeg_baseline")).unwrap();
    let reference = read_nifti(&cases().join("expected/ts_jpeg_baseline.nii"))
        .unwrap()
        .volume;
    assert_eq!(d.volume.dims(), reference.dims());
    assert!(max_affine_diff(&d.volume.affine, &reference.affine) < 1e-4);
    // Lossy JPEG: decoders may round the inverse DCT differently (by one grey level at most here).
    let worst = d
        .volume
        .data
        .iter()
        .zip(reference.data.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 1.0, "JPEG baseline differs by {worst}");
}

#[test]
fn a_zip_reads_like_its_folder_and_files_are_never_sorted_by_name() {
    let folder = read(&cases().join("axial")).unwrap();
    let zip = cases().join("axial.zip");
    assert!(is_dicom_input(&zip));
    let z = read(&zip).unwrap();
    assert_same("zip", &z.volume, &folder.volume);
    assert_eq!(
        z.series.series_instance_uid,
        folder.series.series_instance_uid
    );
    assert!(
        z.series.slices[0].source.contains("axial.zip!patient/"),
        "{}",
        z.series.slices[0].source
    );
    // The crafted files are named and numbered in shuffled order: sorting by position is what made them equal
    // to dcm2niix above; check the order really differs from the names'.
    let mut by_name: Vec<&str> = folder
        .series
        .slices
        .iter()
        .map(|s| s.source.as_str())
        .collect();
    let in_volume = by_name.clone();
    by_name.sort();
    assert_ne!(by_name, in_volume);
}

fn refused(case: &str) -> (DicomError, String) {
    let err = read(&cases().join(case)).expect_err(case);
    let msg = err.to_string();
    (err, msg)
}

#[test]
fn refusals_name_the_problem_and_the_file() {
    let (e, m) = refused("missing_slice");
    assert!(
        matches!(e, DicomError::Gap { .. }) && m.contains("1 missing slice"),
        "{m}"
    );
    assert!(m.contains("missing_slice/sub"), "{m}");

    let (e, m) = refused("duplicate");
    assert!(matches!(e, DicomError::DuplicatePosition { .. }), "{m}");
    assert!(m.contains("duplicate/sub"), "{m}");

    let (e, m) = refused("tilted");
    assert!(matches!(e, DicomError::GantryTilt { .. }), "{m}");
    assert!(m.contains("15 degrees") && m.contains("tilted/sub"), "{m}");

    let (e, m) = refused("mr");
    assert!(
        matches!(e, DicomError::Modality { .. }) && m.contains("MR") && m.contains("mr/sub"),
        "{m}"
    );
    let allowed = DicomOptions {
        allow_modalities: vec!["mr".into()],
        ..DicomOptions::default()
    };
    assert_eq!(
        read_series(&cases().join("mr"), &allowed)
            .unwrap()
            .series
            .modality,
        "MR"
    );
    let mr_small = common::data("pydicom/MR_small.dcm");
    let err = read(&mr_small).unwrap_err();
    assert!(matches!(err, DicomError::Modality { .. }), "{err}");

    let (e, m) = refused("mixed_orientation");
    assert!(matches!(e, DicomError::MixedOrientation { .. }), "{m}");

    let (e, m) = refused("mixed_size");
    assert!(
        matches!(e, DicomError::MixedSize { .. }) && m.contains("32 rows x 32 columns"),
        "{m}"
    );

    let (e, m) = refused("truncated");
    assert!(matches!(e, DicomError::Corrupt { .. }), "{m}");
    assert!(m.contains("truncated/sub"), "{m}");

    let (e, m) = refused("truncated_header");
    assert!(
        matches!(e, DicomError::Corrupt { .. } | DicomError::NotDicom { .. }),
        "{m}"
    );
    assert!(m.contains("truncated_header/sub"), "{m}");

    let (e, m) = refused("not_dicom");
    assert!(
        matches!(e, DicomError::NotDicom { .. }) && m.contains("broken.dcm"),
        "{m}"
    );

    for case in ["empty.zip", "text_only.zip", "empty_folder"] {
        let (e, m) = refused(case);
        assert!(matches!(e, DicomError::NoSeries { .. }), "{case}: {m}");
        assert!(m.contains(case), "{m}");
    }
    let err = read(&cases().join("does_not_exist")).unwrap_err();
    assert!(matches!(err, DicomError::Io { .. }), "{err}");
    let not_a_zip = tempfile::Builder::new().suffix(".zip").tempfile().unwrap();
    std::fs::write(not_a_zip.path(), b"PK but not really").unwrap();
    assert!(matches!(
        read(not_a_zip.path()).unwrap_err(),
        DicomError::Zip { .. }
    ));
}

#[test]
fn several_series_pick_the_largest_ct_or_the_named_one() {
    let multi = cases().join("multi");
    let d = read(&multi).unwrap();
    assert_eq!(d.series.series_instance_uid, "1.2.826.0.1.3680043.10.543.6");
    assert_eq!(d.series.slices.len(), 6);
    let others: Vec<&str> = d
        .series
        .other_series
        .iter()
        .map(|s| s.series_instance_uid.as_str())
        .collect();
    assert_eq!(
        others,
        [
            "1.2.826.0.1.3680043.10.543.3",
            "1.2.826.0.1.3680043.10.543.8"
        ]
    );

    let pick = |uid: &str| {
        read_series(
            &multi,
            &DicomOptions {
                series_uid: Some(uid.into()),
                ..DicomOptions::default()
            },
        )
    };
    assert_eq!(
        pick("1.2.826.0.1.3680043.10.543.3")
            .unwrap()
            .series
            .slices
            .len(),
        3
    );
    let err = pick("1.2.3.4").unwrap_err();
    assert!(matches!(err, DicomError::SeriesNotFound { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("1.2.826.0.1.3680043.10.543.8 (MR, 8 slices"),
        "{err}"
    );
    assert!(matches!(
        pick("1.2.826.0.1.3680043.10.543.8").unwrap_err(),
        DicomError::Modality { .. }
    ));

    let listed = scan_series(&multi).unwrap();
    let counts: Vec<(usize, &str)> = listed
        .iter()
        .map(|s| (s.slices, s.modality.as_str()))
        .collect();
    assert_eq!(counts, [(8, "MR"), (6, "CT"), (3, "CT")]);
}

#[test]
fn only_folders_zips_and_dicom_files_are_dicom_inputs() {
    assert!(is_dicom_input(&cases().join("axial")));
    assert!(!is_dicom_input(&cases().join("expected/axial.nii")));
    assert!(!is_dicom_input(&cases().join("missing.zip")));
}
