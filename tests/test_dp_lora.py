"""train_dp_lora.py end to end on a tiny random base: report, budget, resume, bad input."""

import json
from pathlib import Path

import pytest
import torch
from helpers import base_args, crash_after_checkpoints, digit_folder, script, train

from dp_diffusers.data import DataError
from dp_diffusers.lora import NoLoRATargetError
from dp_diffusers.privacy import PrivacyBudgetError, epsilon_for, max_steps_within_budget

REPORT_KEYS = {
    "accountant", "epsilon", "delta", "target_epsilon", "noise_multiplier", "max_grad_norm", "sample_rate", "steps",
    "epochs", "noise_multiplicity", "dataset_size", "batch_size", "world_size", "trainable_parameters", "lora_rank",
    "lora_alpha", "adapted_modules", "base_model", "epsilon_history", "dp_diffusers_version",
}  # fmt: skip


def test_report_adapter_and_adapted_modules(tiny_base, tmp_path):
    out = tmp_path / "adapter"
    train(base_args(tiny_base, out, **{"--noise_multiplicity": 2, "--samples_per_class": 1,
                                        "--num_inference_steps": 2}))  # fmt: skip
    report = json.loads((out / "dp_report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["steps"] == 4 and report["noise_multiplicity"] == 2 and report["world_size"] == 1
    assert report["dataset_size"] == 200 and report["sample_rate"] == pytest.approx(0.1)
    assert 0 < report["epsilon"] <= report["target_epsilon"] == 10.0
    assert report["epsilon"] == pytest.approx(
        epsilon_for(report["noise_multiplier"], 0.1, 4, 1e-4), rel=1e-6
    )  # the report's epsilon is the accountant's for the steps taken
    assert [s for s, _ in report["epsilon_history"]] == [1, 2, 3, 4]
    # The exact list: every attention projection of the tiny base, including to_out.0
    blocks = ["down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0",
              "up_blocks.0.attentions.1"]  # fmt: skip
    expected = sorted(
        f"{b}.transformer_blocks.0.{attn}.{proj}"
        for b in blocks for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")
    )  # fmt: skip
    assert report["adapted_modules"] == expected
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "samples.png").is_file()
    config = json.loads((out / "dp_lora_config.json").read_text())
    assert config["base_model"] == str(tiny_base) and config["class_embedder"] is None
    assert config["train_subset"] == {"max_samples": 200, "seed": 0}  # the audit's members: what was trained on


def test_resumed_run_reports_the_same_epsilon_and_steps(tiny_base, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(base_args(tiny_base, full, **{"--checkpointing_steps": 2}))

    interrupted = tmp_path / "interrupted"
    module = script("train_dp_lora")
    crash_after_checkpoints(monkeypatch, module)
    with pytest.raises(KeyboardInterrupt):
        module.main([str(a) for a in base_args(tiny_base, interrupted, **{"--checkpointing_steps": 2})])
    assert not (interrupted / "dp_report.json").exists()  # nothing claimed for a crashed run
    assert (interrupted / "checkpoints" / "checkpoint-2").is_dir()

    train(base_args(tiny_base, interrupted, **{"--checkpointing_steps": 2, "--resume_from_checkpoint": "latest"}))
    a = json.loads((full / "dp_report.json").read_text())
    b = json.loads((interrupted / "dp_report.json").read_text())
    assert b["steps"] == a["steps"] == 4
    assert b["epsilon"] == pytest.approx(a["epsilon"], rel=1e-9)
    assert b["epsilon_history"] == a["epsilon_history"]


def test_ema_saves_the_average_of_the_iterates_and_resume_continues_it(tiny_base, tmp_path, monkeypatch):
    from diffusers.training_utils import EMAModel

    module = script("train_dp_lora")
    emas = []

    class RecordingEMA(EMAModel):
        def __init__(self, parameters, **kwargs):
            self.live = list(parameters)
            super().__init__(self.live, **kwargs)
            self.iterates, self.averages_before = [], []
            emas.append(self)

        def step(self, parameters):
            parameters = list(parameters)
            self.iterates.append([p.detach().clone() for p in parameters])
            self.averages_before.append([s.clone() for s in self.shadow_params])
            super().step(parameters)

    monkeypatch.setattr(module, "EMAModel", RecordingEMA)
    real_save = crash_after_checkpoints(monkeypatch, module)
    argv = base_args(tiny_base, tmp_path / "ema", **{"--checkpointing_steps": 2, "--ema_decay": 0.9})
    with pytest.raises(KeyboardInterrupt):
        module.main([str(a) for a in argv])
    monkeypatch.setattr(module, "save_checkpoint", real_save)
    module.main([str(a) for a in argv + ["--resume_from_checkpoint", "latest"]])

    interrupted, resumed = emas
    assert len(interrupted.iterates) == 2 and len(resumed.iterates) == 2  # one update per DP step
    assert resumed.optimization_step == 4  # restored from checkpoint-2, not restarted
    assert json.loads((tmp_path / "ema" / "dp_report.json").read_text())["ema_decay"] == 0.9
    for before, saved in zip(resumed.averages_before[0], interrupted.shadow_params):
        torch.testing.assert_close(before, saved)  # the resumed average continues the interrupted one
    for live, average in zip(resumed.live, resumed.shadow_params):
        torch.testing.assert_close(live, average)  # the saved adapter is the average ...
    assert any(
        not torch.equal(live, last) for live, last in zip(resumed.live, resumed.iterates[-1])
    )  # ... not the last


def test_epsilon_never_passes_the_target(tiny_base, tmp_path):
    sigma, q, delta, target = 0.7, 0.1, 1e-4, 3.0
    allowed = max_steps_within_budget(sigma, q, delta, target, upper=1000)
    assert 1 <= allowed < 1000 and epsilon_for(sigma, q, allowed + 1, delta) > target
    out = tmp_path / "stopped"
    train(base_args(tiny_base, out, **{"--noise_multiplier": sigma, "--target_epsilon": target,
                                        "--max_train_steps": 1000}))  # fmt: skip
    report = json.loads((out / "dp_report.json").read_text())
    assert report["steps"] == allowed
    assert report["epsilon"] <= target


def test_a_given_sigma_without_target_takes_the_planned_steps_and_reports_their_epsilon(tiny_base, tmp_path):
    sigma, q, delta = 0.9, 0.1, 1e-4
    out = tmp_path / "sigma"
    train(base_args(tiny_base, out, **{"--noise_multiplier": sigma, "--samples_per_class": 0}))
    report = json.loads((out / "dp_report.json").read_text())
    assert report["target_epsilon"] is None and report["noise_multiplier"] == sigma
    assert report["steps"] == 4  # --max_train_steps: no target cuts it short
    assert report["epsilon"] == pytest.approx(epsilon_for(sigma, q, 4, delta), rel=1e-6)
    card = (out / "README.md").read_text()
    assert "none (σ was given)" in card


def test_sigma_and_target_given_stop_before_the_target_and_sigma_zero_is_refused(tiny_base, tmp_path):
    sigma, q, delta = 0.9, 0.1, 1e-4
    target = epsilon_for(sigma, q, 2, delta) * 1.01  # two steps fit, not three
    out = tmp_path / "both"
    train(base_args(tiny_base, out, **{"--noise_multiplier": sigma, "--target_epsilon": target}))
    report = json.loads((out / "dp_report.json").read_text())
    assert report["target_epsilon"] == target and report["steps"] == 2 and report["epsilon"] <= target
    with pytest.raises(SystemExit):
        train(base_args(tiny_base, tmp_path / "zero", **{"--noise_multiplier": 0}))
    assert not (tmp_path / "zero").exists()


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"--target_epsilon": 0.01, "--max_train_steps": 5000}, PrivacyBudgetError, "cannot be reached"),
        ({"--target_delta": 0.01}, PrivacyBudgetError, "not below 1/N"),
        ({"--max_train_samples": 10}, DataError, "fewer than one batch"),
        ({"--lora_target_modules": "to_qkv_fused"}, NoLoRATargetError, "no attention layers"),
    ],
)
def test_bad_input_gives_a_clear_error_and_no_adapter(tiny_base, tmp_path, overrides, error, match):
    out = tmp_path / "adapter"
    with pytest.raises(error, match=match):
        train(base_args(tiny_base, out, **overrides))
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert not (out / "dp_report.json").exists()


