"""DP training on 2 processes (torchrun, gloo on CPU) against the 1-process reference.

One launch of ``distributed_worker.py`` runs the project's distributed wiring (``DPDDP`` +
``make_private``: the noise-multiplicity ``DistributedDPOptimizer`` and the distributed Poisson
loader) on both ranks, another runs train_dp_lora.py itself as a user launches it
(``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2``); the tests read what they wrote. Each
test would fail on a broken distributed DP step: another update than one process makes from the
same global batch, noise added per rank (sqrt(2) times the std), noise scaled by the per-rank
batch, Poisson batches per rank that do not add up to the accountant's sample rate, or ranks
that drop their empty batches and fall out of step.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    DIST,
    ROOT,
    base_args,
    distributed_model,
    flat,
    indexed,
    indexed_examples,
    indexed_loss,
    private,
    train,
)

from dp_diffusers.privacy import average_over_copies, private_backward

TESTS = Path(__file__).resolve().parent
TRAIN = {"--max_physical_batch_size": 4, "--train_class_embedding": True}  # several physical batches per rank


def torchrun(tmp: Path, script: Path, args: list, accelerate_cpu: bool = True) -> subprocess.CompletedProcess:
    """``[ACCELERATE_USE_CPU=1] torchrun --standalone --nproc_per_node 2 SCRIPT ARGS``, as a user launches it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    env.pop("ACCELERATE_USE_CPU", None)
    if accelerate_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    return subprocess.run([*cmd, *map(str, args)], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """What distributed_worker.py's ranks wrote."""
    out = tmp_path_factory.mktemp("distributed")
    proc = torchrun(out, TESTS / "distributed_worker.py", ["--out", out])
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def launched_script(tiny_base, tmp_path_factory) -> Path:
    """The output folder of train_dp_lora.py itself launched on 2 CPU processes."""
    out = tmp_path_factory.mktemp("distributed-script") / "train"
    proc = torchrun(out.parent, ROOT / "training_scripts" / "train_dp_lora.py", base_args(tiny_base, out, **TRAIN))
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return out


@pytest.mark.parametrize("mode,k", DIST.equality_cases)
def test_two_processes_make_the_one_process_update(launched, mode, k):
    """Noise off: replaying each logical step's global batch (the union of the ranks' Poisson
    batches) in one process gives the same update, per-example clipping included."""
    run = torch.load(launched / "equality.pt")[f"{mode}-k{k}"]
    assert run["ranks_agree"] and len(run["steps"]) == DIST.equality_steps
    data = indexed_examples()
    dataset = indexed(data["latents"])
    dp, _ = private(distributed_model(), dataset, sigma=0.0, clip=DIST.clip(k), batch=DIST.batch, k=k, mode=mode)
    loss_fn = indexed_loss(data, k)
    norms = []
    for step in run["steps"]:
        idx = torch.tensor(step["indices"], dtype=torch.long)
        assert len(idx) > 0 and len(set(step["indices"])) == len(idx)
        private_backward(dp.model, dp.optimizer, loss_fn, data["latents"][idx], idx)
        folded = k if not dp.optimizer.copies_folded_in_backward else 1
        grads = [average_over_copies(p.grad_sample, folded).flatten(1) for p in dp.optimizer.params]
        norms.append(torch.cat(grads, 1).norm(dim=1))
        dp.optimizer.step()
        expected = flat([p.grad for p in dp.optimizer.params])
        torch.testing.assert_close(step["update"], expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
        dp.optimizer.zero_grad(set_to_none=True)
    norms = torch.cat(norms)
    assert (norms > DIST.clip(k)).any() and (
        norms < DIST.clip(k)
    ).any()  # both clipped and unclipped examples were in it


@pytest.mark.parametrize("mode,k", DIST.unit_cases)
def test_two_processes_make_the_one_process_update_with_privacy_units(launched, mode, k):
    """Unit-level DP, noise off: ranks are dealt units (a unit whole on one rank), and replaying each step's units,
    each with the examples it brought, in one process gives the same update: one clip per unit."""
    run = torch.load(launched / "equality.pt")[f"units-{mode}-k{k}"]
    assert run["ranks_agree"] and len(run["steps"]) == DIST.equality_steps
    data = indexed_examples()
    units = DIST.units()
    dp, _ = private(distributed_model(), indexed(data["latents"]), sigma=0.0, clip=DIST.clip(k),
                    batch=DIST.unit_batch, k=k, mode=mode, units=units)  # fmt: skip
    loss_fn = indexed_loss(data, k)
    for step in run["steps"]:
        owners = [next(u for u, members in enumerate(units.members) if set(chosen) <= set(members))
                  for chosen in step["units"]]  # fmt: skip
        assert len(set(owners)) == len(owners) and all(len(c) == DIST.unit_cap for c in step["units"])
        idx = torch.tensor([i for chosen in step["units"] for i in chosen])
        groups = torch.tensor([u for u, chosen in enumerate(step["units"]) for _ in chosen])
        private_backward(dp.model, dp.optimizer, loss_fn, data["latents"][idx], idx, units=groups)
        dp.optimizer.step()
        expected = flat([p.grad for p in dp.optimizer.params])
        torch.testing.assert_close(step["update"], expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
        dp.optimizer.zero_grad(set_to_none=True)


def test_noise_is_added_once_with_std_sigma_c_over_the_global_batch(launched):
    """Zero gradient (empty batches on both ranks), noise on: the averaged update is pure noise
    of std sigma*C/(q*N). Noise added on both ranks would give sqrt(2) times that, noise scaled
    by the per-rank batch q*N/2 twice that."""
    noise = torch.load(launched / "noise.pt")
    assert noise["ranks_agree"]  # every rank applies the same (rank 0's) noise
    updates = noise["updates"].double()
    assert updates.shape[0] == DIST.noise_steps
    m = updates.numel()
    expected = DIST.sigma * DIST.noise_clip / DIST.batch
    ratio = updates.pow(2).mean().sqrt().item() / expected
    # m * s^2 / std^2 ~ chi2(m) for zero-mean noise: s^2 / std^2 has standard deviation sqrt(2/m)
    tolerance = 6 * math.sqrt(2 / m)
    assert tolerance < 0.1  # sqrt(2) (per-rank noise) is far outside
    assert abs(ratio**2 - 1) < tolerance, f"noise std is {ratio:.4f} times sigma*C/B"
    assert abs(updates.mean().item()) < 6 * expected / math.sqrt(m)
    correlation = torch.corrcoef(updates) - torch.eye(DIST.noise_steps, dtype=updates.dtype)
    assert correlation.abs().max() < 6 / math.sqrt(updates.shape[1])  # fresh noise every step


@pytest.mark.parametrize("generators", ["same_seeded_generators", "default_generators"])
def test_poisson_batches_of_both_ranks_add_up_to_the_accountants_sample_rate(launched, generators):
    """Over many steps the union of the ranks' batches has mean q*N (not 2*q*N), each example is
    in it at rate q, the ranks' shares are disjoint and uncorrelated, and every rank makes every
    step, empty local batches included."""
    rank_batches = json.loads((launched / "checks.json").read_text())["poisson"][generators]["rank_batches"]
    q, n = DIST.poisson_batch / DIST.poisson_n, DIST.poisson_n
    steps = DIST.poisson_epochs * int(1 / q)
    assert len(rank_batches) == 2 and all(len(batches) == steps for batches in rank_batches)
    sizes = torch.tensor([[len(b) for b in batches] for batches in rank_batches], dtype=torch.double)
    assert (sizes == 0).any()  # empty local batches happened, and were steps all the same
    union = sizes.sum(0)
    sd = math.sqrt(n * q * (1 - q) / steps)
    assert abs(union.mean().item() - q * n) < 5 * sd, f"mean global batch {union.mean():.3f}, expected {q * n}"
    for rank in (0, 1):
        assert abs(sizes[rank].mean().item() - q * n / 2) < 5 * sd
        assert all(i % 2 == rank for batch in rank_batches[rank] for i in batch)  # disjoint shares
    assert abs(torch.corrcoef(sizes)[0, 1].item()) < 5 / math.sqrt(steps)
    counts = torch.zeros(n, dtype=torch.double)
    for batches in rank_batches:
        for batch in batches:
            counts[batch] += 1
    chi2 = ((counts - steps * q) ** 2 / (steps * q * (1 - q))).sum().item()  # ~ chi2(n) for rate q everywhere
    assert chi2 < n + 6 * math.sqrt(2 * n)


def test_train_dp_lora_on_two_processes_spends_the_one_process_epsilon(launched_script, tiny_base, tmp_path):
    two = json.loads((launched_script / "dp_report.json").read_text())
    train(base_args(tiny_base, tmp_path / "one", **TRAIN))
    one = json.loads((tmp_path / "one" / "dp_report.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for key in ("steps", "sample_rate", "noise_multiplier", "batch_size", "dataset_size"):
        assert two[key] == one[key], key
    assert two["epsilon"] == pytest.approx(one["epsilon"], rel=1e-9)
    assert (launched_script / "pytorch_lora_weights.safetensors").is_file()
    assert (launched_script / "class_embedder" / "config.json").is_file()


def test_torchrun_without_accelerate_cpu_is_refused_before_anything_is_written(tiny_base, tmp_path):
    """Plain torchrun on CPU gives accelerate one process per rank: two independent runs into one folder."""
    out = tmp_path / "train"
    proc = torchrun(tmp_path, ROOT / "training_scripts" / "train_dp_lora.py", base_args(tiny_base, out),
                    accelerate_cpu=False)  # fmt: skip
    assert proc.returncode != 0
    assert "WORLD_SIZE=2 says 2 processes, but accelerate sees one" in proc.stderr
    assert "ACCELERATE_USE_CPU=1 torchrun" in proc.stderr
    assert not (out / "dp_report.json").exists() and not (out / "pytorch_lora_weights.safetensors").exists()
