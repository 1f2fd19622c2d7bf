//! QC previews on real CTs (TotalSegmentator's example CT with its label map, the LPS angiogram, the LAS DICOM
//! labels): sizes and aspect from the spacing, every slice pixel checked against the voxel that the radiological
//! convention and the affine put there (derived here independently of the renderer), overlay colours against the
//! legend swatches read from the image, orientation of RAS vs LPS inputs, point markers, "nothing found", errors,
//! and the contact sheet. The rendered PNGs are kept under `target/tmp/preview/` for a look.

mod common;

use std::path::PathBuf;

use ndarray::Array3;
use vista3d::io::read_nifti;
use vista3d::preview::{
    self, class_color, contact_sheet, Panel, Preview, PreviewError, PreviewOptions, SheetItem,
    SheetOptions, View, HATCH_COLOR, NEGATIVE_POINT, NOTE_COLOR, POSITIVE_POINT,
};
use vista3d::prompts::LabelTable;
use vista3d::volume::{apply, inverse, Volume};

fn load(rel: &str) -> Volume {
    read_nifti(&common::data(rel)).unwrap().volume
}

fn artefact(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("preview");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn px(p: &Preview, x: u32, y: u32) -> [u8; 3] {
    p.image.get_pixel(x, y).0
}

/// The soft-tissue window, written out here: W 400 / L 40.
fn grey(v: f32) -> u8 {
    if v.is_nan() {
        return 0;
    }
    (((v + 160.0) / 400.0).clamp(0.0, 1.0) * 255.0 + 0.5).floor() as u8
}

/// The voxel that pixel `(x, y)` of `panel` must show, from first principles: the panel spans the volume's world
/// box (voxel edges) along its two screen axes, radiologically oriented (axial: patient right on the left,
/// anterior up; coronal: right on the left, superior up; sagittal: anterior on the left, superior up); the
/// pixel centre's world position goes through the inverse affine. `None` when it falls within 1e-6 of a voxel
/// boundary (either voxel would be right). Axis-aligned affines only.
fn expected_voxel(ct: &Volume, panel: &Panel, x: u32, y: u32) -> Option<[usize; 3]> {
    let dims = ct.dims();
    let a = &ct.affine;
    let mut lo = [f64::INFINITY; 3];
    let mut hi = [f64::NEG_INFINITY; 3];
    for corner in 0..8 {
        let v: [f64; 3] = std::array::from_fn(|k| {
            if corner >> k & 1 == 1 {
                dims[k] as f64 - 0.5
            } else {
                -0.5
            }
        });
        let w = apply(a, v);
        for i in 0..3 {
            lo[i] = lo[i].min(w[i]);
            hi[i] = hi[i].max(w[i]);
        }
    }
    let fx = (f64::from(x - panel.rect.x) + 0.5) / f64::from(panel.rect.width);
    let fy = (f64::from(y - panel.rect.y) + 0.5) / f64::from(panel.rect.height);
    let mut slice_voxel = [0.0; 3];
    slice_voxel[panel.slice_axis] = panel.slice_index as f64;
    let mut world = apply(a, slice_voxel);
    // Screen-right runs towards L (x decreasing) or P (y decreasing); screen-down towards P or I.
    let (h, v) = match panel.view {
        View::Axial => (0, 1),
        View::Coronal => (0, 2),
        View::Sagittal => (1, 2),
    };
    world[h] = hi[h] - fx * (hi[h] - lo[h]);
    world[v] = hi[v] - fy * (hi[v] - lo[v]);
    let c = apply(&inverse(a).unwrap(), world);
    let mut out = [0usize; 3];
    for k in 0..3 {
        if k != panel.slice_axis && ((c[k] - c[k].floor()) - 0.5).abs() < 1e-6 {
            return None;
        }
        let r = c[k].round();
        assert!(
            r >= 0.0 && r < dims[k] as f64,
            "pixel ({x}, {y}) maps outside the volume: {c:?}"
        );
        out[k] = r as usize;
    }
    Some(out)
}

/// Checks every pixel of every panel: the renderer's voxel is the expected one; background shows the windowed
/// CT grey; a class voxel shows its legend colour (read from the swatch pixels of the image), either pure (outline)
/// or blended over the grey with `alpha`. Returns (class pixels, outline pixels).
fn check_pixels(ct: &Volume, labels: &Array3<f32>, p: &Preview, alpha: f32) -> (usize, usize) {
    let swatch: std::collections::HashMap<u8, [u8; 3]> = p
        .legend
        .iter()
        .map(|e| {
            let s = e.swatch;
            let c = px(p, s.x + s.width / 2, s.y + s.height / 2);
            assert_eq!(c, e.color, "swatch of class {} in the image", e.id);
            assert_eq!(c, class_color(e.id), "legend colour of class {}", e.id);
            (e.id, c)
        })
        .collect();
    let (mut class_pixels, mut outline) = (0, 0);
    for panel in &p.panels {
        let r = panel.rect;
        assert!(r.x + r.width <= p.image.width() && r.y + r.height <= p.image.height());
        for y in r.y..r.y + r.height {
            for x in r.x..r.x + r.width {
                let v = panel.voxel_at(x, y).unwrap();
                if let Some(e) = expected_voxel(ct, panel, x, y) {
                    assert_eq!(v, e, "{:?} pixel ({x}, {y})", panel.view);
                }
                let g = grey(ct.data[v]);
                let got = px(p, x, y);
                let label = labels[v] as u8;
                match label {
                    0 => assert_eq!(got, [g, g, g], "background at {v:?} ({x}, {y})"),
                    255 => {}
                    c => {
                        class_pixels += 1;
                        let color = swatch[&c];
                        if got == color {
                            outline += 1;
                            continue;
                        }
                        for ch in 0..3 {
                            let unblended =
                                (f32::from(got[ch]) - (1.0 - alpha) * f32::from(g)) / alpha;
                            assert!(
                                (unblended - f32::from(color[ch])).abs() <= 0.5 / alpha + 0.01,
                                "class {c} at {v:?} ({x}, {y}): pixel {got:?} over grey {g} is not \
                                 its colour {color:?}"
                            );
                        }
                    }
                }
            }
        }
    }
    (class_pixels, outline)
}

fn unique_classes(labels: &Array3<f32>) -> Vec<u8> {
    let mut seen = [false; 256];
    for &v in labels {
        seen[v as usize] = true;
    }
    (1..255u8).filter(|&c| seen[usize::from(c)]).collect()
}

#[test]
fn real_ct_preview_has_physical_size_and_overlays_exactly_where_the_labels_are() {
    let ct = load("totalsegmentator/example_ct_sm.nii.gz");
    let labels = load("totalsegmentator/example_seg.nii.gz").data;
    let table = LabelTable::bundle();
    let opts = PreviewOptions::default();
    let path = artefact("example_ct_sm.png");
    let p = preview::write_png(&path, &ct, &labels, &[], &table, &opts).unwrap();

    // 122 x 101 x 30 voxels of 3 mm: 366 x 303 x 90 mm; the largest extent gets 320 pixels.
    let s = 320.0 / 366.0;
    let size = |mm: f64| (mm * s).round() as u32;
    let dims: Vec<(View, u32, u32)> = p.panels[..3]
        .iter()
        .map(|q| (q.view, q.rect.width, q.rect.height))
        .collect();
    assert_eq!(
        dims,
        vec![
            (View::Axial, 320, size(303.0)),
            (View::Coronal, 320, size(90.0)),
            (View::Sagittal, size(303.0), size(90.0)),
        ]
    );
    assert_eq!((size(303.0), size(90.0)), (265, 79));
    assert_eq!(p.panels.len(), 3 + opts.axial_fractions.len());
    for q in &p.panels[3..] {
        assert_eq!(q.view, View::Axial);
        let aspect = f64::from(q.rect.width) / f64::from(q.rect.height);
        assert!((aspect - 366.0 / 303.0).abs() < 0.03, "{:?}", q.rect);
    }
    let panels_w: u32 = p.panels[..3].iter().map(|q| q.rect.width).sum();
    assert!(p.image.width() > panels_w && p.image.width() < panels_w + 200);
    assert!(p.image.height() < 1000, "{}", p.image.height());

    // The main slices go through the labelled voxels' medians; the fractions run superior to inferior.
    let k = p.panels[0].slice_index;
    assert!(labels
        .index_axis(ndarray::Axis(2), k)
        .iter()
        .any(|&v| v > 0.0));
    let ks: Vec<usize> = p.panels[3..].iter().map(|q| q.slice_index).collect();
    assert!(ks.windows(2).all(|w| w[0] > w[1]), "{ks:?}");

    let (class_pixels, outline) = check_pixels(&ct, &labels, &p, opts.overlay_alpha);
    assert!(class_pixels > 20_000, "{class_pixels} class pixels");
    assert!(
        outline > 1000 && outline < class_pixels / 2,
        "{outline} outline pixels of {class_pixels}"
    );

    let ids: Vec<u8> = p.legend.iter().map(|e| e.id).collect();
    assert_eq!(ids, unique_classes(&labels));
    for e in &p.legend {
        assert_eq!(Some(e.name.as_str()), table.name(i64::from(e.id)));
        let n = labels.iter().filter(|&&v| v == f32::from(e.id)).count() as u64;
        assert_eq!(e.voxels, n);
        assert!((e.volume_ml - n as f64 * 27.0 / 1000.0).abs() < 1e-9);
    }
    assert!(!p.nothing_found && p.note.is_none() && p.not_computed_swatch.is_none());

    let back = preview::read_png(&path).unwrap();
    assert_eq!(back, p.image, "the PNG holds the rendered pixels");
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.ends_with(".tmp")),
        "temporary files left: {names:?}"
    );
}

