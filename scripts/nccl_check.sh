#!/usr/bin/env bash
# Data parallel with NCCL on one GPU: `torchrun --nproc-per-node 1 ... train` (NCCL, FSDP2 on the device,
# DCP checkpoints) against the same run as one plain process. Same losses within 1e-3 relative.
# Run from the repository root on a CUDA machine: `bash scripts/nccl_check.sh` (scripts/gpu_check.sh runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
steps=(--config tiny-v3 --no-plots --no-progress --set run.steps=4 --set run.log_every=1 --set run.eval_every=0
       --set run.save_every=2 --set data.batch_size=4 --set data.seq_len=64)
for run in single dist; do
    launch=("$python" -m seekformer)
    [ "$run" = dist ] && launch=("$python" -m torch.distributed.run --nproc-per-node 1 -m seekformer)
    if ! "${launch[@]}" train "${steps[@]}" --out "$work/$run" > "$work/$run.log" 2>&1; then
        tail -30 "$work/$run.log"
        exit 1
    fi
done
"$python" - "$work" <<'PY'
import json
import pathlib
import sys

work = pathlib.Path(sys.argv[1])


def train_records(run):
    lines = (work / run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r.get("grad_norm")) for r in map(json.loads, lines) if r["kind"] == "train"]


single, dist = train_records("single"), train_records("dist")
print("one process:", single)
print("torchrun   :", dist)
assert [s for s, *_ in single] == [s for s, *_ in dist], "different logged steps"
worst = max(abs(a[1] - b[1]) / abs(a[1]) for a, b in zip(single, dist))
print(f"largest relative loss difference {worst:.2e}")
assert worst < 1e-3, "torchrun's losses differ from the one-process run"
assert any((work / "dist").rglob("*.distcp")), "no DCP checkpoint written"
PY
