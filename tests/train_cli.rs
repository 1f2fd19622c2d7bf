//! `vista3d train` end to end on a tiny configuration (width 8, 32 x 32 x 16 patches, 6 mm spacing) with
//! TotalSegmentator's example CT: checkpoints, metrics files, the plot, `--resume` (which must continue exactly
//! as an uninterrupted run), MONAI loading the best checkpoint, and clear errors for bad datalists.

mod common;
use common::model_tensors;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

fn vista3d(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vista3d"))
        .args(args)
        .output()
        .expect("run vista3d")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn work_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("train_cli")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A complete training configuration in `dir` (datalist: the example CT as training and validation item).
fn write_config(dir: &Path, datalist: Value) -> PathBuf {
    let datalist_path = dir.join("datalist.json");
    std::fs::write(
        &datalist_path,
        serde_json::to_vec_pretty(&datalist).unwrap(),
    )
    .unwrap();
    let cfg = json!({
        "data_list_file_path": datalist_path,
        "dataset_dir": dir,
        "ckpt_dir": dir.join("models"),
        "output_dir": dir.join("logs"),
        "device": "cpu",
        "seed": 3,
        "encoder_embed_dim": 8,
        "epochs": 2,
        "val_interval": 1,
        "val_at_start": true,
        "learning_rate": 0.001,
        "lr_schedule": {"activate": false},
        "optimizer": {"weight_decay": 0.01},
        "loss": {"smooth_nr": 0.0001, "smooth_dr": 0.01},
        "max_point": 5,
        "drop_label_prob": 0.25,
        "drop_point_prob": 0.25,
        "exclude_background": true,
        "amp": true,
        "label_mappings": {"default": [[1, 3]]},
        "num_classes": 255,
        // Off: with it, the candidate patch centres depend on `epochs` (10 * epochs per class), which the
        // one-epoch-then-resume run below changes.
        "cache_cls_idx": {"activate": false},
        "patch_size": [32, 32, 16],
        "resample_to_spacing": [6.0, 6.0, 6.0],
        "num_patches_per_image": 1,
        "train_dataset_cache_rate": 1.0,
        "num_cache_workers": 1,
        "num_workers": 1,
        "key_metric_filename": "model_finetune.pt"
    });
    let path = dir.join("train.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    path
}

fn example_datalist() -> Value {
    let ct = common::data("totalsegmentator/example_ct_sm.nii.gz");
    let seg = common::data("totalsegmentator/example_seg.nii.gz");
    json!({"training": [
        {"image": ct, "label": seg, "fold": 1},
        {"image": ct, "label": seg, "fold": 0}
    ]})
}

fn train(cfg: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--config", cfg.to_str().unwrap(), "--threads", "2"];
    args.extend_from_slice(extra);
    vista3d(&args)
}

fn assert_success(o: &Output) {
    assert!(
        o.status.success(),
        "vista3d train failed: {}\n{}",
        stderr(o),
        String::from_utf8_lossy(&o.stdout)
    );
}

fn csv_epochs(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().to_string())
        .collect()
}

#[test]
fn trains_writes_results_and_resumes_exactly() {
    // Run A: one epoch, then --resume to two.
    let a = work_dir("resumed");
    let cfg_a = write_config(&a, example_datalist());
    let o = train(&cfg_a, &["--set", "epochs=1"]);
    assert_success(&o);
    let models = a.join("models");
    let logs = a.join("logs");
    assert!(
        models.join("model_finetune.pt").is_file(),
        "best checkpoint"
    );
    assert!(
        models.join("last.safetensors").is_file(),
        "resumable checkpoint"
    );
    assert_eq!(csv_epochs(&logs.join("metrics.csv")), vec!["0", "1"]);
    let header = std::fs::read_to_string(logs.join("metrics.csv")).unwrap();
    assert!(
        header.starts_with("epoch,step,loss,lr,val_dice,seconds"),
        "{header}"
    );
    let png = std::fs::read(logs.join("training_curves.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "plot is a PNG");

    let o = train(&cfg_a, &["--resume"]);
    assert_success(&o);
    assert!(
        stderr(&o).contains("resuming from"),
        "resume message: {}",
        stderr(&o)
    );
    assert_eq!(csv_epochs(&logs.join("metrics.csv")), vec!["0", "1", "2"]);
    let records: Vec<Value> = std::fs::read_to_string(logs.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3);
    assert_eq!(records[2]["epoch"], 2);
    assert_eq!(records[2]["step"], 2, "one step per epoch");
    assert!(records[2]["loss"].as_f64().unwrap().is_finite());
    let dice = records[2]["val_dice"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&dice), "val dice {dice}");

    // Nothing left to do: a clean exit.
    let o = train(&cfg_a, &["--resume"]);
    assert_success(&o);
    assert!(stderr(&o).contains("nothing to do"), "{}", stderr(&o));

    // Run B: two epochs in one go must give the same weights.
    let b = work_dir("straight");
    let cfg_b = write_config(&b, example_datalist());
    assert_success(&train(&cfg_b, &[]));
    let wa = model_tensors(&models.join("last.safetensors"));
    let wb = model_tensors(&b.join("models").join("last.safetensors"));
    assert_eq!(wa.len(), wb.len());
    assert!(wa.len() > 200);
    let differing: Vec<&String> = wa
        .iter()
        .zip(&wb)
        .filter(|(x, y)| x != y)
        .map(|(x, _)| &x.0)
        .collect();
    assert!(
        differing.is_empty(),
        "resumed run differs from the uninterrupted one in {} tensors, e.g. {:?}",
        differing.len(),
        differing.first()
    );

    // Finetuning from the best checkpoint: the validation before training reproduces its Dice.
    let best_dice = records
        .iter()
        .filter_map(|r| r["val_dice"].as_f64())
        .fold(f64::NEG_INFINITY, f64::max);
    let c = work_dir("finetune");
    let cfg_c = write_config(&c, example_datalist());
    let best = models.join("model_finetune.pt");
    let finetune_path = format!("finetune_model_path={}", best.display());
    let o = train(
        &cfg_c,
        &[
            "--set",
            "finetune=true",
            "--set",
            &finetune_path,
            "--set",
            "epochs=1",
        ],
    );
    assert_success(&o);
    assert!(stderr(&o).contains("finetuning from"), "{}", stderr(&o));
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(c.join("logs").join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["epoch"], 0);
    assert_eq!(first["val_dice"].as_f64().unwrap(), best_dice);

    // MONAI's vista3d132 loads the best checkpoint strictly.
    let python = std::env::var("VISTA3D_PYTHON").expect(
        "VISTA3D_PYTHON (python with monai, set by scripts/env.sh) is needed for this test",
    );
    let script = "import sys, torch\nfrom monai.networks.nets import vista3d132\n\
                  net = vista3d132(encoder_embed_dim=8, in_channels=1)\n\
                  sd = torch.load(sys.argv[1], weights_only=True)\n\
                  print(net.load_state_dict(sd, strict=True))\n";
    let o = Command::new(python)
        .args([
            "-c",
            script,
            models.join("model_finetune.pt").to_str().unwrap(),
        ])
        .output()
        .expect("run python");
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("All keys matched"),
        "MONAI could not load the checkpoint: {}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
}

fn assert_clean_failure(o: &Output, expect: &str, dir: &Path) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit code, stderr: {err}");
    assert!(err.contains("error:") && !err.contains("panicked"), "{err}");
    assert!(
        err.contains(expect),
        "message should mention '{expect}': {err}"
    );
    assert!(
        !dir.join("models").join("last.safetensors").exists(),
        "no checkpoint after a failure"
    );
}

#[test]
fn bad_datalists_and_resume_without_checkpoint_fail_clearly() {
    let dir = work_dir("bad");
    let cfg = write_config(&dir, example_datalist());
    std::fs::write(dir.join("datalist.json"), b"{\"training\": [ {\"image\": ").unwrap();
    assert_clean_failure(&train(&cfg, &[]), "datalist.json", &dir);

    let ct = common::data("totalsegmentator/example_ct_sm.nii.gz");
    let missing = json!({"training": [
        {"image": ct, "label": "no_such_label.nii.gz", "fold": 1},
        {"image": ct, "label": "no_such_label.nii.gz", "fold": 0}
    ]});
    let cfg = write_config(&dir, missing);
    assert_clean_failure(&train(&cfg, &[]), "no_such_label.nii.gz", &dir);

    let cfg = write_config(&dir, example_datalist());
    assert_clean_failure(&train(&cfg, &["--resume"]), "nothing to resume", &dir);
    assert_clean_failure(
        &train(&cfg, &["--set", "drop_label_prob=2"]),
        "drop_label_prob",
        &dir,
    );
}
