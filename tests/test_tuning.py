"""Private hyper-parameter selection (``dp-diffusers tune``; ``dp_diffusers.privacy.selection``): the tuned epsilon
against an independent recomputation of Papernot & Steinke's theorems, K's distribution, the score's sensitivity,
the search space, and the command end to end (only the winner released, K and the losers nowhere, resume)."""

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from dp_diffusers.privacy import Release
from dp_diffusers.privacy.selection import (
    ORDERS,
    REPEAT_DISTRIBUTIONS,
    RunSchedule,
    calibrate_tuning,
    repeat_gamma,
    run_event,
    run_rdp,
    sample_num_runs,
    tuned_epsilon,
)

SCHEDULES = [RunSchedule(1.1, 0.178, 85, (Release(2.0),)), RunSchedule(1.6, 0.178, 170, (Release(2.0),)),
             RunSchedule(0.9, 0.09, 40)]  # fmt: skip
SCORE_SIGMA, DELTA = 10.0, 1e-5


def rdp_curve(event) -> np.ndarray:
    accountant = rdp.RdpAccountant(list(ORDERS))
    accountant.compose(event)
    return np.asarray(accountant._rdp)


def theorem_2(orders: np.ndarray, curve: np.ndarray, mean: float, eta: float) -> np.ndarray:
    """PS22 Theorem 2 by hand (the reference note's formula): eps'(lambda) = eps(lambda) + (1 + eta)(1 - 1/lh)
    eps(lh) + (1 + eta) log(1/gamma) / lh + log(E[K]) / (lambda - 1), minimised over lh on the grid."""
    gamma = repeat_gamma(mean, eta)
    best = np.array([min(curve[i] + (1 + eta) * (1 - 1 / lh) * curve[j] + (1 + eta) * math.log(1 / gamma) / lh
                         + math.log(mean) / (lam - 1) for j, lh in enumerate(orders))
                     for i, lam in enumerate(orders)])  # fmt: skip
    return best


def theorem_6(orders: np.ndarray, curve: np.ndarray, mean: float) -> np.ndarray:
    """PS22 Theorem 6 by hand: eps'(lambda) = eps(lambda) + mu delta_hat + log(mu) / (lambda - 1), with eps_hat =
    log(lambda / (lambda - 1)) and delta_hat Q's own delta at eps_hat (read off its RDP curve)."""
    out = []
    for lam, eps in zip(orders, curve):
        eps_hat = math.log(lam / (lam - 1))
        delta_hat = rdp.compute_delta(orders, curve, eps_hat)[0]
        out.append(eps + mean * delta_hat + math.log(mean) / (lam - 1))
    return np.asarray(out)


@pytest.mark.parametrize("distribution", sorted(REPEAT_DISTRIBUTIONS))
@pytest.mark.parametrize("mean", [1.5, 3.0, 10.0])
def test_the_tuned_epsilon_is_an_independent_recomputation(distribution, mean):
    """The maximum of the candidates' curves (each from dp-accounting's own composition of the run's events), then
    the theorem by hand, then the usual conversion: at least as large as the library's value and within 2% of it
    (the library minimises more carefully; a smaller library value is the tighter, still valid, bound)."""
    orders = np.asarray(ORDERS)
    curve = np.max([rdp_curve(run_event(s, SCORE_SIGMA)) for s in SCHEDULES], axis=0)
    np.testing.assert_allclose(curve, run_rdp(SCHEDULES, SCORE_SIGMA), rtol=1e-10)
    shape = REPEAT_DISTRIBUTIONS[distribution]
    by_hand = theorem_6(orders, curve, mean) if math.isinf(shape) else theorem_2(orders, curve, mean, shape)
    expected = rdp.compute_epsilon(orders, by_hand, DELTA)[0]
    got = tuned_epsilon(SCHEDULES, SCORE_SIGMA, mean, distribution, DELTA)
    assert expected * 0.98 <= got <= expected * (1 + 1e-9)
    assert got > rdp.compute_epsilon(orders, curve, DELTA)[0]  # tuning costs more than one run


@pytest.mark.parametrize("distribution", sorted(REPEAT_DISTRIBUTIONS))
def test_one_schedule_equals_dp_accountings_repeat_and_select_event(distribution):
    shape = REPEAT_DISTRIBUTIONS[distribution]
    event = dp_event.RepeatAndSelectDpEvent(run_event(SCHEDULES[0], SCORE_SIGMA), 3.0, shape)
    accountant = rdp.RdpAccountant(list(ORDERS))
    accountant.compose(event)
    assert tuned_epsilon(SCHEDULES[:1], SCORE_SIGMA, 3.0, distribution, DELTA) == pytest.approx(
        accountant.get_epsilon(DELTA), rel=1e-12)


