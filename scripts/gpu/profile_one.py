"""Run one benchmark entry's libraries a few times (a target for ``ncu``).

    ncu -k regex:main --section SpeedOfLight python3 scripts/gpu/profile_one.py c64_o64_s56_st1_b64_k16
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_cases import load_runtime  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    name = sys.argv[1]
    kinds = sys.argv[2:] or ["sparks"]
    folder = os.path.join(ROOT, ".gpu", "bench")
    entry = {e["name"]: e for e in json.load(open(os.path.join(folder, "manifest.json")))["entries"]}[name]
    load_runtime("cuda")
    import tvm

    dev = tvm.cuda(0)
    w = np.load(os.path.join(folder, entry["weights"]))
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(entry["in_shape"]).astype(np.float32), dev)
    for kind in kinds:
        lib = tvm.runtime.load_module(os.path.join(folder, entry["libs"][kind]))
        if kind == "sparks":
            args = [x, tvm.runtime.tensor(w["codes"], dev), tvm.runtime.tensor(w["idx"], dev),
                    tvm.runtime.empty(tuple(entry["out_shape"]), "int32", dev)]  # NCHW, like the dense kernel
        else:
            args = [x, tvm.runtime.tensor(w["wbits"], dev), tvm.runtime.empty(tuple(entry["out_shape"]), "int32", dev)]
        for _ in range(2):
            lib["main"](*args)
        dev.sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
