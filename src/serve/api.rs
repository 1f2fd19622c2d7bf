//! The inference request of NVIDIA's VISTA-3D NIM (`POST /v1/vista3d/inference`) and its query parameters,
//! turned into the request path's prompts.
//!
//! Body: `{"image": "...", "prompts": {"classes": [names or ids], "points": {"<class>": [[x, y, z], ...]}}}`.
//! No prompts segments everything. `points` belongs to one class (VISTA3D segments one object from clicks); its
//! clicks are positive unless `prompts.point_labels` (a vista3d extension: 1 positive, 0 negative) says
//! otherwise; `classes` may be left out or name the same class. vista3d extensions at the top level: `precision`
//! (as `--precision`) and `output_dtype` (`float32`, `uint8`, `int16`). Unknown keys are errors, and so is the
//! NIM's `local_working_dir` (results come back in the response body; the server never writes where a client
//! says).
//!
//! Query: `format=zip|nifti|dicom-seg` (zip: the label map and the JSON record, plus the DICOM SEG when the image
//! is a DICOM series and `output_format` asks for one; nifti: the bare `.nii.gz`; dicom-seg: the bare DICOM
//! Segmentation object of a DICOM series), `preview=true|false` (true: the zip also holds the
//! QC preview PNG of the result, as `vista3d infer --preview` writes it), and for
//! `application/octet-stream` uploads `request=<the JSON body without image>`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::error::ServeError;
use crate::engines::Method;
use crate::io::OutputDtype;
use crate::prompts::{LabelSpec, LabelTable, RequestPrompts};

/// The JSON body (or the `request` part / query parameter of an upload).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceBody {
    /// A path or `file://` URL under an allowed folder, or an http(s) URL under an allowed prefix.
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub prompts: Option<NimPrompts>,
    /// The method of this request (as `--precision`).
    #[serde(default)]
    pub precision: Option<Method>,
    /// `float32` (default), `uint8` or `int16`.
    #[serde(default)]
    pub output_dtype: Option<String>,
    /// The NIM's output folder: refused (see the module documentation).
    #[serde(default)]
    pub local_working_dir: Option<serde_json::Value>,
}

/// The NIM's `prompts`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NimPrompts {
    #[serde(default)]
    pub classes: Option<Vec<LabelSpec>>,
    #[serde(default)]
    pub points: Option<BTreeMap<String, Vec<[f64; 3]>>>,
    /// One label per point (vista3d extension; default: all positive).
    #[serde(default)]
    pub point_labels: Option<Vec<i64>>,
}

/// What the response body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A zip with the label map and its JSON record (the NIM's answer).
    Zip,
    /// The bare label map (`.nii.gz`).
    Nifti,
    /// The bare DICOM SEG (DICOM series only).
    DicomSeg,
}

/// The query parameters of an inference request.
#[derive(Debug, Clone)]
pub struct Query {
    pub format: Format,
    /// Add a QC preview PNG to the zip (`preview=true`; zip only).
    pub preview: bool,
    /// The request of an `application/octet-stream` upload.
    pub request: Option<String>,
}

impl Query {
    /// Parses the query parameters; unknown ones are errors.
    pub fn parse(params: &[(String, String)]) -> Result<Self, ServeError> {
        let mut q = Query {
            format: Format::Zip,
            preview: false,
            request: None,
        };
        for (k, v) in params {
            match k.as_str() {
                "format" => {
                    q.format = match v.to_ascii_lowercase().as_str() {
                        "zip" => Format::Zip,
                        "nifti" | "nii.gz" | "nii" => Format::Nifti,
                        "dicom-seg" | "dicom_seg" | "seg" => Format::DicomSeg,
                        other => {
                            return Err(ServeError::BadRequest(format!(
                                "unknown format '{other}': use zip (default), nifti or dicom-seg"
                            )))
                        }
                    }
                }
                "preview" => match v.to_ascii_lowercase().as_str() {
                    "false" | "0" | "no" => q.preview = false,
                    "true" | "1" | "yes" => q.preview = true,
                    other => {
                        return Err(ServeError::BadRequest(format!(
                            "preview must be true or false, got '{other}'"
                        )))
                    }
                },
                "request" => q.request = Some(v.clone()),
                other => {
                    return Err(ServeError::BadRequest(format!(
                        "unknown query parameter '{other}': known are format, preview and request"
                    )))
                }
            }
        }
        if q.preview && q.format != Format::Zip {
            return Err(ServeError::BadRequest(
                "preview=true adds a PNG to the zip: use it with format=zip (the default)".into(),
            ));
        }
        Ok(q)
    }
}

