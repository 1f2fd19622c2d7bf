//! "Did you mean" suggestions: the closest known name to what a user typed (config keys, class names).

/// Levenshtein distance between two strings, in characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The candidate closest to `key` (by edit distance on the whole key and on its last `#` part), if it is close
/// enough to be a plausible typo or a nesting mistake (`label_prompt` for `input_dict#label_prompt`).
pub fn closest<'a>(key: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let last = key.rsplit('#').next().unwrap_or(key);
    let tolerance = (last.chars().count() / 3).clamp(1, 4);
    candidates
        .into_iter()
        .map(|c| {
            let c_last = c.rsplit('#').next().unwrap_or(c);
            let d = edit_distance(key, c).min(edit_distance(last, c_last));
            (d, c)
        })
        .filter(|&(d, _)| d <= tolerance)
        .min_by_key(|&(d, c)| (d, c.len()))
        .map(|(_, c)| c.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_characters() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("ÄÖ", "AÖ"), 1);
    }
}
