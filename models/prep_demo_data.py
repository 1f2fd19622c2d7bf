#!/usr/bin/env python
"""Data for the demo model (models/README.md): TotalSegmentator's labelled example CT cut into three z-slabs.

    python models/prep_demo_data.py --data "$VISTA3D_DATA" --out target/demo_data

`example_ct_sm.nii.gz` (122 x 101 x 30 voxels, 3 mm, RAS) and `example_seg.nii.gz` (TotalSegmentator ids) are cut
into slabs of 10 slices: z 0-9 (a) and z 20-29 (c) for training, z 10-19 (b) held out for validation. The labels
keep two organs with local ids 1 = liver (TotalSegmentator 5) and 2 = spleen (TotalSegmentator 1); everything else
is 0. The training config maps them to VISTA3D's global ids 1 (liver) and 3 (spleen). Writes the slabs and
`datalist.json` (fold 0 = validation).
"""

import argparse
import json
import os

import nibabel as nib
import numpy as np

SLABS = {"a": (0, 10, 1), "b": (10, 20, 0), "c": (20, 30, 1)}  # name: (z start, z end, fold)
KEEP = {5: 1, 1: 2}  # TotalSegmentator id -> local id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="VISTA3D_DATA (scripts/fetch_data.sh)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    src = os.path.join(args.data, "totalsegmentator")
    ct = nib.load(os.path.join(src, "example_ct_sm.nii.gz"))
    seg = nib.load(os.path.join(src, "example_seg.nii.gz"))
    assert ct.shape == seg.shape == (122, 101, 30), (ct.shape, seg.shape)
    seg_data = np.asanyarray(seg.dataobj)
    local = np.zeros(seg_data.shape, dtype=np.uint8)
    for ts, lid in KEEP.items():
        local[seg_data == ts] = lid
    local_img = nib.Nifti1Image(local, seg.affine, seg.header)
    items = []
    for name, (z0, z1, fold) in SLABS.items():
        img_path = f"slab_{name}_ct.nii.gz"
        lab_path = f"slab_{name}_seg.nii.gz"
        nib.save(ct.slicer[:, :, z0:z1], os.path.join(args.out, img_path))
        nib.save(local_img.slicer[:, :, z0:z1], os.path.join(args.out, lab_path))
        items.append({"image": img_path, "label": lab_path, "fold": fold})
        counts = {int(k): int(v) for k, v in zip(*np.unique(local[:, :, z0:z1], return_counts=True))}
        print(f"slab {name}: z {z0}-{z1 - 1}, fold {fold}, voxels per local id {counts}")
    with open(os.path.join(args.out, "datalist.json"), "w") as f:
        json.dump({"training": items}, f, indent=1)


if __name__ == "__main__":
    main()