#[test]
fn anisotropic_voxels_keep_their_physical_aspect() {
    // The same CT claiming 6 mm slices: coronal and sagittal panels twice as tall, every pixel still exact.
    let mut ct = load("totalsegmentator/example_ct_sm.nii.gz");
    let labels = load("totalsegmentator/example_seg.nii.gz").data;
    for row in ct.affine.iter_mut().take(3) {
        row[2] *= 2.0;
    }
    let opts = PreviewOptions::default();
    let p = preview::render(&ct, &labels, &[], &LabelTable::bundle(), &opts).unwrap();
    let s: f64 = 320.0 / 366.0;
    assert_eq!(
        (p.panels[1].rect.width, p.panels[1].rect.height),
        (320, (180.0 * s).round() as u32)
    );
    assert_eq!(p.panels[2].rect.height, 157);
    check_pixels(&ct, &labels, &p, opts.overlay_alpha);

    // Real anisotropic LAS geometry: the DICOM example's labels (0.977 x 0.977 x 2 mm), shown over themselves.
    let seg = load("totalsegmentator/example_seg_dicom.nii.gz");
    let p = preview::write_png(
        &artefact("example_seg_dicom.png"),
        &seg,
        &seg.data,
        &[],
        &LabelTable::bundle(),
        &opts,
    )
    .unwrap();
    let sp = seg.spacing();
    let (w, h) = (512.0 * sp[0], 20.0 * sp[2]);
    let coronal = p.panels[1].rect;
    assert_eq!(coronal.width, 320);
    assert_eq!(coronal.height, (h * 320.0 / w).round() as u32);
    let (class_pixels, _) = check_pixels(&seg, &seg.data, &p, opts.overlay_alpha);
    assert!(class_pixels > 10_000);
}

