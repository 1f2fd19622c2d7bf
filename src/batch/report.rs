//! `vista3d batch-report OUT_DIR`: the summary of one or many batch processes on one output folder, from the
//! JSONL logs they append in `<OUT_DIR>/.vista3d/` (one file per process) and the records beside the outputs.
//!
//! Each log line is one event of one item: `time`, `host`, `pid`, `worker` (`host:pid:worker`), `device`,
//! `input`, `relative`, `output`, `status` (`started`, `done`, `failed`, `skipped`, `completed`); `done` lines
//! add `seconds`, `stages` (seconds per stage), `method` (requested, used, fallbacks), `fallbacks` and
//! `device_idle` (seconds the worker's device waited for this item since its previous one); `failed`
//! lines add `error`; a `started` line that took over a stale claim adds `took_over`.
//!
//! An item (one output) is **done** when its record and label map exist (the record is the only "done" marker),
//! **failed** when its last finishing event failed and it has no record, **pending** otherwise (started but not
//! finished: running now, or its worker died).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::{json, Value};

/// The folder of the logs inside an output folder.
pub const LOG_DIR: &str = ".vista3d";

/// Errors of reading the logs.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0} is not a folder")]
    NotAFolder(PathBuf),
    #[error(
        "no batch logs in {0} (items-*.jsonl): was `vista3d batch` run with this output folder?"
    )]
    NoLogs(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: {message}")]
    BadLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// The final state of one item.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemState {
    Done,
    Failed(String),
    Pending,
}

/// One item (one output) as the logs and records tell it.
#[derive(Debug, Clone)]
pub struct ItemReport {
    pub output: PathBuf,
    pub input: String,
    pub relative: String,
    pub state: ItemState,
    /// How many times it was segmented (`done` events; 1 in a run where nothing was recomputed twice).
    pub segmented: usize,
    /// Seconds of its last segmentation.
    pub seconds: Option<f64>,
    /// The worker of its last segmentation.
    pub worker: Option<String>,
}

/// The summary of a batch output folder.
#[derive(Debug, Clone)]
pub struct BatchReport {
    /// Log files read (one per process).
    pub logs: usize,
    /// Items in output order.
    pub items: Vec<ItemReport>,
    /// Segmentations run (`done` events).
    pub segmentations: usize,
    /// Items found up to date (`skipped` and `completed` events).
    pub skipped: usize,
    /// Segmentations that needed a fallback of their method.
    pub fell_back: usize,
    /// Stale claims taken over.
    pub taken_over: usize,
    /// Seconds per stage summed over the segmentations.
    pub stage_seconds: BTreeMap<String, f64>,
    /// Seconds the workers' devices waited for their next item (reading, preprocessing and writing not
    /// overlapped with computing), summed over the segmentations.
    pub device_idle_seconds: f64,
    /// From the first `started` to the last `done` event, in seconds.
    pub wall_seconds: f64,
    /// Segmentations per worker.
    pub per_worker: BTreeMap<String, usize>,
}

impl BatchReport {
    pub fn count(&self, state: &ItemState) -> usize {
        self.items
            .iter()
            .filter(|i| std::mem::discriminant(&i.state) == std::mem::discriminant(state))
            .count()
    }

    pub fn failed(&self) -> impl Iterator<Item = (&ItemReport, &str)> {
        self.items.iter().filter_map(|i| match &i.state {
            ItemState::Failed(e) => Some((i, e.as_str())),
            _ => None,
        })
    }

    /// Segmentations per hour over the wall time of the logs (`None` without any).
    pub fn images_per_hour(&self) -> Option<f64> {
        (self.segmentations > 0 && self.wall_seconds > 0.0)
            .then(|| self.segmentations as f64 * 3600.0 / self.wall_seconds)
    }

