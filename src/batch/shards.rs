//! Static shards: `--shard I/N` (or from a scheduler's environment) keeps the items whose relative path hashes to
//! `I` modulo `N`. The hash (64-bit FNV-1a of the relative path with `/` separators) depends on nothing else, so
//! adding inputs later never moves a finished item to another shard.
//!
//! Detection order: `--shard I/N`; else `JOB_COMPLETION_INDEX` (Kubernetes Indexed Job) with `--shards N`; else
//! `SLURM_ARRAY_TASK_ID` and `SLURM_ARRAY_TASK_COUNT` (a Slurm array; the index counts from
//! `SLURM_ARRAY_TASK_MIN`, 0 when unset); else no sharding.

use std::path::{Component, Path};
use std::str::FromStr;

/// Errors of shard options and environment variables.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ShardError {
    #[error("--shard {0}: expected I/N with 0 <= I < N, e.g. 0/4")]
    Syntax(String),
    #[error("shard index {index} is out of range for {count} shards ({source_name})")]
    OutOfRange {
        index: u64,
        count: u64,
        source_name: String,
    },
    #[error("{name}={value} is not a whole number")]
    NotANumber { name: String, value: String },
    #[error("JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but --shards N is not: pass the Job's completions as --shards")]
    MissingShardCount,
    #[error("--shards {0} needs a shard index: pass --shard I/N, or run as a Kubernetes Indexed Job (JOB_COMPLETION_INDEX)")]
    MissingIndex(u64),
}

