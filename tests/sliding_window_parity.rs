//! The sliding-window inferer against MONAI's `sliding_window_inference` with settings other than the bundle's:
//! gaussian blending, overlap 0.5, batches of 2 and 3 windows, replicate padding of an axis smaller than the roi.

mod common;

use tch::Device;
use vista3d::checkpoint::read_checkpoint;
use vista3d::inference::window::BlendMode;
use vista3d::inference::{infer_labels, infer_logits, NetworkPrompts, WindowSettings};
use vista3d::model::to_tensor;

#[test]
fn sliding_window_matches_monai_in_gaussian_and_batched_modes() {
    let dir = common::fixtures("network", "manifest.json");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let model = vista3d::load_model(
        &dir.join("weights_e16.pt"),
        Device::Cpu,
        &Default::default(),
    )
    .unwrap();
    let cases = manifest["sliding_window"]
        .as_array()
        .expect("sliding-window cases in the manifest");
    assert!(!cases.is_empty());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let t = read_checkpoint(&dir.join(format!("{name}.safetensors"))).unwrap();
        let input = to_tensor(t.get("input").unwrap());
        let cv = to_tensor(t.get("class_vector").unwrap());
        let ids: Vec<i64> = Vec::try_from(cv.flatten(0, -1)).unwrap();
        let prompts = NetworkPrompts {
            class_vector: Some(cv.shallow_clone()),
            prompt_class: Some(cv.shallow_clone()),
            point_coords: None,
            point_labels: None,
            label_prompt: Some(ids),
            points: Vec::new(),
        };
        let roi = case["roi"].as_u64().unwrap() as usize;
        let settings = WindowSettings {
            patch_size: [roi; 3],
            overlap: case["overlap"].as_f64().unwrap(),
            mode: case["mode"].as_str().unwrap().parse::<BlendMode>().unwrap(),
            sw_batch_size: case["sw_batch_size"].as_u64().unwrap() as usize,
            use_point_window: false,
            ..WindowSettings::default()
        };
        let logits = infer_logits(&model.net, &input, &prompts, &settings).unwrap();
        let expected = to_tensor(t.get("logits").unwrap()).squeeze_dim(0);
        let err = common::rel_error(&logits, &expected).unwrap_or_else(|e| panic!("{name}: {e}"));
        println!("{name}: relative error {err:.1e}");
        assert!(err <= 1e-4, "{name}: relative error {err:e}");
        // The network's output in slabs along x (as "everything" runs at 128^3), here one voxel thick: the same
        // logits and labels bit for bit.
        let slabs = WindowSettings {
            window_output_bytes: 1,
            ..settings.clone()
        };
        let sliced = infer_logits(&model.net, &input, &prompts, &slabs).unwrap();
        assert!(sliced.equal(&logits), "{name}: logits made in slabs differ");
        let labels = infer_labels(&model.net, &input, &prompts, &settings).unwrap();
        let sliced = infer_labels(&model.net, &input, &prompts, &slabs).unwrap();
        assert!(sliced.equal(&labels), "{name}: labels made in slabs differ");
    }
}
