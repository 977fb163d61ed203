"""Text-to-image DP-LoRA on Stable Diffusion bases, as a user meets it: a base folder in the layout
``StableDiffusionPipeline.save_pretrained`` writes (a tiny CLIP text encoder and tokenizer built locally), private
images with captions trained through train_dp_lora.py, the adapter loaded the standard diffusers way."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import TEXT_DIM, TEXT_LENGTH, TextRuns, caption_folder, digit_folder, save_sd_base, train
from huggingface_hub import ModelCard

from dp_diffusers import DiffusionLoss, DPLDMPipeline, NoisePrediction
from dp_diffusers.constants import ADAPTER_CONFIG_NAME, DP_REPORT_NAME, SAMPLES_NAME
from dp_diffusers.data import DataError, dataset_captions, load_image_dataset
from dp_diffusers.families import StableDiffusionFamily, UnsupportedBaseError

pytestmark = pytest.mark.usefixtures("one_thread")

#: Private captions hold the secret: it may appear in nothing the run writes or logs.
SD = TextRuns(batch_size=10, steps=3, guidance_scale=4.0, secret="zebracrossing")


def test_sd_base_samples_as_diffusers_stable_diffusion_pipeline(tiny_sd_base):
    pipe = SD.assert_samples_as(StableDiffusionPipeline, tiny_sd_base)
    assert pipe.base_family == "stable-diffusion"
    encoded = StableDiffusionFamily.encode_prompts(pipe, ["", "a b"])
    assert encoded["encoder_hidden_states"].shape == (2, TEXT_LENGTH, TEXT_DIM)


def test_sd_adapter_loads_with_standard_load_lora_weights_and_leaks_no_caption(tiny_sd_base, tmp_path, caplog):
    out = tmp_path / "adapter"
    with caplog.at_level("DEBUG"):
        train(SD.args(tiny_sd_base, out, SD.captioned(tmp_path / "data", 30),
                      **{"--samples_per_class": 1, "--validation_prompt": SD.prompts[0]}))
    report = json.loads((out / DP_REPORT_NAME).read_text())
    assert report["steps"] == 2 and report["dataset_size"] == 30
    adapted = report["adapted_modules"]
    assert any(name.endswith("attn1.to_q") for name in adapted) and any(name.endswith("attn2.to_k") for name in adapted)
    config = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    assert config["base_family"] == "stable-diffusion" and config["validation_prompts"] == [SD.prompts[0]]
    assert (out / SAMPLES_NAME).is_file()

    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "text-to-image" and card.data.widget == [{"text": SD.prompts[0]}]
    assert card.data.dp_epsilon == report["epsilon"] and "load_lora_weights" in card.text
    # the call every SD user knows gives the images of DPLDMPipeline.from_pretrained(adapter); captions are private:
    # nothing written or logged holds one
    SD.assert_standard_adapter(StableDiffusionPipeline, tiny_sd_base, out)
    assert SD.secret not in caplog.text


def test_v_prediction_base_and_caption_template(tmp_path):
    """An SD 2.x-style base (v-prediction) trains on labelled images captioned from a template."""
    base = save_sd_base(tmp_path / "sd2", prediction_type="v_prediction")
    data = digit_folder(tmp_path / "digits", ["cat", "dog"])
    out = tmp_path / "adapter"
    train(SD.args(base, out, data, **{"--caption_template": "a photo of a {label}"}))
    assert json.loads((out / DP_REPORT_NAME).read_text())["steps"] == 2
    config = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    assert config["caption_template"] == "a photo of a {label}" and config["id2label"] is None
    pipe = DPLDMPipeline.from_pretrained(out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert SD.images(pipe, ["a photo of a cat"]).shape == (1, 16, 16, 3)


def test_caption_contexts_are_the_pipeline_s_prompt_encoding_and_cached(tiny_sd_base, tmp_path):
    pipe = DPLDMPipeline.from_pretrained(tiny_sd_base)
    captions = ["a b", "c", "a photo of a dog"]
    contexts = StableDiffusionFamily.encode_captions(pipe, captions, cache_dir=str(tmp_path), batch_size=2)
    expected = pipe.family.sampling_pipeline(pipe).encode_prompt(captions, "cpu", 1, False)[0]
    torch.testing.assert_close(contexts["encoder_hidden_states"], expected, rtol=0, atol=0)
    assert len(list(tmp_path.glob("latents-text-*.npy"))) == 1
    cached = StableDiffusionFamily.encode_captions(pipe, captions, cache_dir=str(tmp_path))
    torch.testing.assert_close(cached, contexts, rtol=0, atol=0)


def test_caption_dropout_is_per_row_inside_the_loss():
    """Caption dropout is the loss's own per-row draw (so, under DP, inside each example's clipped gradient, and
    per noise-multiplicity copy): dropped rows see exactly the empty prompt's context."""
    seen = []

    def model(noisy, timesteps, conditions):
        seen.append(conditions["encoder_hidden_states"])
        return torch.zeros_like(noisy)

    from diffusers import DDPMScheduler

    null = torch.full((1, TEXT_LENGTH, TEXT_DIM), 7.0)
    contexts = torch.randn(400, TEXT_LENGTH, TEXT_DIM)
    loss = DiffusionLoss(NoisePrediction(DDPMScheduler()), ("encoder_hidden_states",),
                         null_condition={"encoder_hidden_states": null}, dropout=0.25)  # fmt: skip
    torch.manual_seed(0)
    loss(model, torch.randn(400, 4, 8, 8), contexts)
    dropped = (seen[0] == 7.0).flatten(1).all(1)
    kept = (seen[0] == contexts).flatten(1).all(1)
    assert bool((dropped ^ kept).all()) and 70 < int(dropped.sum()) < 130  # ~100 of 400 rows, each on its own


