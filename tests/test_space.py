"""The Spaces demo's functions (examples/space/app.py) without a browser, on a tiny adapter that train_dp_lora.py
trains on the tiny base."""

import json

import numpy as np
import pytest
import torch
from helpers import write_adapter

from dp_diffusers import ClassEmbedder, DPLDMPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def arrays(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


@pytest.fixture(scope="module")
def model(app, space_adapter):
    model = app.load_model(space_adapter, device="cpu")
    model.pipe.set_progress_bar_config(disable=True)
    return model


def sample_pipe(pipe: DPLDMPipeline, name: str, n: int, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    labels = pipe.get_label_ids([name])
    images = pipe(class_labels=labels, num_images_per_prompt=n, num_inference_steps=3, generator=generator).images
    return arrays(images)


def test_generate_gives_the_images_asked_for_reproducibly(app, model):
    assert model.class_names == [str(i) for i in range(10)]
    images = app.generate(model, "3", num_images=3, seed=1, num_inference_steps=3)
    assert len(images) == 3 and images[0].size == (16, 16)
    again = app.generate(model, "3", num_images=3, seed=1, num_inference_steps=3)
    other = app.generate(model, "3", num_images=3, seed=2, num_inference_steps=3)
    assert np.array_equal(arrays(images), arrays(again)) and not np.array_equal(arrays(images), arrays(other))


def test_lora_scale_zero_is_the_public_base_and_one_the_fine_tune(app, model, tiny_base, space_adapter):
    base = sample_pipe(DPLDMPipeline.from_pretrained(tiny_base), "7", 2, seed=5)
    tuned = sample_pipe(DPLDMPipeline.from_pretrained(space_adapter), "7", 2, seed=5)
    assert not np.array_equal(base, tuned)

    def scaled(lora_scale: float) -> np.ndarray:
        return arrays(app.generate(model, "7", 2, seed=5, num_inference_steps=3, lora_scale=lora_scale))

    assert np.array_equal(scaled(0.0), base)
    assert np.array_equal(scaled(1.0), tuned)
    half = scaled(0.5)
    assert not np.array_equal(half, base) and not np.array_equal(half, tuned)
    assert np.array_equal(scaled(0.0), base)  # the scale of one request does not stay for the next


def test_trained_class_embedding_is_swapped_for_the_base_at_scale_zero(app, tiny_base, tmp_path):
    pipe = DPLDMPipeline.from_pretrained(tiny_base)
    torch.manual_seed(2)
    id2label = {**{i: str(i) for i in range(10)}, 10: "cat"}
    folder = write_adapter(tmp_path / "adapter", pipe.unet, tiny_base, ClassEmbedder(11, 16), id2label)
    model = app.load_model(folder, device="cpu")
    model.pipe.set_progress_bar_config(disable=True)
    assert model.class_names[-1] == "cat" and len(app.generate(model, "cat", 1, num_inference_steps=2)) == 1
    with pytest.raises(ValueError, match=r"'cat': the public base \(LoRA scale 0\) knows 0, 1, "):
        app.generate(model, "cat", 1, num_inference_steps=2, lora_scale=0)
    base = sample_pipe(DPLDMPipeline.from_pretrained(tiny_base), "3", 1, seed=0)
    assert np.array_equal(arrays(app.generate(model, "3", 1, num_inference_steps=3, lora_scale=0)), base)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_images": 17}, "number of images must be between 1 and 16, got 17"),
        ({"num_images": 0}, "number of images must be between 1 and 16"),
        ({"num_inference_steps": 101}, "inference steps must be between 1 and 100, got 101"),
        ({"guidance_scale": 25.0}, "guidance scale must be between 1 and 20"),
        ({"lora_scale": 1.5}, "LoRA scale must be between 0 and 1"),
        ({"lora_scale": float("nan")}, "LoRA scale must be between 0 and 1"),
        ({"seed": -1}, "seed must be between 0 and"),
        ({"class_name": "cat"}, r"Unknown class 'cat': this model knows 0, 1, 2, 3, 4, 5, 6, 7, 8, 9\."),
    ],
)
def test_limits_and_unknown_classes_raise(app, model, kwargs, message):
    kwargs = {"class_name": "3", **kwargs}
    with pytest.raises(ValueError, match=message):
        app.generate(model, **kwargs)


