//! JSON configuration with the bundle's key names, layered in order (`--config a.json --config b.json`),
//! with `--set key=value` overrides last. Nested keys use MONAI's `#` separator (`input_dict#label_prompt`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};

use crate::inference::window::BlendMode;
use crate::inference::WindowSettings;
use crate::io::OutputDtype;
use crate::prompts::{LabelSpec, RequestPrompts};

/// The built-in defaults: `configs/inference.json`.
pub const DEFAULT_INFERENCE: &str = include_str!("../configs/inference.json");

/// Merges `overlay` into `base`: objects merge key by key, everything else is replaced.
fn merge(base: &mut Value, overlay: Value) {
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

/// A layered configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub value: Value,
}

impl Config {
    /// The built-in defaults, then each file in order, then each `key=value`.
    pub fn load(files: &[PathBuf], sets: &[String]) -> Result<Self> {
        let mut value: Value =
            serde_json::from_str(DEFAULT_INFERENCE).context("built-in configs/inference.json")?;
        for f in files {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read config {}", f.display()))?;
            let layer: Value = serde_json::from_str(&text)
                .with_context(|| format!("config {} is not valid JSON", f.display()))?;
            ensure!(
                layer.is_object(),
                "config {} must be a JSON object",
                f.display()
            );
            merge(&mut value, layer);
        }
        let mut cfg = Self { value };
        for s in sets {
            cfg.set(s)?;
        }
        cfg.reject_expressions()?;
        Ok(cfg)
    }

