#!/usr/bin/env python
"""Peak memory while encoding a private imagefolder into latents, streamed against all pixels at once.

    python benchmarks/bench_encoding.py --out benchmarks/results/encoding.json

Makes an imagefolder of ``--num_images`` random 64x64 RGB PNGs (10 classes), loads it with ``datasets`` and a
small ``AutoencoderKL`` (f=4: 16x16x4 latents), then, each in a fresh process: ``dp_diffusers.data.dataset_latents``
(what train_dp_lora.py runs: batches of ``--batch_size`` images decoded and encoded, latents kept) and the old
way, every image decoded into one pixel tensor first (``dataset_to_tensors``) and then encoded. Reported: the
process' peak resident memory (VmHWM) above its resident memory just before encoding (data set opened,
autoencoder loaded), next to the latents' own size and the pixel tensor's; and, after encoding, how much of the
resident memory is anonymous (tensors) and how much file-backed (the data set's memory-mapped Arrow pages that
reading the images touched: page cache the kernel can drop, but counted in RSS).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_common as bc


def make_folder(root: Path, num_images: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(num_images):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def child(config: dict) -> None:
    import torch
    from diffusers import AutoencoderKL

    from dp_diffusers.data import dataset_latents, dataset_to_tensors, encode_latents, load_image_dataset

    bc.set_threads(config["threads"])
    dataset = load_image_dataset(train_data_dir=config["folder"], cache_dir=config["datasets_cache"])
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=64).eval()  # fmt: skip
    model_bytes = sum(p.numel() * p.element_size() for p in vae.parameters())
    bc._malloc_trim()
    before = bc._status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    if config["way"] == "streamed":
        latents = dataset_latents(dataset, vae, 64, batch_size=config["batch_size"])
    else:
        pixels, _ = dataset_to_tensors(dataset, 64, 3, label_column=None)
        latents = encode_latents(vae, pixels, config["batch_size"])
    peak = bc._status_kib("VmHWM")
    anon, file_backed = bc._status_kib("RssAnon") / 1024, bc._status_kib("RssFile") / 1024
    print(json.dumps({"peak_above_start_mib": (peak - before) / 1024, "latents_mib": latents.numel() * 4 / 2**20,
                      "rss_anon_after_mib": anon, "rss_file_after_mib": file_backed,
                      "pixels_mib": len(dataset) * 3 * 64 * 64 * 4 / 2**20, "model_mib": model_bytes / 2**20,
                      "num_images": len(dataset), "latent_shape": list(latents.shape[1:])}))  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=20_000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_folder(Path(tmp) / "images", args.num_images)
        results = {}
        for way in ("streamed", "all pixels first"):
            config = {"folder": str(Path(tmp) / "images"), "datasets_cache": str(Path(tmp) / "cache"), "way": way,
                      "batch_size": args.batch_size, "threads": args.threads}  # fmt: skip
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True,
                                  text=True, check=True)  # fmt: skip
            results[way] = json.loads(proc.stdout.strip().splitlines()[-1])
    streamed = results["streamed"]
    budget = 1.2 * (streamed["latents_mib"] + streamed["model_mib"])
    keys = ("peak_above_start_mib", "latents_mib", "pixels_mib", "rss_anon_after_mib", "rss_file_after_mib")
    rows = [[way, *(f"{r[key]:.0f}" for key in keys)] for way, r in results.items()]
    headers = ["encoding", "peak RSS above start, MiB", "latents, MiB", "all pixels, MiB", "RSS anonymous after, MiB",
               "RSS file-backed after, MiB"]  # fmt: skip
    table = bc.markdown_table(headers, rows)
    verdict = bc.verdict(streamed["peak_above_start_mib"], budget)
    summary = (f"\n\nStreamed peak {streamed['peak_above_start_mib']:.0f} MiB against 1.2 x (latents + model) = "
               f"{budget:.0f} MiB: {verdict}.")  # fmt: skip
    print(table + summary)
    if args.out:
        info = bc.machine_info(args.threads)
        path = bc.write_json(args.out, {"machine": info, "config": vars(args), "results": results})
        header = (f"Machine: {info['cpu']}, torch {info['torch']}, {info['date']}. {args.num_images} random 64x64 RGB "
                  f"PNGs, AutoencoderKL f=4 (16x16x4 latents), encoding batch {args.batch_size}.\n\n")  # fmt: skip
        path.with_suffix(".md").write_text(header + table + summary + "\n")


if __name__ == "__main__":
    main()
