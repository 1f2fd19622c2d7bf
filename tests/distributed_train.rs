//! `vista3d train` and `vista3d evaluate` on two processes (gloo on the CPU, loopback), on the phantom demo of
//! models/README.md (width 8, 32^3 patches, 4 training and 2 validation phantoms):
//! - under `torchrun --no-python` (torchrun's agent store): the ranks stay identical (the trainer compares their
//!   parameters after every epoch), rank 0 writes the checkpoints and logs, and the validation Dice equals a
//!   single-process validation of the saved best checkpoint;
//! - started by hand with torchrun's variables and a different `ckpt_dir` / `output_dir` per rank: rank 1 writes
//!   nothing, `--resume` works for the group from rank 0's checkpoint, and one epoch plus a resumed one give the
//!   same weights as the two epochs under torchrun;
//! - `evaluate` on two processes writes files byte-identical to the single-process run;
//! - a killed rank (rank 1, then the store's host rank 0) ends the other with an error naming it within the test's
//!   short heartbeat timeout; ranks with different configurations refuse to start.

mod common;
use common::{model_tensors, output_text as text};

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The tests of this file start several processes each: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vista3d")
}

fn python() -> PathBuf {
    PathBuf::from(std::env::var_os("VISTA3D_PYTHON").expect(
        "VISTA3D_PYTHON (the project's Python with torch and nibabel, set by scripts/env.sh) is needed: run \
         `bash scripts/test.sh`",
    ))
}

fn work_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("distributed_train")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The six phantoms of models/prep_phantoms.py (made once per test run).
fn phantoms() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = work_dir("phantoms");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/prep_phantoms.py");
        let o = Command::new(python())
            .arg(&script)
            .arg("--out")
            .arg(&dir)
            .output()
            .expect("run models/prep_phantoms.py");
        assert!(
            o.status.success(),
            "prep_phantoms.py failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        dir
    })
    .clone()
}

/// The phantom demo's configuration (models/demo_phantom_train.json) made small and exactly resumable: 2 epochs,
/// constant learning rate, no class-index cache (its size depends on `epochs`), seed 123 (multi_gpu_train.json).
fn write_config(dir: &Path, extra: Value) -> PathBuf {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo_phantom_train.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(demo).unwrap()).unwrap();
    let p = phantoms();
    let set = json!({
        "data_list_file_path": p.join("datalist.json"),
        "dataset_dir": p,
        "ckpt_dir": dir.join("models"),
        "output_dir": dir.join("logs"),
        "device": "cpu",
        "seed": 123,
        "epochs": 2,
        "val_interval": 1,
        "val_at_start": false,
        "lr_schedule": {"activate": false},
        "cache_cls_idx": {"activate": false},
        "num_cache_workers": 1,
        "num_workers": 1,
        "dist_timeout": 300,
        "dist_heartbeat_timeout": 30,
    });
    for (k, v) in set
        .as_object()
        .unwrap()
        .iter()
        .chain(extra.as_object().unwrap())
    {
        cfg[k] = v.clone();
    }
    let path = dir.join("train.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    path
}

