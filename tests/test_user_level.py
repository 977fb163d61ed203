"""User-level DP (``--privacy_unit_column``): the person, not the image, is the privacy unit.

Sensitivity probes of the DP step and of the central images' release per unit, the unit sampler (Poisson over
units, at most the cap of a unit's examples, uniformly), epsilon over units against an independent recomputation,
resuming, the audit of people, group privacy in example-level reports, bad input, and the script end to end on
the embedded private digits grouped into people. (2 processes: test_distributed.py.)"""

import json
import math

import pytest
import torch
from helpers import base_args, crash_after_checkpoints, fixed_loss, lora_denoiser, private, script, train
from torch.utils.data import TensorDataset

from dp_diffusers.data import DataError, load_image_dataset, load_private_digit_units, privacy_unit_members
from dp_diffusers.privacy import (
    PrivacyBudget,
    PrivacyBudgetError,
    PrivacyUnits,
    Release,
    RowRandomness,
    central_image_query,
    epsilon_for,
    group_privacy_epsilon,
    private_backward,
    unit_poisson_data_loader,
)

pytestmark = pytest.mark.usefixtures("one_thread")

UNITS = {"--dataset_name": "private-digits-units", "--privacy_unit_column": "person", "--max_train_samples": None,
         "--batch_size": 10, "--max_train_steps": 3, "--noise_multiplier": 1.5,
         "--max_examples_per_unit": 4}  # fmt: skip


def moved_by(dp, lr: float) -> float:
    return lr * torch.sqrt(sum((p.grad.double() ** 2).sum() for p in dp.optimizer.params)).item()


@pytest.mark.parametrize("mode", ["fused", "hooks"])
@pytest.mark.parametrize("cap", [1, 50])
@pytest.mark.parametrize("k", [1, 3])
def test_one_unit_of_50_enormous_examples_moves_the_update_by_exactly_lr_c_over_b(mode, cap, k):
    """Noise off, plain SGD: a unit of 50 enormous examples (identical, so that nothing cancels) moves the update by
    exactly lr * C / B_units however many of them it brings; the same 50 examples as 50 units move it 50 times
    more. The batch is what the unit loader itself gives (its cap, its collation)."""
    torch.manual_seed(0)
    lr, clip, expected_units = 0.5, 1e-7, 8
    latents = torch.cat([torch.randn(1, 3, 8, 8).repeat(50, 1, 1, 1) * 1e4, torch.randn(63, 3, 8, 8)])
    labels = torch.cat([torch.full((50,), 3), torch.randint(0, 10, (63,))])
    dataset = TensorDataset(latents, labels)
    one_unit = PrivacyUnits([list(range(50))] + [[50 + i] for i in range(63)], cap)
    fifty_units = PrivacyUnits([[i] for i in range(113)], cap)
    moved = {}
    for name, units in (("one unit", one_unit), ("fifty units", fifty_units)):
        model = lora_denoiser("cond", "attention")
        dp, _ = private(model, dataset, sigma=0.0, clip=clip, batch=expected_units, k=k, mode=mode, lr=lr,
                        planned_steps=10, units=units)  # fmt: skip
        assert dp.optimizer.expected_batch_size == pytest.approx(expected_units)  # q * N_units
        chosen = [0] if name == "one unit" else list(range(50))
        batch = dp.data_loader.collate_fn([dp.data_loader.dataset[u] for u in chosen])
        *columns, _, groups = batch  # (the example ids: fixed_loss draws nothing)
        assert len(columns[0]) == (min(cap, 50) if name == "one unit" else 50)
        timesteps = torch.full((len(columns[0]) * k,), 400)  # every row the same draw: the examples stay identical
        noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 1e4  # an enormous target too
        _, loss_fn = fixed_loss(timesteps, noise.expand(len(timesteps), -1, -1, -1))
        private_backward(dp.model, dp.optimizer, loss_fn, *columns, units=groups)
        dp.optimizer.step()
        moved[name] = moved_by(dp, lr)
    bound = lr * clip / expected_units
    assert bound * 0.99 <= moved["one unit"] <= bound * (1 + 1e-4)
    assert moved["fifty units"] == pytest.approx(50 * moved["one unit"], rel=1e-3)


