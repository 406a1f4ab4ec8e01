"""AWQ solver seconds per layer: the default SolverOptions against variants, alternated in one
process (so a loaded machine slows them alike), on seeded random calibration tokens.

    .venv/bin/python tools/awq_variant_times.py models/qwen3-micro-b Q4_K_M 8 512 \
        'clip3g5={"clip_candidates": 3, "clip_candidate_grid": 5}' 'clip3={"clip_candidates": 3}'

Arguments: checkpoint, ggml type, windows, tokens per window, then NAME=JSON (SolverOptions fields).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from ggq.checkpoint import Checkpoint
from ggq.convert import ConvertOptions, make_plan
from ggq.plan import recipe as rc
from ggq.solvers import layerwise
from ggq.solvers.options import LayerReport, SolverOptions


def main() -> int:
    model, type_name, nsamples, seqlen = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    variants = {"default": {}} | {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[5:])}
    ckpt = Checkpoint(model)
    types = {t.name: t.type for t in make_plan(ckpt, ConvertOptions(rc.RecipeOptions(type_name)))}
    tokens = np.random.default_rng(0).integers(0, ckpt.hparams.n_vocab, (nsamples, seqlen))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(2):
        for name, extra in variants.items():
            secs: list[float] = []

            def report(r: LayerReport, secs: list[float] = secs) -> None:
                secs.append(r.seconds)

            for _ in layerwise.solve_layers(
                ckpt, tokens, types, SolverOptions(method="awq", **extra), report
            ):
                pass
            times[name].append(float(np.mean(secs)))
            print(name, rep, f"{times[name][-1]:.2f} s/layer", flush=True)
    base = float(np.mean(times["default"]))
    for name, t in times.items():
        each = ", ".join(f"{x:.2f}" for x in t)
        print(f"{name}: {np.mean(t):.2f} s/layer ({each}), {np.mean(t) / base:.2f}x default")
    return 0


if __name__ == "__main__":
    sys.exit(main())