/// Class 1 on the plus side (R, A or S) of world axis `w`, class 2 on the minus side, 0 on the middle plane.
fn halves(ct: &Volume, w: usize) -> Array3<f32> {
    let dims = ct.dims();
    let centre = apply(&ct.affine, dims.map(|n| (n as f64 - 1.0) / 2.0))[w];
    Array3::from_shape_fn(dims, |(i, j, k)| {
        let pos = apply(&ct.affine, [i as f64, j as f64, k as f64])[w];
        if (pos - centre).abs() < 1e-6 {
            0.0
        } else if pos > centre {
            1.0
        } else {
            2.0
        }
    })
}

#[test]
fn ras_and_lps_inputs_are_shown_and_lettered_the_same_way_round() {
    let opts = PreviewOptions {
        axial_fractions: Vec::new(),
        overlay_alpha: 1.0,
        outlines: false,
        ..Default::default()
    };
    let table = LabelTable::bundle();
    let plus_color = class_color(1);
    let minus_color = class_color(2);
    for (rel, code) in [
        ("totalsegmentator/example_ct_sm.nii.gz", "RAS"),
        ("totalsegmentator/aorta_report/example_ct.nii.gz", "LPS"),
    ] {
        let ct = load(rel);
        // The file's own orientation really is what the name says.
        let letters: String = (0..3)
            .map(|k| {
                let c = [ct.affine[0][k], ct.affine[1][k], ct.affine[2][k]];
                preview::geometry::direction_letter(c)
            })
            .collect();
        assert_eq!(letters, code);
        let p = preview::render(&ct, &halves(&ct, 0), &[], &table, &opts).unwrap();
        let l = |q: &Panel| {
            let e = q.letters;
            format!("{}{}{}{}", e.left, e.right, e.top, e.bottom)
        };
        assert_eq!(l(&p.panels[0]), "RLAP", "{code} axial");
        assert_eq!(l(&p.panels[1]), "RLSI", "{code} coronal");
        assert_eq!(l(&p.panels[2]), "APSI", "{code} sagittal");
        for q in &p.panels {
            // The letters are drawn: lit pixels in the margin left of the slice, at mid-height.
            let cy = q.rect.y + q.rect.height / 2;
            let lit = (q.rect.x - 18..q.rect.x)
                .flat_map(|x| (cy - 8..cy + 8).map(move |y| (x, y)))
                .filter(|&(x, y)| px(&p, x, y)[0] > 100)
                .count();
            assert!(lit > 5, "{code} {:?}: no left letter drawn", q.view);
        }
        // For each world axis: the plus half (R, A, S) must be on the left (horizontal R/L and A/P) or at the
        // top (vertical A/P and S/I) of every panel showing that axis.
        for w in 0..3 {
            let labels = halves(&ct, w);
            let p = preview::render(&ct, &labels, &[], &table, &opts).unwrap();
            preview::save_png(&artefact(&format!("halves_{code}_{w}.png")), &p.image).unwrap();
            for q in &p.panels {
                let horizontal = match (q.view, w) {
                    (View::Axial | View::Coronal, 0) | (View::Sagittal, 1) => true,
                    (View::Axial, 1) | (View::Coronal | View::Sagittal, 2) => false,
                    _ => continue,
                };
                let r = q.rect;
                let (mut plus, mut minus) = (0, 0);
                for y in r.y..r.y + r.height {
                    for x in r.x..r.x + r.width {
                        let pos = if horizontal { x - r.x } else { y - r.y };
                        let len = if horizontal { r.width } else { r.height };
                        let c = px(&p, x, y);
                        if c == plus_color {
                            plus += 1;
                            assert!(
                                pos <= len / 2 + 1,
                                "{code} {:?} axis {w}: plus side at {pos} of {len}",
                                q.view
                            );
                        } else if c == minus_color {
                            minus += 1;
                            assert!(
                                pos + 1 >= len / 2,
                                "{code} {:?} axis {w}: minus side at {pos} of {len}",
                                q.view
                            );
                        }
                    }
                }
                assert!(
                    plus > 100 && minus > 100,
                    "{code} {:?} axis {w}: {plus} / {minus}",
                    q.view
                );
            }
        }
    }
}

