//! Configuration: JSON files with the bundle's key names, layered in order (`--config a.json --config b.json`),
//! then `--set key=value` overrides and command-line flags. Nested keys use MONAI's `#` separator
//! (`input_dict#label_prompt`).
//!
//! Every layer is checked as it is read, so an error can say which layer held the problem: an unknown key is an
//! error naming the key, its layer and the closest known key; a value of the wrong type is an error naming the
//! layer. The merged layers are then deserialized once into the typed [`InferenceConfig`] (inference, batch,
//! server, bench) and checked by its `validate()`; training keeps reading the merged value through the getters
//! of [`Config`] (its keys are checked the same way, see [`keys::TRAINING_KEYS`]).

pub mod inference;
pub mod keys;
mod source;

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

pub use inference::{FallbackPolicy, InferenceConfig, InputDict, ListItem, OutputFormat};
pub use source::{ConfigError, Origin};

/// The built-in defaults: `configs/inference.json`.
pub const DEFAULT_INFERENCE: &str = include_str!("../../configs/inference.json");

/// Which keys a configuration may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// `infer`, `batch`, `bench`, `serve`: the keys of [`InferenceConfig`].
    Inference,
    /// `train`, `evaluate`: the inference keys plus [`keys::TRAINING_KEYS`].
    Training,
}

/// Merges `overlay` into `base`: objects merge key by key, everything else is replaced.
pub fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// A layered configuration: the merged JSON of every layer read so far, each checked against its schema.
#[derive(Debug, Clone)]
pub struct Config {
    pub value: Value,
    schema: Schema,
}

impl Config {
    /// The built-in defaults (`configs/inference.json`) for `schema`.
    pub fn defaults(schema: Schema) -> Self {
        let value = serde_json::from_str(DEFAULT_INFERENCE)
            .unwrap_or_else(|e| panic!("built-in configs/inference.json is invalid: {e}"));
        Self { value, schema }
    }

    /// A training configuration (the superset schema): the built-in defaults, then each file in order, then
    /// each `key=value`.
    pub fn load(files: &[PathBuf], sets: &[String]) -> Result<Self, ConfigError> {
        Self::load_for(Schema::Training, files, sets)
    }

    /// The built-in defaults, then each file in order, then each `key=value`, for `schema`.
    pub fn load_for(
        schema: Schema,
        files: &[PathBuf],
        sets: &[String],
    ) -> Result<Self, ConfigError> {
        let mut cfg = Self::defaults(schema);
        for f in files {
            cfg.apply_file(f)?;
        }
        for s in sets {
            cfg.set(s)?;
        }
        Ok(cfg)
    }

    /// Which keys this configuration accepts.
    pub fn schema(&self) -> Schema {
        self.schema
    }

    /// Reads a JSON file as the next layer.
    pub fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let origin = Origin::File(path.to_path_buf());
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            origin: origin.clone(),
            source,
        })?;
        let layer: Value = serde_json::from_str(&text).map_err(|e| ConfigError::NotJson {
            origin: origin.clone(),
            detail: e.to_string(),
        })?;
        self.apply(layer, origin)
    }

    /// Applies one `key=value` (the value parsed as JSON, else taken as a string; `a#b` sets a nested key).
    pub fn set(&mut self, assignment: &str) -> Result<(), ConfigError> {
        let (key, raw) = assignment
            .split_once('=')
            .ok_or_else(|| ConfigError::BadSet(assignment.to_string()))?;
        let key = key.trim();
        if key.is_empty() || key.split('#').any(str::is_empty) {
            return Err(ConfigError::BadSet(assignment.to_string()));
        }
        let value: Value = serde_json::from_str(raw.trim())
            .unwrap_or_else(|_| Value::String(raw.trim().to_string()));
        self.apply(
            nested(key, value),
            Origin::Set(format!("{key}={}", raw.trim())),
        )
    }

    /// Sets `key` (`#`-separated) to `value` as a layer coming from a command-line flag.
    pub fn set_flag(
        &mut self,
        flag: &'static str,
        key: &str,
        value: Value,
    ) -> Result<(), ConfigError> {
        self.apply(nested(key, value), Origin::Flag(flag))
    }

    /// Checks `layer` against the schema (unknown keys, types, bundle expressions), then merges it.
    pub fn apply(&mut self, layer: Value, origin: Origin) -> Result<(), ConfigError> {
        if !layer.is_object() {
            return Err(ConfigError::NotJson {
                origin,
                detail: "the top level must be an object".into(),
            });
        }
        reject_expressions(&layer, "", &origin)?;
        let mut merged = self.value.clone();
        merge(&mut merged, layer);
        check(self.schema, &merged, &origin)?;
        self.value = merged;
        Ok(())
    }

    /// The typed inference settings of the merged layers, validated.
    pub fn inference(&self) -> Result<InferenceConfig, ConfigError> {
        let cfg: InferenceConfig =
            serde_json::from_value(self.value.clone()).map_err(|e| ConfigError::Invalid {
                origin: Origin::Builtin("merged configuration"),
                detail: e.to_string(),
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    /// A string value.
    pub fn string(&self, key: &str) -> anyhow::Result<Option<String>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| anyhow::anyhow!("config '{key}' must be a string, got {v}"))
            })
            .transpose()
    }

    /// A path value.
    pub fn path(&self, key: &str) -> anyhow::Result<Option<PathBuf>> {
        Ok(self.string(key)?.map(PathBuf::from))
    }

    /// A boolean value.
    pub fn bool(&self, key: &str) -> anyhow::Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| anyhow::anyhow!("config '{key}' must be true or false, got {v}"))
            })
            .transpose()
    }

    /// An integer value.
    pub fn int(&self, key: &str) -> anyhow::Result<Option<i64>> {
        self.get(key)
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| anyhow::anyhow!("config '{key}' must be an integer, got {v}"))
            })
            .transpose()
    }

    /// Sliding-window settings (`patch_size`, `overlap`, `mode`, `sw_batch_size`, `use_point_window`).
    pub fn window_settings(&self) -> anyhow::Result<crate::inference::WindowSettings> {
        Ok(self.inference()?.window())
    }
}

