//! One distributed training step against PyTorch's DistributedDataParallel (fixtures:
//! tests/fixtures/make_ddp_fixtures.py: torch.distributed with gloo, 2 processes on loopback,
//! `find_unused_parameters=True`, per-rank patches and prompts, DiceCE + AdamW on seeded weights).
//!
//! The test starts two copies of this test binary as rank 0 and rank 1 (`ddp_worker` below, with torchrun's
//! environment variables), each running vista3d's step: `trainer::forward_backward`, the gradient all-reduce
//! (`distributed::ddp::GradientReducer` over gloo with the TCPStore rendezvous), AdamW. Then it compares each rank
//! with PyTorch's rank. Tolerances are the single-process step's (tests/training_parity.rs): loss 1e-5 relative,
//! averaged gradients 1e-3 of their scale per tensor (selected tensors in full, every parameter through its norm,
//! and the same set of parameters without a gradient), parameters after the step 1e-6 of their scale. The two
//! ranks' parameters must be bit-identical.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tch::{Device, Kind, Tensor};
use vista3d::checkpoint::{read_checkpoint, write_safetensors, RawTensor};
use vista3d::distributed::ddp::{GradientReducer, LocalStep};
use vista3d::distributed::{DistSettings, LaunchEnv, ProcessGroup};
use vista3d::model::to_tensor;
use vista3d::training::loss::DiceCeSettings;
use vista3d::training::optim::{raw_f32, AdamW, AdamWSettings};
use vista3d::training::sampler::PromptPairs;
use vista3d::training::trainer::forward_backward;

const WORKER_OUT: &str = "VISTA3D_DDP_WORKER_OUT";