fn records(logs: &Path) -> Vec<Value> {
    std::fs::read_to_string(logs.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `vista3d ARGS` as rank `rank` of 2 with torchrun's variables; stdout and stderr go to files in `dir`.
fn spawn_rank(dir: &Path, rank: usize, port: u16, args: &[String]) -> Child {
    let log = |what: &str| File::create(dir.join(format!("rank{rank}.{what}"))).unwrap();
    Command::new(bin())
        .args(args)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(log("out")))
        .stderr(Stdio::from(log("err")))
        .spawn()
        .unwrap()
}

fn rank_log(dir: &Path, rank: usize) -> String {
    let read =
        |w: &str| std::fs::read_to_string(dir.join(format!("rank{rank}.{w}"))).unwrap_or_default();
    format!("{}{}", read("out"), read("err"))
}

/// Waits for a child until `deadline`; its exit code (`None` when it had to be killed).
fn wait_until(child: &mut Child, deadline: Instant) -> Option<i32> {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.code().unwrap_or(-1));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs two ranks to the end; panics with their logs unless both succeed.
fn run_pair(dir: &Path, args: [Vec<String>; 2]) {
    let port = free_port();
    let mut children: Vec<Child> = args
        .iter()
        .enumerate()
        .map(|(r, a)| spawn_rank(dir, r, port, a))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(900);
    for (r, c) in children.iter_mut().enumerate() {
        let code = wait_until(c, deadline);
        assert_eq!(
            code,
            Some(0),
            "rank {r} failed:\n--- rank 0:\n{}\n--- rank 1:\n{}",
            rank_log(dir, 0),
            rank_log(dir, 1)
        );
    }
}

fn train_args(cfg: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["train", "--config", cfg.to_str().unwrap(), "--threads", "1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn two_processes_train_the_phantom_demo() {
    let _serial = serial();
    let torchrun = python().with_file_name("torchrun");
    assert!(
        torchrun.is_file(),
        "{} not found: the torch wheel's torchrun is needed (scripts/env.sh installs torch)",
        torchrun.display()
    );

    // 1. torchrun, two epochs.
    let a = work_dir("torchrun");
    let cfg_a = write_config(&a, json!({}));
    let o = Command::new(&torchrun)
        .args(["--no-python", "--standalone", "--nproc_per_node=2", bin()])
        .args(train_args(&cfg_a, &[]))
        .env("RUST_LOG", "info")
        .output()
        .expect("run torchrun");
    let log = text(&o);
    assert!(o.status.success(), "torchrun failed:\n{log}");
    assert!(
        log.contains("torchrun's agent store"),
        "agent store used: {log}"
    );
    for epoch in 1..=2 {
        assert!(
            log.contains(&format!(
                "epoch {epoch}: parameters identical on all 2 ranks"
            )),
            "rank parameters compared after epoch {epoch}:\n{log}"
        );
    }
    let recs = records(&a.join("logs"));
    assert_eq!(recs.len(), 2, "{recs:?}");
    // 4 training phantoms on 2 ranks: 2 steps per epoch.
    assert_eq!(recs[1]["step"], 4, "{recs:?}");
    assert!(recs[1]["allreduce_seconds"].as_f64().unwrap() > 0.0);
    let best_dice = recs
        .iter()
        .filter_map(|r| r["val_dice"].as_f64())
        .fold(f64::NEG_INFINITY, f64::max);
    assert!((0.0..=1.0).contains(&best_dice), "{best_dice}");
    let best = a.join("models/model_finetune.pt");
    assert!(best.is_file() && a.join("models/last.safetensors").is_file());
    assert!(a.join("logs/training_curves.png").is_file());

    // 2. The validation Dice equals a single-process validation of the same checkpoint.
    let c = work_dir("single_validation");
    let cfg_c = write_config(
        &c,
        json!({"finetune": true, "finetune_model_path": best, "val_at_start": true, "epochs": 1}),
    );
    let o = Command::new(bin())
        .args(train_args(&cfg_c, &[]))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let first = &records(&c.join("logs"))[0];
    assert_eq!(first["epoch"], 0);
    assert_eq!(
        first["val_dice"].as_f64().unwrap(),
        best_dice,
        "single-process validation of the best checkpoint"
    );

    // 3. By hand, each rank with its own output folders: one epoch, then --resume to two.
    let b = work_dir("by_hand");
    let cfg_b = write_config(&b, json!({}));
    let rank_dirs = |r: usize| {
        let d = b.join(format!("r{r}"));
        vec![
            "--set".to_string(),
            format!("ckpt_dir={}", d.join("models").display()),
            "--set".to_string(),
            format!("output_dir={}", d.join("logs").display()),
        ]
    };
    let args = |r: usize, extra: &[&str]| {
        let mut a = train_args(&cfg_b, extra);
        a.extend(rank_dirs(r));
        a
    };
    run_pair(
        &b,
        [
            args(0, &["--set", "epochs=1"]),
            args(1, &["--set", "epochs=1"]),
        ],
    );
    assert!(b.join("r0/models/last.safetensors").is_file());
    assert!(!b.join("r1").exists(), "rank 1 wrote files");
    run_pair(&b, [args(0, &["--resume"]), args(1, &["--resume"])]);
    assert!(
        rank_log(&b, 1).contains("resuming from"),
        "rank 1 resumed from rank 0's checkpoint: {}",
        rank_log(&b, 1)
    );
    assert!(!b.join("r1").exists(), "rank 1 wrote files");
    assert_eq!(records(&b.join("r0/logs")).len(), 2);
    let straight = model_tensors(&a.join("models/last.safetensors"));
    let resumed = model_tensors(&b.join("r0/models/last.safetensors"));
    assert!(straight.len() > 200);
    let differing = straight
        .iter()
        .zip(&resumed)
        .filter(|(x, y)| x != y)
        .count();
    assert_eq!(
        differing, 0,
        "one epoch + --resume differs from two epochs under torchrun in {differing} tensors"
    );
}

#[test]
fn distributed_evaluate_writes_the_single_process_files() {
    let _serial = serial();
    // A checkpoint to evaluate: seeded random weights of width 8 (the files, not the Dice, are compared).
    let dir = work_dir("evaluate");
    let ckpt = dir.join("w8.safetensors");
    let o = Command::new(bin())
        .args(["init-checkpoint", "--width", "8", "--seed", "5", "--out"])
        .arg(&ckpt)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let cfg = write_config(&dir, json!({}));
    // Both validation phantoms and two training phantoms evaluated (fold 1 holds phantoms 0-3): 4 items, 2 each.
    let eval_args = |out: &Path| -> Vec<String> {
        [
            "evaluate",
            "--config",
            cfg.to_str().unwrap(),
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--set",
            "fold=1",
            "--set",
            "patch_size=[32,32,32]",
            "--output-dir",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let single = dir.join("single");
    let o = Command::new(bin())
        .args(eval_args(&single))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let multi = dir.join("multi");
    run_pair(&dir, [eval_args(&multi), eval_args(&multi)]);
    let files = |root: &Path| -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p.strip_prefix(root).unwrap().to_path_buf());
                }
            }
        }
        out.sort();
        out
    };
    let (fs, fm) = (files(&single), files(&multi));
    assert_eq!(fs, fm, "the same files");
    assert!(fs.iter().any(|f| f.ends_with("metrics.csv")), "{fs:?}");
    assert_eq!(
        fs.iter()
            .filter(|f| f.to_string_lossy().ends_with(".nii.gz"))
            .count(),
        4,
        "{fs:?}"
    );
    for f in &fs {
        let (a, b) = (
            std::fs::read(single.join(f)).unwrap(),
            std::fs::read(multi.join(f)).unwrap(),
        );
        if f.extension().is_some_and(|e| e == "json") {
            // A prediction's record: equal but for when it was made and how long it took.
            let strip = |bytes: &[u8], root: &Path| {
                let text = String::from_utf8_lossy(bytes).replace(root.to_str().unwrap(), "OUT");
                let mut v: Value = serde_json::from_str(&text).unwrap();
                let o = v.as_object_mut().unwrap();
                o.remove("created");
                o.remove("seconds");
                v
            };
            assert_eq!(
                strip(&a, &single),
                strip(&b, &multi),
                "record {}",
                f.display()
            );
            continue;
        }
        assert_eq!(
            a,
            b,
            "{} differs between the single-process and the 2-process evaluation",
            f.display()
        );
    }
    for r in 0..2 {
        assert!(
            rank_log(&dir, r).contains("evaluates 2 of 4 item(s)"),
            "{}",
            rank_log(&dir, r)
        );
    }
}