    /// The `n` slowest items (by their last segmentation).
    pub fn slowest(&self, n: usize) -> Vec<&ItemReport> {
        let mut timed: Vec<&ItemReport> =
            self.items.iter().filter(|i| i.seconds.is_some()).collect();
        timed.sort_by(|a, b| {
            b.seconds
                .partial_cmp(&a.seconds)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        timed.truncate(n);
        timed
    }

    /// The summary as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "logs": self.logs,
            "items": self.items.len(),
            "done": self.count(&ItemState::Done),
            "failed": self.count(&ItemState::Failed(String::new())),
            "pending": self.count(&ItemState::Pending),
            "segmentations": self.segmentations,
            "skipped": self.skipped,
            "fell_back": self.fell_back,
            "taken_over": self.taken_over,
            "wall_seconds": self.wall_seconds,
            "images_per_hour": self.images_per_hour(),
            "stage_seconds": self.stage_seconds,
            "device_idle_seconds": self.device_idle_seconds,
            "per_worker": self.per_worker,
            "slowest": self.slowest(5).iter().map(|i| json!({
                "output": i.output.display().to_string(), "seconds": i.seconds, "worker": i.worker,
            })).collect::<Vec<_>>(),
            "failures": self.failed().map(|(i, e)| json!({
                "input": i.input, "output": i.output.display().to_string(), "error": e,
            })).collect::<Vec<_>>(),
            "item_states": self.items.iter().map(|i| json!({
                "output": i.output.display().to_string(),
                "state": match &i.state { ItemState::Done => "done", ItemState::Failed(_) => "failed", ItemState::Pending => "pending" },
                "segmented": i.segmented,
            })).collect::<Vec<_>>(),
        })
    }

    /// The summary as a table for the terminal.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let row = |t: &mut String, k: &str, v: String| t.push_str(&format!("{k:<28}{v}\n"));
        row(&mut t, "logs (processes)", self.logs.to_string());
        row(&mut t, "items", self.items.len().to_string());
        row(&mut t, "  done", self.count(&ItemState::Done).to_string());
        row(
            &mut t,
            "  failed",
            self.count(&ItemState::Failed(String::new())).to_string(),
        );
        row(
            &mut t,
            "  pending",
            self.count(&ItemState::Pending).to_string(),
        );
        row(&mut t, "segmentations run", self.segmentations.to_string());
        row(
            &mut t,
            "  with a method fallback",
            self.fell_back.to_string(),
        );
        row(&mut t, "skipped (up to date)", self.skipped.to_string());
        row(
            &mut t,
            "stale claims taken over",
            self.taken_over.to_string(),
        );
        row(&mut t, "wall time", format!("{:.1} s", self.wall_seconds));
        row(
            &mut t,
            "throughput",
            self.images_per_hour()
                .map_or("-".into(), |r| format!("{r:.0} images/hour")),
        );
        for (stage, s) in &self.stage_seconds {
            row(&mut t, &format!("  {stage} (sum)"), format!("{s:.1} s"));
        }
        row(
            &mut t,
            "  device idle (sum)",
            format!("{:.1} s", self.device_idle_seconds),
        );
        for (w, n) in &self.per_worker {
            row(&mut t, &format!("worker {w}"), format!("{n} segmented"));
        }
        let slow = self.slowest(5);
        if !slow.is_empty() {
            t.push_str("slowest:\n");
            for i in slow {
                t.push_str(&format!(
                    "  {:>8.1} s  {}\n",
                    i.seconds.unwrap_or_default(),
                    i.output.display()
                ));
            }
        }
        let failed: Vec<_> = self.failed().collect();
        if !failed.is_empty() {
            t.push_str("failed:\n");
            for (i, e) in failed {
                t.push_str(&format!("  {}: {e}\n", i.input));
            }
        }
        t
    }
}

fn time_of(line: &Value) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(line.get("time")?.as_str()?).ok()
}

