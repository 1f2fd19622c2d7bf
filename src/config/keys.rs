//! The keys each kind of configuration knows, for rejecting unknown keys with a suggestion.
//!
//! Inference keys come from the typed [`super::InferenceConfig`] itself (serde's own list of field names, read
//! through a tiny introspecting deserializer), so the list can never drift from the struct. Training keys are the
//! bundle's `train.json` / `train_continual.json` / `evaluate.json` keys that `vista3d train` and `evaluate` read.

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// Keys of `vista3d train` / `vista3d evaluate` configurations (beyond the inference keys), with the known
/// sub-keys of their nested objects (`None`: any sub-key, e.g. dataset names in `label_mappings`).
pub const TRAINING_KEYS: &[(&str, Option<&[&str]>)] = &[
    ("bundle_root", Some(&[])),
    ("ckpt_dir", Some(&[])),
    ("data_list_file_path", Some(&[])),
    ("dataset_dir", Some(&[])),
    ("use_tensorboard", Some(&[])),
    ("finetune", Some(&[])),
    ("finetune_model_path", Some(&[])),
    ("finetune_strict", Some(&[])),
    ("early_stop", Some(&[])),
    ("early_stop_patience", Some(&[])),
    ("early_stop_min_delta", Some(&[])),
    ("fold", Some(&[])),
    ("seed", Some(&[])),
    // Multi-process runs (configs/multi_gpu_train.json, configs/mgpu_evaluate.json; src/distributed).
    ("dist_backend", Some(&[])),
    ("dist_timeout", Some(&[])),
    ("dist_heartbeat_timeout", Some(&[])),
    ("bucket_cap_mb", Some(&[])),
    ("epochs", Some(&[])),
    ("val_interval", Some(&[])),
    ("val_at_start", Some(&[])),
    ("sw_overlap", Some(&[])),
    ("learning_rate", Some(&[])),
    ("num_patches_per_image", Some(&[])),
    ("input_channels", Some(&[])),
    ("output_classes", Some(&[])),
    ("num_classes", Some(&[])),
    ("max_point", Some(&[])),
    ("max_prompt", Some(&[])),
    ("max_backprompt", Some(&[])),
    ("max_foreprompt", Some(&[])),
    ("drop_label_prob", Some(&[])),
    ("drop_point_prob", Some(&[])),
    ("exclude_background", Some(&[])),
    ("label_set", Some(&[])),
    ("val_label_set", Some(&[])),
    ("amp", Some(&[])),
    ("patch_size_valid", Some(&[])),
    ("encoder_embed_dim", Some(&[])),
    (
        "loss",
        Some(&[
            "include_background",
            "sigmoid",
            "smooth_dr",
            "smooth_nr",
            "squared_pred",
            "to_onehot_y",
            "lambda_dice",
            "lambda_ce",
        ]),
    ),
    ("optimizer", Some(&["weight_decay"])),
    (
        "lr_schedule",
        Some(&["activate", "warmup_steps", "warmup_multiplier"]),
    ),
    ("resample_to_spacing", Some(&[])),
    (
        "rand_intensity",
        Some(&["scale_prob", "scale_factors", "shift_prob", "shift_offsets"]),
    ),
    ("crop_ratios", Some(&[])),
    ("cache_cls_idx", Some(&["activate"])),
    ("label_mappings", None),
    ("n_train_samples", Some(&[])),
    ("n_val_samples", Some(&[])),
    ("num_workers", Some(&[])),
    ("train_dataset_cache_rate", Some(&[])),
    ("val_dataset_cache_rate", Some(&[])),
    ("num_cache_workers", Some(&[])),
    ("show_cache_progress", Some(&[])),
    ("val_head", Some(&[])),
    ("key_metric_filename", Some(&[])),
];

/// The field names serde knows for a struct `T` (`#[derive(Deserialize)]`), as the derive passes them to
/// `deserialize_struct`.
pub fn struct_fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Capture(Option<&'static [&'static str]>);
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field names captured")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> Deserializer<'de> for &mut Capture {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0 = Some(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut c = Capture(None);
    let _ = T::deserialize(&mut c);
    c.0.unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Example {
        alpha: i32,
        #[serde(rename = "beta_gamma")]
        beta: String,
    }

    #[test]
    fn fields_come_from_serde() {
        assert_eq!(struct_fields::<Example>(), &["alpha", "beta_gamma"]);
    }

    #[test]
    fn suggestions_catch_typos_and_nesting() {
        use crate::suggest::{closest, edit_distance};
        let keys = ["overlap", "patch_size", "input_dict#label_prompt", "epochs"];
        assert_eq!(closest("overlpa", keys).as_deref(), Some("overlap"));
        assert_eq!(
            closest("label_prompt", keys).as_deref(),
            Some("input_dict#label_prompt")
        );
        assert_eq!(
            closest("input_dict#lable_prompt", keys).as_deref(),
            Some("input_dict#label_prompt")
        );
        assert_eq!(closest("epoch", keys).as_deref(), Some("epochs"));
        assert_eq!(closest("completely_different", keys), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
