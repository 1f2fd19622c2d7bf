//! Multi-process training and evaluation on PyTorch's own distributed machinery, as the bundle's
//! `multi_gpu_train.json` / `mgpu_evaluate.json` do with `torchrun` and DistributedDataParallel.
//!
//! - Launch ([`launch`]): torchrun's and Slurm's environment variables; one process per device.
//! - Rendezvous ([`store`]): libtorch's `c10d::TCPStore` through a C++ shim compiled against the torch wheel's
//!   headers: rank 0 hosts it on `MASTER_PORT`, or every rank connects to torchrun's agent store
//!   (`TORCHELASTIC_USE_AGENT_STORE`).
//! - Collectives ([`Collective`]): gloo on CPUs ([`gloo`]: Debian's libgloo through a deep-bound shim object,
//!   because libtorch's own gloo has no headers in the wheel and clashes with Debian's), NCCL on GPUs ([`nccl`]:
//!   the torch wheel's libnccl, loaded at run time).
//! - DDP ([`ddp`]): gradients averaged by bucketed all-reduce with `find_unused_parameters` semantics;
//!   DistributedSampler ([`sampler`]); distributed evaluation ([`evaluate`]).
//! - Failures ([`watchdog`]): heartbeats and a failure board in the store; a dead rank ends the others with an
//!   error naming it.
//!
//! A [`ProcessGroup`] is what the trainer and the evaluator hold: rank, world size, collectives on tensors, and
//! small exchanges of bytes through the store (configuration checks, metrics, per-image results).

pub mod ddp;
pub mod evaluate;
pub mod gloo;
pub mod launch;
pub mod nccl;
pub mod sampler;
pub mod store;
pub mod watchdog;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use tch::{Device, Tensor};

pub use launch::{LaunchEnv, Launcher};
use store::Store;
use watchdog::{PeerInfo, Verdict, Watchdog, WatchdogSettings};

use crate::config::Config;

/// Why a multi-process run cannot start or continue.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The launch environment is incomplete or inconsistent.
    #[error("{0}")]
    Launch(String),
    /// Not possible here: a shim not built, a library not installed.
    #[error("{0}")]
    Unavailable(String),
    /// The rendezvous store failed.
    #[error("{0}")]
    Store(String),
    /// Something did not happen within its time limit.
    #[error("{0}")]
    Timeout(String),
    /// A collective operation failed.
    #[error("{0}")]
    Collective(String),
    /// Another rank failed or died.
    #[error("{message}")]
    PeerFailed { rank: usize, message: String },
    /// The ranks disagree (configuration, network width).
    #[error("{0}")]
    Mismatch(String),
}

/// The collective library behind a process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// Collectives on tensors: what gloo and NCCL both provide. Every rank must call the same operations in the same
/// order with tensors of the same size.
pub trait Collective: Send {
    fn backend(&self) -> Backend;
    /// In-place sum over all ranks of a float32 or float64 tensor; every rank ends with the same values.
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), DistError>;
    /// Copies rank `root`'s tensor into every rank's (same shape and type everywhere).
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), DistError>;
    fn barrier(&mut self) -> Result<(), DistError>;
    /// Cancels pending operations (after another rank failed); the backend is unusable afterwards.
    fn abort(&mut self) {}
}

/// Settings of a process group, from the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct DistSettings {
    /// `dist_backend`: `auto` (NCCL on CUDA, gloo on the CPU), `gloo` or `nccl`.
    pub backend: Option<Backend>,
    /// `dist_timeout` (seconds, default 1800 as torch's): rendezvous, store requests and each collective.
    pub timeout: Duration,
    /// `dist_heartbeat_timeout` (seconds, default 60): a rank silent this long is dead.
    pub heartbeat_timeout: Duration,
    /// `bucket_cap_mb` (default 25, DDP's): size of the gradient all-reduce buckets.
    pub bucket_cap_mb: f64,
}

