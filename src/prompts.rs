//! Prompts as the bundle takes them (`label_prompt`, `points`, `point_labels`), resolved and checked exactly
//! as the bundle's `VistaPreTransformd` and `Vista3dEvaluator.check_prompts_format` do, with messages that say
//! what is wrong and how to fix it.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::suggest::edit_distance;

/// The bundle's class table (`metadata.json` `channel_def`: id -> name, 0 = background, 1..132 classes).
const LABELS_JSON: &str = include_str!("../configs/labels.json");

/// Largest class id the network was trained on; larger ids are zero-shot and need points.
pub const LAST_SUPPORTED: i64 = 132;

/// Class ids that cannot be asked for without points (`scripts/evaluator.py`): 16, 18, 129, 130, 131.
const UNSUPPORTED_WITHOUT_POINTS: [i64; 5] = [16, 18, 129, 130, 131];

/// `configs/inference.json` `everything_labels` excludes these from 1..132 (117 ids remain).
const NOT_IN_EVERYTHING: [i64; 15] = [
    2, 16, 18, 20, 21, 23, 24, 25, 26, 27, 128, 129, 130, 131, 132,
];

/// `VistaPreTransformd`'s default `special_index`: if the first label prompt is one of these and points are
/// given, point labels 0/1 become 2/3 (the bundle's tuple; MONAI's sampler uses another, see SPEC).
pub const SPECIAL_POINT_CLASSES: [i64; 6] = [25, 26, 27, 28, 29, 117];

/// The 117 ids segmented when no prompt is given, ascending.
pub fn everything_labels() -> Vec<i64> {
    (1..=LAST_SUPPORTED)
        .filter(|i| !NOT_IN_EVERYTHING.contains(i))
        .collect()
}

/// The bundle's `subclass` expansion: kidney, lung and bone prompts become their parts.
pub fn default_subclass() -> BTreeMap<i64, Vec<i64>> {
    let bone: Vec<i64> = (33..57).chain(63..98).chain([114, 120, 122]).collect();
    BTreeMap::from([(2, vec![14, 5]), (20, vec![28, 29, 30, 31, 32]), (21, bone)])
}

/// Class names and ids.
#[derive(Debug, Clone)]
pub struct LabelTable {
    names: BTreeMap<i64, String>,
    ids: HashMap<String, i64>,
}

impl LabelTable {
    /// The bundle's table of 132 classes plus background.
    pub fn bundle() -> Self {
        let map: BTreeMap<String, String> =
            serde_json::from_str(LABELS_JSON).expect("embedded labels.json is valid");
        let names: BTreeMap<i64, String> = map
            .into_iter()
            .map(|(k, v)| (k.parse::<i64>().expect("labels.json keys are ids"), v))
            .collect();
        let ids = names
            .iter()
            .map(|(&id, n)| (n.to_lowercase(), id))
            .collect();
        Self { names, ids }
    }

    /// Name of a class id, if it has one.
    pub fn name(&self, id: i64) -> Option<&str> {
        self.names.get(&id).map(String::as_str)
    }

    /// Id of a class name (case-insensitive).
    pub fn id(&self, name: &str) -> Option<i64> {
        self.ids.get(&name.trim().to_lowercase()).copied()
    }

    /// Known names close to `query` (a substring, or a few typing errors away), for "did you mean" hints.
    fn suggestions(&self, query: &str) -> Vec<&str> {
        let q = query.trim().to_lowercase();
        if q.is_empty() {
            return Vec::new();
        }
        let tolerance = (q.chars().count() / 4).max(2);
        let mut scored: Vec<(usize, &str)> = self
            .names
            .values()
            .filter_map(|n| {
                let lower = n.to_lowercase();
                let whole = edit_distance(&q, &lower);
                let word = lower
                    .split_whitespace()
                    .map(|w| edit_distance(&q, w))
                    .min()
                    .unwrap_or(usize::MAX);
                let close = whole.min(word);
                let score = if lower.contains(&q) {
                    close.min(tolerance)
                } else {
                    close
                };
                (score <= tolerance).then_some((score, n.as_str()))
            })
            .collect();
        scored.sort();
        scored.into_iter().take(6).map(|(_, n)| n).collect()
    }
}

