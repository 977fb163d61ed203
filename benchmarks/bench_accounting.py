#!/usr/bin/env python
"""Epsilon of the same DP-SGD schedule from three accountants, and the reference code's defect.

    python benchmarks/bench_accounting.py --out benchmarks/results/accounting.json

For each schedule (Poisson sampling rate q = batch / N, steps = ceil(epochs / q), delta), the noise
multiplier sigma is calibrated with the PRV accountant to target epsilon (``calibrate_noise_multiplier``,
as ``train_dp_lora.py`` does), then epsilon is recomputed by:

* opacus PRV (the project's default accountant),
* opacus RDP,
* Google's ``dp-accounting`` PLD (privacy loss distributions; an independent implementation),
  and its RDP accountant; skipped, with the reason, when the package is not installed
  (``pip install dp-accounting``).

Defect row: the reference DP-LDM/DP-LoRA code repeats each example k times and clips each copy,
so one example moves the sum by up to k*C while the noise std is sigma*C: the mechanism that
really runs is the one with noise multiplier sigma/k. Its epsilon is what the claimed guarantee
becomes (dp_diffusers clips the mean of the k copies once, so sigma stands).
"""

from __future__ import annotations

import argparse
import math
import time

import bench_common as bc

SCHEDULES = {
    "embedded-digits (default run)": dict(n=1437, batch=64, epochs=30, delta=1e-5, target_epsilon=10.0),
    "celeba64-paper": dict(n=162770, batch=8192, epochs=20, delta=1e-6, target_epsilon=10.0),
}


def opacus_epsilon(sigma, q, steps, delta, kind):
    from dp_diffusers.privacy import epsilon_for

    return epsilon_for(sigma, q, steps, delta, kind)


def dp_accounting_epsilons(sigma, q, steps, delta) -> dict:
    try:
        import dp_accounting
        from dp_accounting.pld import pld_privacy_accountant
        from dp_accounting.rdp import rdp_privacy_accountant
    except ImportError as err:
        return {"error": f"dp-accounting not installed ({err}); pip install dp-accounting"}
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    out = {}
    t0 = time.perf_counter()
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(event)
    out["pld"] = float(pld.get_epsilon(delta))
    out["pld_seconds"] = time.perf_counter() - t0
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(event)
    out["rdp"] = float(rdp.get_epsilon(delta))
    import importlib.metadata

    out["version"] = importlib.metadata.version("dp-accounting")
    return out


def evaluate(sigma, q, steps, delta) -> dict:
    row = {"sigma": sigma}
    for kind in ("prv", "rdp"):
        try:
            row[f"opacus_{kind}"] = opacus_epsilon(sigma, q, steps, delta, kind)
        except Exception as err:  # noqa: BLE001 - e.g. PRV's domain limits at very low sigma
            row[f"opacus_{kind}"] = None
            row[f"opacus_{kind}_error"] = bc.short_error(err)
    try:
        row["dp_accounting"] = dp_accounting_epsilons(sigma, q, steps, delta)
    except Exception as err:  # noqa: BLE001
        row["dp_accounting"] = {"error": bc.short_error(err)}
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=4, help="Noise multiplicity of the defect row.")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from dp_diffusers.privacy import calibrate_noise_multiplier

    results = {"machine": bc.machine_info(1), "k": args.k, "schedules": []}
    rows = []
    for name, s in SCHEDULES.items():
        q = s["batch"] / s["n"]
        steps = math.ceil(s["epochs"] / q)
        sigma = calibrate_noise_multiplier(s["target_epsilon"], s["delta"], q, steps, "prv")
        entry = {"name": name, **s, "q": q, "steps": steps, "sigma": sigma}
        entry["correct"] = evaluate(sigma, q, steps, s["delta"])
        entry["defect"] = evaluate(sigma / args.k, q, steps, s["delta"])
        results["schedules"].append(entry)
        for label, e in (("as claimed (clip the mean of k copies)", entry["correct"]),
                         (f"reference defect (k={args.k}: sigma/k)", entry["defect"])):  # fmt: skip
            dpa = e["dp_accounting"]
            rows.append([
                name, f"N={s['n']} B={s['batch']} q={q:.4g} T={steps} delta={s['delta']:g}", label,
                f"{e['sigma']:.4f}", _fmt(e.get("opacus_prv")), _fmt(e.get("opacus_rdp")),
                _fmt(dpa.get("pld")), _fmt(dpa.get("rdp")),
            ])  # fmt: skip
    headers = ["schedule", "parameters", "mechanism", "sigma", "opacus PRV", "opacus RDP",
               "dp-accounting PLD", "dp-accounting RDP"]  # fmt: skip
    table = bc.markdown_table(headers, rows)
    errors = [e for s in results["schedules"] for e in (s["correct"], s["defect"]) if "error" in e["dp_accounting"]]
    if errors:
        table += f"\n\ndp-accounting: {errors[0]['dp_accounting']['error']}"
    print(table)
    if args.out:
        bc.write_json(args.out, results)
        from pathlib import Path

        Path(args.out).with_suffix(".md").write_text(table + "\n")


def _fmt(x):
    return "n/a" if x is None else f"{x:.3f}" if x < 100 else f"{x:.1f}"


if __name__ == "__main__":
    main()
