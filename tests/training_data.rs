//! The training data side on the real CT (TotalSegmentator's example_ct_sm + example_seg): datalist folds and
//! errors, the patch loader (shapes, relabelling to global ids, patches centred on present classes, runs
//! reproducible whatever the number of worker threads), validation samples, and `vista3d datalist`.

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::Array3;
use tch::{Kind, Tensor};
use vista3d::config::Config;
use vista3d::io::{read_nifti, write_nifti, OutputDtype};
use vista3d::training::data::{validation_samples, LabelMappings, TrainLoader};
use vista3d::training::datalist::load_datalist;

mod common;
use common::data;

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("training_data")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
}

/// Datalist: the real CT twice for training (fold 1) and once for validation (fold 0).
fn dataset(dir: &Path) -> PathBuf {
    let list = serde_json::json!({"training": [
        {"image": data("totalsegmentator/example_ct_sm.nii.gz"), "label": data("totalsegmentator/example_seg.nii.gz"), "fold": 1},
        {"image": data("totalsegmentator/example_ct_sm.nii.gz"), "label": data("totalsegmentator/example_seg.nii.gz"), "fold": 1},
        {"image": data("totalsegmentator/example_ct_sm.nii.gz"), "label": data("totalsegmentator/example_seg.nii.gz"), "fold": 0}
    ]});
    let p = dir.join("datalist.json");
    std::fs::write(&p, list.to_string()).unwrap();
    p
}

fn continual_config(list: &Path, sets: &[&str]) -> Config {
    let mut all = vec![
        format!("data_list_file_path={}", list.display()),
        "patch_size=[32,32,32]".into(),
        "resample_to_spacing=[4,4,4]".into(),
        "num_workers=3".into(),
    ];
    all.extend(sets.iter().map(|s| s.to_string()));
    Config::load(
        &[
            config_file("train.json"),
            config_file("train_continual.json"),
        ],
        &all,
    )
    .unwrap()
}

fn values(t: &Tensor) -> Vec<u8> {
    Vec::<u8>::try_from(t.flatten(0, -1)).unwrap()
}

