"""`dp-diffusers generate`: DP synthetic data sets (imagefolder + dataset card), resumable, pushed as Hub datasets."""

import json
import re
from unittest import mock

import numpy as np
import pytest
import torch
from datasets import load_dataset
from helpers import base_args, caption_folder, train
from huggingface_hub import DatasetCard
from PIL import Image

from dp_diffusers import DPLDMPipeline, cli
from dp_diffusers.constants import DP_REPORT_NAME
from dp_diffusers.synthetic import GENERATION_NAME, push_dataset


def generate(adapter, out, *flags) -> None:
    cli.main(["generate", str(adapter), "--output_dir", str(out), "--num_inference_steps", "2", *map(str, flags)])


def refused(capsys, adapter, out, *flags) -> str:
    """The command line's error message (it exits with status 1, without a traceback)."""
    with pytest.raises(SystemExit) as exited:
        generate(adapter, out, *flags)
    assert exited.value.code == 1
    return capsys.readouterr().err


def pixels(folder) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for path in sorted((folder / "images").glob("*.png"))]


@pytest.fixture(scope="module")
def text_adapter(tiny_sd_base, tmp_path_factory):
    """A Stable Diffusion adapter of train_dp_lora.py (2 DP steps on private captions, two public prompts)."""
    root = tmp_path_factory.mktemp("text-adapter")
    data = caption_folder(root / "data", [f"private caption {i}" for i in range(20)])
    out = root / "sd-adapter"
    train(base_args(tiny_sd_base, out, **{"--train_data_dir": data, "--max_train_samples": None, "--batch_size": 10,
                                          "--max_train_steps": 2, "--learning_rate": 0.1, "--noise_multiplier": 1.0,
                                          "--validation_prompt": "a red square"})
          + ["--validation_prompt", "a blue circle"])  # fmt: skip
    return out


def test_class_adapter_gives_a_balanced_imagefolder_with_a_dataset_card(space_adapter, tiny_base, tmp_path):
    out = tmp_path / "synthetic"
    generate(space_adapter, out, "--num_images", 7, "--labels", "3", "7", "--batch_size", 3, "--seed", 5)

    data = load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(data) == 7 and data.column_names == ["image", "label"]
    assert data["label"] == ["3", "7", "3", "7", "3", "7", "3"]  # class names, balanced in turn
    assert data[0]["image"].size == (16, 16)
    settings = json.loads((out / GENERATION_NAME).read_text())
    assert settings["seed"] == 5 and settings["batch_size"] == 3 and settings["num_inference_steps"] == 2
    assert settings["sampler"] == "DDIMScheduler" and settings["labels"] == ["3", "7"]
    assert settings["guidance_scale"] == 1.0  # the family's for synthetic data, not the pipeline's 3 for pictures
    report = json.loads((space_adapter / DP_REPORT_NAME).read_text())
    assert json.loads((out / DP_REPORT_NAME).read_text()) == report  # the guarantee travels with the data

    card = DatasetCard.load(out / "README.md")
    assert {"synthetic", "differential-privacy"} <= set(card.data.tags)
    assert card.data.dp_epsilon == report["epsilon"] and card.data.dp_delta == report["delta"]
    assert card.data.source_adapter == space_adapter.name and card.data.base_model == tiny_base.name
    for path in (space_adapter, tiny_base):  # no local path goes into a file that gets uploaded
        assert str(path) not in card.content and str(path) not in (out / GENERATION_NAME).read_text()
    assert "post-processing of the DP training" in card.text and "no further" in card.text

    # each batch of images from its own seeded generator: the second batch is the pipeline's own output
    pipe = DPLDMPipeline.from_pretrained(space_adapter)
    pipe.set_progress_bar_config(disable=True)
    batch = pipe(class_labels=pipe.get_label_ids(["7", "3", "7"]), num_inference_steps=2, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(5 * 1_000_003 + 1)).images  # fmt: skip
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(batch, pixels(out)[3:6]))
    guided = tmp_path / "guided"  # --guidance_scale given: the pipeline's call at that scale (its default, 3)
    generate(space_adapter, guided, "--num_images", 3, "--labels", "3", "7", "--batch_size", 3, "--seed", 5,
             "--guidance_scale", 3)  # fmt: skip
    batch = pipe(class_labels=pipe.get_label_ids(["3", "7", "3"]), num_inference_steps=2,
                 generator=torch.Generator().manual_seed(5 * 1_000_003)).images  # fmt: skip
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(batch, pixels(guided)))
    assert not np.array_equal(pixels(guided)[0], pixels(out)[0])

    every = tmp_path / "every-class"
    generate(space_adapter, every, "--num_images", 10, "--batch_size", 10)
    labels = load_dataset("imagefolder", data_dir=str(every), split="train")["label"]
    assert sorted(labels) == [str(i) for i in range(10)]  # by default: the adapter's classes, balanced