def test_bad_text_inputs_fail_before_anything_is_written(tiny_sd_base, tmp_path):
    data = SD.captioned(tmp_path / "data", 12)
    labelled = digit_folder(tmp_path / "labelled", ["cat", "dog"])
    empty = caption_folder(tmp_path / "empty-caption", ["fine", " ", "fine too"] * 4)
    no_tokenizer = save_sd_base(tmp_path / "no-tokenizer")
    index = json.loads((no_tokenizer / "model_index.json").read_text())
    (no_tokenizer / "model_index.json").write_text(json.dumps({**index, "tokenizer": [None, None]}))
    incomplete = save_sd_base(tmp_path / "incomplete")
    for file in (incomplete / "text_encoder").iterdir():
        file.unlink()
    (incomplete / "text_encoder").rmdir()
    cases = [
        (tiny_sd_base, data, {"--caption_column": "caption"}, DataError, "'caption' is not a column"),
        (tiny_sd_base, labelled, {}, DataError, "needs captions.*--caption_template"),
        (tiny_sd_base, labelled, {"--caption_template": "a photo"}, DataError, "has no '\\{label\\}'"),
        (tiny_sd_base, empty, {}, DataError, "Captions of rows 1, 4, 7, 10 are empty"),
        (tiny_sd_base, data, {"--train_class_embedding": True}, DataError, "no class embedding to train"),
        (no_tokenizer, data, {}, UnsupportedBaseError, "without \\['tokenizer'\\]"),
        (incomplete, data, {}, FileNotFoundError, "\\['text_encoder'\\].*no such folders"),
    ]
    for i, (base, folder, flags, error, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(error, match=message):
            train(SD.args(base, out, folder, **{"--batch_size": 4, **flags}))
        assert not out.exists() or not any(out.iterdir())


def test_captions_come_from_the_column_or_the_template():
    data = load_image_dataset("private-digits").select(range(3))
    assert dataset_captions(data, caption_template="a {label}", label_column="label") == [
        f"a {name}" for name in (data.features["label"].int2str(v) for v in data["label"])
    ]
    with pytest.raises(DataError, match="needs labelled data"):
        dataset_captions(data.remove_columns("label"), caption_template="a {label}")


def test_evaluate_a_text_adapter_on_template_prompts_and_each_example_s_own_caption(
    tiny_sd_base, tmp_path, monkeypatch
):
    """--evaluate on a text adapter: synthetic digits from the template's class prompts feed the downstream
    classifier; the audit scores every member and non-member under the context of its own caption, and the run's
    canaries (trained with random-word captions) against their never-trained twins."""
    from dp_diffusers.evaluation import evaluate as evaluate_module

    audited = []
    real_audit = evaluate_module.audit
    monkeypatch.setattr(evaluate_module, "audit", lambda *a, **kw: audited.append(a) or real_audit(*a, **kw))
    out = tmp_path / "adapter"
    template = "a photo of the digit {label}"
    flags = {"--dataset_name": "private-digits", "--max_train_samples": 40, "--caption_template": template,
             "--evaluate": True, "--eval_samples_per_class": 1, "--eval_inference_steps": 1,
             "--num_canaries": 4}  # fmt: skip
    train(SD.args(tiny_sd_base, out, None, **flags))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["downstream_accuracy"]["num_synthetic"] == 10 and metrics["downstream_accuracy"]["num_test"] == 360
    audit_result = metrics["membership_auc"]
    assert audit_result["num_members"] == 40 and audit_result["num_nonmembers"] == 360
    assert 0 <= audit_result["public_base_auc"] <= 1  # the base (adapter off) under the same captions
    coins = json.loads((out / ".audit" / "canary_coins.json").read_text())  # 8 canaries, each in by its coin
    assert audit_result["num_canaries"] == sum(coins) and 0 <= audit_result.get("canary_auc", 0) <= 1
    assert json.loads((out / DP_REPORT_NAME).read_text())["dataset_size"] == 44  # the canaries count in N

    _, member_contexts, _, nonmember_contexts = audited[0][1:5]
    test = load_image_dataset("private-digits", split="test")
    pipe = DPLDMPipeline.from_pretrained(tiny_sd_base)
    own = StableDiffusionFamily.encode_prompts(
        pipe, [template.format(label=test.features["label"].int2str(v)) for v in test["label"][:5]]
    )["encoder_hidden_states"]
    torch.testing.assert_close(nonmember_contexts["encoder_hidden_states"][:5], own)
    assert member_contexts["encoder_hidden_states"].shape == (40, TEXT_LENGTH, TEXT_DIM)
    card = ModelCard.load(out / "README.md")
    assert {r.task_name for r in card.data.eval_results} == {"Text-to-image generation"}


@pytest.mark.parametrize("k", [1, 3])
def test_one_enormous_captioned_example_moves_the_adapter_by_at_most_lr_c_over_b(k):
    """Sensitivity with text context: an example whose latents and caption context are both enormous still moves
    the update by exactly lr * C / B (noise off), its k copies averaged before the one clip."""
    from helpers import fixed_loss, lora_denoiser, private
    from torch.utils.data import TensorDataset

    from dp_diffusers.privacy import private_backward

    torch.manual_seed(0)
    model = lora_denoiser("text", "attention")
    data = TensorDataset(torch.randn(64, 4, 8, 8), torch.randn(64, TEXT_LENGTH, TEXT_DIM))
    lr, clip = 0.5, 1e-7
    dp, _ = private(model, data, sigma=0.0, clip=clip, batch=8, k=k, lr=lr, planned_steps=10)
    _, loss_fn = fixed_loss(torch.randint(0, 1000, (k,)), torch.randn(k, 4, 8, 8), ("encoder_hidden_states",))
    private_backward(dp.model, dp.optimizer, loss_fn, torch.randn(1, 4, 8, 8) * 1e4,
                     torch.randn(1, TEXT_LENGTH, TEXT_DIM) * 1e4)  # fmt: skip
    dp.optimizer.step()
    moved = lr * torch.sqrt(sum((p.grad.double() ** 2).sum() for p in dp.optimizer.params))
    bound = lr * clip / dp.optimizer.expected_batch_size
    assert bound * 0.99 <= moved <= bound * (1 + 1e-4)


def test_canary_captions_are_random_words_rebuilt_from_the_seed():
    from dp_diffusers.data import canary_captions

    inserted, heldout = canary_captions(5, seed=3)
    assert (inserted, heldout) == canary_captions(5, seed=3) and inserted != canary_captions(5, seed=4)[0]
    assert len(set(inserted + heldout)) == 10 and all(len(c.split()) == 4 for c in inserted)


def test_random_flip_draws_the_image_or_its_mirror_per_row_and_trains_through_the_script(tiny_sd_base, tmp_path):
    """--random_flip: each example's latents and its mirror's are encoded once; every row (each noise-multiplicity
    copy too) trains on one of the two, drawn inside the loss, so inside that example's clipped gradient."""
    from diffusers import DDPMScheduler

    from dp_diffusers.data import encode_latents

    pipe = DPLDMPipeline.from_pretrained(tiny_sd_base)
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    pair = encode_latents(pipe.vae, pixels, mirrored=True)
    torch.testing.assert_close(pair[:, 0], encode_latents(pipe.vae, pixels))
    torch.testing.assert_close(pair[:, 1], encode_latents(pipe.vae, pixels.flip(-1)))

    seen = []

    def model(noisy, timesteps, conditions):
        seen.append(noisy)
        return torch.zeros_like(noisy)

    rows = torch.randn(200, 1, 1, 2, 2).repeat(1, 2, 1, 1, 1) * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1, 1)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    scheduler.add_noise = lambda latents, noise, timesteps: latents  # see the chosen latents themselves
    DiffusionLoss(NoisePrediction(scheduler), random_flip=True)(model, rows)
    first = (seen[0] == rows[:, 0]).flatten(1).all(1)
    assert bool((first ^ (seen[0] == rows[:, 1]).flatten(1).all(1)).all()) and 70 < int(first.sum()) < 130

    out, data = tmp_path / "adapter", SD.captioned(tmp_path / "data", 30)
    train(SD.args(tiny_sd_base, out, data, **{"--random_flip": True, "--noise_multiplicity": 2}))
    assert json.loads((out / DP_REPORT_NAME).read_text())["random_flip"] is True


def test_cli_samples_a_text_model_from_prompts(tiny_sd_base, tmp_path, capsys):
    from PIL import Image

    from dp_diffusers import cli

    out = tmp_path / "grid.png"
    cli.main(["sample", str(tiny_sd_base), "--prompts", "a cat", "a dog", "--num_images", "2",
              "--num_inference_steps", "1", "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert Image.open(out).size[1] == 2 * 16 * 4  # two rows (one per prompt) of 16-pixel images upscaled 4x
    with pytest.raises(SystemExit):
        cli.main(["sample", str(tiny_sd_base), "--device", "cpu", "--out", str(out)])
    assert "needs --prompts" in capsys.readouterr().err