/// `{"a": {"b": value}}` for the key `a#b`.
fn nested(key: &str, value: Value) -> Value {
    key.rsplit('#').fold(value, |v, part| {
        let mut m = Map::new();
        m.insert(part.to_string(), v);
        Value::Object(m)
    })
}

/// MONAI bundle configs hold Python expressions (`"$..."`) and references (`"@..."`); ours must not.
fn reject_expressions(v: &Value, path: &str, origin: &Origin) -> Result<(), ConfigError> {
    match v {
        Value::String(s) if s.starts_with('$') || s.starts_with('@') => Err(ConfigError::Invalid {
            origin: origin.clone(),
            detail: format!(
                "key '{path}' holds a MONAI bundle expression ({s}); give the value itself (see configs/inference.json)"
            ),
        }),
        Value::Object(m) => m.iter().try_for_each(|(k, v)| {
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}#{k}")
            };
            reject_expressions(v, &p, origin)
        }),
        Value::Array(a) => a.iter().try_for_each(|v| reject_expressions(v, path, origin)),
        _ => Ok(()),
    }
}

/// Every known key path of `schema` (`a#b` for nested keys), for suggestions.
fn known_paths(schema: Schema) -> Vec<String> {
    let mut out: Vec<String> = keys::struct_fields::<InferenceConfig>()
        .iter()
        .map(|k| k.to_string())
        .collect();
    out.extend(
        keys::struct_fields::<InputDict>()
            .iter()
            .map(|k| format!("input_dict#{k}")),
    );
    if schema == Schema::Training {
        for (k, sub) in keys::TRAINING_KEYS {
            out.push(k.to_string());
            for s in sub.iter().flat_map(|s| s.iter()) {
                out.push(format!("{k}#{s}"));
            }
        }
    }
    out
}

/// Checks a merged configuration: types of the inference keys, and no key unknown to `schema`.
fn check(schema: Schema, merged: &Value, origin: &Origin) -> Result<(), ConfigError> {
    let mut unknown: Vec<String> = Vec::new();
    let de = merged.clone();
    let result: Result<InferenceConfig, _> =
        serde_ignored::deserialize(de, |path| unknown.push(ignored_path(&path)));
    if let Err(e) = result {
        return Err(ConfigError::Invalid {
            origin: origin.clone(),
            detail: e.to_string(),
        });
    }
    if schema == Schema::Training {
        unknown.retain(|path| !is_training_key(path));
        // Sub-keys of the training groups (`loss#smooth_nr`, ...): serde_ignored reports the group as a whole.
        for (key, subs) in keys::TRAINING_KEYS {
            if let (Some(list), Some(Value::Object(m))) = (subs, merged.get(*key)) {
                unknown.extend(
                    m.keys()
                        .filter(|k| !list.contains(&k.as_str()))
                        .map(|k| format!("{key}#{k}")),
                );
            }
        }
    }
    match unknown.into_iter().next() {
        None => Ok(()),
        Some(key) => {
            let known = known_paths(schema);
            Err(ConfigError::UnknownKey {
                suggestion: crate::suggest::closest(&key, known.iter().map(String::as_str)),
                key,
                origin: origin.clone(),
            })
        }
    }
}

