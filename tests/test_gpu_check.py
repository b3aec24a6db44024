"""benchmarks/gpu_check.sh and bench_pose2video.py --cuda on a machine without a GPU: the arguments, the skip,
and (with a stand-in python that claims CUDA and records its calls) what the script would run, in order."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env)


def _fake_python(tmp_path: Path, fail_on: str = "") -> tuple[Path, Path]:
    """An executable that logs its arguments, says CUDA is there (exit 0), and fails when its arguments
    contain ``fail_on``."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> "{log}"\n'
        + (f'case "$*" in *"{fail_on}"*) exit 3 ;; esac\n' if fail_on else "")
        + "exit 0\n"
    )
    fake.chmod(0o755)
    return fake, log


def test_help_and_bad_arguments():
    out = _run("--help")
    assert out.returncode == 0 and "gpu-marked tests" in out.stdout
    assert "enable_model_cpu_offload" in out.stdout
    bad = _run("--fast")
    assert bad.returncode == 2 and "unknown argument '--fast'" in bad.stderr
    assert _run("--out").returncode == 2
    missing = _run("--python", "/nowhere/python")
    assert missing.returncode == 2 and "no python at /nowhere/python" in missing.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without CUDA")
def test_without_cuda_it_skips_and_runs_nothing(tmp_path):
    out = _run("--python", sys.executable, "--out", str(tmp_path / "out"))
    assert out.returncode == 0 and "SKIPPED: torch sees no CUDA device" in out.stdout
    assert not (tmp_path / "out").exists()


def test_with_cuda_it_runs_the_tests_then_both_benchmarks(tmp_path):
    fake, log = _fake_python(tmp_path)
    out = _run("--python", str(fake), "--out", str(tmp_path / "res"))
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("-c import sys, torch")  # the CUDA probe
    runs = [c for c in calls if not c.startswith("-c")]
    res = tmp_path / "res"
    assert runs == [
        "-m pytest -q -m gpu tests -p no:cacheprovider",
        f"benchmarks/bench_pose2video.py --cuda --json {res}/gpu_bench_pose2video.json",
        f"benchmarks/bench_pose2video.py --cuda --offload --json {res}/gpu_bench_pose2video_offload.json",
    ]


def test_a_failing_step_stops_the_check(tmp_path):
    fake, log = _fake_python(tmp_path, fail_on="pytest")
    out = _run("--python", str(fake), "--out", str(tmp_path / "res"))
    assert out.returncode == 3
    assert not any("bench_pose2video" in c for c in log.read_text().splitlines())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    ("args", "message"),
    [(["--cuda"], "--cuda needs a CUDA GPU"), (["--offload"], "--offload is for the --cuda run")],
)
def test_the_cuda_benchmark_refuses_without_a_gpu(args, message):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_pose2video.py"), *args],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 2 and message in out.stderr
