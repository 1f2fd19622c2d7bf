//! The workers of one batch process: one per device (or per group of CPU threads), each owning its resident
//! [`Segmenter`] on its own thread and pulling items from one shared queue.
//!
//! With prefetch (the default) a worker is a pipeline of three threads joined by rendezvous channels:
//!
//! ```text
//! feeder: look, claim, read, preprocess ──► device: the windows ──► writer: invert, write, record, release
//! ```
//!
//! so the next image is read and preprocessed while the device computes the current one, and the previous one is
//! written meanwhile; at most three items per worker are in memory. Without prefetch the same stages run one
//! after another on one thread. Either way each item's log line says how long the device waited for it
//! (`device_idle`: the seconds between the end of its previous windows and the start of this item's).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use super::claims::{try_claim, ClaimGuard, ClaimOutcome, Claimer};
use super::{
    complete_extras, input_identity, load_item, missing_extras, output_path, record, write_item,
    BatchItem, BatchOptions, BatchSummary, ItemLog, ItemRun, ItemStatus, LogSource, ReadInput,
};
use crate::segmenter::record::{request_identity_for, ModelFacts};
use crate::segmenter::{Inferred, Prepared, RequestPath, SegmentError, Segmenter};

/// What the workers of one run share: the queue of items, the log, the counts and the progress bar.
pub(super) struct Shared<'a> {
    items: Vec<&'a BatchItem>,
    opts: &'a BatchOptions,
    queue: Mutex<VecDeque<Queued>>,
    log: Mutex<ItemLog>,
    summary: Mutex<BatchSummary>,
    bar: Option<indicatif::ProgressBar>,
    finished: AtomicUsize,
    /// When this run started (an output written later counts as recomputed for `--overwrite`).
    started: SystemTime,
    /// How long to wait before looking again at an item another process is segmenting.
    poll: Duration,
}

/// An item waiting in the queue; `retry_at` is set when another process held its claim at the last look.
struct Queued {
    index: usize,
    retry_at: Option<Instant>,
}

/// Locks `m`, going on after a panic elsewhere (the data are counters and a log file, valid either way).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<'a> Shared<'a> {
    pub(super) fn new(
        items: Vec<&'a BatchItem>,
        opts: &'a BatchOptions,
        log: ItemLog,
        summary: BatchSummary,
        bar: Option<indicatif::ProgressBar>,
    ) -> Self {
        let queue = (0..items.len())
            .map(|index| Queued {
                index,
                retry_at: None,
            })
            .collect();
        Self {
            items,
            opts,
            queue: Mutex::new(queue),
            log: Mutex::new(log),
            summary: Mutex::new(summary),
            bar,
            finished: AtomicUsize::new(0),
            started: SystemTime::now(),
            poll: (opts.claim_timeout / 4)
                .clamp(Duration::from_millis(100), Duration::from_secs(5)),
        }
    }

    /// The counts of the run (after every worker stopped).
    pub(super) fn into_summary(self) -> BatchSummary {
        let taken_over = lock(&self.log).taken_over;
        let mut summary = self.summary.into_inner().unwrap_or_else(|e| e.into_inner());
        summary.taken_over = taken_over;
        summary
    }

    /// The next item to look at (waiting until a busy item's next look is due); `None` when the queue is empty:
    /// every item is finished or in the hands of a worker of this process.
    fn next(&self) -> Option<usize> {
        let q = lock(&self.queue).pop_front()?;
        if let Some(t) = q.retry_at {
            let now = Instant::now();
            if t > now {
                std::thread::sleep(t - now);
            }
        }
        Some(q.index)
    }

    /// Puts back an item that another process is segmenting, to look at it again after a while.
    fn busy(&self, index: usize, first_time: bool) {
        if first_time {
            log::info!(
                "{} is being segmented by another worker; waiting for it (or for its claim to go stale)",
                self.items[index].image.display()
            );
        }
        lock(&self.queue).push_back(Queued {
            index,
            retry_at: Some(Instant::now() + self.poll),
        });
    }

    fn output(&self, index: usize) -> PathBuf {
        let o = &self.opts.output;
        output_path(&o.dir, &self.items[index].relative, &o.postfix)
    }

    fn started(&self, w: &Worker, index: usize, out: &Path, took_over: Option<&str>) {
        lock(&self.log).started(self.items[index], out, &w.source(), took_over);
    }

    /// Counts, logs and reports a finished item.
    fn finish(&self, w: &Worker, index: usize, out: &Path, status: ItemStatus) {
        let item = self.items[index];
        let finished = self.finished.fetch_add(1, Ordering::Relaxed) + 1;
        let prefix = format!("[{finished}/{}] {}", self.items.len(), item.image.display());
        {
            let mut summary = lock(&self.summary);
            match &status {
                ItemStatus::Skipped => {
                    summary.skipped += 1;
                    log::info!("{prefix}: up to date (same request), skipped");
                }
                ItemStatus::Completed => {
                    summary.skipped += 1;
                    log::info!("{prefix}: up to date; missing extras written from the label map");
                }
                ItemStatus::Done(run) => {
                    summary.done += 1;
                    if run.fallbacks > 0 {
                        summary.fell_back += 1;
                    }
                    if self.bar.is_none() {
                        log::info!(
                            "{prefix} -> {} ({:.1} s{})",
                            out.display(),
                            run.seconds,
                            run.device_idle
                                .map(|s| format!(", device idle {s:.2} s"))
                                .unwrap_or_default()
                        );
                    }
                }
                ItemStatus::Failed(e) => {
                    log::error!("{prefix}: {e}");
                    summary.failed.push((item.image.clone(), e.clone()));
                }
            }
        }
        lock(&self.log).append(item, out, &status, &w.source());
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }
}