/// Reads the logs of `output_dir` and checks each item's record.
pub fn read(output_dir: &Path) -> Result<BatchReport, ReportError> {
    if !output_dir.is_dir() {
        return Err(ReportError::NotAFolder(output_dir.to_path_buf()));
    }
    let dir = output_dir.join(LOG_DIR);
    let mut logs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    let n = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    n.starts_with("items-") && n.ends_with(".jsonl")
                })
                .collect()
        })
        .unwrap_or_default();
    logs.sort();
    if logs.is_empty() {
        return Err(ReportError::NoLogs(dir));
    }
    let mut events: Vec<(Option<SystemTime>, usize, Value)> = Vec::new();
    for path in &logs {
        let text = std::fs::read_to_string(path).map_err(|source| ReportError::Io {
            path: path.clone(),
            source,
        })?;
        let lines: Vec<&str> = text.lines().collect();
        for (n, l) in lines.iter().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(l) {
                Ok(v) => events.push((time_of(&v), events.len(), v)),
                // A process killed while appending leaves a cut last line; anything else is an error.
                Err(_) if n + 1 == lines.len() && !text.ends_with('\n') => {}
                Err(e) => {
                    return Err(ReportError::BadLine {
                        path: path.clone(),
                        line: n + 1,
                        message: e.to_string(),
                    })
                }
            }
        }
    }
    events.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut items: BTreeMap<String, ItemReport> = BTreeMap::new();
    let mut last_finish: BTreeMap<String, String> = BTreeMap::new();
    let mut report = BatchReport {
        logs: logs.len(),
        items: Vec::new(),
        segmentations: 0,
        skipped: 0,
        fell_back: 0,
        taken_over: 0,
        stage_seconds: BTreeMap::new(),
        device_idle_seconds: 0.0,
        wall_seconds: 0.0,
        per_worker: BTreeMap::new(),
    };
    let (mut first, mut last): (Option<SystemTime>, Option<SystemTime>) = (None, None);
    for (time, _, e) in &events {
        let s = |k: &str| {
            e.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let output = s("output");
        let item = items.entry(output.clone()).or_insert_with(|| ItemReport {
            output: PathBuf::from(&output),
            input: s("input"),
            relative: s("relative"),
            state: ItemState::Pending,
            segmented: 0,
            seconds: None,
            worker: None,
        });
        let status = s("status");
        match status.as_str() {
            "started" => {
                if let Some(t) = time {
                    first = Some(first.map_or(*t, |f| f.min(*t)));
                }
                if e.get("took_over").is_some() {
                    report.taken_over += 1;
                }
            }
            "done" => {
                report.segmentations += 1;
                item.segmented += 1;
                item.seconds = e.get("seconds").and_then(Value::as_f64);
                item.worker = Some(s("worker"));
                *report.per_worker.entry(s("worker")).or_default() += 1;
                if e.get("fallbacks").and_then(Value::as_u64).unwrap_or(0) > 0 {
                    report.fell_back += 1;
                }
                report.device_idle_seconds +=
                    e.get("device_idle").and_then(Value::as_f64).unwrap_or(0.0);
                if let Some(stages) = e.get("stages").and_then(Value::as_object) {
                    for (k, v) in stages {
                        *report.stage_seconds.entry(k.clone()).or_default() +=
                            v.as_f64().unwrap_or(0.0);
                    }
                }
                last = last.max(*time);
                last_finish.insert(output, status.clone());
            }
            "skipped" | "completed" => {
                report.skipped += 1;
                last_finish.insert(output, status.clone());
            }
            "failed" => {
                item.state = ItemState::Failed(s("error"));
                last_finish.insert(output, status.clone());
            }
            _ => {}
        }
    }
    if let (Some(a), Some(b)) = (first, last) {
        report.wall_seconds = b.duration_since(a).map_or(0.0, |d| d.as_secs_f64());
    }
    for (output, mut item) in items {
        let recorded = super::record::record_path(&item.output).is_file() && item.output.is_file();
        item.state = if recorded {
            ItemState::Done
        } else if last_finish.get(&output).map(String::as_str) == Some("failed") {
            item.state
        } else {
            ItemState::Pending
        };
        report.items.push(item);
    }
    Ok(report)
}