#[test]
fn point_prompts_are_drawn_where_they_are() {
    let ct = load("totalsegmentator/example_ct_sm.nii.gz");
    let labels = load("totalsegmentator/example_seg.nii.gz").data;
    let table = LabelTable::bundle();
    let opts = PreviewOptions {
        axial_fractions: Vec::new(),
        ..Default::default()
    };
    let k = preview::render(&ct, &labels, &[], &table, &opts)
        .unwrap()
        .panels[0]
        .slice_index;
    // A positive click on the axial slice shown, a negative one 5 slices away (a ring there).
    let points = [[40.0, 60.0, k as f64], [90.0, 30.0, (k + 5) as f64]];
    let opts = PreviewOptions {
        point_labels: vec![1, 0],
        ..opts
    };
    let p = preview::write_png(
        &artefact("points.png"),
        &ct,
        &labels,
        &points,
        &table,
        &opts,
    )
    .unwrap();
    let axial = &p.panels[0];
    // RAS, 3 mm voxels at 320/366 px per mm: column of voxel i is (121 - i + 0.5) * 2.623, row of j likewise.
    let s = 3.0 * 320.0 / 366.0;
    let at = |i: f64, j: f64| {
        (
            axial.rect.x as f64 + (121.0 - i + 0.5) * s,
            axial.rect.y as f64 + (100.0 - j + 0.5) * s,
        )
    };
    let (x, y) = at(40.0, 60.0);
    assert_eq!(px(&p, x as u32, y as u32), POSITIVE_POINT);
    let (x, y) = at(90.0, 30.0);
    assert_ne!(
        px(&p, x as u32, y as u32),
        NEGATIVE_POINT,
        "off the slice: a ring"
    );
    let ring = (x as u32 - 8..x as u32 + 8)
        .flat_map(|a| (y as u32 - 8..y as u32 + 8).map(move |b| (a, b)))
        .filter(|&(a, b)| px(&p, a, b) == NEGATIVE_POINT)
        .count();
    assert!(ring > 10, "{ring} ring pixels");

    let err = preview::render(&ct, &labels, &points[..1], &table, &opts).unwrap_err();
    assert!(matches!(
        err,
        PreviewError::PointLabelCount {
            points: 1,
            labels: 2
        }
    ));
    let err = preview::render(
        &ct,
        &labels,
        &[[f64::NAN, 0.0, 0.0]],
        &table,
        &PreviewOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, PreviewError::InvalidPoint { index: 0, .. }),
        "{err}"
    );
}

