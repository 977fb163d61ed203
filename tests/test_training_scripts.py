"""End-to-end runs of the stage-1 scripts on tiny data (seconds each)."""


import pytest
import torch
from diffusers import AutoencoderKL
from helpers import ROOT, load_module, script

from dp_diffusers import DPLDMPipeline
from dp_diffusers.data import dataset_to_tensors, load_public_digits
from dp_diffusers.models import NoisePrediction


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    script("train_autoencoder").main(
        ["--output_dir", str(out), "--max_train_samples", "256", "--train_batch_size", "32",
         "--max_train_steps", "40", "--checkpointing_steps", "1000"]
    )  # fmt: skip
    return out


def reconstruction_error(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    with torch.no_grad():
        return (vae(pixels).sample - pixels).abs().mean().item()


def test_autoencoder_reconstruction_error_falls_with_training(trained_vae, tmp_path):
    pixels, _ = dataset_to_tensors(load_public_digits().select(range(4000, 4064)), 16, 1)
    untrained = tmp_path / "untrained"
    script("train_autoencoder").main(["--output_dir", str(untrained), "--max_train_steps", "1",
                                      "--max_train_samples", "64", "--learning_rate", "1e-9"])  # fmt: skip
    before = reconstruction_error(AutoencoderKL.from_pretrained(untrained), pixels)
    after = reconstruction_error(AutoencoderKL.from_pretrained(trained_vae), pixels)
    assert after < 0.6 * before


def test_autoencoder_scaling_factor_gives_unit_variance_latents(trained_vae):
    """LDM's scale_by_std: the saved scaling_factor maps the training images' latents to std 1."""
    vae = AutoencoderKL.from_pretrained(trained_vae).eval()
    assert vae.config.scaling_factor != AutoencoderKL().config.scaling_factor  # not SD's 0.18215
    its_training_images = load_public_digits().shuffle(seed=0).select(range(256))
    pixels, _ = dataset_to_tensors(its_training_images, 16, 1)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(1))
    assert (latents * vae.config.scaling_factor).std().item() == pytest.approx(1.0, abs=0.02)


def test_ldm_saves_a_base_that_loads_samples_and_resumes(trained_vae, tmp_path, caplog):
    out = tmp_path / "base"
    args = ["--vae_path", str(trained_vae), "--output_dir", str(out), "--max_train_samples", "128",
            "--train_batch_size", "32", "--checkpointing_steps", "2"]  # fmt: skip
    script("train_ldm").main([*args, "--max_train_steps", "3"])
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    pipe = DPLDMPipeline.from_pretrained(out)
    assert pipe.labels == {str(i): i for i in range(10)}
    images = pipe(class_labels=[3, 7], num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (2, 16, 16, 1) and 0 <= images.min() and images.max() <= 1

    with caplog.at_level("INFO"):
        script("train_ldm").main([*args, "--max_train_steps", "5", "--resume_from_checkpoint", "latest"])
    assert "Resumed from" in caplog.text and "at step 2" in caplog.text
    assert (out / "checkpoints" / "checkpoint-4").is_dir()


def test_bad_inputs_fail_before_writing(trained_vae, tmp_path):
    from dp_diffusers.data import DataError

    out = tmp_path / "never"
    with pytest.raises(DataError, match="divisible"):
        script("train_ldm").main(["--vae_path", str(trained_vae), "--output_dir", str(out), "--resolution", "15"])
    with pytest.raises(ValueError, match="--unet_block_out_channels needs 2 values"):
        script("train_ldm").main(["--vae_path", str(trained_vae), "--output_dir", str(out),
                                  "--unet_block_out_channels", "32", "64", "128"])  # fmt: skip
    with pytest.raises(DataError, match="no image files"):
        (tmp_path / "empty").mkdir()
        script("train_ldm").main(["--vae_path", str(trained_vae), "--output_dir", str(out),
                                  "--train_data_dir", str(tmp_path / "empty")])  # fmt: skip
    assert not out.exists()


def test_make_demo_runs_end_to_end_and_reuses_the_base(tmp_path, capsys):
    """`make demo`'s script with every stage cut to a few steps: stage 1 retrained (``--retrain_base``: the same
    layout and configs as the packaged base), DP-LoRA, evaluation, card; a second run reuses the cached base; a
    run without ``--retrain_base`` starts from a copy of the packaged base."""
    import json

    from dp_diffusers.assets import PUBLIC_DIGITS_BASE

    demo = load_module(ROOT / "examples" / "run_demo.py")
    argv = ["--output_dir", str(tmp_path), "--vae_steps", "2", "--ldm_steps", "2", "--dp_epochs", "0.1",
            "--dp_batch_size", "64", "--eval_samples_per_class", "1", "--eval_inference_steps", "2",
            "--warmup_steps", "2"]  # fmt: skip
    demo.main([*argv, "--retrain_base"])
    adapter = tmp_path / "dp-lora-eps10"
    report = json.loads((adapter / "dp_report.json").read_text())
    assert report["steps"] == 3 and report["epsilon"] <= 10
    assert report["other_releases"][0]["noise_multiplier"] == 2.0  # the DP central images, in the same epsilon
    assert {"downstream_accuracy", "membership_auc"} <= set(json.loads((adapter / "metrics.json").read_text()))
    assert (adapter / "README.md").is_file() and (adapter / "samples.png").is_file()
    for config in ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                   "class_embedder/config.json"):  # fmt: skip
        # every architecture and schedule value; not the autoencoder's scaling_factor (1 / std of its trained latents)
        retrained, packaged = ({k: v for k, v in json.loads((folder / config).read_text()).items()
                                if not k.startswith("_") and k != "scaling_factor"}
                               for folder in (tmp_path / "base", PUBLIC_DIGITS_BASE))  # fmt: skip
        assert retrained == packaged
    demo.main([*argv, "--skip_evaluation"])
    assert "Reusing the public base" in capsys.readouterr().out

    packaged = DPLDMPipeline.from_pretrained(PUBLIC_DIGITS_BASE)
    assert packaged.unet.dtype == packaged.vae.dtype == torch.float32  # stored in float16, loaded as float32
    assert packaged.labels == {str(digit): digit for digit in range(10)}
    demo.main([*argv[:1], str(tmp_path / "packaged"), *argv[2:], "--skip_evaluation"])
    assert "Copying the packaged public base" in capsys.readouterr().out
    assert json.loads((tmp_path / "packaged" / "dp-lora-eps10" / "dp_report.json").read_text())["steps"] == 3