fn load(path: &Path) -> HashMap<String, Tensor> {
    read_checkpoint(path)
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

fn manifest(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

/// One rank of the 2-process step (started by `ddp_step_matches_pytorch` with torchrun's variables). Does
/// nothing when run on its own.
#[test]
#[ignore = "a worker process of ddp_step_matches_pytorch"]
fn ddp_worker() {
    let Some(out) = std::env::var_os(WORKER_OUT).map(PathBuf::from) else {
        eprintln!("ddp_worker runs only as a process of ddp_step_matches_pytorch");
        return;
    };
    tch::set_num_threads(1);
    let dir = common::fixtures("ddp", "manifest.json");
    let manifest = manifest(&dir);
    let env = LaunchEnv::from_env().unwrap().expect("torchrun variables");
    let rank = env.rank;
    let settings = DistSettings {
        timeout: Duration::from_secs(120),
        heartbeat_timeout: Duration::from_secs(30),
        ..DistSettings::default()
    };
    let group = ProcessGroup::init(env, settings, Device::Cpu).unwrap();
    let case = load(&dir.join(format!("rank{rank}.safetensors")));
    let model = vista3d::load_model(
        &dir.join(manifest["weights"].as_str().unwrap()),
        Device::Cpu,
        &vista3d::LoadOptions::default(),
    )
    .unwrap();
    // The trainable parameters, sorted by name (what the trainer reduces and steps).
    let mut vars: Vec<(String, Tensor)> = model
        .vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let parameter_names = names(&manifest["parameter_names"]);
    let label_prompt = case["label_prompt"].shallow_clone();
    let pairs = PromptPairs {
        label_prompt: Some(label_prompt.shallow_clone()),
        points: case.get("points").map(Tensor::shallow_clone),
        point_labels: case.get("point_labels").map(Tensor::shallow_clone),
        classes: Vec::try_from(label_prompt.flatten(0, -1)).unwrap(),
        prompt_class: label_prompt,
    };
    let loss_settings = DiceCeSettings {
        smooth_nr: manifest["loss"]["smooth_nr"].as_f64().unwrap(),
        smooth_dr: manifest["loss"]["smooth_dr"].as_f64().unwrap(),
        ..Default::default()
    };
    let loss = forward_backward(
        &model.net,
        &case["input"],
        &case["labels"],
        &pairs,
        &loss_settings,
        None,
    )
    .unwrap();
    let reducer = GradientReducer::new(&vars, 25.0);
    let global = reducer
        .reduce(
            &group,
            LocalStep {
                loss: Some(loss),
                stop: false,
            },
        )
        .unwrap();
    assert_eq!(global.contributors, 2);
    let mut results: Vec<(String, RawTensor)> = vec![(
        "loss".into(),
        RawTensor::new(
            vista3d::checkpoint::DType::F64,
            vec![1],
            loss.to_le_bytes().to_vec(),
        )
        .unwrap(),
    )];
    let sq_norm = |t: &Tensor| {
        t.to_kind(Kind::Double)
            .pow_tensor_scalar(2)
            .sum(Kind::Double)
            .double_value(&[])
    };
    let by_name: HashMap<&str, &Tensor> = vars.iter().map(|(n, t)| (n.as_str(), t)).collect();
    // In the order of PyTorch's parameter names.
    let grad_norms: Vec<f64> = parameter_names
        .iter()
        .map(|n| {
            let g = by_name[n.as_str()].grad();
            if g.defined() {
                sq_norm(&g)
            } else {
                f64::NAN
            }
        })
        .collect();
    results.push(("grad_sq_norms_f64".into(), raw_f64(&grad_norms)));
    let selected = names(&manifest["selected"]);
    for n in &selected {
        results.push((
            format!("grad.{n}"),
            raw_f32(&by_name[n.as_str()].grad()).unwrap(),
        ));
    }
    let mut opt = AdamW::new(AdamWSettings {
        lr: manifest["lr"].as_f64().unwrap(),
        weight_decay: manifest["weight_decay"].as_f64().unwrap(),
        ..Default::default()
    });
    opt.step(&vars);
    for n in &selected {
        results.push((format!("param1.{n}"), raw_f32(by_name[n.as_str()]).unwrap()));
    }
    let param_norms: Vec<f64> = parameter_names
        .iter()
        .map(|n| sq_norm(by_name[n.as_str()]))
        .collect();
    results.push(("param1_sq_norms".into(), raw_f64(&param_norms)));
    for (n, p) in &vars {
        results.push((format!("all.{n}"), raw_f32(p).unwrap()));
    }
    write_safetensors(&out.join(format!("rank{rank}.safetensors")), &results, None).unwrap();
    group.finish().unwrap();
}

fn raw_f64(values: &[f64]) -> RawTensor {
    RawTensor::new(
        vista3d::checkpoint::DType::F64,
        vec![values.len()],
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
    .unwrap()
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_worker(rank: usize, port: u16, out: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "ddp_worker", "--ignored", "--nocapture"])
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env(WORKER_OUT, out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a child with a deadline; its exit status and output.
fn wait_with_deadline(mut child: Child, deadline: Instant) -> (bool, String) {
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            let o = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            return (o.status.success(), text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            return (
                false,
                format!(
                    "timed out\n{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ddp_step_matches_pytorch() {
    let dir = common::fixtures("ddp", "manifest.json");
    let manifest = manifest(&dir);
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("distributed_ddp");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let port = free_port();
    let workers: Vec<Child> = (0..2).map(|r| spawn_worker(r, port, &out)).collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    for (r, w) in workers.into_iter().enumerate() {
        let (ok, text) = wait_with_deadline(w, deadline);
        assert!(ok, "rank {r} failed:\n{text}");
    }

    let parameter_names = names(&manifest["parameter_names"]);
    let selected = names(&manifest["selected"]);
    let mut ours: Vec<HashMap<String, Tensor>> = Vec::new();
    for rank in 0..2 {
        let expected = load(&dir.join(format!("rank{rank}.safetensors")));
        let got = load(&out.join(format!("rank{rank}.safetensors")));
        // The rank's own loss.
        let (l, e) = (
            got["loss"].double_value(&[0]),
            expected["loss"].double_value(&[0]),
        );
        let loss_err = (l - e).abs() / e.abs();
        assert!(loss_err <= 1e-5, "rank {rank}: loss {l} vs PyTorch {e}");
        // Averaged gradients: the same parameters have one, with the same values.
        let norms: Vec<f64> = Vec::try_from(&expected["grad_sq_norms"]).unwrap();
        let got_norms: Vec<f64> = Vec::try_from(&got["grad_sq_norms_f64"]).unwrap();
        assert_eq!(norms.len(), parameter_names.len());
        let mut worst_norm = 0.0f64;
        for ((n, &e), &g) in parameter_names.iter().zip(&norms).zip(&got_norms) {
            assert_eq!(
                e.is_nan(),
                g.is_nan(),
                "rank {rank}: {n} has a gradient in one implementation only"
            );
            if e.is_nan() {
                continue;
            }
            let err = if e > 0.0 {
                (g.sqrt() - e.sqrt()).abs() / e.sqrt()
            } else {
                g.sqrt()
            };
            assert!(err <= 1e-3, "rank {rank}: gradient norm of {n}: {err:e}");
            worst_norm = worst_norm.max(err);
        }
        let mut worst_grad = 0.0f64;
        let mut worst_param = 0.0f64;
        for n in &selected {
            let err = max_rel(&got[&format!("grad.{n}")], &expected[&format!("grad.{n}")]);
            assert!(
                err <= 1e-3,
                "rank {rank}: averaged gradient of {n}: {err:e}"
            );
            worst_grad = worst_grad.max(err);
            let err = max_rel(
                &got[&format!("param1.{n}")],
                &expected[&format!("param1.{n}")],
            );
            assert!(
                err <= 1e-6,
                "rank {rank}: {n} after the AdamW step: {err:e}"
            );
            worst_param = worst_param.max(err);
        }
        let pn: Vec<f64> = Vec::try_from(&expected["param1_sq_norms"]).unwrap();
        let gn: Vec<f64> = Vec::try_from(&got["param1_sq_norms"]).unwrap();
        let mut worst_pnorm = 0.0f64;
        for ((n, &e), &g) in parameter_names.iter().zip(&pn).zip(&gn) {
            let err = (g.sqrt() - e.sqrt()).abs() / e.sqrt().max(1e-12);
            assert!(
                err <= 1e-6,
                "rank {rank}: norm of {n} after the step: {err:e}"
            );
            worst_pnorm = worst_pnorm.max(err);
        }
        println!(
            "rank {rank}: loss rel {loss_err:.2e}, averaged gradients max rel {worst_grad:.2e}, gradient norms max \
             rel {worst_norm:.2e}, parameters after AdamW max rel {worst_param:.2e}, parameter norms max rel \
             {worst_pnorm:.2e}"
        );
        ours.push(got);
    }
    // The ranks hold bit-identical parameters after the step.
    let mut compared = 0;
    for n in &parameter_names {
        let k = format!("all.{n}");
        let (a, b) = (&ours[0][&k], &ours[1][&k]);
        assert!(
            a.equal(b),
            "parameter {n} differs between rank 0 and rank 1 after the step"
        );
        compared += 1;
    }
    assert_eq!(compared, parameter_names.len());
}