impl Default for DistSettings {
    fn default() -> Self {
        DistSettings {
            backend: None,
            timeout: Duration::from_secs(1800),
            heartbeat_timeout: Duration::from_secs(60),
            bucket_cap_mb: 25.0,
        }
    }
}

fn seconds(cfg: &Config, key: &str, default: Duration) -> anyhow::Result<Duration> {
    match crate::training::cfg_f64(cfg, key)? {
        None => Ok(default),
        Some(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
        Some(s) => anyhow::bail!("config '{key}' must be a positive number of seconds, got {s}"),
    }
}

impl DistSettings {
    /// Reads `dist_backend`, `dist_timeout`, `dist_heartbeat_timeout` and `bucket_cap_mb`.
    pub fn from_config(cfg: &Config) -> anyhow::Result<DistSettings> {
        let d = DistSettings::default();
        let backend = match cfg.string("dist_backend")?.as_deref() {
            None | Some("auto") => None,
            Some("gloo") => Some(Backend::Gloo),
            Some("nccl") => Some(Backend::Nccl),
            Some(other) => {
                anyhow::bail!("config 'dist_backend' must be auto, gloo or nccl, got '{other}'")
            }
        };
        let bucket_cap_mb =
            crate::training::cfg_f64(cfg, "bucket_cap_mb")?.unwrap_or(d.bucket_cap_mb);
        anyhow::ensure!(
            bucket_cap_mb > 0.0 && bucket_cap_mb.is_finite(),
            "config 'bucket_cap_mb' must be a positive number of MiB, got {bucket_cap_mb}"
        );
        Ok(DistSettings {
            backend,
            timeout: seconds(cfg, "dist_timeout", d.timeout)?,
            heartbeat_timeout: seconds(cfg, "dist_heartbeat_timeout", d.heartbeat_timeout)?,
            bucket_cap_mb,
        })
    }
}

/// The device a rank computes on: `LOCAL_RANK`'s GPU when the configuration asks for CUDA, else the CPU.
pub fn rank_device(env: &LaunchEnv, requested: Device) -> anyhow::Result<Device> {
    match requested {
        Device::Cpu => Ok(Device::Cpu),
        Device::Cuda(i) => {
            let n = tch::Cuda::device_count() as usize;
            anyhow::ensure!(
                env.local_rank < n,
                "LOCAL_RANK={} but this node has {n} CUDA device(s): start at most {n} processes per node",
                env.local_rank
            );
            if i != 0 && i != env.local_rank {
                log::warn!(
                    "device cuda:{i} in the configuration ignored: LOCAL_RANK={} picks cuda:{}",
                    env.local_rank,
                    env.local_rank
                );
            }
            Ok(Device::Cuda(env.local_rank))
        }
        other => anyhow::bail!("device {other:?} is not supported in a multi-process run"),
    }
}

/// Keys that may differ between ranks: where rank 0 writes (paths can differ between nodes; only rank 0 uses
/// them) and the device (`LOCAL_RANK` picks it).
pub const PER_RANK_KEYS: [&str; 3] = ["ckpt_dir", "output_dir", "device"];

/// JSON text with object keys sorted, so equal values give equal text.
fn canonical_json(v: &serde_json::Value) -> String {
    fn write(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::String(k.clone()).to_string());
                    out.push(':');
                    write(&m[k], out);
                }
                out.push('}');
            }
            serde_json::Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

/// The configuration every rank must share, key by key (canonical JSON values), without [`PER_RANK_KEYS`].
fn shared_entries(cfg: &Config) -> std::collections::BTreeMap<String, String> {
    cfg.value
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !PER_RANK_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), canonical_json(v)))
                .collect()
        })
        .unwrap_or_default()
}