fn note_pixels(p: &Preview) -> usize {
    p.image
        .pixels()
        .filter(|c| (0..3).all(|i| (i32::from(c.0[i]) - i32::from(NOTE_COLOR[i])).abs() <= 40))
        .count()
}

#[test]
fn an_empty_result_says_nothing_found_and_not_computed_is_hatched() {
    let ct = load("totalsegmentator/example_ct_sm.nii.gz");
    let table = LabelTable::bundle();
    let empty = Array3::<f32>::zeros(ct.data.raw_dim());
    let p = preview::write_png(
        &artefact("nothing_found.png"),
        &ct,
        &empty,
        &[],
        &table,
        &PreviewOptions::default(),
    )
    .unwrap();
    assert!(p.nothing_found && p.legend.is_empty());
    let note = p.note.expect("the note is drawn");
    // The note's box, 2 pixels wider on each side for anti-aliased glyph edges.
    let in_note = (note.y - 2..note.y + note.height + 2)
        .flat_map(|y| (note.x - 2..note.x + note.width + 2).map(move |x| (x, y)))
        .filter(|&(x, y)| {
            let c = px(&p, x, y);
            (0..3).all(|i| (i32::from(c[i]) - i32::from(NOTE_COLOR[i])).abs() <= 40)
        })
        .count();
    assert!(in_note > 100, "{in_note} note pixels in {note:?}");
    assert_eq!(note_pixels(&p), in_note, "note colour only in the note");
    // The slices go through the middle, and show plain CT.
    assert_eq!(p.panels[0].slice_index, 15);
    check_pixels(&ct, &empty, &p, 0.45);

    // A found class: no note anywhere.
    let labels = load("totalsegmentator/example_seg.nii.gz").data;
    let found = preview::render(&ct, &labels, &[], &table, &PreviewOptions::default()).unwrap();
    assert!(!found.nothing_found && found.note.is_none());

    // Everything "not computed": nothing found, hatch over the CT, a legend entry for it.
    let not_computed = Array3::<f32>::from_elem(ct.data.raw_dim(), 255.0);
    let p = preview::render(&ct, &not_computed, &[], &table, &PreviewOptions::default()).unwrap();
    assert!(p.nothing_found && p.note.is_some());
    assert_eq!(p.not_computed_voxels, ct.data.len() as u64);
    assert!(p.not_computed_swatch.is_some());
    let axial = p.panels[0].rect;
    let mut hatch = 0;
    for y in axial.y..axial.y + axial.height {
        for x in axial.x..axial.x + axial.width {
            if (x + y) % preview::HATCH_PERIOD == 0 {
                assert_eq!(px(&p, x, y), HATCH_COLOR);
                hatch += 1;
            } else {
                let c = px(&p, x, y);
                assert!(
                    c[0] == c[1] && c[1] == c[2],
                    "CT grey between the hatch lines"
                );
            }
        }
    }
    assert!(hatch > 1000);

    // The thumbnail keeps the note.
    let t = preview::render(&ct, &empty, &[], &table, &PreviewOptions::thumbnail()).unwrap();
    assert!(t.note.is_some() && note_pixels(&t) > 30);
    assert_eq!(t.panels.len(), 3);
}

