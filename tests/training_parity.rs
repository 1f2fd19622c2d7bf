//! One training step against MONAI (fixtures: tests/fixtures/make_training_fixtures.py, pip monai 1.6.1):
//! the network forward in training mode (no window: gaussian combination), the bundle trainer's per-prompt
//! DiceCE loss, the gradients of every parameter after backward, and AdamW's update.
//!
//! Tolerances: loss relative error <= 1e-5; gradients: max |rust - monai| / max |monai| <= 1e-3 per tensor
//! (selected tensors in full, every parameter through its squared L2 norm, and the same set of parameters
//! without a gradient); AdamW on MONAI's own gradients: parameters after 1 and 2 steps within 1e-6 of
//! the parameter scale.

mod common;

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use tch::{Device, Kind, Tensor};
use vista3d::checkpoint::read_checkpoint;
use vista3d::model::{to_tensor, ForwardArgs};
use vista3d::training::loss::{per_prompt_loss, DiceCeSettings};
use vista3d::training::optim::{AdamW, AdamWSettings};

fn load_case(dir: &Path, name: &str) -> HashMap<String, Tensor> {
    read_checkpoint(&dir.join(format!("{name}.safetensors")))
        .unwrap()
        .iter()
        .map(|(n, raw)| (n.to_string(), to_tensor(raw)))
        .collect()
}

fn max_rel(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size());
    let a = actual.to_kind(Kind::Double);
    let b = expected.to_kind(Kind::Double);
    let scale = b.abs().max().double_value(&[]);
    let diff = (&a - &b).abs().max().double_value(&[]);
    if scale > 0.0 {
        diff / scale
    } else {
        diff
    }
}

/// Runs one case; returns (loss rel. error, worst selected-gradient error, worst gradient-norm error,
/// worst AdamW error).
fn run_case(dir: &Path, manifest: &Value, name: &str) -> (f64, f64, f64, f64) {
    let spec = &manifest["cases"][name];
    let case = load_case(dir, name);
    let model = vista3d::load_model(
        &dir.join(manifest["weights"].as_str().unwrap()),
        Device::Cpu,
        &Default::default(),
    )
    .unwrap();
    let loss_settings = DiceCeSettings {
        smooth_nr: spec["loss"]["smooth_nr"].as_f64().unwrap(),
        smooth_dr: spec["loss"]["smooth_dr"].as_f64().unwrap(),
        ..Default::default()
    };
    let classes: Vec<i64> = Vec::try_from(case["prompt_class"].flatten(0, -1)).unwrap();
    let out = model
        .net
        .forward(
            &case["input"],
            &ForwardArgs {
                point_coords: case.get("points"),
                point_labels: case.get("point_labels"),
                class_vector: case.get("label_prompt"),
                ..Default::default()
            },
        )
        .unwrap();
    let logits_err = common::rel_error(&out.detach(), &case["logits"]).unwrap();
    assert!(
        logits_err <= 1e-4,
        "{name}: forward logits differ ({logits_err:e})"
    );
    let loss = per_prompt_loss(&out, &case["labels"], &classes, &loss_settings).unwrap();
    let expected_loss = case["loss"].double_value(&[0]);
    let loss_err = (loss.double_value(&[]) - expected_loss).abs() / expected_loss.abs();
    assert!(
        loss_err <= 1e-5,
        "{name}: loss {} vs MONAI {expected_loss}",
        loss.double_value(&[])
    );
    loss.backward();

    let vars = model.vs.variables();
    let names: Vec<String> = spec["parameter_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let norms: Vec<f64> = Vec::try_from(&case["grad_sq_norms"]).unwrap();
    let mut worst_norm = 0.0f64;
    let mut with_grad = 0;
    for (n, &expected) in names.iter().zip(&norms) {
        let g = vars[n].grad();
        let has = g.defined() && g.abs().sum(Kind::Double).double_value(&[]) > 0.0;
        if expected.is_nan() {
            assert!(
                !g.defined(),
                "{name}: {n} has a gradient in Rust but none in MONAI"
            );
            continue;
        }
        with_grad += 1;
        assert!(
            g.defined(),
            "{name}: {n} has no gradient in Rust but one in MONAI"
        );
        let got = g
            .to_kind(Kind::Double)
            .pow_tensor_scalar(2)
            .sum(Kind::Double)
            .double_value(&[]);
        let err = if expected > 0.0 {
            (got.sqrt() - expected.sqrt()).abs() / expected.sqrt()
        } else {
            got.sqrt()
        };
        assert!(
            err <= 1e-3,
            "{name}: gradient norm of {n}: {} vs MONAI {} (has {has})",
            got.sqrt(),
            expected.sqrt()
        );
        worst_norm = worst_norm.max(err);
    }
    assert!(
        with_grad > 100,
        "{name}: only {with_grad} parameters with gradients"
    );

    let selected: Vec<String> = spec["selected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let mut worst_grad = 0.0f64;
    for n in &selected {
        let err = max_rel(&vars[n].grad(), &case[&format!("grad.{n}")]);
        assert!(err <= 1e-3, "{name}: gradient of {n} differs: {err:e}");
        worst_grad = worst_grad.max(err);
    }

    // AdamW on MONAI's gradients, from MONAI's parameters: two steps with the same gradients.
    let mut opt = AdamW::new(AdamWSettings {
        lr: manifest["lr"].as_f64().unwrap(),
        weight_decay: manifest["weight_decay"].as_f64().unwrap(),
        ..Default::default()
    });
    let params: Vec<(String, Tensor)> = selected
        .iter()
        .map(|n| {
            let p = vars[n].shallow_clone();
            tch::no_grad(|| {
                p.shallow_clone().copy_(&case[&format!("param0.{n}")]);
                p.grad().copy_(&case[&format!("grad.{n}")]);
            });
            (n.clone(), p)
        })
        .collect();
    let mut worst_adam = 0.0f64;
    for step in 1..=2 {
        opt.step(&params);
        for (n, p) in &params {
            let expected = &case[&format!("param{step}.{n}")];
            let err = max_rel(&p.detach(), expected);
            assert!(err <= 1e-6, "{name}: {n} after AdamW step {step}: {err:e}");
            worst_adam = worst_adam.max(err);
        }
    }
    (loss_err, worst_grad, worst_norm, worst_adam)
}

#[test]
fn training_step_matches_monai() {
    tch::set_num_threads(2);
    let dir = common::fixtures("training", "manifest.json");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    for name in ["label_points", "points_only", "labels_only"] {
        let (l, g, n, a) = run_case(&dir, &manifest, name);
        println!(
            "{name}: loss rel {l:.2e}, selected gradients max rel {g:.2e}, gradient norms max rel {n:.2e}, AdamW max rel {a:.2e}"
        );
    }
}