/// One entry of a label prompt as the user gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelSpec {
    Id(i64),
    Name(String),
}

impl LabelSpec {
    /// A string that holds an integer is an id (`"3"`), anything else a class name.
    pub fn from_text(s: &str) -> Self {
        match s.trim().parse::<i64>() {
            Ok(id) => LabelSpec::Id(id),
            Err(_) => LabelSpec::Name(s.to_string()),
        }
    }
}

impl Serialize for LabelSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LabelSpec::Id(id) => s.serialize_i64(*id),
            LabelSpec::Name(n) => s.serialize_str(n),
        }
    }
}

impl<'de> Deserialize<'de> for LabelSpec {
    /// An integer id or a class name (JSON number or string).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Id(i64),
            Text(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Id(id)) => Ok(LabelSpec::Id(id)),
            Ok(Raw::Text(s)) => Ok(LabelSpec::from_text(&s)),
            Err(_) => Err(serde::de::Error::custom(
                "a label prompt entry must be a class id (integer) or a class name (string)",
            )),
        }
    }
}

/// Parses `"3,5"`, `"spleen"` or `"spleen,left kidney"` (ids and names may be mixed).
pub fn parse_label_prompt(text: &str) -> Result<Vec<LabelSpec>> {
    let items: Vec<LabelSpec> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(LabelSpec::from_text)
        .collect();
    if items.is_empty() {
        bail!("empty label prompt '{text}': give class ids or names, e.g. --label-prompt 3,5 or --label-prompt spleen");
    }
    Ok(items)
}

/// Parses points `"x,y,z;x,y,z"` (voxel indices of the input image, array order as stored in the file).
pub fn parse_points(text: &str) -> Result<Vec<[f64; 3]>> {
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|p| {
            let c: Vec<f64> = p
                .split(',')
                .map(|v| v.trim().parse::<f64>().with_context(|| format!("point '{p}': '{v}' is not a number")))
                .collect::<Result<_>>()?;
            if c.len() != 3 || c.iter().any(|v| !v.is_finite()) {
                bail!("point '{p}' must have three finite coordinates x,y,z (voxel indices of the input image)");
            }
            Ok([c[0], c[1], c[2]])
        })
        .collect()
}

/// Parses point labels `"1,0,1"`.
pub fn parse_point_labels(text: &str) -> Result<Vec<i64>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|v| {
            v.parse::<i64>().with_context(|| {
                format!("point label '{v}' is not an integer (use -1, 0, 1, 2 or 3)")
            })
        })
        .collect()
}

/// Prompts as given (one request).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestPrompts {
    pub label_prompt: Option<Vec<LabelSpec>>,
    /// Points in voxel indices of the input image.
    pub points: Option<Vec<[f64; 3]>>,
    pub point_labels: Option<Vec<i64>>,
}

/// Prompts after name lookup, subclass expansion, the special-class point mapping and the bundle's checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompts {
    /// Global class ids naming the output channels (`None`: point-only without a class).
    pub label_prompt: Option<Vec<i64>>,
    /// Points in voxel indices of the input image.
    pub points: Option<Vec<[f64; 3]>>,
    /// Point labels (-1 padding, 0/1, 2/3 for special classes).
    pub point_labels: Option<Vec<i64>>,
}

impl Prompts {
    /// True when the class head runs (some label prompt, none of them zero-shot).
    pub fn uses_class_head(&self) -> bool {
        self.label_prompt
            .as_ref()
            .is_some_and(|l| l.iter().all(|&c| c <= LAST_SUPPORTED))
    }
}