    /// Applies one `key=value` (value parsed as JSON, else taken as a string; `a#b` sets a nested key).
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (key, raw) = assignment.split_once('=').with_context(|| {
            format!("--set '{assignment}' must be key=value, e.g. --set overlap=0.5")
        })?;
        let key = key.trim();
        ensure!(!key.is_empty(), "--set '{assignment}': empty key");
        let v: Value = serde_json::from_str(raw.trim())
            .unwrap_or_else(|_| Value::String(raw.trim().to_string()));
        let mut node = &mut self.value;
        let parts: Vec<&str> = key.split('#').collect();
        for (i, part) in parts.iter().enumerate() {
            let obj = node
                .as_object_mut()
                .with_context(|| format!("--set {key}: '{part}' is inside a non-object"))?;
            if i + 1 == parts.len() {
                obj.insert(part.to_string(), v);
                return Ok(());
            }
            node = obj
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
        }
        Ok(())
    }

    /// MONAI bundle configs hold Python expressions (`"$..."`) and references (`"@..."`); ours must not.
    fn reject_expressions(&self) -> Result<()> {
        fn walk(v: &Value, path: &str) -> Result<()> {
            match v {
                Value::String(s) if s.starts_with('$') || s.starts_with('@') => bail!(
                    "config key '{path}' holds a MONAI bundle expression ({s}); give the value itself (see configs/inference.json)"
                ),
                Value::Object(m) => m.iter().try_for_each(|(k, v)| walk(v, &format!("{path}{}{k}", if path.is_empty() { "" } else { "#" }))),
                Value::Array(a) => a.iter().try_for_each(|v| walk(v, path)),
                _ => Ok(()),
            }
        }
        walk(&self.value, "")
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    fn f64_of(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .with_context(|| format!("config '{key}' must be a number, got {v}"))
            })
            .transpose()
    }

    fn usize3(&self, key: &str) -> Result<Option<[usize; 3]>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let err = || {
            format!("config '{key}' must be three positive integers like [128, 128, 128], got {v}")
        };
        if let Some(n) = v.as_u64() {
            return Ok(Some([n as usize; 3]));
        }
        let a = v.as_array().with_context(err)?;
        ensure!(a.len() == 3, "{}", err());
        let n: Vec<usize> = a
            .iter()
            .map(|x| x.as_u64().map(|n| n as usize))
            .collect::<Option<_>>()
            .with_context(err)?;
        ensure!(n.iter().all(|&x| x > 0), "{}", err());
        Ok(Some([n[0], n[1], n[2]]))
    }

    /// Where and how label maps are written: `output_dir` (default `eval`), `output_postfix` (default
    /// `trans`) and `output_dtype` (default `float32`).
    pub fn output_settings(&self) -> Result<(PathBuf, String, OutputDtype)> {
        Ok((
            self.path("output_dir")?
                .unwrap_or_else(|| PathBuf::from("eval")),
            self.string("output_postfix")?
                .unwrap_or_else(|| "trans".into()),
            self.string("output_dtype")?
                .as_deref()
                .unwrap_or("float32")
                .parse()?,
        ))
    }

    /// A string value.
    pub fn string(&self, key: &str) -> Result<Option<String>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("config '{key}' must be a string, got {v}"))
            })
            .transpose()
    }

    /// A path value.
    pub fn path(&self, key: &str) -> Result<Option<PathBuf>> {
        Ok(self.string(key)?.map(PathBuf::from))
    }

    /// A boolean value.
    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .with_context(|| format!("config '{key}' must be true or false, got {v}"))
            })
            .transpose()
    }

    /// An integer value.
    pub fn int(&self, key: &str) -> Result<Option<i64>> {
        self.get(key)
            .map(|v| {
                v.as_i64()
                    .with_context(|| format!("config '{key}' must be an integer, got {v}"))
            })
            .transpose()
    }

    /// Window settings: `patch_size`, `overlap`, `mode`, `sw_batch_size`, `use_point_window`.
    pub fn window_settings(&self) -> Result<WindowSettings> {
        let mut s = WindowSettings::default();
        if let Some(p) = self.usize3("patch_size")? {
            ensure!(
                p.iter().all(|&x| x % 16 == 0),
                "config 'patch_size' {p:?}: every side must be a multiple of 16"
            );
            s.patch_size = p;
        }
        if let Some(o) = self.f64_of("overlap")? {
            ensure!(
                (0.0..1.0).contains(&o),
                "config 'overlap' must be in [0, 1), got {o}"
            );
            s.overlap = o;
        }
        if let Some(m) = self.string("mode")? {
            s.mode = m.parse::<BlendMode>()?;
        }
        if let Some(b) = self.int("sw_batch_size")? {
            ensure!(b >= 1, "config 'sw_batch_size' must be at least 1, got {b}");
            s.sw_batch_size = b as usize;
        }
        if let Some(u) = self.bool("use_point_window")? {
            s.use_point_window = u;
        }
        Ok(s)
    }

    /// `resample_spacing` (a value <= 0, like the bundle's -1, keeps the original spacing on that axis).
    pub fn resample_spacing(&self) -> Result<[f64; 3]> {
        let v = self
            .get("resample_spacing")
            .context("config 'resample_spacing' is missing")?;
        let a = v.as_array().filter(|a| a.len() == 3).with_context(|| {
            format!("config 'resample_spacing' must be [x, y, z] in mm, got {v}")
        })?;
        let s: Vec<f64> = a
            .iter()
            .map(Value::as_f64)
            .collect::<Option<_>>()
            .with_context(|| format!("config 'resample_spacing' must be numbers, got {v}"))?;
        Ok([s[0], s[1], s[2]])
    }

    /// `everything_labels`.
    pub fn everything_labels(&self) -> Result<Vec<i64>> {
        let v = self
            .get("everything_labels")
            .context("config 'everything_labels' is missing")?;
        let ids: Vec<i64> = v
            .as_array()
            .and_then(|a| a.iter().map(Value::as_i64).collect())
            .with_context(|| {
                format!("config 'everything_labels' must be a list of class ids, got {v}")
            })?;
        ensure!(!ids.is_empty(), "config 'everything_labels' is empty");
        Ok(ids)
    }

    /// `subclass`: `{"2": [14, 5], ...}`.
    pub fn subclass(&self) -> Result<BTreeMap<i64, Vec<i64>>> {
        let Some(v) = self.get("subclass") else {
            return Ok(BTreeMap::new());
        };
        let obj = v
            .as_object()
            .with_context(|| format!("config 'subclass' must map ids to id lists, got {v}"))?;
        obj.iter()
            .map(|(k, v)| {
                let id: i64 = k
                    .parse()
                    .with_context(|| format!("config 'subclass' key '{k}' is not a class id"))?;
                let ids: Vec<i64> = v
                    .as_array()
                    .and_then(|a| a.iter().map(Value::as_i64).collect())
                    .with_context(|| {
                        format!("config 'subclass#{k}' must be a list of ids, got {v}")
                    })?;
                Ok((id, ids))
            })
            .collect()
    }

    /// The request in `input_dict` (`image`, `label_prompt`, `points`, `point_labels`).
    pub fn input_dict(&self) -> Result<(Option<PathBuf>, RequestPrompts)> {
        let Some(d) = self.get("input_dict") else {
            return Ok((None, RequestPrompts::default()));
        };
        let d = d
            .as_object()
            .with_context(|| format!("config 'input_dict' must be an object, got {d}"))?;
        let image = d.get("image").and_then(Value::as_str).map(PathBuf::from);
        let label_prompt = match d.get("label_prompt").filter(|v| !v.is_null()) {
            None => None,
            Some(v) => Some(
                v.as_array()
                    .with_context(|| format!("input_dict#label_prompt must be a list, got {v}"))?
                    .iter()
                    .map(|x| match x {
                        Value::Number(n) => n
                            .as_i64()
                            .map(LabelSpec::Id)
                            .with_context(|| format!("label prompt {n} is not an integer")),
                        Value::String(s) => Ok(s
                            .parse::<i64>()
                            .map(LabelSpec::Id)
                            .unwrap_or_else(|_| LabelSpec::Name(s.clone()))),
                        other => bail!("label prompt {other} must be an id or a class name"),
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        let points = match d.get("points").filter(|v| !v.is_null()) {
            None => None,
            Some(v) => Some(
                v.as_array()
                    .with_context(|| {
                        format!("input_dict#points must be [[x, y, z], ...], got {v}")
                    })?
                    .iter()
                    .map(|p| {
                        let c: Vec<f64> = p
                            .as_array()
                            .and_then(|a| a.iter().map(Value::as_f64).collect())
                            .with_context(|| format!("point {p} must be [x, y, z]"))?;
                        ensure!(
                            c.len() == 3,
                            "point {p} must have three coordinates x, y, z"
                        );
                        Ok([c[0], c[1], c[2]])
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        let point_labels = match d.get("point_labels").filter(|v| !v.is_null()) {
            None => None,
            Some(v) => Some(
                v.as_array()
                    .and_then(|a| a.iter().map(Value::as_i64).collect())
                    .with_context(|| {
                        format!("input_dict#point_labels must be a list of integers, got {v}")
                    })?,
            ),
        };
        Ok((
            image,
            RequestPrompts {
                label_prompt,
                points,
                point_labels,
            },
        ))
    }
}

/// Output path of the bundle's SaveImaged: `<output_dir>/<stem>/<stem>_<postfix>.nii.gz`.
pub fn output_path(output_dir: &Path, image: &Path, postfix: &str) -> PathBuf {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))
        .unwrap_or(&name)
        .to_string();
    output_dir
        .join(&stem)
        .join(format!("{stem}_{postfix}.nii.gz"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_and_sets_override_in_order() {
        let dir = std::env::temp_dir().join(format!("vista3d_cfg_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.json");
        std::fs::write(
            &a,
            r#"{"overlap": 0.5, "patch_size": [64, 64, 64], "input_dict": {"label_prompt": [3]}}"#,
        )
        .unwrap();
        let cfg = Config::load(
            std::slice::from_ref(&a),
            &[
                "overlap=0.1".into(),
                "input_dict#label_prompt=[\"spleen\", 5]".into(),
            ],
        )
        .unwrap();
        let w = cfg.window_settings().unwrap();
        assert_eq!((w.overlap, w.patch_size), (0.1, [64, 64, 64]));
        let (_, req) = cfg.input_dict().unwrap();
        assert_eq!(
            req.label_prompt.unwrap(),
            vec![LabelSpec::Name("spleen".into()), LabelSpec::Id(5)]
        );
        assert_eq!(cfg.everything_labels().unwrap().len(), 117);
        assert_eq!(cfg.subclass().unwrap()[&21].len(), 62);
        assert!(Config::load(&[], &["patch_size=[100,100,100]".into()])
            .unwrap()
            .window_settings()
            .is_err());
        assert!(Config::load(&[], &["noequals".into()]).is_err());
        std::fs::write(&a, r#"{"overlap": "$0.3"}"#).unwrap();
        assert!(format!("{:#}", Config::load(&[a], &[]).unwrap_err()).contains("expression"));
        assert_eq!(
            output_path(Path::new("out"), Path::new("/d/ct_01.nii.gz"), "trans"),
            PathBuf::from("out/ct_01/ct_01_trans.nii.gz")
        );
    }
}
