#!/usr/bin/env python
"""Peak memory while encoding private captions into FLUX.1 text contexts (512 x 4096 values each).

    python benchmarks/bench_captions.py --out benchmarks/results/captions.json

A FLUX.1 pipeline's text side at the real context size: a CLIP text encoder and a T5 encoder of FLUX's width
(d_model 4096, 512 tokens: contexts of 512 x 4096 values, 4 MiB per caption in fp16) but 2 narrow layers (the
tests' tiny models, ``tests/helpers.py``), so the benchmark measures the storing of the contexts, not T5-XXL's
weights. Each run, in a fresh process: ``FluxFamily.encode_captions`` (what train_dp_lora.py runs, in fp16 as under
``--mixed_precision``) over ``N`` random captions in batches of ``b``, into ``--cache_dir`` files. Reported: the
process' peak resident memory (VmHWM) above its resident memory just before encoding (models built), next to the
contexts' total size and one batch's, for several N and b: the peak follows the batch, not N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc

ROOT = Path(__file__).resolve().parents[1]
T5_WIDTH, LENGTH = 4096, 512


def child(config: dict) -> None:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import helpers

    from dp_diffusers import DPLDMPipeline
    from dp_diffusers.families import ConditionOptions
    from dp_diffusers.families.flux import FluxFamily

    bc.set_threads(config["threads"])
    helpers.T5_DIM, helpers.T5_LENGTH = T5_WIDTH, LENGTH  # FLUX's context width and length, 2 narrow layers
    work = Path(config["work"])
    pipe = DPLDMPipeline.from_pretrained(helpers.save_flux_base(work / "base"))  # as FluxPipeline saves it
    rng = np.random.default_rng(0)
    words = ["person", "scan", "photo", "left", "right", "lesion", "smiling", "outdoor", "blurred", "close-up"]
    captions = [" ".join(rng.choice(words, size=int(rng.integers(5, 40)))) for _ in range(config["num_captions"])]
    model_bytes = sum(p.numel() * p.element_size() for m in (pipe.text_encoder, pipe.text_encoder_2)
                      for p in m.parameters())  # fmt: skip
    bc._malloc_trim()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    before = bc._status_kib("VmRSS")
    start = time.perf_counter()
    contexts = FluxFamily.encode_captions(pipe, captions, cache_dir=str(work / "cache"),
                                          options=ConditionOptions(max_sequence_length=LENGTH),
                                          batch_size=config["batch_size"], dtype=torch.float16)  # fmt: skip
    seconds = time.perf_counter() - start
    peak = bc._status_kib("VmHWM")
    total = sum(t.numel() * t.element_size() for t in contexts.values())
    shapes = {name: list(t.shape) for name, t in contexts.items()}
    print(json.dumps({"peak_above_start_mib": (peak - before) / 1024, "contexts_mib": total / 2**20,
                      "one_batch_fp32_mib": config["batch_size"] * LENGTH * T5_WIDTH * 4 / 2**20,
                      "model_mib": model_bytes / 2**20, "seconds": seconds, "shapes": shapes,
                      "rss_anon_after_mib": bc._status_kib("RssAnon") / 1024,
                      "rss_file_after_mib": bc._status_kib("RssFile") / 1024}))  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="2000x64,500x64,500x16", help="NxB: N captions in batches of B.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    results = {}
    for run in args.runs.split(","):
        num_captions, batch_size = (int(x) for x in run.split("x"))
        with tempfile.TemporaryDirectory() as work:
            config = {"work": work, "num_captions": num_captions, "batch_size": batch_size, "threads": args.threads}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True,
                                  text=True, check=True, env=dict(os.environ, **bc.MEMORY_CHILD_ENV))  # fmt: skip
            results[run] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(run, results[run], flush=True)
    keys = ("contexts_mib", "one_batch_fp32_mib", "peak_above_start_mib", "rss_anon_after_mib", "seconds")
    rows = [[*run.split("x"), *(f"{r[key]:,.0f}" for key in keys)] for run, r in results.items()]
    headers = ["captions", "batch", "contexts on disk (fp16), MiB", "one batch's contexts (fp32), MiB",
               "peak RSS above start, MiB", "RSS anonymous after, MiB", "seconds"]  # fmt: skip
    table = bc.markdown_table(headers, rows)
    print(table)
    if args.out:
        info = bc.machine_info(args.threads)
        path = bc.write_json(args.out, {"machine": info, "config": vars(args), "results": results})
        header = (f"Machine: {info['cpu']}, torch {info['torch']}, {info['date']}. FluxFamily.encode_captions, fp16 "
                  f"contexts of {LENGTH} x {T5_WIDTH} (+ CLIP pooled), a 2-layer T5 of width {T5_WIDTH}, memory "
                  "in a fresh process per run.\n\n")  # fmt: skip
        path.with_suffix(".md").write_text(header + table + "\n")


if __name__ == "__main__":
    main()
