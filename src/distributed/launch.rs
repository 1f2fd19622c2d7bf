//! The launch contract: which rank this process is, how many there are and where the rendezvous store is, read
//! from the environment that `torchrun` (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`,
//! `TORCHELASTIC_USE_AGENT_STORE`, `TORCHELASTIC_RESTART_COUNT`) or Slurm's `srun` (`SLURM_PROCID`,
//! `SLURM_NTASKS` / `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`, `SLURM_NODELIST`) sets.
//!
//! `torchrun`'s variables win when both are set (torchrun inside an `srun` step). Slurm does not set
//! `MASTER_ADDR`: it is derived from the first host of `SLURM_STEP_NODELIST` / `SLURM_JOB_NODELIST` /
//! `SLURM_NODELIST` (hostlist syntax such as `gpu-[03-05,09],cpu1`); `MASTER_PORT` defaults to
//! `20000 + SLURM_JOB_ID % 20000`, so that two jobs sharing a node do not collide. Nothing set, or a world of one:
//! a single process.

use super::DistError;

/// torchrun's default `MASTER_PORT`.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Who started the process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// `torchrun` (or anything else that sets `RANK` / `WORLD_SIZE`).
    Torchrun,
    /// Slurm's `srun`.
    Slurm,
}

impl Launcher {
    pub fn name(self) -> &'static str {
        match self {
            Launcher::Torchrun => "torchrun",
            Launcher::Slurm => "Slurm",
        }
    }
}

/// This process's place in a multi-process run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    pub launcher: Launcher,
    /// Global rank, `0..world_size`.
    pub rank: usize,
    pub world_size: usize,
    /// Rank on this node: picks the GPU.
    pub local_rank: usize,
    /// Host of the rendezvous store.
    pub master_addr: String,
    pub master_port: u16,
    /// Connect to torchrun's own store (`TORCHELASTIC_USE_AGENT_STORE=True`) instead of hosting one on rank 0.
    pub use_agent_store: bool,
    /// `TORCHELASTIC_RESTART_COUNT`: torchrun keys the agent store by attempt.
    pub restart_count: u64,
}

impl LaunchEnv {
    /// Reads the process environment; `None` for a single process.
    pub fn from_env() -> Result<Option<LaunchEnv>, DistError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`LaunchEnv::from_env`] with an explicit variable lookup (for tests).
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<LaunchEnv>, DistError> {
        let get = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let env = if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            torchrun(&get)?
        } else if get("SLURM_PROCID").is_some() {
            slurm(&get)?
        } else {
            return Ok(None);
        };
        if env.world_size == 1 {
            return Ok(None);
        }
        Ok(Some(env))
    }

    /// The prefix of every key this run puts in the store (torchrun's agent store is shared between attempts).
    pub fn key_prefix(&self) -> String {
        if self.use_agent_store {
            format!("/worker/attempt_{}/vista3d/", self.restart_count)
        } else {
            "vista3d/".into()
        }
    }

    /// True when this process hosts the rendezvous store.
    pub fn hosts_store(&self) -> bool {
        !self.use_agent_store && self.rank == 0
    }

    /// One line for logs: `rank 1 of 2 (local rank 1, torchrun, store 127.0.0.1:29500)`.
    pub fn describe(&self) -> String {
        format!(
            "rank {} of {} (local rank {}, {}, store {}:{}{})",
            self.rank,
            self.world_size,
            self.local_rank,
            self.launcher.name(),
            self.master_addr,
            self.master_port,
            if self.use_agent_store {
                ", torchrun's agent store"
            } else {
                ""
            }
        )
    }
}

fn parse_count(
    get: &impl Fn(&str) -> Option<String>,
    key: &str,
) -> Result<Option<usize>, DistError> {
    get(key)
        .map(|v| {
            v.parse::<usize>()
                .map_err(|_| DistError::Launch(format!("{key}={v} is not a non-negative integer")))
        })
        .transpose()
}

fn require(
    get: &impl Fn(&str) -> Option<String>,
    key: &str,
    why: &str,
) -> Result<usize, DistError> {
    parse_count(get, key)?.ok_or_else(|| DistError::Launch(format!("{key} is not set ({why})")))
}

