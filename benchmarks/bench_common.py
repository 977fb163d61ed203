"""Shared pieces of the benchmarks: model building, interleaved A/B timing, peak-memory probes.

Timing rule on a shared machine: never compare two numbers measured at different moments. Every
benchmark runs its variants *interleaved* (A, B, A, B, ...) in one process, drops the warm-up
rounds, and reports the median of the per-round ratios A_i / B_i, so a neighbour's load that
slows one round slows both sides of that round's ratio.
"""

from __future__ import annotations

import copy
import ctypes
import datetime
import gc
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# The frozen-activation warning of full backward hooks; see dp_diffusers/privacy/engine.py.
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message=".*Using a non-full backward hook.*")


# --------------------------------------------------------------------------------------------
# environment


def add_common_args(parser) -> None:
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: shared CPUs).")
    parser.add_argument("--reps", type=int, default=7, help="Measured interleaved rounds (median reported).")
    parser.add_argument("--warmup", type=int, default=2, help="Interleaved rounds dropped before measuring.")
    parser.add_argument("--seed", type=int, default=0)


def set_threads(n: int) -> None:
    torch.set_num_threads(max(1, int(n)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def machine_info(threads: int) -> dict:
    import diffusers
    import opacus
    import peft

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "opacus": opacus.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["loadavg_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------------------------
# models


def build_denoiser(preset: str = "tiny", targets: str = "attention", rank: int = 8, seed: int = 0):
    """A preset's ``UNet2DConditionModel`` + ``ClassEmbedder`` (random weights) in a ``LatentDenoiser``.

    ``targets`` is a LoRA target preset (``attention``, ``attention+proj``, ...) or ``full`` (every
    UNet weight trainable, no LoRA). The class embedding stays frozen in all cases.
    """
    from diffusers import UNet2DConditionModel

    from dp_diffusers import ClassEmbedder, LatentDenoiser
    from dp_diffusers.families import DPLDMFamily
    from dp_diffusers.lora import add_lora, make_lora_config
    from dp_diffusers.presets import get_preset

    p = get_preset(preset)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**p.unet_config())
    embedder = ClassEmbedder(10, p.cross_attention_dim)
    if targets == "full":
        unet.requires_grad_(True)
    else:
        add_lora(unet, make_lora_config(rank, targets=targets, init_lora_weights="gaussian"))
        with torch.no_grad():  # lora_B starts at 0; give it weights so every path carries gradient
            for name, param in unet.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
    embedder.requires_grad_(False)
    return LatentDenoiser(unet, DPLDMFamily, embedder), p


def scheduler_for(preset) -> object:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**preset.scheduler_config())


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_steps(
    model,
    preset=None,
    *,
    batch_size: int,
    grad_sample_mode: str,
    noise_multiplicity: int = 1,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    dataset_size: int = 1437,
    device: str = "cpu",
    make_nonprivate: bool = True,
    lr: float = 1e-4,
    latent_shape: tuple[int, int, int] | None = None,
    scheduler=None,
    conditions: dict[str, torch.Tensor] | None = None,
    null_condition: dict[str, torch.Tensor] | None = None,
    objective=None,
):
    """(dp_step, nonprivate_step) closures on the same batch. The non-private model is a deep copy
    taken *before* opacus touches the DP one: same weights, same trainable LoRA params, plain AdamW,
    ``loss.mean().backward()``. Either may be None (DP: when ``grad_sample_mode`` is None). The latents'
    shape and the noise schedule are the ``preset``'s, or ``latent_shape`` and ``scheduler`` (other base
    families); each example's ``conditions`` (named (batch_size, ...) tensors, dropped to ``null_condition`` with
    probability 0.1) default to labels 0..9 and the model's null class when it has one; the ``objective`` to DDPM
    noise prediction on that schedule."""
    from torch.utils.data import TensorDataset

    from dp_diffusers import DiffusionLoss, NoisePrediction
    from dp_diffusers.privacy import PrivacyBudget, make_private, private_backward

    shape = latent_shape or (preset.latent_channels, preset.latent_size, preset.latent_size)
    gen = torch.Generator().manual_seed(1234)
    latents = torch.randn(batch_size, *shape, generator=gen).to(device)
    if conditions is None:
        conditions = {"class_labels": torch.randint(0, 10, (batch_size,), generator=gen)}
        null_condition = model.family.null_condition(model)
    conditions = {name: value.to(device) for name, value in conditions.items()}
    objective = objective or NoisePrediction(scheduler or scheduler_for(preset))
    loss_fn = DiffusionLoss(objective, tuple(conditions),
                            null_condition=null_condition or None, dropout=0.1 if null_condition else 0.0)  # fmt: skip
    columns = list(conditions.values())

    np_step = None
    if make_nonprivate:
        np_model = copy.deepcopy(model).to(device)
        np_opt = torch.optim.AdamW(trainable(np_model), lr=lr)
        k = noise_multiplicity

        def np_step():
            rows = [column.repeat_interleave(k, 0) for column in (latents, *columns)]
            loss_fn(np_model, *rows).mean().backward()
            np_opt.step()
            np_opt.zero_grad(set_to_none=True)

    dp_step = None
    if grad_sample_mode is not None:
        model = model.to(device)
        opt = torch.optim.AdamW(trainable(model), lr=lr)
        budget = PrivacyBudget("prv", noise_multiplier, batch_size / dataset_size, 1e-5, planned_steps=10**6)
        dataset = TensorDataset(torch.zeros(dataset_size, 1), torch.zeros(dataset_size))
        dp = make_private(
            model,
            opt,
            dataset,
            budget=budget,
            max_grad_norm=max_grad_norm,
            noise_multiplicity=noise_multiplicity,
            grad_sample_mode=grad_sample_mode,
        )

        example_ids = torch.arange(batch_size)  # each row's keyed draws (RowRandomness), as in training

        def dp_step():
            private_backward(dp.model, dp.optimizer, loss_fn, latents, *columns, example_ids=example_ids)
            dp.optimizer.step()
            dp.optimizer.zero_grad(set_to_none=True)

    return dp_step, np_step


# --------------------------------------------------------------------------------------------
# timing


def sync(device: str = "cpu") -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int, device: str = "cpu", seed: int = 0
) -> dict[str, list[float]]:
    """Run every fn once per round, ``warmup + reps`` rounds; seconds of the measured ones.

    The order inside a round is shuffled (seeded), so no variant always runs first or right after
    the same neighbour (a fixed order can bias a ratio by a few percent on its own).
    """
    order = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + reps):
        names = list(fns)
        order.shuffle(names)
        for name in names:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a_i / b_i (paired: both measured in the same round)."""
    return median([x / y for x, y in zip(a, b)])


def spread(a: list[float], b: list[float]) -> tuple[float, float]:
    """Min and max of the paired ratios: how much the rounds disagreed."""
    r = [x / y for x, y in zip(a, b)]
    return float(min(r)), float(max(r))


def ratio_ci(a: list[float], b: list[float], level: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """Bootstrap confidence interval of :func:`median_ratio` (rounds resampled with replacement)."""
    ratios = [x / y for x, y in zip(a, b)]
    rng = random.Random(0)
    medians = sorted(median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * resamples)], medians[min(resamples - 1, int((1 - tail) * resamples))]


# --------------------------------------------------------------------------------------------
# peak memory
#
# CPU: peak resident set size of a fresh child process during one measured step, above its
# resident size just before that step (Linux: VmHWM after resetting it through
# /proc/self/clear_refs; VmRSS before). glibc is told to hand every block of 64 KiB or more back
# to the OS on free (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so the resident size follows
# the live tensors instead of the allocator's free lists. One warm-up step runs first (optimizer
# state, kernel caches), so the number is the steady-state extra memory of a training step:
# activations, gradients, per-sample gradients, clipping and noise temporaries.
# CUDA: torch.cuda.max_memory_allocated() over the measured step, above memory_allocated() before.

MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "1"}


def _status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_step_memory(step: Callable[[], object], device: str = "cpu", warmup: int = 1) -> dict:
    """Peak extra memory (MiB) of one call of ``step``; see the comment above for what it measures."""
    for _ in range(warmup):
        step()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {
            "method": "cuda.max_memory_allocated",
            "baseline_mib": before / 2**20,
            "peak_mib": peak / 2**20,
            "step_mib": (peak - before) / 2**20,
        }
    _malloc_trim()
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False
    before = _status_kib("VmRSS")
    if before is None:  # not Linux: fall back to ru_maxrss (KiB on Linux, bytes on macOS)
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss"
    else:
        step()
        peak = _status_kib("VmHWM")
        method = "VmHWM-VmRSS" if reset else "VmHWM (not reset: includes model build)"
    return {
        "method": method,
        "baseline_mib": before / 1024,
        "peak_mib": peak / 1024,
        "step_mib": (peak - before) / 1024,
    }


def run_memory_child(script: str, config: dict, timeout: float = 900) -> dict:
    """Run ``script --memory_child JSON`` in a fresh process; it prints one JSON line last."""
    env = dict(os.environ, **MEMORY_CHILD_ENV)
    cmd = [sys.executable, script, "--memory_child", json.dumps(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(tail[-1] if tail else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# output


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value: float | None, target: float, ci: tuple[float, float] | None = None) -> str:
    """``yes`` / ``**no**`` against ``target``; with a confidence interval that straddles the
    target, ``within noise``: the run cannot tell (more rounds or a quieter machine can)."""
    if value is None:
        return "n/a"
    if ci is not None and ci[0] <= target < ci[1]:
        return "within noise"
    return "yes" if value <= target else "**no**"


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def short_error(err: BaseException) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {msg}"[:160]