def test_privacy_summary_shows_the_report_and_what_was_not_measured(app, space_adapter):
    report = json.loads((space_adapter / "dp_report.json").read_text())
    summary = app.privacy_summary(space_adapter)
    for key in ("epsilon", "delta", "accountant", "noise_multiplier"):
        assert summary[key] == report[key]
    assert summary["downstream_accuracy"] == 0.75 and summary["membership_auc"] == 0.5125 and summary["fid"] is None
    assert summary["model_card"] == str(space_adapter / "README.md")
    assert app.epsilon_markdown(summary) == f"**ε = {report['epsilon']:.4g}** (δ = {report['delta']:g})"
    panel = app.summary_markdown(summary)
    assert f"| ε (epsilon) | {report['epsilon']:.4g} |" in panel and "| FID | not measured |" in panel
    assert f"| Accountant | {report['accountant']} |" in panel and "| Downstream accuracy | 0.75 |" in panel
    assert f"Model card: `{space_adapter / 'README.md'}`" in panel
    assert f"`dp-diffusers generate {space_adapter} --num_images 1000 --output_dir synthetic-data`" in panel


def test_privacy_panel_shows_fid_kid_and_the_audit_or_why_they_were_not_computed(app, space_adapter, tmp_path):
    import shutil

    folder = shutil.copytree(space_adapter, tmp_path / "adapter")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert "| Empirical ε lower bound (one-run audit, 95%) | not measured |" in app.summary_markdown(
        app.privacy_summary(folder))  # fmt: skip
    audit = {"value": 0.4125, "num_canaries": 1000, "num_guesses": 40, "num_correct": 27, "claimed_epsilon": 9.99}
    (folder / "metrics.json").write_text(json.dumps({**metrics, "fid": {"value": 41.25, "num_generated": 300},
                                                     "kid": {"value": 0.0123}, "one_run_audit": audit}))  # fmt: skip
    panel = app.summary_markdown(app.privacy_summary(folder))
    assert "| FID | 41.25 |" in panel and "| KID | 0.0123 |" in panel
    assert "| Empirical ε lower bound (one-run audit, 95%) | 0.4125 |" in panel
    offline = {"value": None, "not_computed": "no Inception weights (offline). To fix: ..."}
    (folder / "metrics.json").write_text(json.dumps({**metrics, "fid": offline, "kid": offline}))
    summary = app.privacy_summary(folder)
    assert summary["fid"] == summary["kid"] == "not computed"
    panel = app.summary_markdown(summary)
    assert "| FID | not computed |" in panel and "| KID | not computed |" in panel


def test_unloadable_adapters_are_named_with_the_reason(app, tiny_base, tmp_path):
    with pytest.raises(app.AdapterLoadError, match=f"Cannot load the DP-LoRA adapter '{tiny_base}': it holds no LoRA"):
        app.load_model(tiny_base)
    missing = tmp_path / "missing"
    with pytest.raises(SystemExit, match=f"Cannot load the DP-LoRA adapter '{missing}'.*\nRun `make demo`"):
        app.main(["--adapter", str(missing)])


def test_build_demo_has_the_controls_and_the_epsilon_element(app, model):
    demo = app.build_demo(model)
    elem_ids = {block.elem_id for block in demo.blocks.values()}
    assert {"generate", "gallery", app.EPSILON_ELEM_ID, "privacy-summary"} <= elem_ids


def test_a_text_to_image_adapter_gets_a_prompt_box_and_scale_zero_is_the_public_sd_base(app, tiny_sd_base, tmp_path):
    from diffusers import StableDiffusionPipeline
    from helpers import base_args, caption_folder, train

    data = caption_folder(tmp_path / "data", [f"private caption {i}" for i in range(20)])
    out = tmp_path / "sd-adapter"
    train(base_args(tiny_sd_base, out, **{"--train_data_dir": data, "--max_train_samples": None, "--batch_size": 10,
                                          "--max_train_steps": 2, "--learning_rate": 0.1, "--noise_multiplier": 1.0,
                                          "--validation_prompt": "a public prompt"}))  # fmt: skip
    model = app.load_model(out, device="cpu")
    model.pipe.set_progress_bar_config(disable=True)
    assert model.text_to_image and model.class_names == [] and model.prompts == ["a public prompt"]

    def standard(adapter: bool) -> np.ndarray:
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_base)
        if adapter:
            pipe.load_lora_weights(out)
        pipe.set_progress_bar_config(disable=True)
        images = pipe("a cat", num_images_per_prompt=2, num_inference_steps=3, guidance_scale=3.0,
                      generator=torch.Generator().manual_seed(5)).images  # fmt: skip
        return arrays(images)

    def scaled(lora_scale: float) -> np.ndarray:
        return arrays(app.generate(model, None, 2, seed=5, num_inference_steps=3, lora_scale=lora_scale,
                                   prompt="a cat"))  # fmt: skip

    assert np.array_equal(scaled(0.0), standard(adapter=False))
    assert np.array_equal(scaled(1.0), standard(adapter=True))
    with pytest.raises(ValueError, match="Enter a prompt"):
        app.generate(model, None, prompt=" ")
    elem_ids = {block.elem_id for block in app.build_demo(model).blocks.values()}
    assert {"prompt", "generate", app.EPSILON_ELEM_ID} <= elem_ids
