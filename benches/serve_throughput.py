#!/usr/bin/env python3
"""Throughput of `vista3d serve`: requests/s and latency p50/p95 for 1, 4 and 16 concurrent clients, with
batching across requests off and on, against sequential requests as before the server (one `vista3d infer`
process per image, which loads the model each time). Loopback only; every run is bounded.

    python3 benches/serve_throughput.py --binary target/release/vista3d --image CT.nii.gz \
        [--requests 32] [--clients 1,4,16] [--batch 1,4] [--workers 4] [--json out.json] [-- extra serve flags]

Extra flags after `--` go to both `infer` and `serve` (e.g. `--demo-weights --set patch_size=[32,32,32]`).
Each configuration starts its own server (`--listen 127.0.0.1:0`), waits for readiness, runs one untimed request,
then the timed runs. Uses only the Python standard library (urllib).
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def start(binary, image_dir, batch, workers, extra):
    args = [binary, "serve", "--listen", "127.0.0.1:0", "--allow-dir", image_dir, "--workers", str(workers),
            "--queue", "256", "--set", f"serve_max_batch_windows={batch}"] + extra
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    base = None
    while time.time() < deadline:
        line = p.stdout.readline()
        if line.startswith("vista3d serve: listening on "):
            base = line.split("listening on ", 1)[1].strip()
            break
        if p.poll() is not None:
            break
    if base is None:
        p.kill()
        sys.exit("server did not start: " + " ".join(args))
    threading.Thread(target=p.stdout.read, daemon=True).start()
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(base + "/v1/health/ready", timeout=5) as r:
                if r.status == 200:
                    return p, base
        except Exception:
            time.sleep(0.2)
    p.kill()
    sys.exit("server not ready")


def infer(base, body):
    req = urllib.request.Request(base + "/v1/vista3d/inference?format=nifti", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()
        assert r.status == 200, r.status
    return time.perf_counter() - t


def run(base, body, clients, total):
    per_client = max(1, total // clients)
    lat = []
    lock = threading.Lock()

    def client(_):
        for _ in range(per_client):
            s = infer(base, body)
            with lock:
                lat.append(s)

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(client, range(clients)))
    wall = time.perf_counter() - t
    lat.sort()
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
    return {"clients": clients, "requests": len(lat), "seconds": wall, "requests_per_s": len(lat) / wall,
            "p50_s": statistics.median(lat), "p95_s": p95}


def cli_sequential(binary, image, classes, n, extra, out_dir):
    lat = []
    t = time.perf_counter()
    for _ in range(n):
        s = time.perf_counter()
        subprocess.run([binary, "infer", "--image", image, "--label-prompt", classes, "--output-dir", out_dir]
                       + extra, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t
    lat.sort()
    return {"batch": "-", "clients": "cli sequential", "requests": n, "seconds": wall, "requests_per_s": n / wall,
            "p50_s": statistics.median(lat), "p95_s": lat[min(n - 1, int(round(0.95 * (n - 1))))]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/vista3d")
    ap.add_argument("--image", required=True)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--classes", default="spleen,liver")
    ap.add_argument("--json")
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    image = os.path.abspath(a.image)
    body = json.dumps({"image": image, "prompts": {"classes": a.classes.split(",")}}).encode()
    import tempfile
    with tempfile.TemporaryDirectory() as out_dir:
        rows = [cli_sequential(a.binary, image, a.classes, max(4, a.requests // 4), a.extra, out_dir)]
    for batch in [int(b) for b in a.batch.split(",")]:
        p, base = start(a.binary, os.path.dirname(image), batch, a.workers, a.extra)
        try:
            infer(base, body)  # warm
            for c in [int(x) for x in a.clients.split(",")]:
                rows.append(dict(run(base, body, c, a.requests), batch=batch))
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=120)
    print(f"{'batch':>5} {'clients':>10} {'requests':>8} {'req/s':>7} {'p50 s':>7} {'p95 s':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {str(r['clients']):>10} {r['requests']:>8} {r['requests_per_s']:>7.2f} "
              f"{r['p50_s']:>7.2f} {r['p95_s']:>7.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
