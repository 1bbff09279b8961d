"""Runs the fused FP8 quantisation kernels under Triton's CPU interpreter, in a process of its own.

    TRITON_INTERPRET=1 python tests/fp8_triton_interpreter.py CASES.pt RESULTS.pt

The interpreter must be on before triton is first imported (triton's own library functions are
compiled-mode otherwise, and an interpreted kernel cannot call them), which a test process that has
already imported triton (transformers may) cannot ensure: so tests/test_fp8_triton.py saves its inputs,
runs this script and compares what it saved. ``CASES.pt``: name -> (operation, args); ``RESULTS.pt``:
name -> (q, scale), or the error message.
"""

from __future__ import annotations

import os
import sys


def main(cases_path: str, results_path: str) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 before running this script")
    import torch

    from seekformer.quant import fp8_triton

    results = {}
    for name, (operation, args) in torch.load(cases_path).items():
        try:
            results[name] = getattr(fp8_triton, operation)(*args)
        except Exception as e:  # reported per case, so that one failure does not hide the others
            results[name] = f"{type(e).__name__}: {e}"
    torch.save(results, results_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
