"""Training speed of scripts/train_animator.py, side by side in one run: the same stage-1 steps, seeds and
data under each setting, seconds per step and the loss curve.

    .venv/bin/python benchmarks/bench_train_animator.py [--steps 500] [--json results/FILE.json]

Settings (each a fresh run of the script from the same seed on the same pre-encoded clips):
- ``fp32, 1 process x 1 thread``: the committed animator's setting;
- ``bf16, 1 process x 1 thread``: ``--mixed-precision bf16`` (autocast on the CPU's AVX-512 BF16);
- ``fp32, 1 process x 2 threads`` and ``fp32, 2 processes x 1 thread`` (accelerate, gloo): both cores.
Speed is the mean seconds per step after the first 50 (warm-up, allocation); the loss curve is compared as the
mean of the last 100 logged losses (the issue's criterion: within 2% of fp32's) and the mean absolute
difference of the logged curve. The model is the TOY preset at 128 px, batch 8, as the committed animator.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import anim_lab
from anim_lab.files import check_output_file, write_result

SCRIPT = anim_lab.SCRIPTS_DIR / "train_animator.py"
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
LAUNCH_2 += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
SETTINGS = {
    "fp32, 1 process x 1 thread": ([sys.executable], ["--threads", "1"]),
    "bf16, 1 process x 1 thread": ([sys.executable], ["--threads", "1", "--mixed-precision", "bf16"]),
    "fp32, 1 process x 2 threads": ([sys.executable], ["--threads", "2"]),
    "fp32, 2 processes x 1 thread": (LAUNCH_2, ["--threads", "1"]),
}


def run(launcher: list[str], extra: list[str], out: Path, cache: Path, steps: int) -> dict:
    args = ["--stage", "1", "--out", str(out), "--cache", str(cache), "--max-steps", str(steps)]
    args += ["--log-every", "10", "--checkpoint-every", str(steps), "--seed", "0", "--no-progress", *extra]
    subprocess.run([*launcher, str(SCRIPT), *args], check=True)
    return json.loads((out / "toy_animator" / "train_log.json").read_text())


def summary(log: dict, skip: int = 50) -> dict:
    steps, seconds, loss = (np.asarray(log["log"][k], dtype=float) for k in ("steps", "seconds", "loss"))
    cut = min(skip, steps[-1] // 2)  # a short run skips its first half
    i0 = np.flatnonzero(steps <= cut)[-1] if (steps <= cut).any() else 0  # the log point the timing starts at
    per_step = (seconds[-1] - seconds[i0]) / (steps[-1] - steps[i0])
    last = loss[steps > steps[-1] - 100]  # the logged means of the last 100 steps
    return dict(s_per_step=float(per_step), last100_loss=float(last.mean()), curve=loss.tolist())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), help="a subset of the settings")
    parser.add_argument("--json", help="also write the table here (e.g. results/bench_train_animator.json)")
    args = parser.parse_args(argv)
    if args.json:
        check_output_file(args.json, (".json",), what="--json file")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache.safetensors"  # encoded once by the first run, read by the others
        for i, name in enumerate(args.only or SETTINGS):
            launcher, extra = SETTINGS[name]
            rows[name] = summary(run(launcher, extra, Path(tmp) / f"run{i}", cache, args.steps))
    base = next(iter(rows.values()))
    print(f"{args.steps} stage-1 steps, batch 8, TOY preset at 128 px, seed 0")
    head = ("s/step", 9), ("speed-up", 10), ("last-100 loss", 15), ("vs first", 10), ("curve |diff|", 14)
    print(f"{'setting':32s}" + "".join(f"{h:>{w}s}" for h, w in head))
    for name, r in rows.items():
        r["speedup"] = base["s_per_step"] / r["s_per_step"]
        r["loss_change"] = r["last100_loss"] / base["last100_loss"] - 1
        r["curve_mean_abs_diff"] = float(np.mean(np.abs(np.subtract(r["curve"], base["curve"]))))
        print(
            f"{name:32s}{r['s_per_step']:9.3f}{r['speedup']:9.2f}x{r['last100_loss']:15.4f}"
            f"{100 * r['loss_change']:+9.1f}%{r['curve_mean_abs_diff']:14.4f}"
        )
    if args.json:
        command = " ".join(["benchmarks/bench_train_animator.py", *sys.argv[1:]])
        write_result(args.json, {"command": command, "steps": args.steps, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
