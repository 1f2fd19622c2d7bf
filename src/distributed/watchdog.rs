//! Failure detection: a rank that dies (killed, crashed, or stuck) must end the others with an error that names
//! it, within a bounded time, instead of leaving them blocked in a collective forever.
//!
//! Every rank runs a watchdog thread with its own connection to the store. Each tick (at most 1 s) it
//! - increments its heartbeat counter `hb/<rank>`;
//! - reads the heartbeat counters of its ring neighbours (`rank - 1`, `rank + 1`): a neighbour whose counter has not
//!   moved for `heartbeat_timeout` is declared dead;
//! - reads the failure board (`failures` counter, `fail/<rank>` messages), where a rank that stops with an error
//!   (or a watchdog that found a dead neighbour) posts what happened.
//!
//! On a verdict the watchdog posts it to the board (so that ranks that do not watch the dead one learn it within a
//! tick), prints it and ends the process (`_exit(1)`: the main thread may be blocked inside gloo or NCCL and cannot be
//! unwound; every file vista3d writes is written atomically, so nothing partial is left). A store that stops
//! answering means its host is gone: rank 0, unless torchrun's agent hosts it.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::store::Store;

/// Exit status of a rank ended because another rank failed.
pub const EXIT_PEER_FAILED: i32 = 1;

/// What the watchdog concluded.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The rank that failed.
    pub rank: usize,
    pub message: String,
}

/// Who each rank is, for messages (`host`, `pid`).
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub host: String,
    pub pid: u32,
}

/// Settings of the watchdog.
#[derive(Debug, Clone)]
pub struct WatchdogSettings {
    pub rank: usize,
    pub world_size: usize,
    /// A neighbour whose heartbeat does not move for this long is dead.
    pub heartbeat_timeout: Duration,
    /// The rank hosting the store (`None`: torchrun's agent hosts it).
    pub store_host_rank: Option<usize>,
    /// End the process on a verdict (off in unit tests).
    pub exit_on_verdict: bool,
}

impl WatchdogSettings {
    /// Time between ticks (see [`interval_for`]).
    pub fn interval(&self) -> Duration {
        interval_for(self.heartbeat_timeout)
    }

    /// The ranks whose heartbeats this rank watches: its ring neighbours.
    pub fn watched(&self) -> Vec<usize> {
        let w = self.world_size;
        let mut v = vec![(self.rank + w - 1) % w, (self.rank + 1) % w];
        v.sort_unstable();
        v.dedup();
        v.retain(|&r| r != self.rank);
        v
    }
}

/// Time between the watchdog's ticks for a heartbeat timeout: a fifth of it, between 50 ms and 1 s.
pub fn interval_for(heartbeat_timeout: Duration) -> Duration {
    (heartbeat_timeout / 5).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// The running watchdog thread.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    verdict: Arc<Mutex<Option<Verdict>>>,
    thread: Option<JoinHandle<()>>,
}

/// Describes a rank for messages: `rank 1 (host h, pid 42)`.
pub fn describe(rank: usize, peers: &[PeerInfo]) -> String {
    match peers.get(rank) {
        Some(p) if !p.host.is_empty() => format!("rank {rank} (host {}, pid {})", p.host, p.pid),
        _ => format!("rank {rank}"),
    }
}

impl Watchdog {
    /// Starts the thread on `store` (a connection of its own).
    pub fn start(store: Store, settings: WatchdogSettings, peers: Vec<PeerInfo>) -> Watchdog {
        let stop = Arc::new(AtomicBool::new(false));
        let verdict = Arc::new(Mutex::new(None));
        let thread = {
            let (stop, verdict) = (stop.clone(), verdict.clone());
            std::thread::Builder::new()
                .name("vista3d-watchdog".into())
                .spawn(move || run(store, settings, peers, stop, verdict))
                .ok()
        };
        if thread.is_none() {
            log::warn!(
                "cannot start the watchdog thread: a dead rank will only be noticed by a timeout"
            );
        }
        Watchdog {
            stop,
            verdict,
            thread,
        }
    }

    /// The verdict, if one was reached.
    pub fn verdict(&self) -> Option<Verdict> {
        self.verdict.lock().map(|v| v.clone()).unwrap_or(None)
    }

