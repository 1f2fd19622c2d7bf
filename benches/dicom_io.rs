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

/// User + system CPU seconds of this process so far (all threads).
fn cpu_seconds() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Median wall seconds and median CPU seconds of `reps` runs after one warm-up run (CPU time is what to compare
/// on a loaded machine).
fn median(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    f()?;
    let (mut wall, mut cpu) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for _ in 0..reps {
        let (t0, c0) = (Instant::now(), cpu_seconds());
        f()?;
        wall.push(t0.elapsed().as_secs_f64());
        cpu.push(cpu_seconds() - c0);
    }
    wall.sort_by(|a, b| a.total_cmp(b));
    cpu.sort_by(|a, b| a.total_cmp(b));
    Ok((wall[reps / 2], cpu[reps / 2]))
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
    anyhow::ensure!(reps > 0, "--reps must be at least 1");
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
        "series {} ({} slices {}x{}, {}): read {:.3} s wall / {:.3} s CPU; SEG write {:.3} s wall / {:.3} s CPU \
         ({} bytes); medians of {reps}, {} rayon threads",
        series.display(),
        dicom.series.slices.len(),
        dicom.series.columns,
        dicom.series.rows,
        dicom.series.transfer_syntaxes.join(","),
        read.0,
        read.1,
        write.0,
        write.1,
        size,
        rayon::current_num_threads()
    );
    Ok(())
}