#[test]
fn loader_makes_reproducible_relabelled_patches() {
    let dir = tmp("loader");
    let list = dataset(&dir);
    let cfg = continual_config(&list, &[]);
    let dl = load_datalist(&cfg).unwrap();
    assert_eq!((dl.training.len(), dl.validation.len()), (2, 1));
    let maps = LabelMappings::from_config(&cfg).unwrap();
    assert_eq!(maps.label_set(), vec![0, 3]);
    assert_eq!(maps.val_label_set(), vec![0, 1]);
    let mut loader = TrainLoader::new(&cfg, &dl.training, &maps, 0).unwrap();
    assert_eq!(
        loader.cached(),
        2,
        "train_dataset_cache_rate 1.0 caches everything"
    );
    assert_eq!(loader.settings().crop.num_classes, 255);
    assert!(
        loader.settings().intensity.is_none(),
        "continual learning has no intensity augmentation"
    );
    assert_eq!(loader.len(), 2);
    let seg = read_nifti(&data("totalsegmentator/example_seg.nii.gz")).unwrap();
    let present: Vec<u8> = {
        let c = vista3d::training::augment::class_counts(seg.volume.data.mapv(|v| v as u8).view());
        (0..256).filter(|&v| c[v] > 0).map(|v| v as u8).collect()
    };
    let mut epochs = Vec::new();
    for e in 0..3 {
        let patches: Vec<_> = loader.epoch(e).map(|s| s.unwrap()).collect();
        assert_eq!(patches.len(), 2);
        for p in &patches {
            assert_eq!(p.image.size(), vec![1, 32, 32, 32]);
            assert_eq!(p.label.size(), vec![1, 32, 32, 32]);
            assert_eq!(p.image.kind(), Kind::Float);
            assert_eq!(p.label.kind(), Kind::Uint8);
            let v = values(&p.label);
            // Relabeld 1 -> 3: no spleen voxel keeps its TotalSegmentator id; other ids unchanged.
            assert!(!v.contains(&1), "local id 1 left in a training patch");
            assert!(v.iter().all(|x| *x == 3 || present.contains(x)));
            let img = Vec::<f32>::try_from(p.image.flatten(0, -1)).unwrap();
            assert!(img.iter().all(|x| (0.0..=1.0).contains(x)));
        }
        epochs.push(patches);
    }
    // Same seed, one worker: identical patches; another epoch: different patches.
    let cfg1 = continual_config(&list, &["num_workers=1"]);
    let mut one = TrainLoader::new(&cfg1, &dl.training, &maps, 0).unwrap();
    for (e, patches) in epochs.iter().enumerate() {
        let again: Vec<_> = one.epoch(e).map(|s| s.unwrap()).collect();
        for (a, b) in again.iter().zip(patches) {
            assert!(
                a.image.equal(&b.image) && a.label.equal(&b.label),
                "epoch {e} not reproducible"
            );
        }
    }
    assert!(
        !(epochs[0][0].image.equal(&epochs[1][0].image)
            && epochs[0][1].image.equal(&epochs[1][1].image)),
        "two epochs gave the same patches"
    );
    // Dropping an epoch early stops its workers.
    let mut it = loader.epoch(7);
    assert!(it.next().unwrap().is_ok());
    drop(it);

    // Validation: whole images on the training grid (padded to the patch), valid_remap [[0, 0], [1, 1]].
    let val = validation_samples(&cfg, &dl.validation, &maps).unwrap();
    assert_eq!(val.len(), 1);
    let s = val[0].image.size();
    assert_eq!(val[0].label.size(), s);
    assert!(s[1] >= 32 && s[2] >= 32 && s[3] >= 32, "{s:?}");
    assert!(
        values(&val[0].label).contains(&1),
        "the spleen keeps its local id 1 for validation"
    );
}

#[test]
fn base_train_config_uses_intensity_augmentation_and_two_classes() {
    let dir = tmp("base");
    let list = dataset(&dir);
    let cfg = Config::load(
        &[config_file("train.json")],
        &[
            format!("data_list_file_path={}", list.display()),
            "patch_size=[32,32,32]".into(),
            "resample_to_spacing=[4,4,4]".into(),
        ],
    )
    .unwrap();
    let maps = LabelMappings::from_config(&cfg).unwrap();
    assert_eq!(maps.label_set(), vec![0, 1]);
    let dl = load_datalist(&cfg).unwrap();
    let mut loader = TrainLoader::new(&cfg, &dl.training, &maps, 5).unwrap();
    assert_eq!(loader.cached(), 0, "train.json uses a plain Dataset");
    assert_eq!(loader.settings().crop.num_classes, 2);
    assert!(loader.settings().intensity.is_some());
    // Centres are class 0 or 1 voxels; with num_classes 2 the patch always contains its centre's class.
    for s in loader.epoch(0) {
        let s = s.unwrap();
        let v = values(&s.label);
        assert!(v.contains(&0) || v.contains(&1));
    }
}