    /// Waits up to `timeout` for a verdict.
    pub fn wait_verdict(&self, timeout: Duration) -> Option<Verdict> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(v) = self.verdict() {
                return Some(v);
            }
            if Instant::now() >= end || self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the thread (heartbeats stop too).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    store: Store,
    settings: WatchdogSettings,
    peers: Vec<PeerInfo>,
    stop: Arc<AtomicBool>,
    verdict: Arc<Mutex<Option<Verdict>>>,
) {
    let interval = settings.interval();
    let watched = settings.watched();
    let me = settings.rank;
    let mut last: HashMap<usize, (i64, Instant)> = HashMap::new();
    let start = Instant::now();
    let conclude = |v: Verdict, post: bool| {
        if post {
            post_failure(&store, v.rank, &v.message);
        }
        if let Ok(mut slot) = verdict.lock() {
            if slot.is_none() {
                *slot = Some(v.clone());
            }
        }
        if settings.exit_on_verdict && !stop.load(Ordering::SeqCst) {
            let _ = writeln!(
                std::io::stderr(),
                "error: {}; ending rank {me} too",
                v.message
            );
            let _ = std::io::stderr().flush();
            // SAFETY: _exit ends the process without running destructors (other threads may be inside libtorch).
            unsafe { libc::_exit(EXIT_PEER_FAILED) };
        }
    };
    while !stop.load(Ordering::SeqCst) {
        let tick = Instant::now();
        if let Err(e) = store.add(&format!("hb/{me}"), 1) {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let message = match settings.store_host_rank {
                Some(host) => format!(
                    "{} stopped: the rendezvous store it hosts at {} no longer answers ({e})",
                    describe(host, &peers),
                    store.address()
                ),
                None => format!(
                    "the rendezvous store at {} (torchrun's agent) no longer answers ({e})",
                    store.address()
                ),
            };
            conclude(
                Verdict {
                    rank: settings.store_host_rank.unwrap_or(me),
                    message,
                },
                false,
            );
            break;
        }
        // Announced failures first: they carry the failing rank's own error.
        if let Some(v) = read_board(&store, settings.world_size, me, &peers) {
            conclude(v, false);
            break;
        }
        let mut dead = None;
        for &r in &watched {
            let Ok(count) = store.add(&format!("hb/{r}"), 0) else {
                continue;
            };
            let entry = last.entry(r).or_insert((count, tick));
            if count != entry.0 {
                *entry = (count, tick);
            } else if tick.duration_since(entry.1) >= settings.heartbeat_timeout
                && tick.duration_since(start) >= settings.heartbeat_timeout
            {
                dead = Some(r);
                break;
            }
        }
        if let Some(r) = dead {
            let message = format!(
                "{} stopped responding: no heartbeat for {} s (the process died or hangs)",
                describe(r, &peers),
                settings.heartbeat_timeout.as_secs_f64()
            );
            conclude(Verdict { rank: r, message }, true);
            break;
        }
        let spent = tick.elapsed();
        if spent < interval {
            std::thread::sleep(interval - spent);
        }
    }
}

/// Posts a failure of `rank` on the board (best effort).
pub fn post_failure(store: &Store, rank: usize, message: &str) {
    let key = format!("fail/{rank}");
    if !store.check(std::slice::from_ref(&key)).unwrap_or(false) {
        let _ = store.set(&key, message.as_bytes());
        let _ = store.add("failures", 1);
    }
}

/// The first failure posted by or about another rank.
fn read_board(store: &Store, world_size: usize, me: usize, _peers: &[PeerInfo]) -> Option<Verdict> {
    if store.add("failures", 0).ok()? <= 0 {
        return None;
    }
    for r in (0..world_size).filter(|&r| r != me) {
        let key = format!("fail/{r}");
        if store.check(std::slice::from_ref(&key)).unwrap_or(false) {
            let message = store
                .get(&key)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|e| {
                    format!("rank {r} failed (its message could not be read: {e})")
                });
            return Some(Verdict { rank: r, message });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_and_interval() {
        let s = |rank, world_size, secs| WatchdogSettings {
            rank,
            world_size,
            heartbeat_timeout: Duration::from_secs(secs),
            store_host_rank: Some(0),
            exit_on_verdict: false,
        };
        assert_eq!(s(0, 2, 60).watched(), vec![1]);
        assert_eq!(s(1, 2, 60).watched(), vec![0]);
        assert_eq!(s(0, 4, 60).watched(), vec![1, 3]);
        assert_eq!(s(2, 4, 60).watched(), vec![1, 3]);
        assert_eq!(s(0, 1, 60).watched(), Vec::<usize>::new());
        assert_eq!(s(0, 2, 60).interval(), Duration::from_secs(1));
        assert_eq!(s(0, 2, 2).interval(), Duration::from_millis(400));
    }

    #[test]
    #[cfg(vista3d_c10d_store)]
    fn a_silent_neighbour_and_a_posted_failure_are_reported() {
        let timeout = Duration::from_secs(20);
        let host = Store::host(0, 1, timeout, "w/").unwrap();
        let port = host.port().unwrap();
        let connect = || Store::connect("127.0.0.1", port, 1, false, timeout, "w/").unwrap();
        let peers = vec![
            PeerInfo {
                host: "a".into(),
                pid: 1,
            },
            PeerInfo {
                host: "b".into(),
                pid: 2,
            },
        ];
        let settings = WatchdogSettings {
            rank: 0,
            world_size: 2,
            heartbeat_timeout: Duration::from_millis(600),
            store_host_rank: Some(0),
            exit_on_verdict: false,
        };
        // Rank 1 never beats: rank 0's watchdog names it.
        let t = Instant::now();
        let w = Watchdog::start(connect(), settings.clone(), peers.clone());
        let v = w.wait_verdict(Duration::from_secs(10)).expect("a verdict");
        assert_eq!(v.rank, 1);
        assert!(
            v.message
                .contains("rank 1 (host b, pid 2) stopped responding"),
            "{}",
            v.message
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        // The verdict is on the board for the others.
        assert!(host.check(&["fail/1".into()]).unwrap());

        // A failure posted by rank 1 reaches a fresh watchdog with rank 1's own words.
        let fresh = Store::host(0, 1, timeout, "v/").unwrap();
        let port = fresh.port().unwrap();
        post_failure(&fresh, 1, "rank 1 failed: bad input");
        let w = Watchdog::start(
            Store::connect("127.0.0.1", port, 1, false, timeout, "v/").unwrap(),
            WatchdogSettings {
                heartbeat_timeout: Duration::from_secs(30),
                ..settings
            },
            peers,
        );
        let v = w.wait_verdict(Duration::from_secs(10)).expect("a verdict");
        assert_eq!(
            v,
            Verdict {
                rank: 1,
                message: "rank 1 failed: bad input".into()
            }
        );
    }
}