/// A request ready for the request path.
#[derive(Debug, Clone)]
pub struct ParsedRequest {
    pub prompts: RequestPrompts,
    /// The client's method, if it chose one.
    pub precision: Option<Method>,
    /// The client's output type, if it chose one.
    pub output_dtype: Option<OutputDtype>,
}

impl InferenceBody {
    /// Parses a JSON body: not JSON is 400, JSON that does not fit (unknown keys, wrong types) is 422.
    pub fn parse(bytes: &[u8]) -> Result<Self, ServeError> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
            ServeError::BadRequest(format!("the request body is not valid JSON: {e}"))
        })?;
        if !value.is_object() {
            return Err(ServeError::Unprocessable(
                "the request must be a JSON object like {\"image\": \"...\", \"prompts\": {...}}"
                    .into(),
            ));
        }
        serde_json::from_value(value)
            .map_err(|e| ServeError::Unprocessable(format!("invalid request: {e}")))
    }

    /// The prompts, method and output type (checks that need no image).
    pub fn request(&self, table: &LabelTable) -> Result<ParsedRequest, ServeError> {
        let bad = |m: String| Err(ServeError::Unprocessable(m));
        if self.local_working_dir.is_some() {
            return bad(
                "local_working_dir is not supported: the label map comes back in the response body"
                    .into(),
            );
        }
        let output_dtype = match &self.output_dtype {
            Some(s) => Some(
                s.parse::<OutputDtype>()
                    .map_err(|e| ServeError::Unprocessable(format!("{e:#}")))?,
            ),
            None => None,
        };
        let p = self.prompts.clone().unwrap_or_default();
        if p.classes.as_ref().is_some_and(Vec::is_empty) {
            return bad(
                "prompts.classes is empty: give class names or ids, or leave it out to segment everything".into(),
            );
        }
        let prompts = match &p.points {
            None => {
                if p.point_labels.is_some() {
                    return bad("prompts.point_labels was given without prompts.points".into());
                }
                RequestPrompts {
                    label_prompt: p.classes.clone(),
                    points: None,
                    point_labels: None,
                }
            }
            Some(map) => {
                if map.len() != 1 {
                    return bad(format!(
                        "prompts.points must hold the clicks of exactly one class (VISTA3D segments one object from \
                         points), got {} classes",
                        map.len()
                    ));
                }
                let (class, points) = map.iter().next().expect("one entry");
                let spec = LabelSpec::from_text(class);
                if let Some(classes) = &p.classes {
                    let same = classes.len() == 1 && same_class(&classes[0], &spec, table);
                    if !same {
                        return bad(format!(
                            "with points, prompts.classes must be left out or name the class of the points ('{class}')"
                        ));
                    }
                }
                let labels = p
                    .point_labels
                    .clone()
                    .unwrap_or_else(|| vec![1; points.len()]);
                RequestPrompts {
                    label_prompt: Some(vec![spec]),
                    points: Some(points.clone()),
                    point_labels: Some(labels),
                }
            }
        };
        Ok(ParsedRequest {
            prompts,
            precision: self.precision,
            output_dtype,
        })
    }
}

