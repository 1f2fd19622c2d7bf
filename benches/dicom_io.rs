//! DICOM in and out: read TotalSegmentator's 20-slice JPEG 2000 CT series (512 x 512) into a volume, and write
//! the DICOM SEG of a thresholded label map (bone and a liver box: two segments, 40 frames) for it.
//!
//!     cargo bench --bench dicom_io -- [--reps 5] [--series DIR]
//!
//! Median of `--reps` runs after one warm-up run. The series defaults to
//! `$VISTA3D_DATA/totalsegmentator/example_ct_dicom` (scripts/fetch_data.sh).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use vista3d::io::dicom::{read_series, write_seg, DicomOptions, SegOptions};
use vista3d::prompts::LabelTable;

fn median(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let data = std::env::var("VISTA3D_DATA").unwrap_or_else(|_| "target/data".into());
    let mut series = PathBuf::from(data).join("totalsegmentator/example_ct_dicom");
    let mut reps = 5usize;
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--reps" => reps = value()?.parse()?,
            "--series" => series = PathBuf::from(value()?),
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let options = DicomOptions::default();
    let dicom = read_series(&series, &options)?;
    let read = median(reps, || {
        read_series(&series, &options)?;
        Ok(())
    })?;
    let labels = dicom.volume.data.indexed_iter().fold(
        ndarray::Array3::<f32>::zeros(dicom.volume.data.raw_dim()),
        |mut acc, ((i, j, k), &hu)| {
            acc[[i, j, k]] = if hu > 300.0 {
                21.0
            } else if (100..250).contains(&i) && (150..300).contains(&j) && hu > 0.0 {
                1.0
            } else {
                0.0
            };
            acc
        },
    );
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("seg.dcm");
    let table = LabelTable::bundle();
    let write = median(reps, || {
        write_seg(&out, &labels, &dicom.series, &table, &SegOptions::default())?;
        Ok(())
    })?;
    let size = std::fs::metadata(&out)?.len();
    println!(
        "series {} ({} slices {}x{}, {}): read {:.3} s; SEG write {:.3} s ({} bytes); median of {reps}, {} rayon threads",
        series.display(),
        dicom.series.slices.len(),
        dicom.series.columns,
        dicom.series.rows,
        dicom.series.transfer_syntaxes.join(","),
        read,
        write,
        size,
        rayon::current_num_threads()
    );
    Ok(())
}