fn port(get: &impl Fn(&str) -> Option<String>) -> Result<Option<u16>, DistError> {
    get("MASTER_PORT")
        .map(|v| match v.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(DistError::Launch(format!(
                "MASTER_PORT={v} is not a TCP port (1..=65535)"
            ))),
        })
        .transpose()
}

fn check_rank(rank: usize, world: usize, rank_key: &str, world_key: &str) -> Result<(), DistError> {
    if world == 0 {
        return Err(DistError::Launch(format!(
            "{world_key}=0: at least one process is needed"
        )));
    }
    if rank >= world {
        return Err(DistError::Launch(format!(
            "{rank_key}={rank} is not below {world_key}={world}"
        )));
    }
    Ok(())
}

fn torchrun(get: &impl Fn(&str) -> Option<String>) -> Result<LaunchEnv, DistError> {
    let why = "torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT together";
    let rank = require(get, "RANK", why)?;
    let world_size = require(get, "WORLD_SIZE", why)?;
    check_rank(rank, world_size, "RANK", "WORLD_SIZE")?;
    let local_rank = parse_count(get, "LOCAL_RANK")?.unwrap_or(0);
    let master_addr = match get("MASTER_ADDR") {
        Some(a) => a,
        None if world_size == 1 => "127.0.0.1".into(),
        None => return Err(DistError::Launch(format!("MASTER_ADDR is not set ({why})"))),
    };
    let use_agent_store = get("TORCHELASTIC_USE_AGENT_STORE")
        .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    let restart_count = get("TORCHELASTIC_RESTART_COUNT")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(LaunchEnv {
        launcher: Launcher::Torchrun,
        rank,
        world_size,
        local_rank,
        master_addr,
        master_port: port(get)?.unwrap_or(DEFAULT_MASTER_PORT),
        use_agent_store,
        restart_count,
    })
}

fn slurm(get: &impl Fn(&str) -> Option<String>) -> Result<LaunchEnv, DistError> {
    let rank = require(get, "SLURM_PROCID", "set by srun")?;
    let world_key = if get("SLURM_STEP_NUM_TASKS").is_some() {
        "SLURM_STEP_NUM_TASKS"
    } else {
        "SLURM_NTASKS"
    };
    let world_size = require(
        get,
        world_key,
        "srun sets SLURM_NTASKS: start one task per rank, e.g. srun --ntasks-per-node=N",
    )?;
    check_rank(rank, world_size, "SLURM_PROCID", world_key)?;
    let local_rank = parse_count(get, "SLURM_LOCALID")?.unwrap_or(0);
    let master_addr = match get("MASTER_ADDR") {
        Some(a) => a,
        None => {
            let list = [
                "SLURM_STEP_NODELIST",
                "SLURM_JOB_NODELIST",
                "SLURM_NODELIST",
            ]
            .iter()
            .find_map(|k| get(k));
            match list {
                Some(l) => first_host(&l).ok_or_else(|| {
                    DistError::Launch(format!(
                        "cannot read the first host of SLURM_NODELIST={l}: set MASTER_ADDR to the host of rank 0"
                    ))
                })?,
                None if world_size == 1 => "127.0.0.1".into(),
                None => {
                    return Err(DistError::Launch(
                        "Slurm launch without MASTER_ADDR and without SLURM_NODELIST: set MASTER_ADDR to the \
                         host of rank 0"
                            .into(),
                    ))
                }
            }
        }
    };
    let master_port = match port(get)? {
        Some(p) => p,
        None => match get("SLURM_JOB_ID").and_then(|j| j.parse::<u64>().ok()) {
            Some(job) => (20000 + job % 20000) as u16,
            None => DEFAULT_MASTER_PORT,
        },
    };
    Ok(LaunchEnv {
        launcher: Launcher::Slurm,
        rank,
        world_size,
        local_rank,
        master_addr,
        master_port,
        use_agent_store: false,
        restart_count: 0,
    })
}

