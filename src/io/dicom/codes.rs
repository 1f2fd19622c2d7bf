//! The SNOMED CT segment codes of each class (`configs/segment_codes.json`, its sources named in the file).

use std::collections::BTreeMap;

use serde::Deserialize;

const SEGMENT_CODES_JSON: &str = include_str!("../../../configs/segment_codes.json");

/// A coded concept: coding scheme designator, code value, code meaning.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CodedConcept {
    /// Coding scheme designator (`SCT` for SNOMED CT).
    pub scheme: String,
    /// Code value.
    pub code: String,
    /// Code meaning.
    pub meaning: String,
}

impl CodedConcept {
    fn sct(code: &str, meaning: &str) -> Self {
        Self {
            scheme: "SCT".into(),
            code: code.into(),
            meaning: meaning.into(),
        }
    }
}

/// The codes of one class: Segmented Property Category and Type, optional type modifier (laterality),
/// optional anatomic region and its modifier.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentCodes {
    /// Class name as in `configs/labels.json`.
    pub name: String,
    /// Segmented Property Category (CID 7150).
    pub category: CodedConcept,
    /// Segmented Property Type.
    #[serde(rename = "type")]
    pub property_type: CodedConcept,
    /// Segmented Property Type Modifier (laterality).
    #[serde(default)]
    pub modifier: Option<CodedConcept>,
    /// Anatomic Region (for lesions: the organ).
    #[serde(default)]
    pub region: Option<CodedConcept>,
    /// Anatomic Region Modifier (laterality of the region).
    #[serde(default)]
    pub region_modifier: Option<CodedConcept>,
}

#[derive(Deserialize)]
struct Table {
    #[serde(rename = "_about")]
    _about: Vec<String>,
    classes: BTreeMap<String, SegmentCodes>,
}

impl SegmentCodes {
    /// The table of `configs/segment_codes.json`, by class id.
    pub fn table() -> BTreeMap<i64, SegmentCodes> {
        let t: Table = serde_json::from_str(SEGMENT_CODES_JSON)
            .expect("embedded configs/segment_codes.json is valid (checked by tests)");
        t.classes
            .into_iter()
            .filter_map(|(k, v)| k.parse::<i64>().ok().map(|id| (id, v)))
            .collect()
    }

    /// Codes for a class id the table does not list (zero-shot classes): an anatomical structure.
    pub fn generic(name: &str) -> SegmentCodes {
        SegmentCodes {
            name: name.to_string(),
            category: CodedConcept::sct("91723000", "Anatomical Structure"),
            property_type: CodedConcept::sct("91723000", "Anatomical Structure"),
            modifier: None,
            region: None,
            region_modifier: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_of_labels_json_has_codes_with_its_name() {
        let table = SegmentCodes::table();
        let labels = crate::prompts::LabelTable::bundle();
        for id in 1..=crate::prompts::LAST_SUPPORTED {
            let codes = table
                .get(&id)
                .unwrap_or_else(|| panic!("class {id} has no codes"));
            assert_eq!(Some(codes.name.as_str()), labels.name(id), "class {id}");
            for c in [&codes.category, &codes.property_type] {
                assert_eq!(c.scheme, "SCT");
                assert!(!c.code.is_empty() && c.code.chars().all(|d| d.is_ascii_digit()));
                assert!(!c.meaning.is_empty() && c.meaning.len() <= 64);
            }
        }
        assert_eq!(table.len(), crate::prompts::LAST_SUPPORTED as usize);
    }
}
