//! PNG plot of a training run: training loss per step (and its epoch mean) and validation Dice per epoch.
//!
//! Drawn with `plotters`' bitmap backend; text uses DejaVu Sans embedded from the `dejavu` crate (no system fonts).

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// What the plot shows.
#[derive(Debug, Default, Clone)]
pub struct PlotData {
    /// `(global step, loss)` of every training step.
    pub step_loss: Vec<(f64, f64)>,
    /// `(epoch, mean loss)` (epochs 1-based, at the end of the epoch).
    pub epoch_loss: Vec<(f64, f64)>,
    /// `(epoch, mean validation Dice)`; epoch 0 is the validation before training.
    pub val_dice: Vec<(f64, f64)>,
    /// Steps per epoch, to put step positions on the epoch axis.
    pub steps_per_epoch: f64,
}

fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_err()
        {
            log::warn!("the embedded DejaVu font could not be registered; the plot has no text");
        }
    });
}

fn range(values: impl Iterator<Item = f64>, floor: Option<f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if let Some(f) = floor {
        lo = lo.min(f);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    (lo, hi + 0.05 * (hi - lo))
}

/// Writes the plot as a PNG at `path` (via a temporary file renamed at the end).
pub fn write_plot(path: &Path, data: &PlotData) -> Result<()> {
    register_fonts();
    let tmp = crate::fsutil::temporary_sibling(path);
    let result = draw(&tmp, data)
        .map_err(|e| anyhow!("{}: cannot draw the plot: {e}", path.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .map_err(|e| anyhow!("{}: cannot write the plot: {e}", path.display()))
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn draw(path: &Path, data: &PlotData) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    let per_epoch = data.steps_per_epoch.max(1.0);
    let max_epoch = data
        .epoch_loss
        .iter()
        .chain(&data.val_dice)
        .map(|p| p.0)
        .chain(data.step_loss.iter().map(|p| p.0 / per_epoch))
        .fold(1.0f64, f64::max);

    let (lo, hi) = range(
        data.step_loss.iter().chain(&data.epoch_loss).map(|p| p.1),
        Some(0.0),
    );
    let mut chart = ChartBuilder::on(&left)
        .caption("training loss (DiceCE)", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..max_epoch, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("loss")
        .label_style(("sans-serif", 14))
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            data.step_loss.iter().map(|&(s, l)| (s / per_epoch, l)),
            BLUE.mix(0.35),
        ))?
        .label("per step")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE.mix(0.35)));
    chart
        .draw_series(LineSeries::new(
            data.epoch_loss.iter().copied(),
            BLUE.stroke_width(3),
        ))?
        .label("epoch mean")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE.stroke_width(3)));
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    let mut chart = ChartBuilder::on(&right)
        .caption("validation mean Dice", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..max_epoch, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("Dice")
        .label_style(("sans-serif", 14))
        .draw()?;
    let dice: Vec<(f64, f64)> = data
        .val_dice
        .iter()
        .copied()
        .filter(|p| p.1.is_finite())
        .collect();
    chart.draw_series(LineSeries::new(dice.iter().copied(), RED.stroke_width(3)))?;
    chart.draw_series(dice.iter().map(|&p| Circle::new(p, 4, RED.filled())))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        let dir = std::env::temp_dir().join(format!("vista3d-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("curves.png");
        let data = PlotData {
            step_loss: (0..20)
                .map(|s| (s as f64, 2.0 / (1.0 + s as f64)))
                .collect(),
            epoch_loss: vec![(1.0, 1.0), (2.0, 0.3)],
            val_dice: vec![(0.0, 0.1), (1.0, 0.5), (2.0, f64::NAN)],
            steps_per_epoch: 10.0,
        };
        write_plot(&path, &data).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"));
        assert!(bytes.len() > 5000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