def test_an_interrupted_run_is_resumed_with_the_images_it_would_have_written(space_adapter, tmp_path, monkeypatch):
    flags = ("--num_images", 5, "--batch_size", 2)
    generate(space_adapter, tmp_path / "whole", *flags)

    calls, crash = [], [True]
    sample = DPLDMPipeline.__call__

    def crash_on_the_second_batch(self, *args, **kwargs):
        calls.append(kwargs["class_labels"])
        if crash[0] and len(calls) == 2:
            raise RuntimeError("killed")
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(DPLDMPipeline, "__call__", crash_on_the_second_batch)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="killed"):
        generate(space_adapter, out, *flags)
    assert len(list((out / "images").glob("*.png"))) == 2 and not (out / "metadata.jsonl").exists()
    calls.clear()
    crash[0] = False
    generate(space_adapter, out, *flags)
    assert len(calls) == 2  # batches 2 and 3 only: the first was kept
    assert all(np.array_equal(a, b) for a, b in zip(pixels(out), pixels(tmp_path / "whole")))
    assert (out / "metadata.jsonl").read_text() == (tmp_path / "whole" / "metadata.jsonl").read_text()


def test_bad_generation_input_fails_clearly_and_writes_nothing(space_adapter, text_adapter, tmp_path, capsys):
    refusals = {
        "none": (space_adapter, ["--num_images", 0], "--num_images must be >= 1, got 0"),
        "cat": (space_adapter, ["--num_images", 2, "--labels", "cat"], r"Unknown class label.*cat"),
        "prompted": (space_adapter, ["--num_images", 2, "--prompts", "a cat"], "not text-to-image: it takes no"),
        "labelled": (text_adapter, ["--num_images", 2, "--labels", "3"], "not class-conditional: it takes no"),
        "nowhere": (space_adapter, ["--num_images", 2, "--push_to_hub"], "--push_to_hub needs --repo_id"),
    }
    for name, (adapter, flags, message) in refusals.items():
        assert re.search(message, refused(capsys, adapter, tmp_path / name, *flags))
        assert not (tmp_path / name).exists()

    taken = tmp_path / "taken"
    generate(space_adapter, taken, "--num_images", 2)
    before = pixels(taken)
    message = refused(capsys, space_adapter, taken, "--num_images", 3, "--seed", 1)
    assert "holds another synthetic data set (different ['num_images', 'seed'])" in message
    assert all(np.array_equal(a, b) for a, b in zip(before, pixels(taken)))  # nothing overwritten
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my files")
    assert "not empty and holds no synthetic data set" in refused(capsys, space_adapter, tmp_path / "mine",
                                                                  "--num_images", 2)  # fmt: skip
    with pytest.raises(ValueError, match="no finished synthetic data set"):
        push_dataset(tmp_path / "mine", "me/data", api=mock.Mock())


def test_text_adapter_gives_a_prompt_column_and_is_pushed_as_a_hub_dataset(text_adapter, tmp_path):
    out = tmp_path / "synthetic"
    with mock.patch("dp_diffusers.synthetic.HfApi") as api_class:
        api = api_class.return_value
        api.create_repo.return_value = mock.Mock(repo_id="me/synthetic-shapes")
        api.create_repo.return_value.__str__ = lambda self: "https://huggingface.co/datasets/me/synthetic-shapes"
        generate(text_adapter, out, "--num_images", 3, "--batch_size", 2, "--push_to_hub", "--repo_id",
                 "me/synthetic-shapes", "--private")  # fmt: skip

    data = load_dataset("imagefolder", data_dir=str(out), split="train")
    assert data["text"] == ["a red square", "a blue circle", "a red square"]  # the public prompts, in turn
    written = "".join(path.read_text() for path in out.iterdir() if path.is_file())
    assert "private caption" not in written  # training captions are never written
    assert api.create_repo.call_args.args == ("me/synthetic-shapes",)
    assert api.create_repo.call_args.kwargs["repo_type"] == "dataset" and api.create_repo.call_args.kwargs["private"]
    upload = api.upload_folder.call_args.kwargs
    assert upload["repo_type"] == "dataset" and upload["repo_id"] == "me/synthetic-shapes"
    assert upload["folder_path"] == out
    card = DatasetCard.load(out / "README.md")
    assert 'load_dataset("me/synthetic-shapes")' in card.text and "differential-privacy" in card.data.tags

    prompted = tmp_path / "prompted"
    generate(text_adapter, prompted, "--num_images", 2, "--prompts", "a green star")
    assert load_dataset("imagefolder", data_dir=str(prompted), split="train")["text"] == ["a green star"] * 2


@pytest.mark.parametrize("base", ["tiny_ldm_base", "tiny_dit_base", "tiny_sdxl_base", "tiny_sd3_base",
                                  "tiny_flux_base"])  # fmt: skip
def test_every_family_samples_a_data_set(base, request, tmp_path):
    """Each family samples through its own diffusers pipeline; a base (no adapter) claims no guarantee."""
    folder = request.getfixturevalue(base)
    pipe = DPLDMPipeline.from_pretrained(folder)
    prompts = ["--prompts", "a photo"] if pipe.conditioning == "text" else []
    labels = ["--labels", "seven"] if pipe.conditioning == "class" else []
    out = tmp_path / "synthetic"
    generate(folder, out, "--num_images", 2, *prompts, *labels)
    data = load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(data) == 2
    expected = {"text": ["text"], "class": ["label"], "none": []}[pipe.conditioning]
    assert [name for name in data.column_names if name != "image"] == expected
    assert not (out / DP_REPORT_NAME).exists()
    assert "no differential-privacy guarantee is claimed" in (out / "README.md").read_text()
