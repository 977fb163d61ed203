#!/usr/bin/env python
"""Cost of one DP training step against the same step without privacy.

    python benchmarks/bench_dp_step.py --out benchmarks/results/dp_step.json

Model: the ``tiny`` preset's UNet2DConditionModel (64, 128; cross-attention at 4x4) + ClassEmbedder
in a LatentDenoiser, random weights; 64 examples of 8x8x3 latents per step, one physical batch.

* DP step = ``private_backward`` (forward + backward with per-sample gradients) + the DP optimizer's
  step (fold the k copies, clip, Gaussian noise with sigma=1, accountant) + ``zero_grad``.
* Non-private step = the same trainable parameters (a copy of the model taken before opacus
  touches it), plain AdamW, ``loss.mean().backward()``, ``step``, ``zero_grad``.

Sections (each timed interleaved, median of per-round ratios, warm-up rounds dropped):
1. DP / non-private time and peak memory, per LoRA target set (``attention``, ``attention+proj``,
   ``full`` = every UNet weight) and per grad-sample mode; a mode that fails is reported n/a.
2. Noise multiplicity k = 1, 2, 4, 8 (64 examples -> 64k rows): time and peak memory per logical
   batch, ratios to k = 1.
Peak memory is measured in a fresh child process per configuration (see bench_common.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bench_common as bc
import torch

TARGETS = {"time_attention": 1.05, "k4_over_k1": 4.0, "memory_dp_over_np": 1.10}


def parse_args(argv=None):
    from dp_diffusers.privacy import GRAD_SAMPLE_MODES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_common_args(parser)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="attention,attention+proj,full")
    parser.add_argument("--modes", default=",".join(GRAD_SAMPLE_MODES), help="grad_sample_modes of section 1.")
    parser.add_argument("--ks", default="1,2,4,8", help="Noise multiplicities of section 2.")
    parser.add_argument("--k_modes", default=None, help="grad_sample_modes of section 2 (default: make_private's).")
    parser.add_argument("--k_targets", default="attention")
    parser.add_argument("--sections", default="modes,k", help="Which sections: modes, k.")
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    parser.add_argument("--memory_child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def default_mode() -> str:
    import inspect

    from dp_diffusers.privacy import make_private

    return inspect.signature(make_private).parameters["grad_sample_mode"].default


def memory_child(config: dict) -> None:
    import json

    bc.set_threads(config["threads"])
    model, preset = bc.build_denoiser(config["preset"], config["targets"], config["rank"], config["seed"])
    dp_step, np_step = bc.make_steps(
        model,
        preset,
        batch_size=config["batch_size"],
        grad_sample_mode=config["mode"],
        noise_multiplicity=config["k"],
        device=config["device"],
        make_nonprivate=config["mode"] is None,
    )
    result = bc.measure_step_memory(dp_step or np_step, device=config["device"])
    print(json.dumps(result))


def memory(args, targets, mode, k=1):
    if args.skip_memory:
        return None
    config = dict(
        preset=args.preset, targets=targets, rank=args.rank, seed=args.seed, batch_size=args.batch_size,
        mode=mode, k=k, threads=args.threads, device=args.device,
    )  # fmt: skip
    try:
        return bc.run_memory_child(__file__, config)
    except Exception as err:  # noqa: BLE001 - reported as n/a
        return {"error": bc.short_error(err)}


def section_modes(args, results):
    """Per target set: the non-private step and one DP step per mode, all in the same rounds."""
    import copy

    for targets in args.targets.split(","):
        model, preset = bc.build_denoiser(args.preset, targets, args.rank, args.seed)
        n_trainable = sum(p.numel() for p in bc.trainable(model))
        _, np_step = bc.make_steps(
            copy.deepcopy(model), preset, batch_size=args.batch_size, grad_sample_mode=None, device=args.device
        )
        steps, entries = {"non-private": np_step}, {}
        for mode in args.modes.split(","):
            entry = entries[mode] = {"targets": targets, "mode": mode, "trainable_params": n_trainable}
            try:
                dp_step, _ = bc.make_steps(
                    copy.deepcopy(model), preset, batch_size=args.batch_size, grad_sample_mode=mode,
                    device=args.device, make_nonprivate=False,
                )  # fmt: skip
                dp_step()  # a mode that cannot run this model fails here, before the timed rounds
                steps[mode] = dp_step
            except Exception as err:  # noqa: BLE001 - a mode that does not work is reported n/a
                entry["error"] = bc.short_error(err)
        times = bc.interleaved(steps, args.reps, args.warmup, args.device)
        steps.clear()
        np_mem = memory(args, targets, None)
        for mode, entry in entries.items():
            if "error" not in entry:
                entry.update(
                    dp_ms=1e3 * bc.median(times[mode]),
                    np_ms=1e3 * bc.median(times["non-private"]),
                    time_ratio=bc.median_ratio(times[mode], times["non-private"]),
                    time_ratio_range=bc.spread(times[mode], times["non-private"]),
                )
                dp_mem = memory(args, targets, mode)
                entry["dp_memory"], entry["np_memory"] = dp_mem, np_mem
                if dp_mem and np_mem and "error" not in dp_mem and "error" not in np_mem:
                    entry["memory_ratio"] = dp_mem["step_mib"] / np_mem["step_mib"]
                    entry["memory_ratio_total"] = dp_mem["peak_mib"] / np_mem["peak_mib"]
            results["modes"].append(entry)
            print(_mode_row(entry), file=sys.stderr, flush=True)


def _fmt_mem(m):
    if not m:
        return "-"
    if "error" in m:
        return "n/a"
    return f"{m['step_mib']:.0f}"


def _mode_row(e):
    if "error" in e:
        return [e["targets"], e["mode"], e.get("trainable_params", "-"), "n/a", "n/a", f"n/a ({e['error']})"]
    return [
        e["targets"],
        e["mode"],
        e["trainable_params"],
        round(e["np_ms"], 1),
        round(e["dp_ms"], 1),
        f"{e['time_ratio']:.3f} ({e['time_ratio_range'][0]:.2f}-{e['time_ratio_range'][1]:.2f})",
        _fmt_mem(e.get("np_memory")),
        _fmt_mem(e.get("dp_memory")),
        f"{e['memory_ratio']:.3f}" if "memory_ratio" in e else "-",
    ]


def section_k(args, results):
    ks = [int(k) for k in args.ks.split(",")]
    modes = (args.k_modes or default_mode()).split(",")
    for mode in modes:
        steps = {}
        try:
            for k in ks:
                model, preset = bc.build_denoiser(args.preset, args.k_targets, args.rank, args.seed)
                steps[k], _ = bc.make_steps(
                    model,
                    preset,
                    batch_size=args.batch_size,
                    grad_sample_mode=mode,
                    noise_multiplicity=k,
                    device=args.device,
                    make_nonprivate=False,
                )
            times = bc.interleaved({f"k={k}": steps[k] for k in ks}, args.reps, args.warmup, args.device)
        except Exception as err:  # noqa: BLE001
            results["k"].append({"mode": mode, "error": bc.short_error(err)})
            continue
        steps.clear()
        base = times[f"k={ks[0]}"]
        for k in ks:
            t = times[f"k={k}"]
            mem = memory(args, args.k_targets, mode, k)
            entry = {
                "mode": mode,
                "targets": args.k_targets,
                "k": k,
                "rows": k * args.batch_size,
                "ms": 1e3 * bc.median(t),
                "ratio_to_k1": bc.median_ratio(t, base),
                "memory": mem,
            }
            results["k"].append(entry)
            print(entry, file=sys.stderr, flush=True)


def render(results) -> str:
    out = []
    info = results["machine"]
    out.append(
        f"Machine: {info['cpu']} ({info['logical_cpus']} logical CPUs, torch threads={info['torch_threads']}), "
        f"torch {info['torch']}, diffusers {info['diffusers']}, peft {info['peft']}, opacus {info['opacus']}, "
        f"{info['date']}. Batch {results['config']['batch_size']}, LoRA rank {results['config']['rank']}, "
        f"{results['config']['reps']} interleaved rounds (median; range of the per-round ratios in brackets)."
    )
    if results["modes"]:
        out.append("\n### DP step vs non-private step (k = 1)\n")
        headers = ["targets", "mode", "trainable", "non-private ms", "DP ms", "DP/non-private time",
                   "non-private step MiB", "DP step MiB", "DP/non-private memory"]  # fmt: skip
        out.append(bc.markdown_table(headers, [_mode_row(e) for e in results["modes"]]))
    if results["k"]:
        out.append("\n### Noise multiplicity (one logical batch of 64 examples)\n")
        rows = []
        for e in results["k"]:
            if "error" in e:
                rows.append([e["mode"], "-", "-", "n/a", f"n/a ({e['error']})", "-"])
                continue
            rows.append([e["mode"], e["k"], e["rows"], round(e["ms"], 1), f"{e['ratio_to_k1']:.2f}",
                         _fmt_mem(e["memory"])])  # fmt: skip
        out.append(bc.markdown_table(["mode", "k", "rows", "ms / logical batch", "time / k=1", "step MiB"], rows))
    out.append("\n### Targets\n")
    out.append(bc.markdown_table(["ratio", "target", "measured", "met"], headline(results)))
    return "\n".join(out)


def headline(results):
    mode = results["config"]["default_mode"]
    att = [e for e in results["modes"] if e["targets"] == "attention" and e["mode"] == mode and "error" not in e]
    t = att[0]["time_ratio"] if att else None
    m = att[0].get("memory_ratio") if att else None
    ks = {e["k"]: e for e in results["k"] if e.get("mode") == mode and "error" not in e}
    k4 = ks[4]["ratio_to_k1"] if 4 in ks and 1 in ks else None
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    return [
        [f"DP / non-private time, LoRA attention ({mode})", f"<= {TARGETS['time_attention']}", fmt(t),
         bc.verdict(t, TARGETS["time_attention"])],
        [f"k=4 / k=1 time ({mode})", f"<= {TARGETS['k4_over_k1']}", fmt(k4), bc.verdict(k4, TARGETS["k4_over_k1"])],
        [f"DP / non-private step memory, LoRA attention ({mode})", f"<= {TARGETS['memory_dp_over_np']}", fmt(m),
         bc.verdict(m, TARGETS["memory_dp_over_np"])],
    ]  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        import json

        memory_child(json.loads(args.memory_child))
        return
    bc.set_threads(args.threads)
    torch.manual_seed(args.seed)
    results = {
        "machine": bc.machine_info(args.threads),
        "config": {
            "preset": args.preset,
            "batch_size": args.batch_size,
            "rank": args.rank,
            "reps": args.reps,
            "warmup": args.warmup,
            "default_mode": default_mode(),
            "memory_method": "peak RSS above pre-step RSS in a fresh child process (see bench_common.py)",
        },
        "targets": TARGETS,
        "modes": [],
        "k": [],
    }
    sections = args.sections.split(",")
    if "modes" in sections:
        section_modes(args, results)
    if "k" in sections:
        section_k(args, results)
    results["headline"] = headline(results)
    table = render(results)
    print(table)
    if args.out:
        bc.write_json(args.out, results)
        Path(args.out).with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