#[test]
fn a_dead_rank_ends_the_other_with_an_error_naming_it() {
    let _serial = serial();
    for victim in [1usize, 0] {
        let dir = work_dir(&format!("kill_rank{victim}"));
        let cfg = write_config(
            &dir,
            json!({"epochs": 1000, "val_interval": 1000, "dist_heartbeat_timeout": 8}),
        );
        let port = free_port();
        let args = train_args(&cfg, &[]);
        let mut ranks: Vec<Child> = (0..2).map(|r| spawn_rank(&dir, r, port, &args)).collect();
        // Training is under way once rank 0 has written the first epoch's checkpoint.
        let started = Instant::now();
        while !dir.join("models/last.safetensors").exists() {
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "training did not start:\n{}\n{}",
                rank_log(&dir, 0),
                rank_log(&dir, 1)
            );
            if let Some(status) = ranks[0].try_wait().unwrap() {
                panic!("rank 0 ended early ({status}):\n{}", rank_log(&dir, 0));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        ranks[victim].kill().unwrap();
        let _ = ranks[victim].wait();
        let killed_at = Instant::now();
        let survivor = 1 - victim;
        let code = wait_until(&mut ranks[survivor], killed_at + Duration::from_secs(60));
        let took = killed_at.elapsed();
        let log = rank_log(&dir, survivor);
        assert_eq!(
            code,
            Some(1),
            "rank {survivor} after rank {victim} was killed ({took:?}):\n{log}"
        );
        assert!(
            log.contains(&format!("rank {victim} (host")) && log.contains("error:"),
            "the error names rank {victim}:\n{log}"
        );
        assert!(!log.contains("panicked"), "{log}");
        println!(
            "rank {victim} killed: rank {survivor} ended in {:.1} s: {}",
            took.as_secs_f64(),
            log.lines()
                .filter(|l| l.contains("error"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
}

#[test]
fn ranks_with_different_configurations_refuse_to_start() {
    let _serial = serial();
    let dir = work_dir("mismatch");
    let cfg = write_config(&dir, json!({"dist_heartbeat_timeout": 10}));
    let port = free_port();
    let mut ranks = [
        spawn_rank(&dir, 0, port, &train_args(&cfg, &[])),
        spawn_rank(
            &dir,
            1,
            port,
            &train_args(&cfg, &["--set", "learning_rate=0.002"]),
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(120);
    for (r, c) in ranks.iter_mut().enumerate() {
        let code = wait_until(c, deadline);
        let log = rank_log(&dir, r);
        assert_eq!(code, Some(1), "rank {r}:\n{log}");
        assert!(
            log.contains("disagree on the configuration"),
            "rank {r}:\n{log}"
        );
    }
    assert!(!dir.join("models/last.safetensors").exists());

    // A rank that cannot set up its collectives (NCCL asked for on a CPU) ends the other with its error.
    let port = free_port();
    let mut ranks = [
        spawn_rank(&dir, 0, port, &train_args(&cfg, &[])),
        spawn_rank(
            &dir,
            1,
            port,
            &train_args(&cfg, &["--set", "dist_backend=\"nccl\""]),
        ),
    ];
    for (r, c) in ranks.iter_mut().enumerate() {
        let code = wait_until(c, Instant::now() + Duration::from_secs(120));
        let log = rank_log(&dir, r);
        assert_eq!(code, Some(1), "rank {r}:\n{log}");
        // Rank 0 names rank 1; rank 1 says what it could not do.
        let names_rank = r == 1 || log.contains("rank 1 (host");
        assert!(
            names_rank && log.contains("nccl needs CUDA devices"),
            "rank {r}:\n{log}"
        );
    }
}
