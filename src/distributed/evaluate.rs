//! `vista3d evaluate` on several processes, as the bundle's `mgpu_evaluate.json`: the item list is split across
//! the ranks as `DistributedSampler(even_divisible=False, shuffle=False)` does (rank `r` takes items `r, r + world,
//! ...`), each rank segments its items and writes their predictions, the per-image Dice values are gathered, and
//! rank 0 writes one set of MetricsSaver files.
//!
//! The gathered rows are put back in datalist order before the reports are written, so the files are
//! byte-identical to a single-process run. (MONAI's MetricsSaver concatenates the ranks' rows rank by rank, so its
//! multi-GPU files list the images in another order than its single-GPU ones.)

use anyhow::{ensure, Context, Result};

use super::{sampler, ProcessGroup};
use crate::config::Config;
use crate::segmenter::Segmenter;
use crate::training::data::{LabelMap, LabelMappings};
use crate::training::datalist::DataItem;
use crate::training::evaluate::{
    build_report, dice_text, evaluate_item, prediction_path, EvalItem, EvalReport, EvalSettings,
};
use crate::training::metrics::write_metrics_reports;

/// One evaluated item as it travels between ranks: its index in the list and its Dice values as IEEE bits (NaN
/// marks a class absent from the ground truth and must survive the trip).
#[derive(serde::Serialize, serde::Deserialize)]
struct Row {
    index: usize,
    dice_bits: Option<Vec<u64>>,
}

/// Evaluates this rank's share of `items` and gathers everyone's results; rank 0 writes the reports. Every rank
/// returns the same report.
pub fn evaluate_items(
    group: &ProcessGroup,
    cfg: &Config,
    segmenter: &Segmenter,
    items: &[DataItem],
    mappings: &LabelMappings,
    settings: &EvalSettings,
) -> Result<EvalReport> {
    ensure!(!items.is_empty(), "nothing to evaluate: the split is empty");
    group.check_config(cfg)?;
    group.check_same(
        "network width (encoder_embed_dim of the checkpoint)",
        &segmenter.model().net.config.embed_dim.to_string(),
    )?;
    let seq = LabelMap::sequential(&settings.label_set, 1)?;
    let all: Vec<usize> = (0..items.len()).collect();
    let mine = sampler::shard(&all, group.rank(), group.world_size(), false);
    log::info!(
        "rank {} evaluates {} of {} item(s)",
        group.rank(),
        mine.len(),
        items.len()
    );
    let mut rows = Vec::with_capacity(mine.len());
    for (k, &i) in mine.iter().enumerate() {
        let t = std::time::Instant::now();
        let done = evaluate_item(segmenter, &items[i], mappings, settings, &seq)?;
        log::info!(
            "[{}/{}] {}: dice {} ({:.1} s) -> {}",
            k + 1,
            mine.len(),
            items[i].name(),
            dice_text(&done.dice),
            t.elapsed().as_secs_f64(),
            done.prediction.display()
        );
        rows.push(Row {
            index: i,
            dice_bits: done.dice.map(|d| d.iter().map(|v| v.to_bits()).collect()),
        });
    }
    let gathered = group.all_gather_bytes(&serde_json::to_vec(&rows)?)?;
    let mut slots: Vec<Option<Option<Vec<f64>>>> = vec![None; items.len()];
    for (rank, bytes) in gathered.iter().enumerate() {
        let rows: Vec<Row> = serde_json::from_slice(bytes)
            .with_context(|| format!("results of {}", group.describe_rank(rank)))?;
        for row in rows {
            ensure!(
                row.index < items.len() && slots[row.index].is_none(),
                "{} sent a result for item {} twice or out of range",
                group.describe_rank(rank),
                row.index
            );
            slots[row.index] = Some(
                row.dice_bits
                    .map(|b| b.into_iter().map(f64::from_bits).collect()),
            );
        }
    }
    let evaluated: Vec<EvalItem> = items
        .iter()
        .zip(slots)
        .map(|(item, slot)| {
            let dice =
                slot.with_context(|| format!("no rank evaluated {}", item.image.display()))?;
            Ok(EvalItem {
                image: item.image.clone(),
                prediction: prediction_path(settings, item),
                dice,
            })
        })
        .collect::<Result<_>>()?;
    let report = build_report(evaluated)?;
    if group.is_main() {
        write_metrics_reports(&settings.output.dir, &report.details)?;
    }
    Ok(report)
}
