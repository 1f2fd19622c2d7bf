#!/usr/bin/env bash
# Fetches the real test data from the package registry (PyPI), pinned by version and checked by sha256:
#   - TotalSegmentator 2.18.0 sdist (Apache-2.0): example CTs, labels, a CT angiogram (LPS), a DICOM series
#   - nibabel 5.4.2 wheel (MIT): NIfTI header variety (big-endian, scaled, NIfTI-2, qform/sform codes, 4-D)
#   - pydicom 3.0.2 wheel (MIT): CT_small.dcm (one CT slice, 128x128) and MR_small.dcm (an MR slice) for the DICOM reader
# Extracts them under ${VISTA3D_DATA:-target/data}. Idempotent; prints the data directory.
set -euo pipefail
cd "$(dirname "$0")/.."
data="${VISTA3D_DATA:-$PWD/target/data}"
py="${VISTA3D_PYTHON:-python3}"
mkdir -p "$data/downloads"

fetch() {  # fetch <requirement> <file name> <sha256> [pip options...]
    local req="$1" file="$2" sha="$3"; shift 3
    local path="$data/downloads/$file"
    if [ ! -f "$path" ] || ! echo "$sha  $path" | sha256sum --check --status; then
        rm -f "$path"
        "$py" -m pip download --quiet --no-deps --disable-pip-version-check -d "$data/downloads" "$@" "$req" >&2
        if ! echo "$sha  $path" | sha256sum --check --status; then
            echo "fetch_data: checksum mismatch for $file (expected sha256 $sha)" >&2
            exit 1
        fi
    fi
    echo "$path"
}

ts=$(fetch totalsegmentator==2.18.0 totalsegmentator-2.18.0.tar.gz \
    5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03 --no-binary :all:)
nib=$(fetch nibabel==5.4.2 nibabel-5.4.2-py3-none-any.whl \
    553482c5f1e1034fc312edf6fb7f32236c0056439845d1c29293b7e8c98d4854 --only-binary :all:)
pyd=$(fetch pydicom==3.0.2 pydicom-3.0.2-py3-none-any.whl \
    abf971a5440f84dbaf42c4b6758e30e62480902584f8b270b9a5d146e278a07b --only-binary :all:)

if [ ! -f "$data/totalsegmentator/.done" ]; then
    rm -rf "$data/totalsegmentator" && mkdir -p "$data/totalsegmentator"
    tar -xzf "$ts" -C "$data/totalsegmentator" --strip-components=3 \
        totalsegmentator-2.18.0/tests/reference_files/example_ct.nii.gz \
        totalsegmentator-2.18.0/tests/reference_files/example_ct_sm.nii.gz \
        totalsegmentator-2.18.0/tests/reference_files/example_seg.nii.gz \
        totalsegmentator-2.18.0/tests/reference_files/example_seg_fast \
        totalsegmentator-2.18.0/tests/reference_files/aorta_report/example_ct.nii.gz \
        totalsegmentator-2.18.0/tests/reference_files/example_ct_dicom \
        totalsegmentator-2.18.0/tests/reference_files/example_seg_dicom.nii.gz
    touch "$data/totalsegmentator/.done"
fi
if [ ! -f "$data/nibabel/.done" ]; then
    rm -rf "$data/nibabel" && mkdir -p "$data/nibabel"
    "$py" - "$nib" "$data/nibabel" <<'PY'
import sys, zipfile, os
whl, out = sys.argv[1], sys.argv[2]
names = ["anatomical.nii", "functional.nii", "example4d.nii.gz", "example_nifti2.nii.gz",
         "reoriented_anat_moved.nii", "standard.nii.gz"]
with zipfile.ZipFile(whl) as z:
    for n in names:
        with open(os.path.join(out, n), "wb") as f:
            f.write(z.read("nibabel/tests/data/" + n))
PY
    touch "$data/nibabel/.done"
fi
if [ ! -f "$data/pydicom/.done" ]; then
    rm -rf "$data/pydicom" && mkdir -p "$data/pydicom"
    "$py" - "$pyd" "$data/pydicom" <<'PY'
import sys, zipfile, os
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    for n in ["CT_small.dcm", "MR_small.dcm"]:
        with open(os.path.join(out, n), "wb") as f:
            f.write(z.read("pydicom/data/test_files/" + n))
PY
    touch "$data/pydicom/.done"
fi
echo "$data"
