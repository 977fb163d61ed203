"""One rank of the 2-process checks of test_distributed.py (``accelerate launch --cpu --num_processes 2``).

Every rank runs the project's own DP wiring, as train_dp_lora.py does: ``DPDDP(model)``, then
``make_private`` (its distributed optimizer and Poisson loader), ``BatchMemoryManager``,
``private_backward``, ``optimizer.step``. Rank 0 writes what the test checks to ``--out``:

* ``equality.pt``: noise off; per logical step, the union of the ranks' batch indices and the
  update (``p.grad`` after the all-reduce), for each grad_sample_mode and noise multiplicity;
  the test replays the same global batches in one process;
* ``noise.pt``: noise on, empty batches (zero gradient); the final averaged update of each step;
* ``checks.json``: the Poisson batch sizes of both ranks over many steps, and whether the ranks
  ended with the same parameters.

With ``--train_args``, the ranks then run train_dp_lora.py's ``main`` with those arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import PartialState
from conftest import scheduler, tiny_cond_unet
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import TensorDataset

from dp_diffusers import ClassEmbedder, LatentDenoiser, denoising_loss
from dp_diffusers.lora import add_lora, make_lora_config
from dp_diffusers.privacy import DPTraining, PrivacyBudget, make_private, private_backward

ROOT = Path(__file__).resolve().parents[1]
N = 24  # private examples of the equality and noise checks
BATCH = 6  # expected global logical batch q * N
MAX_K = 4
EQUALITY_CASES = [("fused", 1), ("fused", 4), ("hooks", 1), ("hooks", 4)]
EQUALITY_STEPS = 2
PHYSICAL = 2  # examples per forward: several physical batches per logical one, their number differing by rank
CLIPS = {1: 0.15, 4: 0.09}  # by k: clips some examples, not all (the test checks both kinds occur)
SIGMA, NOISE_CLIP, NOISE_STEPS = 2.0, 0.5, 6
POISSON_N, POISSON_BATCH, POISSON_EPOCHS = 40, 2, 50  # about one example per rank and step: many empty ones


def build_model(lora_rank: int = 4) -> LatentDenoiser:
    """The same tiny class-conditional denoiser on every call: LoRA on attention+proj (B perturbed
    so every LoRA weight has a gradient) and a trainable class embedding left in eval mode, as
    ``from_pretrained`` leaves it."""
    unet = tiny_cond_unet()
    add_lora(unet, make_lora_config(rank=lora_rank, targets="attention+proj", init_lora_weights=True))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    embedder = ClassEmbedder(10, unet.config.cross_attention_dim)
    embedder.requires_grad_(True).eval()
    return LatentDenoiser(unet, embedder)


def examples() -> dict[str, torch.Tensor]:
    """Latents, labels, and per (example, copy) timesteps and diffusion noise, fixed by index."""
    g = torch.Generator().manual_seed(2)
    return {
        "latents": torch.randn(N, 3, 8, 8, generator=g),
        "labels": torch.randint(0, 10, (N,), generator=g),
        "timesteps": torch.randint(0, 1000, (N, MAX_K), generator=g),
        "noise": torch.randn(N, MAX_K, 3, 8, 8, generator=g),
    }


def indexed_loss(data: dict[str, torch.Tensor], k: int) -> Callable:
    """``loss_fn`` for ``private_backward`` whose "labels" are example indices: every row's class,
    timestep and noise depend on its example and copy only, not on the batch it lands in."""
    sched = scheduler()

    def loss_fn(model: nn.Module, latents: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        copy = torch.arange(len(idx)) % k
        return denoising_loss(
            model, sched, latents, data["labels"][idx], data["timesteps"][idx, copy], data["noise"][idx, copy]
        )

    return loss_fn


def private(
    model: nn.Module,
    dataset: TensorDataset,
    *,
    sigma: float,
    clip: float,
    batch: int,
    k: int = 1,
    mode: str = "fused",
    **kw,
) -> tuple[DPTraining, PrivacyBudget]:
    """``make_private`` with plain SGD (lr 1: the update is ``p.grad``), expected batch ``batch``."""
    params = [p for p in model.parameters() if p.requires_grad]
    budget = PrivacyBudget("prv", sigma, batch / len(dataset), 1e-5, planned_steps=10_000)
    optimizer = torch.optim.SGD(params, lr=1.0)
    dp = make_private(
        model, optimizer, dataset, budget=budget, max_grad_norm=clip, noise_multiplicity=k, grad_sample_mode=mode, **kw
    )
    return dp, budget


def indexed(latents: torch.Tensor) -> TensorDataset:
    return TensorDataset(latents, torch.arange(len(latents)))


def flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def equality_run(mode: str, k: int) -> dict:
    """Two logical Poisson steps of the distributed DP step, noise off."""
    data = examples()
    model = DPDDP(build_model())
    generator = torch.Generator().manual_seed(10 + torch.distributed.get_rank())
    dp, budget = private(
        model,
        indexed(data["latents"]),
        sigma=0.0,
        clip=CLIPS[k],
        batch=BATCH,
        k=k,
        mode=mode,
        sampling_generator=generator,
    )
    loss_fn = indexed_loss(data, k)
    steps, local = [], []
    with BatchMemoryManager(
        data_loader=dp.data_loader, max_physical_batch_size=PHYSICAL, optimizer=dp.optimizer
    ) as loader:
        for latents, idx in loader:
            steps_before = budget.steps
            private_backward(dp.model, dp.optimizer, loss_fn, latents, idx)
            dp.optimizer.step()
            local += idx.tolist()
            if budget.steps > steps_before:  # the last physical batch of a logical one: a real step
                union = [i for part in _gather(local) for i in part]
                steps.append({"indices": sorted(union), "update": flat([p.grad for p in dp.optimizer.params])})
                local = []
            dp.optimizer.zero_grad(set_to_none=True)
            if len(steps) == EQUALITY_STEPS:
                break
    final = flat(dp.optimizer.params)
    finals = _gather(final)
    return {"steps": steps, "ranks_agree": all(torch.equal(f, final) for f in finals)}


def noise_run() -> dict:
    """Noise-only steps (empty batches on both ranks: zero gradient) of the distributed optimizer."""
    model = DPDDP(build_model(lora_rank=8))
    dp, _ = private(model, indexed(examples()["latents"]), sigma=SIGMA, clip=NOISE_CLIP, batch=BATCH)
    updates = []
    for _ in range(NOISE_STEPS):
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
    dataset = indexed(torch.zeros(POISSON_N, 1))
    dp, _ = private(model, dataset, sigma=1.0, clip=1.0, batch=POISSON_BATCH, sampling_generator=generator)
    batches = [idx.tolist() for _ in range(POISSON_EPOCHS) for _, idx in dp.data_loader]
    return {"rank_batches": _gather(batches)}


def _gather(obj):
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train_args", type=str, default=None, help="JSON list: argv of train_dp_lora.main")
    args = parser.parse_args()
    state = PartialState(cpu=True)  # gloo process group, as Accelerator() makes it (ACCELERATE_USE_CPU)
    torch.manual_seed(state.process_index)  # as set_seed(device_specific=True): the ranks' RNGs differ

    equality = {f"{mode}-k{k}": equality_run(mode, k) for mode, k in EQUALITY_CASES}
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
                  "poisson_sample_rate": POISSON_BATCH / POISSON_N, "poisson_n": POISSON_N}  # fmt: skip
        (args.out / "checks.json").write_text(json.dumps(checks))
    state.wait_for_everyone()

    if args.train_args:
        spec = importlib.util.spec_from_file_location("train_dp_lora", ROOT / "training_scripts" / "train_dp_lora.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(json.loads(args.train_args))


if __name__ == "__main__":
    main()
