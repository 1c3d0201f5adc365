"""Run kernel cases on the GPU and save what they returned (for debugging a mismatch).

    python3 scripts/gpu/dump_case.py .gpu/cases/sparks_04.json ... --out $OUT --runs 3

Each run starts from an output filled with a sentinel (-7777777), so elements a kernel never
writes show up as the sentinel; several runs expose nondeterminism (races).
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_cases import load_runtime  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("cases", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    load_runtime("cuda")
    import tvm

    dev = tvm.cuda(0)
    saved = {}
    for path in args.cases:
        spec = json.load(open(path))
        base = os.path.dirname(os.path.abspath(path))
        lib = tvm.runtime.load_module(os.path.join(base, spec["lib"]))
        ins = [tvm.runtime.tensor(np.load(os.path.join(base, f)), dev) for f in spec["inputs"]]
        o = spec["outputs"][0]
        for r in range(args.runs):
            out = tvm.runtime.tensor(np.full(o["shape"], -7777777, o["dtype"]), dev)
            lib["main"](*ins, out)
            saved[f"{spec['name']}_run{r}"] = out.numpy()
        saved[f"{spec['name']}_want"] = np.load(os.path.join(base, o["expected"]))
        got = saved[f"{spec['name']}_run0"]
        want = saved[f"{spec['name']}_want"]
        bad = np.argwhere(got != want)
        print(spec["name"], "mismatches", len(bad), "first", bad[:8].tolist(),
              "unwritten", int((got == -7777777).sum()),
              "runs equal", all(np.array_equal(saved[f"{spec['name']}_run{r}"], got) for r in range(args.runs)))
    np.savez_compressed(os.path.join(args.out, "dump.npz"), **saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