#[test]
fn bad_input_is_a_clear_error_and_writes_nothing() {
    let ct = load("totalsegmentator/example_ct_sm.nii.gz");
    let table = LabelTable::bundle();
    let opts = PreviewOptions::default();
    let small = Array3::<f32>::zeros((10, 10, 10));
    let err = preview::render(&ct, &small, &[], &table, &opts).unwrap_err();
    assert!(
        matches!(
            err,
            PreviewError::ShapeMismatch {
                ct: [122, 101, 30],
                labels: [10, 10, 10]
            }
        ),
        "{err}"
    );
    let mut labels = Array3::<f32>::zeros(ct.data.raw_dim());
    labels[[3, 4, 5]] = 2.5;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.png");
    let err = preview::write_png(&out, &ct, &labels, &[], &table, &opts).unwrap_err();
    assert!(
        err.to_string().contains("2.5") && err.to_string().contains("[3, 4, 5]"),
        "{err}"
    );
    assert!(!out.exists());
    // A file where a directory should be: a write error, nothing left behind.
    std::fs::write(dir.path().join("file"), b"x").unwrap();
    let blocked = dir.path().join("file").join("p.png");
    let err = preview::write_png(
        &blocked,
        &ct,
        &Array3::zeros(ct.data.raw_dim()),
        &[],
        &table,
        &opts,
    )
    .unwrap_err();
    assert!(matches!(err, PreviewError::Write { .. }), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1);
    let err = preview::read_png(&dir.path().join("file")).unwrap_err();
    assert!(matches!(err, PreviewError::Read { .. }), "{err}");
}

#[test]
fn contact_sheet_shows_each_case_and_marks_failures() {
    let table = LabelTable::bundle();
    let thumb = PreviewOptions::thumbnail();
    let ct = load("totalsegmentator/example_ct_sm.nii.gz");
    let labels = load("totalsegmentator/example_seg.nii.gz").data;
    let a = preview::render(&ct, &labels, &[], &table, &thumb)
        .unwrap()
        .image;
    let angio = load("totalsegmentator/aorta_report/example_ct.nii.gz");
    let vessels = angio.data.mapv(|v| if v > 250.0 { 6.0 } else { 0.0 });
    let b = preview::render(&angio, &vessels, &[], &table, &thumb)
        .unwrap()
        .image;
    let items = vec![
        SheetItem::ok("case_a/example_ct_sm.nii.gz", a.clone()),
        SheetItem::failed(
            "case_b/broken.nii.gz",
            "cannot read NIfTI file case_b/broken.nii.gz: truncated data (expected 893,000 bytes, found 12)",
        ),
        SheetItem::ok("case_c/aorta.nii.gz", b),
    ];
    let opts = SheetOptions {
        columns: 2,
        ..Default::default()
    };
    let path = artefact("contact_sheet.png");
    let sheet = preview::write_contact_sheet(&path, &items, &opts).unwrap();
    assert_eq!(preview::read_png(&path).unwrap(), sheet.image);
    assert_eq!(sheet.cells.len(), 3);
    // Two columns, two rows, cells of one size.
    let c = &sheet.cells;
    assert_eq!(c[0].rect.y, c[1].rect.y);
    assert!(c[2].rect.y > c[0].rect.y + c[0].rect.height);
    assert_eq!(c[0].rect.x, c[2].rect.x);
    assert!(c.iter().all(|x| x.rect.width == c[0].rect.width));
    assert!(sheet.image.width() >= c[1].rect.x + c[1].rect.width);
    let at = |x: u32, y: u32| sheet.image.get_pixel(x, y).0;
    for (cell, failed) in c.iter().zip([false, true, false]) {
        assert_eq!(cell.failed, failed);
        let frame = at(cell.rect.x + 1, cell.rect.y + cell.rect.height / 2);
        assert_eq!(frame == preview::FAILED_COLOR, failed, "{frame:?}");
        if !failed {
            assert_eq!(frame, preview::FRAME_COLOR);
        }
        // The name (and for the failure, the reason) is written below the picture area.
        let text_top = cell.rect.y + 3 + 4 + opts.thumb_height + 4;
        let lit = (text_top..cell.rect.y + cell.rect.height - 3)
            .flat_map(|y| (cell.rect.x + 7..cell.rect.x + 100).map(move |x| (x, y)))
            .filter(|&(x, y)| at(x, y).iter().any(|&v| v > 120))
            .count();
        assert!(lit > 30, "{lit} text pixels");
    }
    assert!(c[1].thumbnail.is_none());
    // The first thumbnail is the preview scaled down with its aspect, its mean colour kept.
    let t = c[0].thumbnail.unwrap();
    let aspect = |w: u32, h: u32| f64::from(w) / f64::from(h);
    assert!((aspect(t.width, t.height) - aspect(a.width(), a.height())).abs() < 0.05);
    assert!(t.width <= opts.thumb_width && t.height <= opts.thumb_height);
    let mean = |pixels: Vec<[u8; 3]>| {
        let n = pixels.len() as f64;
        (0..3)
            .map(|i| pixels.iter().map(|p| f64::from(p[i])).sum::<f64>() / n)
            .collect::<Vec<_>>()
    };
    let thumb_mean = mean(
        (t.y..t.y + t.height)
            .flat_map(|y| (t.x..t.x + t.width).map(move |x| (x, y)))
            .map(|(x, y)| at(x, y))
            .collect(),
    );
    let source_mean = mean(a.pixels().map(|p| p.0).collect());
    for i in 0..3 {
        assert!(
            (thumb_mean[i] - source_mean[i]).abs() < 4.0,
            "{thumb_mean:?} vs {source_mean:?}"
        );
    }

    assert!(matches!(
        contact_sheet(&[], &opts),
        Err(PreviewError::NoItems)
    ));
    let too_many = vec![SheetItem::failed("x", "y"); preview::MAX_SHEET_ITEMS + 1];
    assert!(matches!(
        contact_sheet(&too_many, &opts),
        Err(PreviewError::TooManyItems { .. })
    ));
}