def test_published_figures_of_the_reference_note():
    """q 0.01, sigma 1, 2,000 steps, score sigma 20, E[K] 10 at delta 1e-5: logarithmic 4.70, geometric 5.47 (the
    note's fractional orders; ours are integers: within 1%)."""
    schedule = [RunSchedule(1.0, 0.01, 2000)]
    assert tuned_epsilon(schedule, 20.0, 10.0, "logarithmic", DELTA) == pytest.approx(4.70, rel=0.01)
    assert tuned_epsilon(schedule, 20.0, 10.0, "geometric", DELTA) == pytest.approx(5.47, rel=0.01)


@pytest.mark.parametrize("distribution", sorted(REPEAT_DISTRIBUTIONS))
def test_k_has_the_requested_mean(distribution):
    rng = np.random.default_rng(0)
    draws = np.array([sample_num_runs(3.0, distribution, rng) for _ in range(20000)])
    assert abs(draws.mean() - 3.0) < 0.1
    assert draws.min() >= (0 if distribution == "poisson" else 1)


def test_calibration_meets_the_total_and_bad_settings_are_refused():
    templates = [RunSchedule(math.nan, s.sample_rate, s.steps, s.other_releases) for s in SCHEDULES[:2]]
    schedules = calibrate_tuning(templates, SCORE_SIGMA, 3.0, "logarithmic", 10.0, DELTA)
    total = tuned_epsilon(schedules, SCORE_SIGMA, 3.0, "logarithmic", DELTA)
    assert 9.9 <= total <= 10.0
    assert schedules[1].noise_multiplier > schedules[0].noise_multiplier  # twice the steps: more noise
    from dp_diffusers.privacy import PrivacyBudgetError

    with pytest.raises(PrivacyBudgetError, match="cannot be met"):
        calibrate_tuning(templates, 0.05, 3.0, "logarithmic", 1.0, DELTA)  # the score alone spends more
    with pytest.raises(ValueError, match="E\\[K\\]"):
        tuned_epsilon(SCHEDULES, SCORE_SIGMA, 0.5, "logarithmic", DELTA)
    with pytest.raises(ValueError, match="repeat_distribution"):
        tuned_epsilon(SCHEDULES, SCORE_SIGMA, 2.0, "uniform", DELTA)


# ---- the command -------------------------------------------------------------------------------------------------


def tune_args(space: dict, folder, **flags) -> tuple:
    """``dp-diffusers tune`` as parsed: (its namespace, the training flags)."""
    import json as json_module

    from dp_diffusers.cli import build_parser

    path = folder / "space.json"
    path.write_text(json_module.dumps(space))
    tune_flags = {"--expected_runs": 2, "--score_noise_multiplier": 5, "--score_samples_per_class": 2,
                  "--score_inference_steps": 2, **flags}  # fmt: skip
    argv = ["tune", "--search_space", str(path), *[str(x) for k, v in tune_flags.items() for x in (k, v)]]
    args, rest = build_parser().parse_known_args(argv)
    return args, rest


SPACE = {"learning_rate": [0.001, 0.002], "max_train_steps": [2, 3]}


def training_flags(base, out, **overrides) -> list[str]:
    from helpers import base_args

    return [str(a) for a in base_args(base, out, **{"--target_epsilon": 10, **overrides})]


