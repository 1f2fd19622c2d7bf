//! `vista3d batch` at scale on a real CT with the demo weights and small windows: several processes on one output
//! folder (claims), a worker killed mid-image (its stale claim taken over), static shards, and `batch-report`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{data, output_text as text};

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("batch_scale")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Small and fast: 6 mm resampling (about 3 s per image on the 2-vCPU dev VM; 3 mm takes 20 s under the
/// machine's usual load, too slow for 30 segmentations), 32^3 windows, demo weights, one thread per process.
const FAST: [&str; 7] = [
    "--demo-weights",
    "--set",
    "resample_spacing=[6,6,6]",
    "--set",
    "patch_size=[32,32,32]",
    "--threads",
    "1",
];

/// A folder of `n` copies of the small example CT (`ct_00.nii.gz`, ...).
fn inputs(name: &str, n: usize) -> PathBuf {
    let dir = tmp(name);
    let ct = data("totalsegmentator/example_ct_sm.nii.gz");
    for i in 0..n {
        std::fs::copy(&ct, dir.join(format!("ct_{i:02}.nii.gz"))).unwrap();
    }
    dir
}

fn batch_command(input: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vista3d"));
    c.args(["batch", "--input-dir"])
        .arg(input)
        .arg("--output-dir")
        .arg(out)
        .args(["--label-prompt", "3"])
        .args(FAST)
        .args(extra)
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT");
    c
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Every line of every process's item log.
fn log_lines(out: &Path) -> Vec<Value> {
    files_under(&out.join(".vista3d"))
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `done` lines per output.
fn done_per_output(lines: &[Value]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in lines.iter().filter(|l| l["status"] == "done") {
        *m.entry(l["output"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    m
}

/// The workers (`host:pid:worker`) of the `done` lines.
fn done_workers(lines: &[Value]) -> BTreeSet<&str> {
    lines
        .iter()
        .filter(|l| l["status"] == "done")
        .map(|l| l["worker"].as_str().unwrap())
        .collect()
}

/// Every label map of `maps` is byte for byte `reference` (what `what` wrote).
fn assert_each_equals(maps: &BTreeMap<PathBuf, Vec<u8>>, reference: &[u8], what: &str) {
    for (path, bytes) in maps {
        assert!(bytes == reference, "{} differs from {what}", path.display());
    }
}

/// The label maps (`*_trans.nii.gz`) under `out`, by their path relative to it, with their bytes.
fn label_maps(out: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_under(out)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with("_trans.nii.gz"))
        .map(|p| {
            (
                p.strip_prefix(out).unwrap().to_path_buf(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// Every file under `out` (outside the logs) is a label map with its record or a record with its label map:
/// no claims, no temporary files, nothing half written.
fn assert_only_finished_outputs(out: &Path) {
    for p in files_under(out) {
        if p.starts_with(out.join(".vista3d")) {
            continue;
        }
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".nii.gz") {
            assert!(
                p.with_file_name(format!("{stem}.json")).is_file(),
                "{} has no record",
                p.display()
            );
        } else if let Some(stem) = name.strip_suffix(".json") {
            assert!(
                p.with_file_name(format!("{stem}.nii.gz")).is_file(),
                "{} has no label map",
                p.display()
            );
        } else {
            panic!("unexpected file {}", p.display());
        }
    }
}

fn report_json(out: &Path) -> (Option<i32>, Value, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_vista3d"))
        .args(["batch-report", "--json"])
        .arg(out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let start = stdout.find('{').unwrap_or_else(|| panic!("{}", text(&o)));
    let v: Value =
        serde_json::from_str(&stdout[start..]).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    (o.status.code(), v, text(&o))
}

#[test]
fn three_processes_on_one_folder_segment_each_image_once_as_one_process_does() {
    let input = inputs("three_in", 12);
    // The images are copies of one CT, so one process's label map of that CT is every image's expected output.
    let single_in = inputs("three_single_in", 1);
    let single = tmp("three_single");
    let o = batch_command(&single_in, &single, &[]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let reference = label_maps(&single);
    assert_eq!(reference.len(), 1);
    let reference = reference.into_values().next().unwrap();

    let shared = tmp("three_shared");
    let children: Vec<Child> = (0..3)
        .map(|_| {
            batch_command(&input, &shared, &[])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for o in &outputs {
        assert!(o.status.success(), "{}", text(o));
    }
    // Every image segmented exactly once across the three logs, and by more than one process.
    let lines = log_lines(&shared);
    let done = done_per_output(&lines);
    assert_eq!(done.len(), 12, "{done:?}");
    assert!(done.values().all(|&n| n == 1), "{done:?}");
    let workers = done_workers(&lines);
    assert!(
        workers.len() >= 2,
        "one process did everything: {workers:?}"
    );
    for l in lines.iter().filter(|l| l["status"] == "done") {
        for stage in ["read", "inference", "write"] {
            assert!(l["stages"][stage].as_f64().is_some(), "{l}");
        }
        assert_eq!(l["device"], "cpu", "{l}");
        assert!(l["method"]["used"].is_array(), "{l}");
        assert!(l["host"].is_string(), "{l}");
    }
    // Byte for byte what one process wrote.
    let maps = label_maps(&shared);
    assert_eq!(maps.len(), 12);
    assert_each_equals(&maps, &reference, "the single-process run");
    assert_only_finished_outputs(&shared);

    // batch-report agrees with the records and the logs.
    let (code, r, t) = report_json(&shared);
    assert_eq!(code, Some(0), "{t}");
    let records = files_under(&shared)
        .iter()
        .filter(|p| p.to_string_lossy().ends_with("_trans.json"))
        .count();
    assert_eq!(r["done"], records as u64, "{r}");
    assert_eq!(r["items"], 12);
    assert_eq!(r["segmentations"], 12);
    assert_eq!(
        (r["failed"].as_u64(), r["pending"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(r["logs"], 3);
    let per_worker: u64 = r["per_worker"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(per_worker, 12);
    let slowest = &r["slowest"][0];
    let max_seconds = lines
        .iter()
        .filter_map(|l| l["seconds"].as_f64())
        .fold(0.0, f64::max);
    assert_eq!(slowest["seconds"].as_f64(), Some(max_seconds), "{r}");
    assert!(r["images_per_hour"].as_f64().unwrap() > 0.0);
}

#[test]
fn two_workers_with_prefetch_write_what_one_sequential_worker_writes() {
    // The reference: one worker, each item's stages one after another.
    let single_in = inputs("workers_single_in", 1);
    let single = tmp("workers_single");
    let o = batch_command(&single_in, &single, &["--no-prefetch"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let reference = label_maps(&single).into_values().next().unwrap();
    let single_lines = log_lines(&single);
    let idle = single_lines
        .iter()
        .find(|l| l["status"] == "done")
        .and_then(|l| l["device_idle"].as_f64());
    assert!(idle.is_some_and(|s| s > 0.0), "{single_lines:?}");

    // Two workers in one process, each a pipeline; one unreadable file among the images.
    let input = inputs("workers_in", 5);
    std::fs::write(input.join("ct_bad.nii.gz"), b"not a NIfTI file").unwrap();
    let out = tmp("workers_out");
    let o = batch_command(&input, &out, &["--workers", "2"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("ct_bad.nii.gz"), "{}", text(&o));
    let lines = log_lines(&out);
    let done = done_per_output(&lines);
    assert_eq!(done.len(), 5, "{done:?}");
    assert!(done.values().all(|&n| n == 1), "{done:?}");
    let workers = done_workers(&lines);
    assert_eq!(workers.len(), 2, "one worker did everything: {workers:?}");
    let mut idle_sum = 0.0;
    for l in lines.iter().filter(|l| l["status"] == "done") {
        let idle = l["device_idle"].as_f64();
        assert!(idle.is_some_and(|s| s >= 0.0), "{l}");
        idle_sum += idle.unwrap_or_default();
    }
    let failed: Vec<&Value> = lines.iter().filter(|l| l["status"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{lines:?}");
    assert!(
        failed[0]["input"]
            .as_str()
            .unwrap()
            .ends_with("ct_bad.nii.gz"),
        "{}",
        failed[0]
    );
    let maps = label_maps(&out);
    assert_eq!(maps.len(), 5, "{:?}", maps.keys());
    assert_each_equals(&maps, &reference, "the sequential single-worker run");
    assert_only_finished_outputs(&out);
    let (code, r, t) = report_json(&out);
    assert_eq!(code, Some(1), "{t}");
    assert_eq!(r["segmentations"], 5, "{r}");
    let reported = r["device_idle_seconds"].as_f64().unwrap();
    assert!(
        (reported - idle_sum).abs() < 1e-6,
        "{reported} vs {idle_sum}"
    );
}

#[test]
fn a_killed_workers_item_is_taken_over_and_redone_without_partial_outputs() {
    let input = inputs("kill_in", 2);
    std::fs::write(input.join("bad.nii.gz"), b"not a nifti file").unwrap();
    let out = tmp("kill_out");
    let mut victim = batch_command(&input, &out, &["--claim-timeout", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until it holds a claim on an image (mid-image), then SIGKILL it.
    let t0 = Instant::now();
    let claim = loop {
        let claims: Vec<PathBuf> = files_under(&out)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "claim"))
            .filter(|p| !p.to_string_lossy().contains("bad"))
            .collect();
        // Once its contents are written (they are a moment after the O_EXCL create).
        if let Some(c) = claims.first() {
            let written = std::fs::read_to_string(c)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .is_some();
            if written {
                break c.clone();
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no claim appeared");
        assert!(
            victim.try_wait().unwrap().is_none(),
            "the worker ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    let holder: Value = serde_json::from_str(&std::fs::read_to_string(&claim).unwrap()).unwrap();
    assert_eq!(holder["pid"], victim.id());
    assert!(holder["heartbeat"].is_string() && holder["host"].is_string());
    // Its item has no label map and no record: nothing half written.
    let item_out = claim.with_extension("nii.gz");
    assert!(!item_out.exists() && !claim.with_extension("json").exists());
    // With prefetch a worker also holds the claim of the item it prepares next: every claim it left is taken
    // over, and none of its items has an output.
    let held: BTreeSet<String> = files_under(&out)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "claim"))
        .map(|p| {
            assert!(!p.with_extension("json").exists(), "{}", p.display());
            p.with_extension("nii.gz").display().to_string()
        })
        .collect();
    assert!((1..=2).contains(&held.len()), "the victim held {held:?}");

    // A fresh worker with a short timeout takes the dead claim over and finishes the run.
    let o = batch_command(&input, &out, &["--claim-timeout", "2"])
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "bad.nii.gz fails: {t}");
    assert!(
        t.contains("stale claims taken over") && t.contains("1 failed"),
        "{t}"
    );
    assert!(item_out.is_file() && claim.with_extension("json").is_file());
    let lines = log_lines(&out);
    let took_over: Vec<&Value> = lines
        .iter()
        .filter(|l| l["took_over"].is_string())
        .collect();
    let taken: BTreeSet<String> = took_over
        .iter()
        .map(|l| l["output"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(took_over.len(), held.len(), "{lines:?}");
    assert_eq!(taken, held, "{lines:?}");
    assert!(taken.contains(&item_out.display().to_string()));
    let done = done_per_output(&lines);
    assert_eq!(done.len(), 2, "{done:?}");
    assert_only_finished_outputs(&out);
    assert!(!out.join("bad").exists());

    // The report: 2 done, the bad file failed with its error, nothing pending; exit status 1.
    let (code, r, t) = report_json(&out);
    assert_eq!(code, Some(1), "{t}");
    assert_eq!(
        (
            r["done"].as_u64(),
            r["failed"].as_u64(),
            r["pending"].as_u64()
        ),
        (Some(2), Some(1), Some(0)),
        "{r}"
    );
    assert_eq!(r["taken_over"], held.len() as u64);
    let failure = &r["failures"][0];
    assert!(
        failure["input"].as_str().unwrap().ends_with("bad.nii.gz"),
        "{r}"
    );
    assert!(!failure["error"].as_str().unwrap().is_empty());
    // The table names the failure too, and a contact sheet is written.
    let sheet = out.join("sheet.png");
    let o = Command::new(env!("CARGO_BIN_EXE_vista3d"))
        .args(["batch-report", "--contact-sheet"])
        .arg(&sheet)
        .arg(&out)
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("failed:") && t.contains("bad.nii.gz"), "{t}");
    assert!(std::fs::metadata(&sheet).unwrap().len() > 1000);
}

#[test]
fn static_shards_split_one_folder_between_processes() {
    use vista3d::batch::Shard;
    let input = inputs("shard_in", 4);
    let out = tmp("shard_out");
    let expected = |index| -> BTreeSet<PathBuf> {
        (0..4)
            .map(|i| format!("ct_{i:02}"))
            .filter(|stem| Shard { index, count: 2 }.holds(Path::new(&format!("{stem}.nii.gz"))))
            .map(|stem| PathBuf::from(format!("{stem}/{stem}_trans.nii.gz")))
            .collect()
    };
    // Shard 0 of 2 from the option, then shard 1 from a Slurm array's environment.
    let o = batch_command(&input, &out, &["--shard", "0/2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let first: BTreeSet<PathBuf> = label_maps(&out).into_keys().collect();
    assert_eq!(first, expected(0));
    let o = batch_command(&input, &out, &[])
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "2")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let all: BTreeSet<PathBuf> = label_maps(&out).into_keys().collect();
    assert_eq!(all.len(), 4);
    assert_eq!(
        all.difference(&first).cloned().collect::<BTreeSet<_>>(),
        expected(1)
    );
    let done = done_per_output(&log_lines(&out));
    assert!(done.values().all(|&n| n == 1), "{done:?}");
    // An Indexed Job index without --shards is refused before any work.
    let refused = tmp("shard_refused");
    let o = batch_command(&input, &refused, &[])
        .env("JOB_COMPLETION_INDEX", "0")
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0));
    assert!(text(&o).contains("--shards"), "{}", text(&o));
    assert!(files_under(&refused).is_empty());
}