/// `vista3d` with `args` plus the demo weights and small windows.
fn vista3d_fast(args: &[&str]) -> std::process::Output {
    let all: Vec<&str> = args.iter().chain(common::FAST.iter()).copied().collect();
    common::vista3d(&all)
}

#[test]
fn infer_and_batch_write_the_preview_beside_the_label_map() {
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("preview_cli");
    let _ = std::fs::remove_dir_all(&work);
    let ct_path = common::data("totalsegmentator/example_ct_sm.nii.gz");

    // infer --preview: the PNG is exactly the renderer's picture of the written label map over the CT.
    let out = work.join("infer");
    let o = vista3d_fast(&[
        "infer",
        "--image",
        ct_path.to_str().unwrap(),
        "--label-prompt",
        "spleen,liver",
        "--preview",
        "--output-dir",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = out.join("example_ct_sm");
    let png = dir.join("example_ct_sm_trans.png");
    let written = preview::read_png(&png).unwrap();
    let labels = read_nifti(&dir.join("example_ct_sm_trans.nii.gz"))
        .unwrap()
        .volume
        .data;
    let ct = read_nifti(&ct_path).unwrap().volume;
    let opts = PreviewOptions {
        title: Some("example_ct_sm_trans".into()),
        ..Default::default()
    };
    let expected = preview::render(&ct, &labels, &[], &LabelTable::bundle(), &opts).unwrap();
    assert_eq!(written.dimensions(), expected.image.dimensions());
    assert!(
        written == expected.image,
        "the PNG differs from the rendered preview"
    );
    let rec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("example_ct_sm_trans.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(rec["outputs"]["preview"], png.display().to_string());

    // batch: a finished run asked again with --preview gets its previews from the label maps, without the network.
    let input = work.join("in");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::copy(&ct_path, input.join("a.nii.gz")).unwrap();
    let out = work.join("batch");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "batch",
            "--input-dir",
            input.to_str().unwrap(),
            "--label-prompt",
            "spleen",
            "--output-dir",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = vista3d_fast(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let t = run(&[]);
    assert!(t.contains("1 segmented"), "{t}");
    let nii = out.join("a/a_trans.nii.gz");
    let png = out.join("a/a_trans.png");
    assert!(!png.exists());
    let before = std::fs::read(&nii).unwrap();
    let t = run(&["--preview"]);
    assert!(t.contains("missing extras written"), "{t}");
    assert!(t.contains("0 segmented"), "{t}");
    assert!(png.is_file());
    assert_eq!(std::fs::read(&nii).unwrap(), before);
    let t = run(&["--preview"]);
    assert!(t.contains("up to date (same request), skipped"), "{t}");
}