def test_the_winner_alone_is_released_with_the_tunings_epsilon(tiny_base, tmp_path, monkeypatch):
    """End to end on the tiny base (E[K] = 2, K fixed by the key at 2): the output folder holds one adapter whose
    report's epsilon is the tuning's (recomputed from its ``per_run`` schedules), and no file holds K or a loser's
    score; every run trained on the train part only."""
    import json as json_module

    from dp_diffusers import tuning

    scores = []
    real_noisy_score = tuning.noisy_score
    monkeypatch.setattr(tuning, "noisy_score", lambda *a: scores.append(real_noisy_score(*a)) or scores[-1])
    args, _ = tune_args(SPACE, tmp_path)
    out = tmp_path / "tuned"
    tuning.tune(args, training_flags(tiny_base, out), key=0)
    assert len(scores) == 2  # K for key 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "dp_lora_config.json", "dp_report.json",
                                                     "epsilon.png", "pytorch_lora_weights.safetensors"]  # fmt: skip
    report = json_module.loads((out / "dp_report.json").read_text())
    tuned = report["tuning"]
    schedules = [RunSchedule(s["noise_multiplier"], s["sample_rate"], s["steps"],
                             tuple(Release(**r) for r in s["other_releases"])) for s in tuned["per_run"]]  # fmt: skip
    assert len(schedules) == 2 and {s.steps for s in schedules} == {2, 3}
    assert report["epsilon"] == pytest.approx(tuned_epsilon(schedules, 5.0, 2.0, "logarithmic", 1e-4), rel=1e-9)
    assert 9.9 <= report["epsilon"] <= 10.0 and tuned["score"]["sensitivity"] == 1.0
    assert report["steps"] in (2, 3) and report["sample_rate"] == pytest.approx(20 / 160)  # the train part's 160
    config = json_module.loads((out / "dp_lora_config.json").read_text())
    assert config["train_subset"]["validation_split"] == 0.2
    losers = [score for score in scores if score != max(scores)]
    written = "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())
    for score in losers:
        assert repr(score)[:8] not in written and repr(score / 40)[:8] not in written
    assert "expected_runs" in written and not {"num_runs", "K", "runs", "scores"} & set(tuned)
    card = (out / "README.md").read_text()
    assert f"ε = {report['epsilon']:.4g} covers the hyper-parameter tuning that chose this adapter" in card
    assert f"One run alone: ε at most {tuned['per_run_epsilon']:.3g}." in card
    assert "(logarithmic distribution, mean 2)" in card and "`--learning_rate`" in card
    winner = tuned["winner"]  # the released run's candidate and noisy score, nothing of the others
    assert winner["score"] == pytest.approx(max(scores) / 40) and set(winner["flags"]) == set(SPACE)
    assert winner["flags"]["max_train_steps"] == report["steps"]
    assert f"`--learning_rate {winner['flags']['learning_rate']} --max_train_steps {report['steps']}`" in card


def test_a_killed_tuning_resumes_without_redrawing_or_rescoring(tiny_base, tmp_path, monkeypatch):
    """Killed in its second run: the resumed tuning keeps K and the candidates, does not score the first run again
    and releases one adapter."""
    import json as json_module

    from dp_diffusers import tuning

    real_training_script = tuning.training_script
    calls = {"main": 0, "score": 0}

    def crashing_script():
        module = real_training_script()
        real_main = module.main

        def main(argv):
            calls["main"] += 1
            if calls["main"] == 2:
                raise KeyboardInterrupt("killed in the second run")
            return real_main(argv)

        module.main = main
        return module

    real_sum = tuning.validation_sum
    monkeypatch.setattr(tuning, "validation_sum", lambda *a: calls.__setitem__("score", calls["score"] + 1) or
                        real_sum(*a))  # fmt: skip
    monkeypatch.setattr(tuning, "training_script", crashing_script)
    args, _ = tune_args(SPACE, tmp_path)
    out = tmp_path / "tuned"
    with pytest.raises(KeyboardInterrupt):
        tuning.tune(args, training_flags(tiny_base, out), key=0)
    state = json_module.loads((out / ".tuning" / "state.json").read_text())
    assert len(state["candidates"]) == 2 and len(state["scores"]) == 1 and calls["score"] == 1
    args, _ = tune_args(SPACE, tmp_path)
    tuning.tune(args, training_flags(tiny_base, out), key=None)  # a new process: another secret key
    assert calls["score"] == 2 and not (out / ".tuning").exists() and (out / "dp_report.json").is_file()