def test_the_unit_sampler_is_poisson_over_units_and_draws_at_most_the_cap_uniformly():
    """Every unit is in a batch independently with rate q (mean and per-unit frequency), a unit's examples are
    adjacent, never more than the cap, and each of a large unit's examples is drawn at rate cap / size."""
    sizes = [10] * 20 + [2] * 20
    members, start = [], 0
    for size in sizes:
        members.append(list(range(start, start + size)))
        start += size
    dataset = TensorDataset(torch.arange(start).float().unsqueeze(1), torch.arange(start))
    q, cap, steps = 0.25, 3, 800
    accesses = iter(range(10**9))
    # a new step at every access (a fresh subset each time); seeded, so that the statistical bounds are checked once
    randomness = RowRandomness(step=lambda: next(accesses), key=0)
    loader = unit_poisson_data_loader(dataset, PrivacyUnits(members, cap), q, distributed=False, randomness=randomness,
                                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    unit_counts, example_counts, batch_units = torch.zeros(len(members)), torch.zeros(start), []
    owner = {i: u for u, unit in enumerate(members) for i in unit}
    drawn = 0
    while drawn < steps:
        for _, idx, _, groups in loader:
            drawn += 1
            units_here = [owner[int(i)] for i in idx]
            per_group = [sorted({units_here[j] for j in (groups == g).nonzero().flatten().tolist()})
                         for g in groups.unique().tolist()]  # fmt: skip
            assert all(len(owners) == 1 for owners in per_group)  # a batch unit is one person
            assert torch.equal(groups, groups.sort().values)  # a unit's examples adjacent
            assert all(int((groups == g).sum()) <= cap for g in groups.unique().tolist())
            for u in {owners[0] for owners in per_group}:
                unit_counts[u] += 1
            example_counts[idx] += 1
            batch_units.append(len(per_group))
            if drawn == steps:
                break
    sd = math.sqrt(len(members) * q * (1 - q) / steps)
    assert abs(sum(batch_units) / steps - q * len(members)) < 5 * sd
    chi2 = ((unit_counts - steps * q) ** 2 / (steps * q * (1 - q))).sum().item()
    assert chi2 < len(members) + 6 * math.sqrt(2 * len(members))
    large = example_counts[: 10 * 20].reshape(20, 10) / unit_counts[:20, None]  # rate per step the unit was in
    assert abs(large.mean().item() - cap / 10) < 0.02 and (large - cap / 10).abs().max() < 0.12
    small = example_counts[200:].reshape(20, 2) / unit_counts[20:, None]
    assert torch.allclose(small, torch.ones_like(small))  # fewer than the cap: all of them


def test_central_images_count_one_bounded_contribution_per_unit():
    """One person with 50 enormous images moves the release's query by at most sqrt(2) C (each image weighs 1/50);
    the same images as 50 people move it 50 times more."""
    clip = 2.0
    images = torch.ones(50, 1, 4, 4)  # clipped to norm C: each adds C to its class and C to the count
    labels = torch.zeros(50, dtype=torch.long)
    empty = central_image_query([(torch.zeros(0, 1, 4, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0).long())],
                                2, clip, unit_sizes=torch.tensor([50]))  # fmt: skip
    as_one = central_image_query([(images, labels, torch.zeros(50, dtype=torch.long))], 2, clip,
                                 unit_sizes=torch.tensor([50]))  # fmt: skip
    as_fifty = central_image_query([(images, labels)], 2, clip)

    def distance(a, b):
        return math.sqrt(sum(((x - y) ** 2).sum().item() for x, y in zip(a, b)))

    assert distance(as_one, empty) == pytest.approx(math.sqrt(2) * clip)
    assert distance(as_fifty, empty) == pytest.approx(50 * math.sqrt(2) * clip)


def test_group_privacy_epsilon_satisfies_vadhan_s_lemma():
    """The example-level report's group privacy: m = 1 is the run's RDP epsilon; for m > 1, the delta at which the
    run (recomputed with opacus' RDP functions) has epsilon = the stated epsilon / m gives a group delta within the
    target (Vadhan's Lemma 2.2); larger groups cost more; no bound is reported as such."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    sigma, q, steps, delta = 3.0, 0.05, 500, 1e-5
    assert group_privacy_epsilon(sigma, q, steps, delta, 1) == pytest.approx(
        epsilon_for(sigma, q, steps, delta, accountant="rdp"), rel=1e-9)  # fmt: skip
    found = [group_privacy_epsilon(sigma, q, steps, delta, m) for m in (1, 2, 5, 10)]
    assert found == sorted(found) and all(math.isfinite(e) for e in found)
    orders = [*RDPAccountant.DEFAULT_ALPHAS, *range(64, 256)]
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    for m, group_eps in zip((2, 5, 10), found[1:]):
        low, high = math.log(delta) - 300, math.log(delta)  # the smallest delta_ex with epsilon <= group_eps / m
        for _ in range(80):
            mid = (low + high) / 2
            low, high = (low, mid) if get_privacy_spent(orders=orders, rdp=rdp, delta=math.exp(mid))[0] <= \
                group_eps / m else (mid, high)  # fmt: skip
        eps_ex = group_eps / m
        assert math.exp(high) * (math.exp(m * eps_ex) - 1) / (math.exp(eps_ex) - 1) <= delta * (1 + 1e-6)
    assert group_privacy_epsilon(1.1, 0.05, 2000, delta, 10) == math.inf  # no bound: the report says so


def test_a_user_level_run_counts_people_spends_the_recomputed_epsilon_and_says_so(tiny_base, tmp_path):
    out = tmp_path / "people"
    central = {"--central_image_noise_multiplier": 2.0, "--central_image_copies": 2, "--warmup_steps": 2,
               "--num_canaries": 3, "--target_delta": 1e-3}  # fmt: skip
    train(base_args(tiny_base, out, **UNITS, **central))
    report = json.loads((out / "dp_report.json").read_text())
    people = len(privacy_unit_members(load_private_digit_units("train"), "person"))
    assert report["privacy_unit"] == "person" and report["max_examples_per_unit"] == 4
    assert report["num_privacy_units"] == people + 3  # three canary people
    assert report["dataset_size"] == len(load_private_digit_units("train")) + 3 * 4  # examples, canaries' included
    assert report["sample_rate"] == pytest.approx(10 / (people + 3)) and report["group_privacy"] == []
    recomputed = epsilon_for(1.5, 10 / (people + 3), 3, 1e-3, releases=[Release(2.0)])
    assert report["epsilon"] == pytest.approx(recomputed, rel=1e-9)
    config = json.loads((out / "dp_lora_config.json").read_text())
    assert config["privacy_unit"] == "person" and config["canaries"]["per_unit"] == 4
    card = " ".join((out / "README.md").read_text().split())
    assert "adding or removing all examples of one `person`" in card and "user-level" in card
    assert "Per example, not per person" not in card and "at most 4 of their examples" in card
    assert "δ is not small" not in card  # δ = 1e-3 is below 1 / people


def test_an_example_level_card_says_what_it_means_for_a_person(tiny_base, tmp_path):
    out = tmp_path / "examples"
    train(base_args(tiny_base, out))
    report = json.loads((out / "dp_report.json").read_text())
    assert [entry["examples"] for entry in report["group_privacy"]] == [2, 5, 10]
    card = " ".join((out / "README.md").read_text().split())
    assert "Per example, not per person" in card and "m = 2: " in card and "--privacy_unit_column" in card


def test_resume_keeps_the_units_and_the_budget(tiny_base, tmp_path, monkeypatch):
    module = script("train_dp_lora")
    crash_after_checkpoints(monkeypatch, module)
    out = tmp_path / "resumed"
    argv = base_args(tiny_base, out, **{**UNITS, "--max_train_steps": 4, "--checkpointing_steps": 2,
                                        "--target_delta": 1e-3})  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        module.main([str(a) for a in argv])
    module = script("train_dp_lora")
    module.main([str(a) for a in [*argv, "--resume_from_checkpoint", "latest"]])
    report = json.loads((out / "dp_report.json").read_text())
    people = len(privacy_unit_members(load_private_digit_units("train"), "person"))
    assert report["steps"] == 4 and report["num_privacy_units"] == people
    assert report["epsilon"] == pytest.approx(epsilon_for(1.5, 10 / people, 4, 1e-3), rel=1e-9)


def test_a_checkpoint_resumes_only_as_a_run_of_the_same_privacy_unit():
    """Same sigma, q, delta and releases, but another unit: an example-level checkpoint resumed as a user-level run
    (or the reverse, or with another cap or another number of units) is refused; the same unit resumes."""
    example = {"privacy_unit": None, "num_privacy_units": 1000, "max_examples_per_unit": None}
    person = {"privacy_unit": "person", "num_privacy_units": 1000, "max_examples_per_unit": 4}

    def budget(unit):
        return PrivacyBudget("prv", 1.0, 0.01, 1e-5, 10, privacy_unit=unit)

    for saved, resumed in ((example, person), (person, example), (person, {**person, "max_examples_per_unit": 8}),
                           (person, {**person, "num_privacy_units": 999})):  # fmt: skip
        with pytest.raises(PrivacyBudgetError, match="Resume with the original --privacy_unit_column"):
            budget(resumed).load_state_dict(budget(saved).state_dict())
    budget(person).load_state_dict(budget(person).state_dict())
    old = {k: v for k, v in budget(None).state_dict().items() if k != "privacy_unit"}  # before units were stored
    budget(example).load_state_dict(old)
    with pytest.raises(PrivacyBudgetError, match="examples"):
        budget(person).load_state_dict(old)


def test_the_audit_of_a_user_level_adapter_is_of_people(tiny_base, tmp_path):
    out = tmp_path / "audited"
    train(base_args(tiny_base, out, **{**UNITS, "--target_delta": 1e-3, "--evaluate": True,
                                       "--eval_samples_per_class": 1, "--eval_inference_steps": 1,
                                       "--num_canaries": 2}))  # fmt: skip
    audit = json.loads((out / "metrics.json").read_text())["membership_auc"]
    held_out = len(privacy_unit_members(load_private_digit_units("test"), "person"))
    assert audit["num_nonmembers"] == held_out and audit["num_members"] == held_out  # people on both sides
    coins = json.loads((out / ".audit" / "canary_coins.json").read_text())
    assert len(coins) == 4 and audit["num_canaries"] == sum(coins)  # canary people, each trained on by its coin


def test_bad_unit_inputs_fail_before_anything_is_written(tiny_base, tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "data"
    (folder / "3").mkdir(parents=True)
    rows = []
    for i in range(12):
        Image.fromarray(np.full((16, 16), i * 20, dtype=np.uint8)).save(folder / "3" / f"{i}.png")
        rows.append(json.dumps({"file_name": f"3/{i}.png", "label": "3",
                                "patient": "" if i in (3, 7) else f"p{i // 3}"}))  # fmt: skip
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    assert len(load_image_dataset(train_data_dir=str(folder))) == 12
    cases = [
        ({"--privacy_unit_column": "patient_id"}, DataError, "'patient_id' is not a column"),
        ({"--train_data_dir": folder, "--dataset_name": None, "--privacy_unit_column": "patient"}, DataError,
         "Rows 3, 7 have an empty 'patient'"),
        ({"--batch_size": 400}, DataError, "privacy units, fewer than one batch"),
        ({"--target_delta": 1e-2}, PrivacyBudgetError, "N: privacy units"),
        ({"--max_examples_per_unit": 0}, SystemExit, ""),
    ]  # fmt: skip
    for i, (flags, error, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(error, match=message):
            train(base_args(tiny_base, out, **{**UNITS, **flags}))
        assert not out.exists() or not any(out.iterdir())
    allowed = tmp_path / "no-dp"  # a unit column with --disable_dp: trains, claims nothing
    train(base_args(tiny_base, allowed, **{**UNITS, "--disable_dp": True}))
    assert not (allowed / "dp_report.json").exists() and (allowed / "pytorch_lora_weights.safetensors").is_file()


def test_the_embedded_people_are_split_by_person():
    train, test = load_private_digit_units("train"), load_private_digit_units("test")
    assert not set(train["person"]) & set(test["person"])
    sizes = [len(m) for m in privacy_unit_members(train, "person") + privacy_unit_members(test, "person")]
    assert min(sizes) >= 5 and max(sizes) <= 15 + 4 and len(train) + len(test) == 1797
    tuning = load_private_digit_units("train", tuning=True), load_private_digit_units("test", tuning=True)
    assert set(tuning[0]["person"]) | set(tuning[1]["person"]) == set(train["person"])


def test_canary_coins_that_include_none_still_train_and_audit(tiny_base, tmp_path, monkeypatch):
    """All coins tails (1 in 16 with 4 canary people: a CI run drew it): the run trains on no canary and the audit
    still runs on the 4 candidates, all of them non-members."""
    from dp_diffusers.evaluation import one_run_audit

    monkeypatch.setattr(one_run_audit, "draw_coins", lambda m: [False] * m)
    out = tmp_path / "none-in"
    train(base_args(tiny_base, out, **{**UNITS, "--target_delta": 1e-3, "--evaluate": True,
                                       "--eval_samples_per_class": 1, "--eval_inference_steps": 1,
                                       "--num_canaries": 2}))  # fmt: skip
    assert json.loads((out / ".audit" / "canary_coins.json").read_text()) == [False] * 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["membership_auc"]["num_canaries"] == 0 and "one_run_audit" in metrics
