"""One rank of the 2-process checks of test_distributed.py (``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2``).

Every rank runs the project's own DP wiring, as train_dp_lora.py does: ``DPDDP(model)``, then
``make_private`` (its distributed optimizer and Poisson loader), ``BatchMemoryManager``,
``private_backward``, ``optimizer.step``. Rank 0 writes what the test checks to ``--out``:

* ``equality.pt``: noise off; per logical step, the union of the ranks' batch indices (unit-level: each unit with
  the examples it brought) and the update (``p.grad`` after the all-reduce), for each grad_sample_mode and noise
  multiplicity; the test replays the same global batches in one process;
* ``noise.pt``: noise on, empty batches (zero gradient); the final averaged update of each step;
* ``checks.json``: the Poisson batch sizes of both ranks over many steps, and whether the ranks
  ended with the same parameters.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import PartialState
from helpers import DIST, distributed_model, flat, indexed, indexed_examples, indexed_loss, private
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn

from dp_diffusers.privacy import private_backward


def equality_run(mode: str, k: int) -> dict:
    """Two logical Poisson steps of the distributed DP step, noise off."""
    data = indexed_examples()
    model = DPDDP(distributed_model())
    generator = torch.Generator().manual_seed(10 + torch.distributed.get_rank())
    dp, budget = private(
        model,
        indexed(data["latents"]),
        sigma=0.0,
        clip=DIST.clip(k),
        batch=DIST.batch,
        k=k,
        mode=mode,
        sampling_generator=generator,
    )
    loss_fn = indexed_loss(data, k)
    steps, local = [], []
    with BatchMemoryManager(
        data_loader=dp.data_loader, max_physical_batch_size=DIST.physical, optimizer=dp.optimizer
    ) as loader:
        for latents, idx, _ in loader:  # (the loader's example ids: idx again)
            steps_before = budget.steps
            private_backward(dp.model, dp.optimizer, loss_fn, latents, idx)
            dp.optimizer.step()
            local += idx.tolist()
            if budget.steps > steps_before:  # the last physical batch of a logical one: a real step
                union = [i for part in _gather(local) for i in part]
                steps.append({"indices": sorted(union), "update": flat([p.grad for p in dp.optimizer.params])})
                local = []
            dp.optimizer.zero_grad(set_to_none=True)
            if len(steps) == DIST.equality_steps:
                break
    final = flat(dp.optimizer.params)
    finals = _gather(final)
    return {"steps": steps, "ranks_agree": all(torch.equal(f, final) for f in finals)}


def unit_equality_run(mode: str, k: int) -> dict:
    """Two logical steps of unit-level DP (``DIST.units()``), noise off: per step, each unit in the union of the
    ranks' batches with the examples it brought, and the update."""
    data = indexed_examples()
    model = DPDDP(distributed_model())
    generator = torch.Generator().manual_seed(20 + torch.distributed.get_rank())
    dp, budget = private(model, indexed(data["latents"]), sigma=0.0, clip=DIST.clip(k), batch=DIST.unit_batch, k=k,
                         mode=mode, sampling_generator=generator, units=DIST.units())  # fmt: skip
    loss_fn = indexed_loss(data, k)
    steps, local = [], []
    with BatchMemoryManager(
        data_loader=dp.data_loader, max_physical_batch_size=1, optimizer=dp.optimizer
    ) as loader:
        for latents, idx, _, units in loader:
            steps_before = budget.steps
            private_backward(dp.model, dp.optimizer, loss_fn, latents, idx, units=units)
            dp.optimizer.step()
            local += [idx[units == u].tolist() for u in units.unique().tolist()]
            if budget.steps > steps_before:
                union = [unit for part in _gather(local) for unit in part]
                steps.append({"units": sorted(union), "update": flat([p.grad for p in dp.optimizer.params])})
                local = []
            dp.optimizer.zero_grad(set_to_none=True)
            if len(steps) == DIST.equality_steps:
                break
    final = flat(dp.optimizer.params)
    return {"steps": steps, "ranks_agree": all(torch.equal(f, final) for f in _gather(final))}


def noise_run() -> dict:
    """Noise-only steps (empty batches on both ranks: zero gradient) of the distributed optimizer."""
    model = DPDDP(distributed_model(lora_rank=8))
    dp, _ = private(
        model, indexed(indexed_examples()["latents"]), sigma=DIST.sigma, clip=DIST.noise_clip, batch=DIST.batch
    )
    updates = []
    for _ in range(DIST.noise_steps):
        private_backward(dp.model, dp.optimizer, None, torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long))
        dp.optimizer.step()
        update = flat([p.grad for p in dp.optimizer.params])
        updates.append(update)
        dp.optimizer.zero_grad(set_to_none=True)
    same = all(torch.equal(u, updates[-1]) for u in _gather(updates[-1]))
    return {"updates": torch.stack(updates), "ranks_agree": same}


def poisson_run(generator: torch.Generator | None) -> dict:
    """The indices each rank's loader gives, step by step, over many epochs."""
    model = DPDDP(nn.Linear(1, 1))
    dataset = indexed(torch.zeros(DIST.poisson_n, 1))
    dp, _ = private(model, dataset, sigma=1.0, clip=1.0, batch=DIST.poisson_batch, sampling_generator=generator)
    batches = [idx.tolist() for _ in range(DIST.poisson_epochs) for _, idx, _ in dp.data_loader]
    return {"rank_batches": _gather(batches)}


def _gather(obj):
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    state = PartialState(cpu=True)  # gloo process group, as Accelerator() makes it (ACCELERATE_USE_CPU)
    torch.manual_seed(state.process_index)  # as set_seed(device_specific=True): the ranks' RNGs differ

    equality = {f"{mode}-k{k}": equality_run(mode, k) for mode, k in DIST.equality_cases}
    equality |= {f"units-{mode}-k{k}": unit_equality_run(mode, k) for mode, k in DIST.unit_cases}
    noise = noise_run()
    poisson = {
        "same_seeded_generators": poisson_run(torch.Generator().manual_seed(7)),
        "default_generators": poisson_run(None),
    }
    if state.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(equality, args.out / "equality.pt")
        torch.save(noise, args.out / "noise.pt")
        checks = {"world_size": state.num_processes, "poisson": poisson,
                  "poisson_sample_rate": DIST.poisson_batch / DIST.poisson_n, "poisson_n": DIST.poisson_n}  # fmt: skip
        (args.out / "checks.json").write_text(json.dumps(checks))
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