/// True when `path` (`a` or `a#b...`) is a training key (or inside one whose sub-keys are free).
fn is_training_key(path: &str) -> bool {
    let mut parts = path.split('#');
    let top = parts.next().unwrap_or_default();
    let sub = parts.next();
    keys::TRAINING_KEYS.iter().any(|(k, subs)| {
        *k == top
            && match (sub, subs) {
                (None, _) | (Some(_), None) => true,
                (Some(s), Some(list)) => list.contains(&s),
            }
    })
}

/// A `serde_ignored` path as a `#`-separated key.
fn ignored_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    fn walk(p: &P<'_>, out: &mut Vec<String>) {
        match p {
            P::Root => {}
            P::Seq { parent, index } => {
                walk(parent, out);
                if let Some(last) = out.last_mut() {
                    last.push_str(&format!("[{index}]"));
                }
            }
            P::Map { parent, key } => {
                walk(parent, out);
                out.push(key.clone());
            }
            P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
                walk(parent, out)
            }
        }
    }
    let mut parts = Vec::new();
    walk(path, &mut parts);
    parts.join("#")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompts::LabelSpec;

    #[test]
    fn layers_and_sets_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.json");
        std::fs::write(
            &a,
            r#"{"overlap": 0.5, "patch_size": [64, 64, 64], "input_dict": {"label_prompt": [3]}}"#,
        )
        .unwrap();
        let cfg = Config::load_for(
            Schema::Inference,
            std::slice::from_ref(&a),
            &[
                "overlap=0.1".into(),
                "input_dict#label_prompt=[\"spleen\", 5]".into(),
            ],
        )
        .unwrap();
        let s = cfg.inference().unwrap();
        let w = s.window();
        assert_eq!((w.overlap, w.patch_size), (0.1, [64, 64, 64]));
        assert_eq!(
            s.input_dict.label_prompt.clone().unwrap(),
            vec![LabelSpec::Name("spleen".into()), LabelSpec::Id(5)]
        );
        assert_eq!(s.everything_labels.len(), 117);
        assert_eq!(s.subclass[&21].len(), 62);
        assert!(
            Config::load_for(Schema::Inference, &[], &["patch_size=[100,100,100]".into()])
                .unwrap()
                .inference()
                .is_err()
        );
        assert!(Config::load(&[], &["noequals".into()]).is_err());
        std::fs::write(&a, r#"{"overlap": "$0.3"}"#).unwrap();
        assert!(Config::load(std::slice::from_ref(&a), &[])
            .unwrap_err()
            .to_string()
            .contains("expression"));
    }

    #[test]
    fn unknown_keys_name_the_layer_and_the_closest_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("typo.json");
        std::fs::write(&f, r#"{"input_dict": {"lable_prompt": [3]}}"#).unwrap();
        let e = Config::load_for(Schema::Inference, std::slice::from_ref(&f), &[]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("'input_dict#lable_prompt'"), "{msg}");
        assert!(msg.contains("typo.json"), "{msg}");
        assert!(
            msg.contains("did you mean 'input_dict#label_prompt'"),
            "{msg}"
        );

        let e = Config::load_for(Schema::Inference, &[], &["label_prompt=[3]".into()]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("--set label_prompt=[3]"), "{msg}");
        assert!(
            msg.contains("did you mean 'input_dict#label_prompt'"),
            "{msg}"
        );

        // Training keys are unknown to inference, known to training; typos in nested training keys are caught.
        assert!(Config::load_for(Schema::Inference, &[], &["epochs=1".into()]).is_err());
        assert!(Config::load(&[], &["epochs=1".into()]).is_ok());
        let e = Config::load(&[], &["epoch=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean 'epochs'"), "{e}");
        let e = Config::load(&[], &["loss#smoth_nr=0".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean 'loss#smooth_nr'"), "{e}");
        assert!(Config::load(&[], &["label_mappings#my_dataset=[[1,3]]".into()]).is_ok());

        // Wrong types name the layer.
        let e = Config::load_for(Schema::Inference, &[], &["overlap=big".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--set overlap=big"), "{e}");
    }

    #[test]
    fn shipped_configs_are_clean() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        Config::load_for(Schema::Inference, &[root.join("batch_inference.json")], &[])
            .unwrap()
            .inference()
            .unwrap();
        for files in [
            vec!["train.json"],
            vec!["train.json", "train_continual.json"],
            vec!["train.json", "train_continual.json", "evaluate.json"],
        ] {
            let paths: Vec<PathBuf> = files.iter().map(|f| root.join(f)).collect();
            Config::load(&paths, &[]).unwrap();
        }
    }
}
