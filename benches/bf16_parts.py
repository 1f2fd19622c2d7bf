"""Which part of VISTA3D under CPU bf16 autocast costs label agreement with fp32? (issue 13: `auto` may choose bf16
only at >= 99.9% agreement.) MONAI's network with the shipped demo weights, MONAI's sliding window (64^3), one thread;
each VARIANT runs under torch.autocast("cpu", bfloat16) with some modules kept in fp32:
  bf16 (none), head (the class head), up (the encoder's last up layer), norm (every instance norm), joined by "+".

    $VISTA3D_PYTHON benches/bf16_parts.py IMAGE LABELS SPACING VARIANT[,VARIANT...]
"""
import sys, time, copy
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import numpy as np, torch
from monai.transforms import Compose
from monai.data import list_data_collate
from monai.inferers import SlidingWindowInfererAdapt
import monai_reference as mr

image, labels, spacing = sys.argv[1], sys.argv[2], float(sys.argv[3])
variants = sys.argv[4].split(",")
torch.set_num_threads(1)
net = mr.build_network(str(ROOT / "models" / "demo_e8.safetensors"), 8).eval()
tr = mr.preprocessing_transforms(torch.device("cpu"), [spacing] * 3)
data = Compose(tr)({"image": image})
x = list_data_collate([{"image": data["image"]}])["image"]
ids = [int(v) for v in labels.split(",")]
cv = torch.tensor(ids).unsqueeze(-1)

def fp32_module(mod):
    f = mod.forward
    def g(*a, **k):
        with torch.autocast("cpu", enabled=False):
            a = [t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in a]
            k = {n: (t.float() if torch.is_tensor(t) and t.is_floating_point() else t) for n, t in k.items()}
            return f(*a, **k)
    mod.forward = g

def run(variant):
    n = copy.deepcopy(net)
    if "head" in variant:
        fp32_module(n.class_head)
    if "up" in variant:  # the encoder's last up layer and its heads
        fp32_module(n.image_encoder.up_layers[-1])
    if "norm" in variant:
        for m in n.modules():
            if isinstance(m, (torch.nn.InstanceNorm3d, torch.nn.GroupNorm)):
                fp32_module(m)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if variant != "fp32" else torch.autocast("cpu", enabled=False)
    t = time.perf_counter()
    with torch.no_grad(), ctx:
        lg = SlidingWindowInfererAdapt(roi_size=[64] * 3, sw_batch_size=1, with_coord=True, padding_mode="replicate")(
            x, n, transpose=True, class_vector=cv, prompt_class=cv, point_coords=None, point_labels=None,
            prev_mask=None, labels=None, label_set=None)
    lg = lg.float()[0] if lg.shape[0] == 1 else lg.float()[:, 0]
    return lg, time.perf_counter() - t

def to_labels(lg):
    lg = lg.reshape(len(ids), *lg.shape[-3:])
    m, a = lg.max(0)
    return torch.where(m > 0, a + 1, 0).numpy()

ref, t0 = run("fp32")
lab0 = to_labels(ref)
print(f"{image.split('/')[-1]} {labels} {spacing} mm grid {tuple(ref.shape[-3:])}: fp32 {t0:.1f} s", flush=True)
for v in variants:
    lg, t = run(v)
    lab = to_labels(lg)
    agree = (lab == lab0).mean() * 100
    d = (lg - ref.reshape(lg.shape)).abs()
    print(f"  {v:16s} {t:6.1f} s  agreement {agree:.4f}%  max|dlogit| {d.max():.3f}  mean {d.mean():.4f}", flush=True)