def test_unknown_labels_need_a_trainable_class_embedding(tiny_base, tmp_path):
    data = digit_folder(tmp_path / "data", ["3", "7", "cat"])
    args = dict(**{"--train_data_dir": data, "--max_train_samples": None, "--batch_size": 9, "--target_delta": 1e-3})
    public = ["--class_names", "3", "7", "cat"]  # the label set, public (the adapter publishes it)
    with pytest.raises(DataError, match=r"\['cat'\] are unknown to the base"):
        train(base_args(tiny_base, tmp_path / "no", **args) + public)
    out = tmp_path / "yes"
    train(base_args(tiny_base, out, **args, **{"--train_class_embedding": True}) + public)
    config = json.loads((out / "dp_lora_config.json").read_text())
    assert config["id2label"]["10"] == "cat" and config["class_embedder"] == "class_embedder"
    assert json.loads((out / "class_embedder" / "config.json").read_text())["num_classes"] == 11


def test_disable_dp_trains_the_same_lora_without_a_privacy_claim(tiny_base, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "nonprivate"
    (out).mkdir()
    (out / "dp_report.json").write_text("{}")  # stale report of an earlier DP run in the same folder
    train(base_args(tiny_base, out, **{"--disable_dp": True, "--target_delta": None}))

    assert not (out / "dp_report.json").exists()  # nothing lends this run a guarantee
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "dp_lora_config.json").is_file()
    card = ModelCard.load(out / "README.md")
    assert "differential-privacy" not in card.data.tags and "dp_epsilon" not in card.data.to_dict()
    assert not (out / "checkpoints").exists()
    with pytest.raises(SystemExit):
        train(base_args(tiny_base, out, **{"--disable_dp": True, "--resume_from_checkpoint": "latest"}))