/// Writes a contact sheet of the items: each done item's preview (`<stem>_<postfix>.png`, from `batch
/// --preview`), failed items framed with their error, items without a preview empty. Returns the number of cells.
pub fn write_sheet(
    report: &BatchReport,
    path: &Path,
) -> Result<usize, crate::preview::PreviewError> {
    use crate::preview::{read_png, write_contact_sheet, SheetItem, SheetOptions};
    let cells: Vec<SheetItem> = report
        .items
        .iter()
        .map(|i| {
            let name = if i.relative.is_empty() {
                i.output.display().to_string()
            } else {
                i.relative.clone()
            };
            match &i.state {
                ItemState::Failed(e) => SheetItem::failed(name, e.clone()),
                ItemState::Pending => SheetItem::failed(name, "pending (not finished)"),
                ItemState::Done => match read_png(&super::preview_path(&i.output)) {
                    Ok(img) => SheetItem::ok(name, img),
                    Err(_) => SheetItem {
                        name,
                        image: None,
                        failure: None,
                    },
                },
            }
        })
        .collect();
    write_contact_sheet(path, &cells, &SheetOptions::default())?;
    Ok(cells.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_from_logs_and_records() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        std::fs::create_dir_all(out.join(LOG_DIR)).unwrap();
        let a = out.join("a/a_trans.nii.gz");
        std::fs::create_dir_all(a.parent().unwrap()).unwrap();
        std::fs::write(&a, b"x").unwrap();
        std::fs::write(out.join("a/a_trans.json"), b"{}").unwrap();
        let b = out.join("b/b_trans.nii.gz");
        let c = out.join("c/c_trans.nii.gz");
        let ev = |t: &str, o: &Path, status: &str, extra: Value| {
            let mut v = json!({"time": t, "output": o.display().to_string(), "input": "in", "status": status,
                               "worker": "h:1:0"});
            if let Value::Object(m) = extra {
                for (k, x) in m {
                    v[k] = x;
                }
            }
            v.to_string()
        };
        let log1 = [
            ev("2026-01-01T10:00:00.000Z", &a, "started", json!({})),
            ev(
                "2026-01-01T10:00:10.000Z",
                &a,
                "done",
                json!({"seconds": 10.0, "stages": {"inference": 8.0}, "fallbacks": 1, "device_idle": 0.5}),
            ),
            ev("2026-01-01T10:00:10.000Z", &b, "started", json!({})),
            ev(
                "2026-01-01T10:00:11.000Z",
                &b,
                "failed",
                json!({"error": "not a NIfTI file"}),
            ),
        ];
        let log2 = [
            ev("2026-01-01T10:00:05.000Z", &c, "started", json!({})),
            ev("2026-01-01T10:00:30.000Z", &a, "skipped", json!({})),
        ];
        std::fs::write(
            out.join(LOG_DIR).join("items-h-1-0.jsonl"),
            log1.join("\n") + "\n",
        )
        .unwrap();
        // The second process was killed while appending: a cut last line is ignored.
        std::fs::write(
            out.join(LOG_DIR).join("items-h-2-0.jsonl"),
            log2.join("\n") + "\n{\"time\": \"2",
        )
        .unwrap();
        let r = read(out).unwrap();
        assert_eq!(r.logs, 2);
        assert_eq!(r.count(&ItemState::Done), 1);
        assert_eq!(r.count(&ItemState::Pending), 1);
        let failed: Vec<_> = r.failed().collect();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].1, "not a NIfTI file");
        assert_eq!((r.segmentations, r.skipped, r.fell_back), (1, 1, 1));
        assert_eq!(r.wall_seconds, 10.0);
        assert_eq!(r.images_per_hour(), Some(360.0));
        assert_eq!(r.stage_seconds["inference"], 8.0);
        assert_eq!(r.device_idle_seconds, 0.5);
        let t = r.table();
        assert!(
            t.contains("not a NIfTI file") && t.contains("360 images/hour"),
            "{t}"
        );
        // A bad line in the middle is an error naming the file and line.
        std::fs::write(
            out.join(LOG_DIR).join("items-h-3-0.jsonl"),
            "nonsense\n{}\n",
        )
        .unwrap();
        let e = read(out).unwrap_err().to_string();
        assert!(e.contains("items-h-3-0.jsonl line 1"), "{e}");
        assert!(matches!(
            read(&out.join("nowhere")),
            Err(ReportError::NotAFolder(_))
        ));
    }
}
