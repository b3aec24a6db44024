"""How long `anim-lab demo` takes, end to end, in a fresh process each time (the number the README quotes).

    .venv/bin/python benchmarks/bench_demo.py [--repeats 3] [--json results/demo.json]

Each repeat runs ``anim-lab demo --out-dir <temporary folder> --no-progress`` as a new process and times it
from start to exit (Python start-up, imports, loading the toy animator, 16 frames at 8 steps, writing mp4, gif
and strip), after one untimed run that warms the file cache. Prints the median and the spread.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from anim_lab.files import check_output_file, write_result

ANIM_LAB = Path(sys.executable).with_name("anim-lab")


def run_once(out_dir: Path) -> float:
    start = time.perf_counter()
    subprocess.run([str(ANIM_LAB), "demo", "--out-dir", str(out_dir), "--no-progress"], check=True)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the result here (e.g. results/demo.json)")
    args = parser.parse_args(argv)
    if args.json:
        check_output_file(args.json, (".json",), what="--json file")
    with tempfile.TemporaryDirectory() as tmp:
        run_once(Path(tmp) / "warm-up")
        seconds = [run_once(Path(tmp) / f"run{i}") for i in range(args.repeats)]
    result = {
        "command": "anim-lab demo --out-dir DIR --no-progress",
        "repeats": args.repeats,
        "seconds": [round(s, 2) for s in seconds],
        "median_s": round(statistics.median(seconds), 2),
    }
    print(f"anim-lab demo: median {result['median_s']:.1f} s over {args.repeats} runs ({result['seconds']})")
    if args.json:
        write_result(args.json, result)
    return result


if __name__ == "__main__":
    main()
