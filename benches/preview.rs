//! Cost of a QC preview per case: rendering (label checks and counts, slices, overlays, legend) and writing the
//! PNG, on TotalSegmentator's example CT and on a synthetic 512 x 512 x 300 CT with 40 classes (and with every
//! body voxel labelled, the worst case for the label pass); plus thumbnails and a contact sheet of 100 thumbnails.
//!
//!     cargo bench --bench preview -- --runs 5 [--threads 2]
//!
//! Median of `--runs` runs after one warm-up run; reads `$VISTA3D_DATA` (default `target/data`, filled by
//! scripts/fetch_data.sh). Prints a markdown table for benches/RESULTS.md.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ndarray::{s, Array3};
use vista3d::io::read_nifti;
use vista3d::preview::{self, PreviewOptions, SheetItem, SheetOptions};
use vista3d::prompts::LabelTable;
use vista3d::volume::Volume;

fn median_ms(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        f()?;
        times.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn data(rel: &str) -> PathBuf {
    std::env::var_os("VISTA3D_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/data"))
        .join(rel)
}

/// A synthetic 512 x 512 x 300 CT (0.8 x 0.8 x 1.5 mm, RAS): a soft-tissue ellipse body in air with a texture,
/// and 40 ellipsoid "organs" with class ids 1..=40 inside it.
fn synthetic() -> (Volume, Array3<f32>) {
    let (nx, ny, nz) = (512usize, 512usize, 300usize);
    let ct = Array3::from_shape_fn((nx, ny, nz), |(i, j, k)| {
        let x = (i as f32 - 256.0) / 230.0;
        let y = (j as f32 - 256.0) / 170.0;
        if x * x + y * y < 1.0 {
            40.0 + 30.0 * ((i * 7 + j * 13 + k * 3) % 17) as f32 / 17.0
        } else {
            -1000.0
        }
    });
    let organs: Vec<([f32; 3], [f32; 3])> = (0..40)
        .map(|c| {
            let a = c as f32 * 2.399_963;
            let r = 0.25 + 0.5 * ((c * 7) % 10) as f32 / 10.0;
            let centre = [
                256.0 + 180.0 * r * a.cos(),
                256.0 + 120.0 * r * a.sin(),
                20.0 + (c * 37 % 260) as f32,
            ];
            (centre, [18.0 + (c % 5) as f32 * 4.0, 14.0, 25.0])
        })
        .collect();
    let mut labels = Array3::<f32>::zeros((nx, ny, nz));
    for (c, (centre, radius)) in organs.iter().enumerate() {
        let lo = |d: usize| (centre[d] - radius[d]).max(0.0) as usize;
        let hi = |d: usize, n: usize| ((centre[d] + radius[d]).ceil() as usize).min(n);
        for i in lo(0)..hi(0, nx) {
            for j in lo(1)..hi(1, ny) {
                for k in lo(2)..hi(2, nz) {
                    let d: f32 = [i, j, k]
                        .iter()
                        .enumerate()
                        .map(|(a, &v)| ((v as f32 - centre[a]) / radius[a]).powi(2))
                        .sum();
                    if d < 1.0 {
                        labels[[i, j, k]] = (c + 1) as f32;
                    }
                }
            }
        }
    }
    let mut affine = vista3d::volume::IDENTITY;
    affine[0][0] = 0.8;
    affine[1][1] = 0.8;
    affine[2][2] = 1.5;
    (Volume { data: ct, affine }, labels)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut runs = 5usize;
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--runs" => runs = value()?.parse()?,
            "--threads" => {
                let n: usize = value()?.parse()?;
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build_global()
                    .context("rayon thread pool")?;
            }
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    let table = LabelTable::bundle();
    let out = std::env::temp_dir().join(format!("vista3d_preview_bench_{}", std::process::id()));
    std::fs::create_dir_all(&out)?;

    // TotalSegmentator's example CT with its labels (example_seg is slices 82..=111 of it).
    let ct = read_nifti(&data("totalsegmentator/example_ct.nii.gz"))?.volume;
    let seg = read_nifti(&data("totalsegmentator/example_seg.nii.gz"))?
        .volume
        .data;
    let mut labels = Array3::<f32>::zeros(ct.data.raw_dim());
    labels.slice_mut(s![.., .., 82..112]).assign(&seg);
    let (big_ct, big_labels) = synthetic();
    // The worst case for the label pass: every body voxel labelled (as after an "everything" run), 117 classes in
    // blocks of 40 x 40 x 30 voxels.
    let dense = Array3::from_shape_fn(big_ct.data.raw_dim(), |(i, j, k)| {
        if big_ct.data[[i, j, k]] > -1000.0 {
            ((i / 40 + j / 40 * 13 + k / 30 * 7) % 117 + 1) as f32
        } else {
            0.0
        }
    });

    println!("| case | voxels | render, ms | PNG write, ms | total, ms | PNG size |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut thumbs = Vec::new();
    for (name, ct, labels) in [
        ("example_ct 122x101x112, 41 classes", &ct, &labels),
        ("synthetic 512x512x300, 40 classes", &big_ct, &big_labels),
        (
            "synthetic 512x512x300, body all labelled, 117 classes",
            &big_ct,
            &dense,
        ),
    ] {
        let opts = PreviewOptions::default();
        let path = out.join("preview.png");
        let mut image = None;
        let render = median_ms(runs, || {
            image = Some(preview::render(ct, labels, &[], &table, &opts)?.image);
            Ok(())
        })?;
        let Some(image) = image else {
            bail!("no image rendered");
        };
        let write = median_ms(runs, || Ok(preview::save_png(&path, &image)?))?;
        let total = median_ms(runs, || {
            preview::write_png(&path, ct, labels, &[], &table, &opts)?;
            Ok(())
        })?;
        let size = std::fs::metadata(&path)?.len();
        println!(
            "| {name} | {} | {render:.1} | {write:.1} | {total:.1} | {} x {}, {:.0} kB |",
            ct.data.len(),
            image.width(),
            image.height(),
            size as f64 / 1000.0
        );
        let thumb_opts = PreviewOptions::thumbnail();
        let mut thumb = None;
        let t = median_ms(runs, || {
            thumb = Some(preview::render(ct, labels, &[], &table, &thumb_opts)?.image);
            Ok(())
        })?;
        println!("| {name}, thumbnail | | {t:.1} | | | |");
        thumbs.extend(thumb);
    }
    let items: Vec<SheetItem> = (0..100)
        .map(|i| {
            SheetItem::ok(
                format!("case_{i:03}.nii.gz"),
                thumbs[i % thumbs.len()].clone(),
            )
        })
        .collect();
    let sheet_path = out.join("sheet.png");
    let sheet_ms = median_ms(runs, || {
        preview::write_contact_sheet(&sheet_path, &items, &SheetOptions::default())?;
        Ok(())
    })?;
    println!(
        "| contact sheet, 100 thumbnails (render + write) | | | | {sheet_ms:.1} | {:.0} kB |",
        std::fs::metadata(&sheet_path)?.len() as f64 / 1000.0
    );
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
