//! Prometheus metrics of the server (`GET /metrics`, text format): requests by status, queue depth, requests
//! running, latency histograms per stage, windows and network calls (windows per second), memory reserved,
//! and device memory on CUDA.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets (seconds): from a cached point click to a large "everything" request on a CPU.
const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0,
];

/// How far back `vista3d_windows_per_second` looks.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Every metric of one server.
pub struct Metrics {
    registry: Registry,
    /// Finished requests by HTTP status code.
    pub requests: IntCounterVec,
    /// Requests admitted and waiting for a request thread.
    pub queue_depth: IntGauge,
    /// Requests on a request thread.
    pub running: IntGauge,
    /// Whole-request latency (admission to response).
    pub request_seconds: Histogram,
    /// Seconds per stage: receive, queue, read, preprocess, inference, postprocess, write.
    pub stage_seconds: HistogramVec,
    /// Windows computed by the network.
    pub windows: IntCounter,
    /// Network calls (one call runs a batch of windows).
    pub network_calls: IntCounter,
    /// Windows per network call.
    pub batch_windows: Histogram,
    /// Bytes of the memory budget reserved by running requests.
    pub memory_reserved: IntGauge,
    /// Device memory (`free`, `total`) when on CUDA.
    pub device_memory: IntGaugeVec,
    windows_per_second: prometheus::Gauge,
    recent: Mutex<VecDeque<(Instant, u64)>>,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "vista3d_requests_total",
                "Finished inference requests by HTTP status",
            ),
            &["status"],
        )
        .expect("valid metric");
        let queue_depth = IntGauge::new(
            "vista3d_queue_depth",
            "Requests admitted and waiting for a request thread",
        )
        .expect("valid metric");
        let running = IntGauge::new(
            "vista3d_requests_running",
            "Requests being computed on a request thread",
        )
        .expect("valid metric");
        let request_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "vista3d_request_seconds",
                "Latency of inference requests, admission to response",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new(
                "vista3d_stage_seconds",
                "Seconds per stage of an inference request (receive, queue, read, preprocess, inference, postprocess, write)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["stage"],
        )
        .expect("valid metric");
        let windows = IntCounter::new(
            "vista3d_windows_total",
            "Sliding windows computed by the network",
        )
        .expect("valid metric");
        let network_calls = IntCounter::new(
            "vista3d_network_calls_total",
            "Network calls on the device (each runs a batch of windows)",
        )
        .expect("valid metric");
        let batch_windows = Histogram::with_opts(
            HistogramOpts::new("vista3d_batch_windows", "Windows per network call")
                .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0]),
        )
        .expect("valid metric");
        let memory_reserved = IntGauge::new(
            "vista3d_memory_reserved_bytes",
            "Bytes of the memory budget reserved by running requests",
        )
        .expect("valid metric");
        let device_memory = IntGaugeVec::new(
            Opts::new(
                "vista3d_device_memory_bytes",
                "CUDA device memory (free and total) after the last network call",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let windows_per_second = prometheus::Gauge::new(
            "vista3d_windows_per_second",
            "Windows computed per second over the last 10 seconds",
        )
        .expect("valid metric");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(queue_depth.clone()),
            Box::new(running.clone()),
            Box::new(request_seconds.clone()),
            Box::new(stage_seconds.clone()),
            Box::new(windows.clone()),
            Box::new(network_calls.clone()),
            Box::new(batch_windows.clone()),
            Box::new(memory_reserved.clone()),
            Box::new(device_memory.clone()),
            Box::new(windows_per_second.clone()),
        ] {
            registry.register(m).expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            queue_depth,
            running,
            request_seconds,
            stage_seconds,
            windows,
            network_calls,
            batch_windows,
            memory_reserved,
            device_memory,
            windows_per_second,
            recent: Mutex::new(VecDeque::new()),
        }
    }

    /// Records one network call of `n` windows.
    pub fn network_call(&self, n: usize) {
        self.windows.inc_by(n as u64);
        self.network_calls.inc();
        self.batch_windows.observe(n as f64);
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.push_back((Instant::now(), n as u64));
        Self::prune(&mut recent);
    }

    fn prune(recent: &mut VecDeque<(Instant, u64)>) {
        while recent
            .front()
            .is_some_and(|(t, _)| t.elapsed() > RATE_WINDOW)
        {
            recent.pop_front();
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            Self::prune(&mut recent);
            let n: u64 = recent.iter().map(|(_, n)| n).sum();
            self.windows_per_second
                .set(n as f64 / RATE_WINDOW.as_secs_f64());
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::error!("cannot encode the metrics: {e}");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_exposition_has_every_family() {
        let m = Metrics::new();
        m.requests.with_label_values(&["200"]).inc();
        m.stage_seconds
            .with_label_values(&["inference"])
            .observe(0.3);
        m.network_call(4);
        let text = m.render();
        for name in [
            "vista3d_requests_total{status=\"200\"} 1",
            "vista3d_queue_depth 0",
            "vista3d_stage_seconds_bucket{stage=\"inference\",le=\"0.5\"} 1",
            "vista3d_windows_total 4",
            "vista3d_network_calls_total 1",
            "vista3d_windows_per_second 0.4",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