#[test]
fn datalist_errors_are_clear() {
    let dir = tmp("errors");
    let img = data("totalsegmentator/example_ct_sm.nii.gz");
    let write = |name: &str, v: serde_json::Value| {
        let p = dir.join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p
    };
    let load = |p: &Path| {
        let cfg = Config::load(&[], &[format!("data_list_file_path={}", p.display())]).unwrap();
        format!("{:#}", load_datalist(&cfg).unwrap_err())
    };
    let missing = write(
        "missing.json",
        serde_json::json!({"training": [
            {"image": img, "label": "nowhere/seg.nii.gz", "fold": 0},
            {"image": img, "label": "nowhere/seg.nii.gz", "fold": 1}]}),
    );
    let e = load(&missing);
    assert!(
        e.contains("do not exist") && e.contains("nowhere/seg.nii.gz"),
        "{e}"
    );
    let no_val = write(
        "noval.json",
        serde_json::json!({"training": [{"image": img, "label": img, "fold": 1}]}),
    );
    assert!(
        load(&no_val).contains("no validation items"),
        "{}",
        load(&no_val)
    );
    let e = load(&dir.join("absent.json"));
    assert!(e.contains("cannot read the datalist"), "{e}");

    // A label on another grid is rejected when the sample is prepared.
    let seg = read_nifti(&data("totalsegmentator/example_seg.nii.gz")).unwrap();
    let small = dir.join("small.nii.gz");
    write_nifti(
        &small,
        &Array3::zeros((5, 5, 5)),
        &seg.header,
        OutputDtype::Uint8,
    )
    .unwrap();
    let bad = write(
        "grid.json",
        serde_json::json!({"training": [
            {"image": img, "label": small, "fold": 0},
            {"image": img, "label": small, "fold": 1}]}),
    );
    let cfg = continual_config(&bad, &[]);
    let dl = load_datalist(&cfg).unwrap();
    let maps = LabelMappings::from_config(&cfg).unwrap();
    let e = format!(
        "{:#}",
        TrainLoader::new(&cfg, &dl.training, &maps, 0)
            .err()
            .unwrap()
    );
    assert!(e.contains("must share a grid"), "{e}");
}

#[test]
fn datalist_command_splits_and_folds() {
    let dir = tmp("cli");
    let seg = read_nifti(&data("totalsegmentator/example_seg.nii.gz")).unwrap();
    for d in ["images", "labels"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    for i in 0..11 {
        for d in ["images", "labels"] {
            let a = Array3::from_elem((3, 3, 3), i as f32);
            write_nifti(
                &dir.join(format!("{d}/case_{i:02}.nii.gz")),
                &a,
                &seg.header,
                OutputDtype::Uint8,
            )
            .unwrap();
        }
    }
    let run = |out: &Path, seed: &str| {
        Command::new(env!("CARGO_BIN_EXE_vista3d"))
            .args(["datalist", "--images"])
            .arg(dir.join("images"))
            .arg("--labels")
            .arg(dir.join("labels"))
            .arg("--out")
            .arg(out)
            .args(["--seed", seed])
            .output()
            .unwrap()
    };
    let out = dir.join("list.json");
    let o = run(&out, "0");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let training = doc["training"].as_array().unwrap();
    let testing = doc["testing"].as_array().unwrap();
    // int(0.8 * 11 + 0.5) = 9 training, 2 testing; 9 in 5 folds: 2, 2, 2, 2, 1
    assert_eq!((training.len(), testing.len()), (9, 2));
    let mut sizes = [0usize; 5];
    for t in training {
        sizes[t["fold"].as_u64().unwrap() as usize] += 1;
        let (i, l) = (t["image"].as_str().unwrap(), t["label"].as_str().unwrap());
        assert_eq!(Path::new(i).file_name(), Path::new(l).file_name());
        assert!(l.contains("labels"));
    }
    assert_eq!(sizes, [2, 2, 2, 2, 1]);
    let out2 = dir.join("list2.json");
    assert!(run(&out2, "0").status.success());
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&out2).unwrap(),
        "same seed, same file"
    );
    assert!(run(&out2, "1").status.success());
    assert_ne!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
    // The file is usable as is.
    let cfg = Config::load(
        &[],
        &[
            format!("data_list_file_path={}", out.display()),
            "fold=4".into(),
        ],
    )
    .unwrap();
    let dl = load_datalist(&cfg).unwrap();
    assert_eq!(
        (dl.training.len(), dl.validation.len(), dl.testing.len()),
        (8, 1, 2)
    );
    // An image without a label: error, no file.
    std::fs::remove_file(dir.join("labels/case_03.nii.gz")).unwrap();
    let out3 = dir.join("list3.json");
    let o = run(&out3, "0");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("case_03.nii.gz"));
    assert!(!out3.exists());
}
