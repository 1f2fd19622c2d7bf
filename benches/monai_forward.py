#!/usr/bin/env python
"""MONAI's VISTA3D forward, timed per module on the CPU: the baseline for benches/network_forward.rs.

    python benches/monai_forward.py --weights W.pt --input X.safetensors --threads 2 --reps 3 --json out.json

Stages (same as the Rust bench): encoder down path; auto decoder; point decoder; class head with 1 and 117
prompts; point head with 1 object and 3 points; the whole forward with 1 class prompt. Median of --reps runs
after one warm-up run, fp32, torch.inference_mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import safetensors.torch
import torch
from monai.networks.nets import vista3d132

EVERYTHING = sorted(set(range(1, 133)) - {2, 16, 18, 20, 21, 23, 24, 25, 26, 27, 128, 129, 130, 131, 132})


def timed(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    width = state["image_encoder.encoder.conv_init.weight"].shape[0]
    net = vista3d132(encoder_embed_dim=width).eval()
    net.load_state_dict(state, strict=True)
    x = safetensors.torch.load_file(args.input)["input"]
    p = x.shape[-1]
    enc = net.image_encoder
    results = {}
    with torch.inference_mode():
        skips = enc.encoder(x)

        def decoder(layers):
            xs = list(reversed(skips))
            y = xs[0]
            for i, level in enumerate(layers):
                y = level["upsample"](y) + xs[i + 1]
                y = level["blocks"](y)
            return level["head"](y)

        feats = decoder(enc.up_layers_auto)
        cv1 = torch.tensor([[3]])
        cv117 = torch.tensor([[i] for i in EVERYTHING])
        pts = torch.tensor([[[p / 2, p / 2, p / 2], [p / 4, p / 3, p / 2], [p / 2 + 3, p / 3, p / 5]]], dtype=torch.float64)
        pl = torch.tensor([[1, 1, 0]])
        results["encoder_down"] = timed(lambda: enc.encoder(x), args.reps)
        results["decoder_auto"] = timed(lambda: decoder(enc.up_layers_auto), args.reps)
        results["decoder_point"] = timed(lambda: decoder(enc.up_layers), args.reps)
        results["class_head_1"] = timed(lambda: net.class_head(feats, cv1), args.reps)
        results["class_head_117"] = timed(lambda: net.class_head(feats, cv117), args.reps)
        results["point_head_1x3"] = timed(lambda: net.point_head(feats, pts, pl), args.reps)
        results["forward_class_1"] = timed(lambda: net(x, class_vector=cv1), args.reps)
    out = {"impl": "monai", "monai_torch": torch.__version__, "width": int(width), "patch": list(x.shape[2:]),
           "threads": args.threads, "reps": args.reps, "seconds": results}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