def test_privacy_utility_writes_every_row_of_the_readme_table(tiny_base, tmp_path):
    """examples/privacy_utility.py on the tiny base, one seed and a few steps per run: ``--train_only`` trains each
    run and stops; then every row of the README's table, with the central images charged to eps=10's epsilon."""
    import json

    from dp_diffusers.constants import LORA_WEIGHT_NAME

    table_script = load_module(ROOT / "examples" / "privacy_utility.py")
    out = tmp_path / "privacy-utility"
    argv = ["--base", str(tiny_base), "--output_dir", str(out), "--seeds", "0", "--epsilons", "10", "--epochs",
            "0.05", "--batch_size", "20", "--warmup_steps", "2", "--eval_samples_per_class", "1",
            "--eval_inference_steps", "2", "--dp_classifier_epochs", "1"]  # fmt: skip
    table_script.main([*argv, "--train_only"])
    assert (out / "eps10" / "seed0" / LORA_WEIGHT_NAME).is_file() and (out / "nonprivate" / "seed0").is_dir()
    assert not (out / "table.md").exists()
    table_script.main(argv)  # reuses the trained runs
    table = (out / "table.md").read_text()
    rows = ["public base, no fine-tuning", "CNN on the real public digits (`public-digits-8x8`)",
            "DP-LoRA eps=10, central images sigma=2", "LoRA without DP", "CNN with DP-SGD on the private train split",
            "CNN on the real private"]  # fmt: skip
    assert all(f"| {row}" in table or f"| the same {row}" in table for row in rows), table
    results = json.loads((out / "results.json").read_text())
    [run] = results["runs"]["DP-LoRA eps=10, central images sigma=2"]
    assert run["report"]["epsilon"] <= 10 and run["report"]["other_releases"][0]["noise_multiplier"] == 2.0
    assert set(results["classifiers"]) == {"public", "real", "dp-sgd eps=10"}


def test_min_snr_weights_follow_the_paper():
    """min(SNR, gamma) / SNR for epsilon prediction: 1 at high noise (SNR < gamma), gamma / SNR below."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.tensor([0, 10, 100, 500, 999])
    snr = compute_snr(scheduler, timesteps)
    weights = NoisePrediction(scheduler, snr_gamma=5.0).min_snr_weights(timesteps)
    expected = torch.where(snr > 5.0, 5.0 / snr, torch.ones_like(snr))
    torch.testing.assert_close(weights, expected)
    assert weights[0] < 0.01 and weights[-1] == 1.0


def test_user_level_utility_writes_both_rows_with_the_group_privacy_of_the_example_level_run(tiny_base, tmp_path):
    """examples/user_level_utility.py on the tiny base, one seed, a few steps per run: the example-level row states
    the group-privacy epsilon for the people's sizes, the user-level row the epsilon per person."""
    import json

    from dp_diffusers.privacy import Release, group_privacy_epsilon

    table_script = load_module(ROOT / "examples" / "user_level_utility.py")
    out = tmp_path / "user-level"
    table_script.main(["--base", str(tiny_base), "--output_dir", str(out), "--seeds", "0", "--epochs", "0.05",
                       "--batch_size", "20", "--unit_epochs", "0.2", "--unit_batch_size", "8", "--warmup_steps", "2",
                       "--unit_central_image_noise_multiplier", "none", "--eval_samples_per_class", "1",
                       "--eval_inference_steps", "2"])  # fmt: skip
    table = (out / "table.md").read_text()
    results = json.loads((out / "results.json").read_text())
    [example], [person] = results["runs"].values()
    assert "| public base, no fine-tuning |" in table and len(results["public base, no fine-tuning"]) == 1
    assert person["report"]["privacy_unit"] == "person" and person["report"]["other_releases"] == []
    assert person["report"]["num_privacy_units"] == results["people"] and "ε" in table and "per person |" in table
    report = example["report"]
    assert example["report"]["privacy_unit"] is None and report["other_releases"][0]["noise_multiplier"] == 2.0
    m = results["sizes"][0]
    expected = group_privacy_epsilon(report["noise_multiplier"], report["sample_rate"], report["steps"],
                                     report["delta"], m, [Release(2.0)])  # fmt: skip
    assert example["person_epsilon"][str(m)] == pytest.approx(expected)  # (JSON keys are strings)