/// One worker's facts: its request path (for the CPU stages), its model's facts (records, identities) and its
/// claim name.
struct Worker {
    path: RequestPath,
    facts: ModelFacts,
    claimer: Claimer,
}

impl Worker {
    fn source(&self) -> LogSource<'_> {
        LogSource {
            claimer: &self.claimer,
            device: &self.facts.device,
        }
    }
}

/// An item this worker claimed: its output, the claim (held until its outputs are written) and the request it
/// answers.
struct Claim {
    index: usize,
    out: PathBuf,
    guard: ClaimGuard,
    identity: Value,
    /// The identity of the record it replaces, if any.
    replaced: Option<Value>,
}

/// What one look at an item found.
enum Look {
    Finished(ItemStatus),
    /// Another live worker holds the item's claim: look again later.
    Busy,
    /// Claimed by this worker: segment it.
    Claimed {
        guard: ClaimGuard,
        identity: Value,
        replaced: Option<Value>,
    },
}

/// Runs worker `index` until the queue is empty, with `threads` libtorch threads (its share of the process's).
pub(super) fn run_worker(index: usize, segmenter: Segmenter, threads: i32, shared: &Shared) {
    // libtorch's intra-op thread count is per thread (OpenMP): each worker thread sets its share.
    tch::set_num_threads(threads);
    let w = Worker {
        path: segmenter.request_path().clone(),
        facts: ModelFacts::of(&segmenter),
        claimer: Claimer::this_process(index.to_string()),
    };
    if shared.opts.prefetch {
        pipelined(&w, segmenter, threads, shared);
    } else {
        sequential(&w, &segmenter, shared);
    }
}

/// The next item this worker claims (finishing on the way those that need no network: skipped, completed,
/// failed before a claim); `None` when the queue is empty.
fn claim_next(w: &Worker, shared: &Shared) -> Option<Claim> {
    let mut seen_busy = std::collections::HashSet::new();
    while let Some(index) = shared.next() {
        let out = shared.output(index);
        match look(w, shared, index, &out) {
            Look::Busy => {
                let first = seen_busy.insert(index);
                shared.busy(index, first);
            }
            Look::Finished(status) => shared.finish(w, index, &out, status),
            Look::Claimed {
                guard,
                identity,
                replaced,
            } => {
                shared.started(w, index, &out, guard.took_over.as_deref());
                return Some(Claim {
                    index,
                    out,
                    guard,
                    identity,
                    replaced,
                });
            }
        }
    }
    None
}

/// Inverts and writes a claimed item whose windows ran, releases its claim and reports it.
fn write_claimed(
    w: &Worker,
    shared: &Shared,
    claim: Claim,
    read: &ReadInput,
    inferred: Result<Inferred, SegmentError>,
    device_idle: f64,
) {
    let run = inferred.and_then(|inferred| {
        write_item(
            &w.path,
            &w.facts,
            shared.items[claim.index],
            read,
            inferred,
            &claim.out,
            &shared.opts.output,
            claim.identity,
            claim.replaced,
        )
    });
    drop(claim.guard);
    let status = status_of(run.map(|mut r| {
        r.device_idle = Some(device_idle);
        r
    }));
    shared.finish(w, claim.index, &claim.out, status);
}