/// Whether two label specs name the same class (ids, known names, or the same unknown name).
fn same_class(a: &LabelSpec, b: &LabelSpec, table: &LabelTable) -> bool {
    let id = |s: &LabelSpec| match s {
        LabelSpec::Id(i) => Some(*i),
        LabelSpec::Name(n) => table.id(n),
    };
    match (id(a), id(b), a, b) {
        (Some(x), Some(y), _, _) => x == y,
        (None, None, LabelSpec::Name(x), LabelSpec::Name(y)) => {
            x.trim().eq_ignore_ascii_case(y.trim())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ParsedRequest, ServeError> {
        InferenceBody::parse(json.as_bytes())?.request(&LabelTable::bundle())
    }

    #[test]
    fn nim_requests_become_prompts() {
        let r = parse(r#"{"image": "a", "prompts": {"classes": ["spleen", 5]}}"#).unwrap();
        assert_eq!(
            r.prompts.label_prompt,
            Some(vec![LabelSpec::Name("spleen".into()), LabelSpec::Id(5)])
        );
        let r = parse(
            r#"{"image": "a", "prompts": {"classes": ["Spleen"], "points": {"spleen": [[1, 2, 3], [4, 5, 6]]}}}"#,
        )
        .unwrap();
        assert_eq!(
            r.prompts.label_prompt,
            Some(vec![LabelSpec::Name("spleen".into())])
        );
        assert_eq!(r.prompts.point_labels, Some(vec![1, 1]));
        let r = parse(
            r#"{"image": "a", "prompts": {"points": {"3": [[1, 2, 3]]}, "point_labels": [0]}, "precision": "fp32", "output_dtype": "uint8"}"#,
        )
        .unwrap();
        assert_eq!(r.prompts.label_prompt, Some(vec![LabelSpec::Id(3)]));
        assert_eq!(r.prompts.point_labels, Some(vec![0]));
        assert_eq!(r.precision, Some(Method::Fp32));
        assert_eq!(r.output_dtype, Some(OutputDtype::Uint8));
        let r = parse(r#"{"image": "a"}"#).unwrap();
        assert_eq!(r.prompts, RequestPrompts::default());
    }

    #[test]
    fn malformed_requests_are_refused_with_their_status() {
        let status = |j: &str| parse(j).unwrap_err().status().as_u16();
        assert_eq!(status("{not json"), 400);
        assert_eq!(status("[1]"), 422);
        assert_eq!(status(r#"{"imgae": "a"}"#), 422);
        assert_eq!(status(r#"{"image": "a", "prompts": {"classes": []}}"#), 422);
        assert_eq!(
            status(r#"{"image": "a", "prompts": {"points": {"1": [[1,2,3]], "3": [[1,2,3]]}}}"#),
            422
        );
        assert_eq!(
            status(r#"{"image": "a", "prompts": {"classes": [1], "points": {"3": [[1,2,3]]}}}"#),
            422
        );
        assert_eq!(status(r#"{"image": "a", "precision": "fp8"}"#), 422);
        assert_eq!(status(r#"{"image": "a", "output_dtype": "int64"}"#), 422);
        assert_eq!(
            status(r#"{"image": "a", "local_working_dir": "/tmp"}"#),
            422
        );
        let e = parse(r#"{"image": "a", "prompts": {"clases": [1]}}"#).unwrap_err();
        assert!(e.to_string().contains("clases"), "{e}");
    }

    #[test]
    fn query_parameters() {
        let q = |s: &[(&str, &str)]| {
            Query::parse(
                &s.iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(q(&[]).unwrap().format, Format::Zip);
        assert_eq!(q(&[("format", "nifti")]).unwrap().format, Format::Nifti);
        assert_eq!(
            q(&[("format", "dicom-seg")]).unwrap().format,
            Format::DicomSeg
        );
        assert!(q(&[("format", "png")])
            .unwrap_err()
            .to_string()
            .contains("unknown format 'png'"));
        assert!(q(&[("preview", "true")]).unwrap().preview);
        assert!(q(&[("preview", "true"), ("format", "nifti")]).is_err());
        assert!(q(&[("preview", "maybe")]).is_err());
        assert!(q(&[("preview", "false")]).is_ok());
        assert!(q(&[("fromat", "zip")]).is_err());
    }
}
