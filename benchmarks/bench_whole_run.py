#!/usr/bin/env python
"""A whole DP run against the same run with ``--disable_dp``: wall time and peak memory of the whole process.

    python benchmarks/bench_whole_run.py --base outputs/base --out benchmarks/results/whole_run.json

``train_dp_lora.py`` on the embedded private digits, ``--num_train_epochs E --batch_size B`` (the DP run at
``--target_epsilon 10``; the reference run: the same LoRA, loss, batch size and number of steps with ``--disable_dp``),
each started as its own process, in turn (DP, non-DP, DP, ...) so that drifts of the machine's speed hit both; each
figure is the run's wall seconds (start to exit, set-up included) and its peak RSS (the OS's accounting of that
child, ``os.wait4``). The ratio is taken pair by pair; the table gives median, min and max. Both runs skip samples and
evaluation. The step benchmark (``bench_dp_step.py``) isolates the DP step; this one is what a user waits for.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``train_dp_lora.py argv`` as its own process."""
    with tempfile.TemporaryFile() as log:
        start = time.monotonic()
        process = subprocess.Popen([sys.executable, str(ROOT / "training_scripts" / "train_dp_lora.py"), *argv],
                                   env=env, stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory
        wall = time.monotonic() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            log.seek(0)
            raise RuntimeError(f"train_dp_lora.py failed:\n{log.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(ROOT / "outputs" / "base"), help="A base folder (make demo's).")
    parser.add_argument("--epochs", type=float, default=8.0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_train_steps", type=int, default=None, help="Instead of --epochs (long runs).")
    parser.add_argument("--pairs", type=int, default=3, help="DP / non-DP pairs.")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "whole_run.json"))
    args = parser.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    length = ["--max_train_steps", str(args.max_train_steps)] if args.max_train_steps else [
        "--num_train_epochs", str(args.epochs)]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--pretrained_model_name_or_path", args.base, "--batch_size", str(args.batch_size), *length,
                  "--samples_per_class", "0", "--learning_rate", "2e-3"]  # fmt: skip
        commands = {"dp": [*common, "--target_epsilon", "10", "--output_dir", f"{tmp}/dp"],
                    "non_dp": [*common, "--disable_dp", "--output_dir", f"{tmp}/non_dp"]}  # fmt: skip
        run_once(commands["non_dp"], env)  # warm-up: file caches, compiled kernels
        figures = {name: {"wall": [], "peak_mib": []} for name in commands}
        for _ in range(args.pairs):
            for name, command in commands.items():
                wall, peak = run_once(command, env)
                figures[name]["wall"].append(wall)
                figures[name]["peak_mib"].append(peak)
                print(f"{name}: {wall:.1f} s, {peak:.0f} MiB", flush=True)
        steps = json.loads(Path(tmp, "dp", "dp_report.json").read_text())["steps"]
    ratios = {key: [a / b for a, b in zip(figures["dp"][key], figures["non_dp"][key])] for key in ("wall", "peak_mib")}
    result = {
        "settings": {"epochs": args.epochs, "max_train_steps": args.max_train_steps, "batch_size": args.batch_size,
                     "steps": steps, "target_epsilon": 10, "pairs": args.pairs},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        **{f"{name}_{key}": summary(values) for name, fig in figures.items() for key, values in fig.items()},
        **{f"ratio_{key}": summary(values) for key, values in ratios.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [f"| {label} | {result[f'dp_{key}']['median']:.1f} | {result[f'non_dp_{key}']['median']:.1f} | "
            f"{result[f'ratio_{key}']['median']:.3f} ({result[f'ratio_{key}']['min']:.3f}-"
            f"{result[f'ratio_{key}']['max']:.3f}) |" for key, label in (("wall", "wall s"), ("peak_mib", "peak MiB"))]
    out.with_suffix(".md").write_text(
        f"Whole run, DP (target epsilon 10) vs --disable_dp, {steps} steps of batch {args.batch_size}, "
        f"{args.pairs} pairs ({result['machine']}, {result['date']}):\n\n"
        "| figure | DP (median) | non-DP (median) | DP / non-DP (median, min-max over pairs) |\n|---|---|---|---|\n"
        + "\n".join(rows) + "\n"
    )  # fmt: skip
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