/// The first host of a Slurm hostlist: `node[01-04,07],gpu5` -> `node01`, `a[1-2]-ib` -> `a1-ib`,
/// `rack[2-3]-n[08-09]` -> `rack2-n08`. `None` for an empty or malformed list.
pub fn first_host(list: &str) -> Option<String> {
    // The first item at bracket depth 0.
    let mut depth = 0i32;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
        if depth < 0 {
            return None;
        }
    }
    let item = list[..end].trim();
    let mut out = String::new();
    let mut rest = item;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find(']')? + open;
        let inner = &rest[open + 1..close];
        // The first element of "01-04,07" is "01" (zero padding kept).
        let first = inner.split(',').next()?.split('-').next()?.trim();
        if first.is_empty() || !first.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        out.push_str(first);
        rest = &rest[close + 1..];
    }
    if rest.contains(']') {
        return None;
    }
    out.push_str(rest);
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<LaunchEnv>, DistError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LaunchEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn single_process_without_variables_or_with_a_world_of_one() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap(), None);
        assert_eq!(
            env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap(),
            None
        );
    }

    #[test]
    fn torchrun_variables() {
        let e = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
            // Slurm variables are ignored when torchrun's are set.
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(e.launcher, Launcher::Torchrun);
        assert_eq!((e.rank, e.world_size, e.local_rank), (3, 8, 1));
        assert_eq!((e.master_addr.as_str(), e.master_port), ("node7", 29400));
        assert!(e.use_agent_store && !e.hosts_store());
        assert_eq!(e.key_prefix(), "/worker/attempt_2/vista3d/");
        let e = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")])
            .unwrap()
            .unwrap();
        assert_eq!(e.master_port, DEFAULT_MASTER_PORT);
        assert!(e.hosts_store());
        assert_eq!(e.key_prefix(), "vista3d/");
    }

    #[test]
    fn bad_torchrun_variables_are_named() {
        for (pairs, expect) in [
            (vec![("RANK", "0")], "WORLD_SIZE is not set"),
            (vec![("WORLD_SIZE", "2")], "RANK is not set"),
            (
                vec![("RANK", "2"), ("WORLD_SIZE", "2")],
                "RANK=2 is not below WORLD_SIZE=2",
            ),
            (vec![("RANK", "x"), ("WORLD_SIZE", "2")], "RANK=x"),
            (
                vec![("RANK", "0"), ("WORLD_SIZE", "2")],
                "MASTER_ADDR is not set",
            ),
            (
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "99999"),
                ],
                "MASTER_PORT=99999",
            ),
            (vec![("RANK", "0"), ("WORLD_SIZE", "0")], "WORLD_SIZE=0"),
        ] {
            let e = env(&pairs).unwrap_err().to_string();
            assert!(e.contains(expect), "{pairs:?}: {e}");
        }
    }

    #[test]
    fn slurm_variables_and_master_from_the_nodelist() {
        let e = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu-[03-05,09],cpu1"),
            ("SLURM_JOB_ID", "123456"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(e.launcher, Launcher::Slurm);
        assert_eq!((e.rank, e.world_size, e.local_rank), (5, 8, 1));
        assert_eq!(e.master_addr, "gpu-03");
        assert_eq!(e.master_port, 20000 + (123456 % 20000) as u16);
        // srun's step task count wins over the job's; MASTER_ADDR / MASTER_PORT win over the derived ones.
        let e = env(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_NODELIST", "n1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (e.world_size, e.master_addr.as_str(), e.master_port),
            (2, "10.0.0.1", 1234)
        );
        let err = env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("MASTER_ADDR"), "{err}");
        let err = env(&[("SLURM_PROCID", "0")]).unwrap_err().to_string();
        assert!(err.contains("SLURM_NTASKS"), "{err}");
    }

    #[test]
    fn first_host_of_hostlists() {
        for (list, host) in [
            ("node01", Some("node01")),
            ("node[01-04,07],gpu5", Some("node01")),
            ("gpu5,node[1-2]", Some("gpu5")),
            ("a[1-2]-ib", Some("a1-ib")),
            ("rack[2-3]-n[08-09]", Some("rack2-n08")),
            ("n[7]", Some("n7")),
            ("", None),
            ("n[", None),
            ("n[a-b]", None),
            ("n]1[", None),
        ] {
            assert_eq!(first_host(list).as_deref(), host, "{list}");
        }
    }
}