def test_evaluate_and_push_to_hub_after_training(tiny_base, tmp_path, monkeypatch):
    from unittest import mock

    from huggingface_hub import ModelCard

    from dp_diffusers.hub import upload_file_list

    monkeypatch.delenv("DP_DIFFUSERS_FID_INCEPTION", raising=False)
    out = tmp_path / "adapter"
    with mock.patch("dp_diffusers.hub.HfApi") as api_class:
        api = api_class.return_value
        api.create_repo.return_value = mock.Mock(repo_id="me/dp-lora")
        train(base_args(tiny_base, out, **{"--evaluate": True, "--eval_samples_per_class": 1,
                                            "--eval_inference_steps": 2, "--push_to_hub": True,
                                            "--scheduler": "DPMSolverMultistepScheduler",
                                            "--num_canaries": 8,
                                            "--hub_model_id": "me/dp-lora"}))  # fmt: skip

    metrics = json.loads((out / "metrics.json").read_text())
    assert {"downstream_accuracy", "membership_auc"} <= set(metrics)
    assert metrics["downstream_accuracy"]["sampler"] == "DPMSolverMultistepScheduler, 2 steps, guidance 1"
    # 16 canaries, each trained on like any example by a secret coin; q and N count the expected 8 (nothing published
    # depends on the coins); the evaluation audits the coins' members against the others and bounds epsilon from
    # below with the one-run audit; the coins stay in the hidden .audit/, never uploaded
    report = json.loads((out / "dp_report.json").read_text())
    assert report["dataset_size"] == 208 and report["sample_rate"] == pytest.approx(20 / 208)
    assert report["num_canaries"] == 8
    assert json.loads((out / "dp_lora_config.json").read_text())["canaries"] == {
        "num_canaries": 8,
        "seed": 0,
        "resolution": 16,
        "coins": True,
    }
    coins = json.loads((out / ".audit" / "canary_coins.json").read_text())
    assert len(coins) == 16 and metrics["membership_auc"]["num_canaries"] == sum(coins)
    assert 0 <= metrics["membership_auc"]["canary_auc"] <= 1
    one_run = metrics["one_run_audit"]
    assert one_run["total_canaries"] == 16 and one_run["num_canaries"] == 8 and one_run["delta"] == 1e-4
    assert 0 <= one_run["epsilon_lower_bound"] == one_run["value"] and one_run["claimed_epsilon"] == report["epsilon"]
    assert 1 <= one_run["num_guesses"] <= 8 and 0 <= one_run["num_correct"] <= one_run["num_guesses"]
    card_text = (out / "README.md").read_text()
    assert "| Audit canaries | 8 |" in card_text
    assert "Empirical ε lower bound (one-run audit, 16 canaries, 95%)" in card_text
    assert not any(name.startswith(".audit") for name in upload_file_list(out))
    # `dp-diffusers evaluate` recomputes the bound from the training folder's coins; a copy of what was uploaded has
    # none, and says where they are instead of auditing against the wrong members
    from dp_diffusers import cli

    evaluate = ["--eval_samples_per_class", "1", "--eval_inference_steps", "2", "--scheduler",
                "DPMSolverMultistepScheduler"]  # fmt: skip
    cli.main(["evaluate", str(out), *evaluate])
    assert json.loads((out / "metrics.json").read_text())["one_run_audit"] == one_run
    uploaded = tmp_path / "uploaded"
    uploaded.mkdir()
    for name in upload_file_list(out):
        (uploaded / name).parent.mkdir(parents=True, exist_ok=True)
        (uploaded / name).write_bytes((out / name).read_bytes())
    cli.main(["evaluate", str(uploaded), *evaluate])
    not_computed = json.loads((uploaded / "metrics.json").read_text())["one_run_audit"]
    assert not_computed["value"] is None and ".audit/" in not_computed["not_computed"]
    card = ModelCard.load(out / "README.md")
    assert card.data.dp_epsilon == json.loads((out / "dp_report.json").read_text())["epsilon"]
    assert {r.metric_type for r in card.data.eval_results} == {"accuracy", "roc_auc", "epsilon_lower_bound"}  # no FID
    assert "| FID | not computed | no Inception weights (offline)" in (out / "README.md").read_text()
    api.create_repo.assert_called_once()
    assert api.create_repo.call_args.args[0] == "me/dp-lora"
    upload = api.upload_folder.call_args.kwargs
    assert upload["repo_id"] == "me/dp-lora" and Path(upload["folder_path"]) == out
    assert "checkpoints/*" in upload["ignore_patterns"]
    assert not any(name.startswith("checkpoints/") for name in upload_file_list(out))
    with pytest.raises(SystemExit):  # a typo in the sampler fails before training, not after it
        train(base_args(tiny_base, tmp_path / "typo", **{"--scheduler": "DPMSolverMultistep"}))
    assert not (tmp_path / "typo").exists()
    with pytest.raises(DataError, match="test/"):  # evaluation needs held-out images: said before training
        train(base_args(tiny_base, tmp_path / "no-test", **{"--evaluate": True, "--dataset_name": None,
                                                             "--train_data_dir": tmp_path}))  # fmt: skip
    assert not (tmp_path / "no-test").exists()


def test_bf16_base_with_gradient_checkpointing_trains_through_the_script(tiny_base, tmp_path):
    out = tmp_path / "bf16"
    train(base_args(tiny_base, out, **{"--mixed_precision": "bf16", "--gradient_checkpointing": True,
                                        "--max_train_steps": 2, "--train_class_embedding": True}))  # fmt: skip
    report = json.loads((out / "dp_report.json").read_text())
    assert report["mixed_precision"] == "bf16" and report["gradient_checkpointing"] is True and report["steps"] == 2
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float32 for t in load_file(out / "pytorch_lora_weights.safetensors").values())
    from dp_diffusers import DPLDMPipeline

    pipe = DPLDMPipeline.from_pretrained(out)
    assert pipe(class_labels=[3], num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 1)
    with pytest.raises(SystemExit):  # opacus' hooks would record the recomputed forward a second time
        train(base_args(tiny_base, tmp_path / "hooks", **{"--gradient_checkpointing": True,
                                                           "--grad_sample_mode": "hooks"}))  # fmt: skip
    assert not (tmp_path / "hooks").exists()