/// A digest of the configuration every rank must share: SHA-256 of its JSON with sorted keys, without
/// [`PER_RANK_KEYS`]. The first 16 hex digits.
pub fn config_digest(cfg: &Config) -> String {
    use sha2::{Digest, Sha256};
    let text = serde_json::to_string(&shared_entries(cfg)).unwrap_or_default();
    crate::fsutil::hex(&Sha256::digest(text.as_bytes()))[..16].to_string()
}

/// The watchdog's tick for these settings.
fn watchdog_interval(settings: &DistSettings) -> Duration {
    watchdog::interval_for(settings.heartbeat_timeout)
}

/// Sets up the collectives of one rank.
fn connect_backend(
    kind: Backend,
    env: &LaunchEnv,
    settings: &DistSettings,
    device: Device,
    store: &Store,
    host_name: &str,
) -> Result<Box<dyn Collective>, DistError> {
    Ok(match (kind, device) {
        (Backend::Nccl, Device::Cuda(i)) => Box::new(nccl::NcclBackend::connect(
            store,
            env.rank,
            env.world_size,
            i,
        )?),
        (Backend::Nccl, other) => {
            return Err(DistError::Launch(format!(
                "dist_backend nccl needs CUDA devices, this rank runs on {other:?}"
            )))
        }
        (Backend::Gloo, _) => {
            let iface = std::env::var("GLOO_SOCKET_IFNAME")
                .ok()
                .filter(|s| !s.is_empty());
            let host = gloo::local_address_towards(&env.master_addr, env.master_port)
                .unwrap_or_else(|| host_name.to_string());
            Box::new(gloo::GlooBackend::connect(
                store,
                env.rank,
                env.world_size,
                &host,
                iface.as_deref(),
                settings.timeout,
            )?)
        }
    })
}

/// One process of a multi-process run.
pub struct ProcessGroup {
    env: LaunchEnv,
    settings: DistSettings,
    device: Device,
    store: Store,
    backend: Mutex<Option<Box<dyn Collective>>>,
    watchdog: Mutex<Option<Watchdog>>,
    peers: Vec<PeerInfo>,
    /// Sequence number of store exchanges (all ranks make them in the same order).
    seq: AtomicU64,
}

/// The host name of this machine, for messages.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "?".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

impl ProcessGroup {
    /// Joins the group: rendezvous through the store, collectives for `device`, watchdog started.
    pub fn init(
        env: LaunchEnv,
        settings: DistSettings,
        device: Device,
    ) -> Result<ProcessGroup, DistError> {
        let prefix = env.key_prefix();
        let store = if env.hosts_store() {
            Store::host(env.master_port, env.world_size, settings.timeout, &prefix)?
        } else {
            Store::connect(
                &env.master_addr,
                env.master_port,
                env.world_size,
                !env.use_agent_store,
                settings.timeout,
                &prefix,
            )?
        };
        // Who is who, for messages about failures.
        let me = PeerInfo {
            host: host_name(),
            pid: std::process::id(),
        };
        store.set(
            &format!("info/{}", env.rank),
            format!("{} {}", me.host, me.pid).as_bytes(),
        )?;
        let mut peers = Vec::with_capacity(env.world_size);
        for r in 0..env.world_size {
            let v = store.get(&format!("info/{r}"))?;
            let text = String::from_utf8_lossy(&v).into_owned();
            let (host, pid) = text.rsplit_once(' ').unwrap_or((&text, "0"));
            peers.push(PeerInfo {
                host: host.to_string(),
                pid: pid.parse().unwrap_or(0),
            });
        }
        // The watchdog first: a rank that fails to set up its collectives then ends the others too.
        let watchdog_store = Store::connect(
            &env.master_addr,
            env.master_port,
            env.world_size,
            false,
            settings.timeout,
            &prefix,
        )?;
        let mut watchdog = Watchdog::start(
            watchdog_store,
            WatchdogSettings {
                rank: env.rank,
                world_size: env.world_size,
                heartbeat_timeout: settings.heartbeat_timeout,
                store_host_rank: (!env.use_agent_store).then_some(0),
                exit_on_verdict: true,
            },
            peers.clone(),
        );
        let backend_kind = settings.backend.unwrap_or(if device.is_cuda() {
            Backend::Nccl
        } else {
            Backend::Gloo
        });
        let backend = match connect_backend(backend_kind, &env, &settings, device, &store, &me.host)
        {
            Ok(b) => b,
            Err(e) => {
                let message = format!("{} failed: {e}", watchdog::describe(env.rank, &peers));
                watchdog::post_failure(&store, env.rank, &message);
                watchdog.stop();
                if env.hosts_store() {
                    // Let the others read the message before the store goes away.
                    std::thread::sleep(watchdog_interval(&settings) * 3);
                }
                return Err(e);
            }
        };
        log::info!(
            "joined the process group: {}, {} on {device:?}",
            env.describe(),
            backend_kind.name()
        );
        Ok(ProcessGroup {
            env,
            settings,
            device,
            store,
            backend: Mutex::new(Some(backend)),
            watchdog: Mutex::new(Some(watchdog)),
            peers,
            seq: AtomicU64::new(0),
        })
    }