def test_k_and_the_candidates_do_not_depend_on_the_data(tiny_base, tmp_path, monkeypatch):
    """Same key, two data sets: the same runs with the same candidates (the training and the score stubbed)."""
    from pathlib import Path

    from helpers import digit_folder, report_folder

    from dp_diffusers import tuning

    seen = {}
    real_training_script = tuning.training_script

    def recording_script(label):
        def make():
            module = real_training_script()

            def main(argv):
                drawn = argv[argv.index("--validation_split_seed") + 2: argv.index("--output_dir")]
                seen.setdefault(label, []).append(drawn)  # the candidate's flags and its noise multiplier
                report_folder(Path(argv[argv.index("--output_dir") + 1]), steps=3)

            module.main = main
            return module

        return make

    monkeypatch.setattr(tuning, "validation_sum", lambda *a: 0.0)
    other = digit_folder(tmp_path / "other", [str(i) for i in range(10)], per_class=20)
    for label, data in (("digits", {}), ("other", {"--train_data_dir": other, "--dataset_name": None})):
        monkeypatch.setattr(tuning, "training_script", recording_script(label))
        args, _ = tune_args(SPACE, tmp_path)
        tuning.tune(args, training_flags(tiny_base, tmp_path / f"{label}-tuned", **data), key=4)
    assert len(seen["digits"]) == 2 and seen["digits"] == seen["other"]


@pytest.mark.parametrize("space,flags,error", [
    ({}, {}, "at least one training flag"),
    ({"target_epsilon": [1, 2]}, {}, "cannot be tuned"),
    ({"batch_size": {"low": 8, "high": 32}}, {}, "finite list"),
    ({"learning_rate": {"low": 0, "high": 1, "distribution": "log_uniform"}}, {}, "a range is"),
    ({"learning_rate": []}, {}, "empty list"),
    (SPACE, {"--expected_runs": 0.5}, "E\\[K\\]"),
    (SPACE, {"--score_noise_multiplier": 50}, "validation part has 40 units"),
])  # fmt: skip
def test_bad_tuning_input_fails_before_any_training(tiny_base, tmp_path, monkeypatch, space, flags, error):
    from dp_diffusers import tuning

    monkeypatch.setattr(tuning, "validation_sum", lambda *a: pytest.fail("scored"))
    args, _ = tune_args(space, tmp_path, **flags)
    with pytest.raises(ValueError, match=error):
        tuning.tune(args, training_flags(tiny_base, tmp_path / "out"), key=0)
    assert not (tmp_path / "out").exists()


def test_an_unreachable_target_and_a_tracker_are_refused(tiny_base, tmp_path):
    from dp_diffusers import tuning
    from dp_diffusers.privacy import PrivacyBudgetError

    args, _ = tune_args(SPACE, tmp_path)
    with pytest.raises(PrivacyBudgetError, match="cannot be met"):
        tuning.tune(args, training_flags(tiny_base, tmp_path / "out", **{"--target_epsilon": 0.01}), key=0)
    with pytest.raises(tuning.TuningError, match="--report_to"):
        tuning.tune(args, [*training_flags(tiny_base, tmp_path / "out"), "--report_to", "tensorboard"], key=0)
    malformed = tmp_path / "bad.json"
    malformed.write_text("{learning_rate: [1")
    args.search_space = str(malformed)
    with pytest.raises(tuning.TuningError, match="not valid JSON"):
        tuning.tune(args, training_flags(tiny_base, tmp_path / "out"), key=0)


def test_the_scores_sensitivity_is_what_the_report_states(tiny_base, tmp_path):
    """One more validation example, of a class no other one has, moves the noiseless sum by at most the stated
    sensitivity: 1 for accuracy (the classifier's classes are the adapter's public ones, not the data's), the bound
    for the clipped loss (its loss is above the bound)."""
    import argparse

    from datasets import concatenate_datasets
    from helpers import base_args, train

    from dp_diffusers.data import load_private_digits
    from dp_diffusers.tuning import validation_sum

    adapter = tmp_path / "adapter"
    train(base_args(tiny_base, adapter))
    test = load_private_digits("test")
    labels = test["label"]
    # the extra example's class is in no other validation example: the score's classes must not depend on it
    validation = test.select([i for i in range(60) if labels[i] != labels[60]][:30])
    extra = test.select([60])
    fixed = argparse.Namespace(image_column=None, label_column=None, privacy_unit_column=None, seed=0,
                               eval_guidance_scale=None)
    for score, bound in (("accuracy", 1.0), ("denoising_loss", 0.05)):
        settings = argparse.Namespace(score=score, score_loss_bound=bound, score_samples_per_class=2,
                                      score_inference_steps=2)  # fmt: skip
        without = validation_sum(adapter, validation, fixed, settings)
        with_one = validation_sum(adapter, concatenate_datasets([validation, extra]), fixed, settings)
        assert abs(with_one - without) <= bound + 1e-9
        if score == "denoising_loss":
            assert with_one - without == pytest.approx(-bound)  # its loss is above the bound: clipped to it