/// Every stage of each item on this thread, one item after another.
fn sequential(w: &Worker, segmenter: &Segmenter, shared: &Shared) {
    let mut device_free_since = Instant::now();
    while let Some(claim) = claim_next(w, shared) {
        match load_item(&w.path, shared.items[claim.index], &shared.opts.output) {
            Ok((read, prepared)) => {
                let idle = device_free_since.elapsed().as_secs_f64();
                let inferred = segmenter.infer(prepared);
                device_free_since = Instant::now();
                write_claimed(w, shared, claim, &read, inferred, idle);
            }
            Err(e) => fail_claimed(w, shared, claim, e),
        }
    }
}

/// The three-thread pipeline (see the module documentation): the feeder runs on this thread.
fn pipelined(w: &Worker, segmenter: Segmenter, threads: i32, shared: &Shared) {
    let (to_device, device_queue) = sync_channel::<(Claim, ReadInput, Prepared)>(0);
    let (to_writer, writer_queue) =
        sync_channel::<(Claim, ReadInput, Result<Inferred, SegmentError>, f64)>(0);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            tch::set_num_threads(threads);
            let mut free_since = Instant::now();
            for (claim, read, prepared) in device_queue {
                let idle = free_since.elapsed().as_secs_f64();
                let inferred = segmenter.infer(prepared);
                free_since = Instant::now();
                if to_writer.send((claim, read, inferred, idle)).is_err() {
                    break;
                }
            }
        });
        scope.spawn(move || {
            for (claim, read, inferred, idle) in writer_queue {
                write_claimed(w, shared, claim, &read, inferred, idle);
            }
        });
        while let Some(claim) = claim_next(w, shared) {
            match load_item(&w.path, shared.items[claim.index], &shared.opts.output) {
                Ok((read, prepared)) => {
                    if to_device.send((claim, read, prepared)).is_err() {
                        log::error!("the device thread of worker {} stopped", w.claimer.worker);
                        break;
                    }
                }
                Err(e) => fail_claimed(w, shared, claim, e),
            }
        }
        drop(to_device);
    });
}

/// Releases the claim of an item that failed before its windows and reports it.
fn fail_claimed(w: &Worker, shared: &Shared, claim: Claim, e: SegmentError) {
    drop(claim.guard);
    shared.finish(
        w,
        claim.index,
        &claim.out,
        ItemStatus::Failed(e.to_string()),
    );
}

fn status_of(run: Result<ItemRun, SegmentError>) -> ItemStatus {
    match run {
        Ok(run) => ItemStatus::Done(run),
        Err(e) => ItemStatus::Failed(e.to_string()),
    }
}

/// Whether the output `out` answers `identity` (for `--overwrite`: and was written during this run).
fn answered(shared: &Shared, out: &Path, identity: &Value) -> (bool, Option<Value>) {
    let previous = record::read_record(out).filter(|_| out.is_file());
    let same = previous
        .as_ref()
        .is_some_and(|r| r.get("request") == Some(identity));
    let fresh_enough = !shared.opts.overwrite
        || std::fs::metadata(record::record_path(out))
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= shared.started);
    (same && fresh_enough, previous)
}

/// One look at one item: skip it, complete its extras, or claim it for segmenting.
fn look(w: &Worker, shared: &Shared, index: usize, out: &Path) -> Look {
    let item = shared.items[index];
    let spec = &shared.opts.output;
    let method = item.precision.unwrap_or(w.path.config().precision);
    let identity = request_identity_for(
        w.path.config(),
        &w.facts,
        input_identity(item),
        &item.prompts,
        method,
        spec.dtype,
    );
    let (up_to_date, previous) = answered(shared, out, &identity);
    if up_to_date
        && !previous
            .as_ref()
            .is_some_and(|r| missing_extras(out, spec, r))
    {
        return Look::Finished(ItemStatus::Skipped);
    }
    let guard = match try_claim(out, &w.claimer, shared.opts.claim_timeout) {
        Ok(ClaimOutcome::Claimed(g)) => g,
        Ok(ClaimOutcome::Busy { .. }) => return Look::Busy,
        Err(e) => return Look::Finished(ItemStatus::Failed(e.to_string())),
    };
    if guard.took_over.is_some() {
        lock(&shared.log).taken_over += 1;
    }
    // Another worker may have finished it between the first look and the claim.
    let (up_to_date, previous) = answered(shared, out, &identity);
    if !up_to_date {
        let replaced = previous.and_then(|r| r.get("request").cloned());
        return Look::Claimed {
            guard,
            identity,
            replaced,
        };
    }
    let status = match previous {
        Some(rec) if missing_extras(out, spec, &rec) => {
            match complete_extras(&w.path, item, out, spec, rec) {
                Ok(()) => ItemStatus::Completed,
                Err(e) => ItemStatus::Failed(e.to_string()),
            }
        }
        _ => ItemStatus::Skipped,
    };
    drop(guard);
    Look::Finished(status)
}