    /// Reads the launch environment and joins the group; `None` for a single process. `requested` is the
    /// configuration's device; the returned device is this rank's.
    pub fn from_env(
        cfg: &Config,
        requested: Device,
    ) -> anyhow::Result<Option<(ProcessGroup, Device)>> {
        let Some(env) = LaunchEnv::from_env()? else {
            return Ok(None);
        };
        let settings = DistSettings::from_config(cfg)?;
        let device = rank_device(&env, requested)?;
        let describe = env.describe();
        let group = ProcessGroup::init(env, settings, device)
            .with_context(|| format!("joining the process group as {describe}"))?;
        Ok(Some((group, device)))
    }

    pub fn rank(&self) -> usize {
        self.env.rank
    }

    pub fn world_size(&self) -> usize {
        self.env.world_size
    }

    /// Rank 0 writes checkpoints, logs and reports.
    pub fn is_main(&self) -> bool {
        self.env.rank == 0
    }

    pub fn env(&self) -> &LaunchEnv {
        &self.env
    }

    pub fn settings(&self) -> &DistSettings {
        &self.settings
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn backend(&self) -> Option<Backend> {
        self.backend
            .lock()
            .ok()
            .and_then(|b| b.as_ref().map(|b| b.backend()))
    }

    /// Describes a rank for messages: `rank 1 (host h, pid 42)`.
    pub fn describe_rank(&self, rank: usize) -> String {
        watchdog::describe(rank, &self.peers)
    }

    /// Runs a collective; on failure, asks the watchdog which rank is to blame.
    fn collective(
        &self,
        what: &str,
        f: impl FnOnce(&mut dyn Collective) -> Result<(), DistError>,
    ) -> Result<(), DistError> {
        let mut guard = self
            .backend
            .lock()
            .map_err(|_| DistError::Collective(format!("{what}: the backend lock is poisoned")))?;
        let backend = guard
            .as_mut()
            .ok_or_else(|| DistError::Collective(format!("{what}: the process group is closed")))?;
        match f(backend.as_mut()) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.blame(e)),
        }
    }

    /// Turns an error of a collective or store exchange into [`DistError::PeerFailed`] when the watchdog finds a
    /// failed rank within the heartbeat timeout.
    fn blame(&self, e: DistError) -> DistError {
        if matches!(e, DistError::PeerFailed { .. }) {
            return e;
        }
        let wait = self.settings.heartbeat_timeout + Duration::from_secs(2);
        let verdict: Option<Verdict> = self
            .watchdog
            .lock()
            .ok()
            .and_then(|w| w.as_ref().and_then(|w| w.wait_verdict(wait)));
        match verdict {
            Some(v) => DistError::PeerFailed {
                rank: v.rank,
                message: format!("{} ({e})", v.message),
            },
            None => e,
        }
    }

    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), DistError> {
        self.collective("all-reduce", |b| b.all_reduce_sum(t))
    }

    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), DistError> {
        self.collective("broadcast", |b| b.broadcast(t, root))
    }

    pub fn barrier(&self) -> Result<(), DistError> {
        self.collective("barrier", |b| b.barrier())
    }

    fn next_key(&self, what: &str) -> String {
        format!("x/{}/{what}", self.seq.fetch_add(1, Ordering::SeqCst))
    }

    /// Every rank's `data`, in rank order (through the store: for small payloads such as metrics).
    pub fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        let key = self.next_key("gather");
        self.store
            .set(&format!("{key}/{}", self.rank()), data)
            .map_err(|e| self.blame(e))?;
        (0..self.world_size())
            .map(|r| {
                self.store
                    .get(&format!("{key}/{r}"))
                    .map_err(|e| self.blame(e))
            })
            .collect()
    }

    /// Rank 0's `data` on every rank (through the store). Other ranks pass `None`.
    pub fn broadcast_bytes(&self, data: Option<&[u8]>) -> Result<Vec<u8>, DistError> {
        let key = self.next_key("bcast");
        if self.is_main() {
            let data = data.unwrap_or_default();
            self.store.set(&key, data).map_err(|e| self.blame(e))?;
            Ok(data.to_vec())
        } else {
            self.store.get(&key).map_err(|e| self.blame(e))
        }
    }

    /// Rank 0's bytes on every rank, of any size (the length through the store, the bytes through the backend's
    /// broadcast): e.g. the checkpoint to resume from. Other ranks pass `None`.
    pub fn broadcast_blob(&self, data: Option<Vec<u8>>) -> Result<Vec<u8>, DistError> {
        let len = data.as_ref().map_or(0, Vec::len) as u64;
        let len_bytes = self.broadcast_bytes(Some(&len.to_le_bytes()))?;
        let len = u64::from_le_bytes(len_bytes.as_slice().try_into().map_err(|_| {
            DistError::Store(format!(
                "blob length of {} bytes, expected 8",
                len_bytes.len()
            ))
        })?) as usize;
        let host = match (self.is_main(), data) {
            (true, Some(d)) => Tensor::from_slice(&d),
            _ => Tensor::zeros([len as i64], (tch::Kind::Uint8, Device::Cpu)),
        };
        let mut t = host.to_device(self.device);
        self.broadcast(&mut t, 0)?;
        Vec::<u8>::try_from(t.to_device(Device::Cpu))
            .map_err(|e| DistError::Collective(format!("reading the broadcast bytes: {e}")))
    }

    /// Checks that every rank runs with the same configuration (every key but [`PER_RANK_KEYS`]); the error names
    /// the keys that differ, with rank 0's and the other rank's values.
    pub fn check_config(&self, cfg: &Config) -> Result<(), DistError> {
        let digest = config_digest(cfg);
        let digests = self.all_gather_bytes(digest.as_bytes())?;
        if digests.iter().all(|d| d == &digests[0]) {
            return Ok(());
        }
        let entries = serde_json::to_vec(&shared_entries(cfg)).unwrap_or_default();
        let all = self.all_gather_bytes(&entries)?;
        let parsed: Vec<std::collections::BTreeMap<String, String>> = all
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap_or_default())
            .collect();
        let short = |v: Option<&String>| match v {
            None => "nothing".to_string(),
            Some(v) if v.chars().count() > 60 => {
                format!("{}...", v.chars().take(57).collect::<String>())
            }
            Some(v) => v.clone(),
        };
        let mut parts = Vec::new();
        for (r, entries) in parsed.iter().enumerate().skip(1) {
            let keys: std::collections::BTreeSet<&String> =
                parsed[0].keys().chain(entries.keys()).collect();
            for k in keys {
                let (a, b) = (parsed[0].get(k), entries.get(k));
                if a != b {
                    parts.push(format!(
                        "{} has {k}={} where rank 0 has {}",
                        self.describe_rank(r),
                        short(b),
                        short(a)
                    ));
                }
            }
        }
        Err(DistError::Mismatch(format!(
            "the ranks disagree on the configuration (every key but {} must be equal): {}",
            PER_RANK_KEYS.join(", "),
            parts.join("; ")
        )))
    }

    /// Checks that every rank has the same `value` of `what` (e.g. the configuration hash); the error lists the
    /// ranks that differ from rank 0.
    pub fn check_same(&self, what: &str, value: &str) -> Result<(), DistError> {
        let all = self.all_gather_bytes(value.as_bytes())?;
        let differing: Vec<String> = all
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, v)| *v != &all[0])
            .map(|(r, v)| {
                format!(
                    "{} has {}",
                    self.describe_rank(r),
                    String::from_utf8_lossy(v)
                )
            })
            .collect();
        if differing.is_empty() {
            Ok(())
        } else {
            Err(DistError::Mismatch(format!(
                "the ranks disagree on the {what}: rank 0 has {}, {}",
                String::from_utf8_lossy(&all[0]),
                differing.join(", ")
            )))
        }
    }

    /// Announces that this rank stops with `error`, so that the others end with this message (their watchdogs
    /// read it within a tick) instead of waiting for a timeout. The store's host lingers for a few ticks so the
    /// others can read it.
    pub fn abort(&self, error: &str) {
        let message = format!("{} failed: {error}", self.describe_rank(self.rank()));
        watchdog::post_failure(&self.store, self.rank(), &message);
        if let Ok(mut w) = self.watchdog.lock() {
            if let Some(mut w) = w.take() {
                w.stop();
            }
        }
        if let Ok(mut b) = self.backend.lock() {
            if let Some(mut b) = b.take() {
                b.abort();
            }
        }
        if self.env.hosts_store() {
            std::thread::sleep(watchdog_interval(&self.settings) * 3);
        }
    }

    /// Ends the run cleanly: a last barrier, the watchdog stopped, and the store's host waits until every other
    /// rank is done with the store.
    pub fn finish(self) -> Result<(), DistError> {
        self.barrier()?;
        if let Ok(mut w) = self.watchdog.lock() {
            if let Some(mut w) = w.take() {
                w.stop();
            }
        }
        if self.env.hosts_store() {
            let others: Vec<String> = (1..self.world_size())
                .map(|r| format!("done/{r}"))
                .collect();
            self.store
                .wait(&others, self.settings.heartbeat_timeout * 2)
                .map_err(|e| {
                    DistError::Timeout(format!("waiting for the other ranks to finish: {e}"))
                })?;
        } else {
            self.store.set(&format!("done/{}", self.rank()), b"1")?;
        }
        Ok(())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Ok(mut w) = self.watchdog.lock() {
            if let Some(mut w) = w.take() {
                w.stop();
            }
        }
    }
}

/// Runs `f` with the process group (if any); when `f` fails, the failure is announced to the other ranks before
/// it is returned; when it succeeds, the group is closed cleanly.
pub fn run_in_group<T>(
    group: Option<ProcessGroup>,
    f: impl FnOnce(Option<&ProcessGroup>) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    match group {
        None => f(None),
        Some(g) => match f(Some(&g)) {
            Ok(v) => {
                g.finish().context("closing the process group")?;
                Ok(v)
            }
            Err(e) => {
                // A failure caused by another rank is not announced again.
                let from_peer = e.chain().any(|c| {
                    matches!(
                        c.downcast_ref::<DistError>(),
                        Some(DistError::PeerFailed { .. })
                    )
                });
                if !from_peer {
                    g.abort(&format!("{e:#}"));
                }
                Err(e)
            }
        },
    }
}