/// Resolves and checks a request: `VistaPreTransformd` (names -> ids, unknown names -> new zero-shot ids 133,
/// 134, ... in order of appearance; subclass expansion; special point labels), then the evaluator's checks, and
/// the 117 "everything" labels when nothing is given.
pub fn resolve(
    req: &RequestPrompts,
    table: &LabelTable,
    subclass: &BTreeMap<i64, Vec<i64>>,
    everything: &[i64],
) -> Result<Prompts> {
    // Names -> ids.
    let mut new_ids: Vec<(String, i64)> = Vec::new();
    let mut next_new = table.names.len() as i64;
    let mut unknown_names = Vec::new();
    let label_prompt: Option<Vec<i64>> = req.label_prompt.as_ref().map(|specs| {
        specs
            .iter()
            .map(|s| match s {
                LabelSpec::Id(id) => *id,
                LabelSpec::Name(name) => table.id(name).unwrap_or_else(|| {
                    let key = name.trim().to_lowercase();
                    if let Some((_, id)) = new_ids.iter().find(|(n, _)| *n == key) {
                        return *id;
                    }
                    let id = next_new;
                    next_new += 1;
                    new_ids.push((key, id));
                    unknown_names.push(name.clone());
                    id
                }),
            })
            .collect()
    });
    if let Some(ids) = &label_prompt {
        if let Some(bad) = ids.iter().find(|&&id| id < 0) {
            bail!("label prompt {bad} is negative: class ids are 1..132 (or 133..254 for zero-shot classes with points)");
        }
    }

    // Subclass expansion (kidney, lung, bone -> parts), then special point labels from the first prompt.
    let expanded: Option<Vec<i64>> = label_prompt.as_ref().map(|ids| {
        ids.iter()
            .flat_map(|id| subclass.get(id).cloned().unwrap_or_else(|| vec![*id]))
            .collect()
    });
    let mut point_labels = req.point_labels.clone();
    if let (Some(ids), Some(pl)) = (&label_prompt, &mut point_labels) {
        if ids
            .first()
            .is_some_and(|id| SPECIAL_POINT_CLASSES.contains(id))
        {
            for l in pl.iter_mut() {
                *l = match *l {
                    0 => 2,
                    1 => 3,
                    other => other,
                };
            }
        }
    }

    let points = req.points.clone();
    if expanded.is_none() && points.is_none() {
        if point_labels.is_some() {
            bail!("point labels were given without points: add --points \"x,y,z;...\" or drop --point-labels");
        }
        return Ok(Prompts {
            label_prompt: Some(everything.to_vec()),
            points: None,
            point_labels: None,
        });
    }
    if let Some(ids) = &expanded {
        if let Some(&bad) = ids.iter().find(|&&id| id >= 255) {
            bail!("label prompt {bad} is too large: ids must be below 255 (255 marks voxels that were not computed)");
        }
        if points.is_none() {
            if let Some(name) = unknown_names.first() {
                let hint = table.suggestions(name);
                bail!(
                    "unknown class name '{name}': it is not one of the 132 VISTA3D classes{}; a new (zero-shot) class \
                     needs point prompts (--points and --point-labels)",
                    if hint.is_empty() { String::new() } else { format!(" (did you mean: {})", hint.join(", ")) }
                );
            }
            if let Some(&bad) = ids.iter().find(|&&id| {
                !(1..=LAST_SUPPORTED).contains(&id) || UNSUPPORTED_WITHOUT_POINTS.contains(&id)
            }) {
                let why = if bad > LAST_SUPPORTED {
                    "is a zero-shot class (above 132) and needs point prompts".to_string()
                } else {
                    format!(
                        "({}) cannot be segmented from a class prompt alone; add point prompts",
                        table.name(bad).unwrap_or("?")
                    )
                };
                bail!("label prompt {bad} {why}");
            }
        }
    }
    match (&points, &point_labels) {
        (Some(p), Some(l)) => {
            if p.is_empty() {
                bail!("no points given: --points needs at least one x,y,z");
            }
            if p.len() != l.len() {
                bail!(
                    "{} points but {} point labels: give one label per point",
                    p.len(),
                    l.len()
                );
            }
            if let Some(bad) = l.iter().find(|v| !(-1..=3).contains(*v)) {
                bail!("point label {bad} is invalid: use 1 (positive), 0 (negative), -1 (ignore), or 3/2 for special classes");
            }
            if let Some(ids) = &expanded {
                if ids.len() != 1 {
                    bail!(
                        "with points, give exactly one label prompt (got {} after expanding subclasses: {ids:?}); \
                         kidney, lung and bone expand into several classes and cannot be combined with points",
                        ids.len()
                    );
                }
            }
        }
        (Some(_), None) => bail!(
            "points were given without point labels: add --point-labels (1 positive, 0 negative)"
        ),
        (None, Some(_)) => {
            bail!("point labels were given without points: add --points \"x,y,z;...\"")
        }
        (None, None) => {}
    }
    Ok(Prompts {
        label_prompt: expanded,
        points,
        point_labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_str(
        labels: Option<&str>,
        points: Option<&str>,
        point_labels: Option<&str>,
    ) -> Result<Prompts> {
        let req = RequestPrompts {
            label_prompt: labels.map(|s| parse_label_prompt(s).unwrap()),
            points: points.map(|s| parse_points(s).unwrap()),
            point_labels: point_labels.map(|s| parse_point_labels(s).unwrap()),
        };
        resolve(
            &req,
            &LabelTable::bundle(),
            &default_subclass(),
            &everything_labels(),
        )
    }

    #[test]
    fn everything_has_117_labels() {
        let e = everything_labels();
        assert_eq!(e.len(), 117);
        assert_eq!(&e[..4], &[1, 3, 4, 5]);
        assert_eq!(
            resolve_str(None, None, None).unwrap().label_prompt.unwrap(),
            e
        );
    }

    #[test]
    fn names_subclasses_and_special_points() {
        let p = resolve_str(Some("Spleen, left kidney,6"), None, None).unwrap();
        assert_eq!(p.label_prompt.unwrap(), vec![3, 14, 6]);
        assert_eq!(
            resolve_str(Some("kidney"), None, None)
                .unwrap()
                .label_prompt
                .unwrap(),
            vec![14, 5]
        );
        assert_eq!(
            resolve_str(Some("21"), None, None)
                .unwrap()
                .label_prompt
                .unwrap()
                .len(),
            62
        );
        // Hepatic tumour (26) is special: point labels 0/1 -> 2/3.
        let p = resolve_str(Some("26"), Some("1,2,3;4,5,6;7,8,9"), Some("1,0,-1")).unwrap();
        assert_eq!(p.point_labels.unwrap(), vec![3, 2, -1]);
        // Unknown names become zero-shot ids 133, 134... and need points.
        let p = resolve_str(Some("my tumour"), Some("1,2,3"), Some("1")).unwrap();
        assert_eq!(p.label_prompt.unwrap(), vec![133]);
        assert!(!resolve_str(Some("140"), Some("1,2,3"), Some("1"))
            .unwrap()
            .uses_class_head());
    }

    #[test]
    fn the_bundle_checks_fail_with_clear_messages() {
        let err = |l, p, pl| format!("{:#}", resolve_str(l, p, pl).unwrap_err());
        assert!(err(Some("splen"), None, None).contains("did you mean: spleen"));
        assert!(err(Some("140"), None, None).contains("zero-shot"));
        assert!(err(Some("16"), None, None).contains("prostate or uterus"));
        assert!(err(Some("300"), Some("1,2,3"), Some("1")).contains("below 255"));
        assert!(
            err(Some("3"), Some("1,2,3;4,5,6"), Some("1")).contains("2 points but 1 point labels")
        );
        assert!(err(Some("3"), Some("1,2,3"), Some("5")).contains("point label 5"));
        assert!(err(Some("kidney"), Some("1,2,3"), Some("1")).contains("exactly one label prompt"));
        assert!(err(Some("3,5"), Some("1,2,3"), Some("1")).contains("exactly one label prompt"));
        assert!(err(None, Some("1,2,3"), None).contains("without point labels"));
        assert!(err(None, None, Some("1")).contains("without points"));
        assert!(err(Some("-3"), None, None).contains("negative"));
        assert!(parse_points("1,2").is_err());
        assert!(parse_points("1,2,x").is_err());
        assert!(parse_label_prompt(" , ").is_err());
    }
}