/// Shard `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = ShardError;
    fn from_str(s: &str) -> Result<Self, ShardError> {
        let bad = || ShardError::Syntax(s.to_string());
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: u64 = i.trim().parse().map_err(|_| bad())?;
        let count: u64 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

impl Shard {
    /// Whether the item at `relative` (its path relative to the input root) belongs to this shard.
    pub fn holds(&self, relative: &Path) -> bool {
        stable_hash(relative) % self.count == self.index
    }
}

/// 64-bit FNV-1a of the path's normal components joined with `/` (the same on every platform and run).
pub fn stable_hash(relative: &Path) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut first = true;
    for c in relative.components() {
        if let Component::Normal(part) = c {
            if !first {
                h = fnv(h, b"/");
            }
            first = false;
            h = fnv(h, part.to_string_lossy().as_bytes());
        }
    }
    h
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The shard of this process from the options and the environment (`env` looks a variable up; pass
/// `|k| std::env::var(k).ok()`).
pub fn detect(
    shard: Option<Shard>,
    shards: Option<u64>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Shard>, ShardError> {
    if let Some(s) = shard {
        return Ok(Some(s));
    }
    let number = |name: &str| -> Result<Option<u64>, ShardError> {
        match env(name) {
            None => Ok(None),
            Some(v) if v.trim().is_empty() => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| ShardError::NotANumber {
                    name: name.into(),
                    value: v,
                }),
        }
    };
    let checked = |index: u64, count: u64, source_name: &str| {
        if count == 0 || index >= count {
            Err(ShardError::OutOfRange {
                index,
                count,
                source_name: source_name.into(),
            })
        } else {
            Ok(Some(Shard { index, count }))
        }
    };
    if let Some(index) = number("JOB_COMPLETION_INDEX")? {
        let count = shards.ok_or(ShardError::MissingShardCount)?;
        return checked(index, count, "JOB_COMPLETION_INDEX, --shards");
    }
    if let (Some(id), Some(count)) = (
        number("SLURM_ARRAY_TASK_ID")?,
        number("SLURM_ARRAY_TASK_COUNT")?,
    ) {
        let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let index = id.checked_sub(min).ok_or(ShardError::OutOfRange {
            index: id,
            count,
            source_name: "SLURM_ARRAY_TASK_ID below SLURM_ARRAY_TASK_MIN".into(),
        })?;
        let count = shards.unwrap_or(count);
        return checked(index, count, "SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT");
    }
    match shards {
        Some(n) if n > 1 => Err(ShardError::MissingIndex(n)),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::PathBuf;

    fn names(n: usize, from: usize) -> Vec<PathBuf> {
        (from..from + n)
            .map(|i| PathBuf::from(format!("site{}/patient_{i:04}/ct.nii.gz", i % 3)))
            .collect()
    }

    #[test]
    fn shards_cover_every_item_once_and_added_inputs_do_not_move_finished_ones() {
        for count in [1u64, 2, 3, 7] {
            let shards: Vec<Shard> = (0..count).map(|index| Shard { index, count }).collect();
            let first = names(200, 0);
            let owner = |p: &PathBuf| -> Vec<u64> {
                shards
                    .iter()
                    .filter(|s| s.holds(p))
                    .map(|s| s.index)
                    .collect()
            };
            let before: HashMap<PathBuf, Vec<u64>> =
                first.iter().map(|p| (p.clone(), owner(p))).collect();
            for (p, o) in &before {
                assert_eq!(o.len(), 1, "{} in shards {o:?} of {count}", p.display());
            }
            // Inputs added later (and listed in another order): finished ones keep their shard.
            let mut more = names(150, 180);
            more.extend(first.iter().rev().cloned());
            for p in &more {
                let o = owner(p);
                assert_eq!(o.len(), 1);
                if let Some(b) = before.get(p) {
                    assert_eq!(&o, b, "{} moved", p.display());
                }
            }
            if count > 1 {
                // Every shard gets a share (no degenerate hash).
                for s in &shards {
                    let n = first.iter().filter(|p| s.holds(p)).count();
                    assert!(n > 200 / count as usize / 3, "shard {s} holds {n}");
                }
            }
        }
        // The hash is fixed: a change would move finished items of existing runs.
        assert_eq!(stable_hash(Path::new("")), 0xcbf2_9ce4_8422_2325);
        assert_eq!(
            stable_hash(Path::new("a/b.nii.gz")),
            stable_hash(Path::new("./a//b.nii.gz"))
        );
    }

    #[test]
    fn shard_syntax() {
        assert_eq!("2/5".parse(), Ok(Shard { index: 2, count: 5 }));
        for bad in ["5/5", "1", "a/2", "0/0", "-1/3"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn shards_from_the_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let none: &[(&str, &str)] = &[];
        assert_eq!(detect(None, None, env(none)), Ok(None));
        assert_eq!(detect(None, Some(1), env(none)), Ok(None));
        assert_eq!(
            detect(None, Some(4), env(none)),
            Err(ShardError::MissingIndex(4))
        );
        // The option wins over the environment.
        let k8s: &[(&str, &str)] = &[("JOB_COMPLETION_INDEX", "3")];
        let s = Some(Shard { index: 1, count: 2 });
        assert_eq!(detect(s, None, env(k8s)), Ok(s));
        assert_eq!(
            detect(None, Some(4), env(k8s)),
            Ok(Some(Shard { index: 3, count: 4 }))
        );
        assert_eq!(
            detect(None, None, env(k8s)),
            Err(ShardError::MissingShardCount)
        );
        assert!(matches!(
            detect(None, Some(3), env(k8s)),
            Err(ShardError::OutOfRange { .. })
        ));
        let slurm: &[(&str, &str)] = &[
            ("SLURM_ARRAY_TASK_ID", "6"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "5"),
        ];
        assert_eq!(
            detect(None, None, env(slurm)),
            Ok(Some(Shard { index: 1, count: 4 }))
        );
        let slurm0: &[(&str, &str)] = &[
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        assert_eq!(
            detect(None, None, env(slurm0)),
            Ok(Some(Shard { index: 2, count: 3 }))
        );
        let bad: &[(&str, &str)] = &[("JOB_COMPLETION_INDEX", "x")];
        assert!(matches!(
            detect(None, Some(2), env(bad)),
            Err(ShardError::NotANumber { .. })
        ));
    }
}
