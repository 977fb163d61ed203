"""Public base families (dp_diffusers.families) as a user meets them: a base folder in the layout diffusers' own
pipeline class saves, trained through train_dp_lora.py, its adapter loaded by DPLDMPipeline.from_pretrained."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DiTPipeline, LDMPipeline
from helpers import (
    base_args,
    digit_folder,
    save_ldm_base,
    scheduler,
    tiny_dit,
    tiny_uncond_unet,
    train,
    write_adapter,
)
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from dp_diffusers import DPLDMPipeline, LatentDenoiser
from dp_diffusers.constants import ADAPTER_CONFIG_NAME, DP_REPORT_NAME, LORA_WEIGHT_NAME, SAMPLES_NAME
from dp_diffusers.data import DataError
from dp_diffusers.families import FAMILIES, DiTFamily, UnsupportedBaseError, base_family
from dp_diffusers.lora import NoLoRATargetError, add_lora, make_lora_config
from dp_diffusers.models import DiTClassRows

pytestmark = pytest.mark.usefixtures("one_thread")


def images(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(batch_size=2, num_inference_steps=3, generator=generator, output_type="np", **kwargs).images


def test_families_are_read_from_model_index(tiny_base, tiny_ldm_base, tiny_dit_base):
    assert base_family(tiny_base).name == "dp-ldm" and base_family(tiny_dit_base).name == "dit"
    assert base_family(tiny_ldm_base).name == "compvis-ldm"
    assert {"DPLDMPipeline", "LDMPipeline", "DiTPipeline"} <= set(FAMILIES)


def test_compvis_base_samples_as_diffusers_ldm_pipeline_zero_adapter_and_fused_too(tiny_ldm_base, tmp_path):
    reference = images(LDMPipeline.from_pretrained(tiny_ldm_base))
    pipe = DPLDMPipeline.from_pretrained(tiny_ldm_base)
    assert pipe.base_family == "compvis-ldm" and pipe.num_classes is None
    assert type(pipe.vae).__name__ == "VQModel" and type(pipe.unet).__name__ == "UNet2DModel"
    assert (images(pipe) == reference).all()  # the same numbers as diffusers' own pipeline
    zero = write_adapter(tmp_path / "zero", tiny_uncond_unet(), tiny_ldm_base, lora_std=0.0)
    tuned = DPLDMPipeline.from_pretrained(zero)
    assert tuned.base_family == "compvis-ldm"
    assert (images(tuned) == reference).all()
    tuned.fuse_lora()
    assert (images(tuned) == reference).all()


def test_compvis_base_trains_through_the_script_and_its_adapter_loads(tiny_ldm_base, tmp_path, caplog):
    out = tmp_path / "adapter"
    with caplog.at_level("WARNING"):
        train(base_args(tiny_ldm_base, out, **{"--max_train_steps": 2, "--samples_per_class": 2,
                                                "--learning_rate": 0.1}))  # fmt: skip
    assert "unconditional: the data's labels" in caplog.text  # the digits' labels exist and are not used
    report = json.loads((out / DP_REPORT_NAME).read_text())
    assert report["steps"] == 2 and report["epsilon"] > 0
    assert any(".attentions." in name and name.endswith("to_q") for name in report["adapted_modules"])
    config = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    assert config["base_family"] == "compvis-ldm" and config["id2label"] is None
    assert (out / SAMPLES_NAME).is_file()
    tuned = DPLDMPipeline.from_pretrained(out)
    assert tuned.base_family == "compvis-ldm"
    base = images(DPLDMPipeline.from_pretrained(tiny_ldm_base))
    assert images(tuned).shape == base.shape == (2, 16, 16, 1)
    assert not (images(tuned) == base).all()  # the adapter changes the base's images


def test_bad_bases_and_labels_fail_before_anything_is_written(tiny_ldm_base, tmp_path):
    ddpm = tmp_path / "ddpm"
    DDPMPipeline(unet=tiny_uncond_unet(), scheduler=scheduler()).save_pretrained(ddpm)  # pixel space: no autoencoder
    no_attention = save_ldm_base(tmp_path / "no-attention", attention=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (ddpm, {}, UnsupportedBaseError, "DDPMPipeline with components \\['scheduler', 'unet'\\].*LDMPipeline"),
        (empty, {}, UnsupportedBaseError, "has no model_index.json: not a diffusers pipeline"),
        (tiny_ldm_base, {"--label_column": "label"}, DataError, "unconditional"),
        (no_attention, {}, NoLoRATargetError, "no attention"),
    ]
    for i, (base, flags, error, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(error, match=message):
            train(base_args(base, out, **flags))
        assert not (out / ADAPTER_CONFIG_NAME).exists() and not (out / DP_REPORT_NAME).exists()


def test_dit_base_samples_as_diffusers_dit_pipeline_with_guidance_zero_adapter_and_fused(tiny_dit_base, tmp_path):
    def dit_images(pipe, guidance_scale):
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        return pipe(class_labels=[0, 7], num_inference_steps=3, guidance_scale=guidance_scale, generator=generator,
                    output_type="np").images  # fmt: skip

    reference = {g: dit_images(DiTPipeline.from_pretrained(tiny_dit_base), g) for g in (1.0, 4.0)}
    pipe = DPLDMPipeline.from_pretrained(tiny_dit_base)
    assert pipe.base_family == "dit" and pipe.num_classes == 1000
    assert type(pipe.unet).__name__ == "DiTTransformer2DModel"
    assert pipe.get_label_ids(["zero", "0", "seven", "class 3"]) == [0, 0, 7, 3]  # DiT's synonyms
    for g, expected in reference.items():  # DiTPipeline decodes latents * (1 / s), this pipeline latents / s
        np.testing.assert_allclose(dit_images(pipe, g), expected, atol=1e-6)
    zero = write_adapter(tmp_path / "zero", tiny_dit(), tiny_dit_base, lora_std=0.0)
    tuned = DPLDMPipeline.from_pretrained(zero)
    np.testing.assert_allclose(dit_images(tuned, 4.0), reference[4.0], atol=1e-6)
    tuned.fuse_lora()
    np.testing.assert_allclose(dit_images(tuned, 4.0), reference[4.0], atol=1e-6)


def test_dit_base_trains_on_labels_known_by_name_and_its_adapter_loads(tiny_dit_base, tmp_path):
    data = digit_folder(tmp_path / "data", ["0", "one", "seven"])  # DiT classes 0, 1 and 7, by synonym
    out = tmp_path / "adapter"
    flags = {"--train_data_dir": data, "--max_train_samples": None, "--max_train_steps": 2, "--learning_rate": 0.1,
             "--samples_per_class": 1}  # fmt: skip
    train(base_args(tiny_dit_base, out, **flags))
    report = json.loads((out / DP_REPORT_NAME).read_text())
    assert report["steps"] == 2 and "transformer_blocks.1.attn1.to_q" in report["adapted_modules"]
    config = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    assert config["base_family"] == "dit" and config["id2label"]["7"] == "seven, 7"
    assert (out / SAMPLES_NAME).is_file()
    tuned = DPLDMPipeline.from_pretrained(out)
    assert tuned.base_family == "dit"
    labels = tuned.get_label_ids(["seven"])
    base = DPLDMPipeline.from_pretrained(tiny_dit_base)
    assert not (images(tuned, class_labels=labels) == images(base, class_labels=labels)).all()

    unknown = digit_folder(tmp_path / "unknown", ["0", "cat"])  # 'cat' is private: no public label set names it
    flags = {"--train_data_dir": unknown, "--max_train_samples": None}
    with pytest.raises(DataError, match=r"15 of 30 rows \(rows .*\) have labels outside the base model's classes.*"
                                        "--class_names.*--train_class_embedding") as refused:
        train(base_args(tiny_dit_base, tmp_path / "refused", **flags))
    assert "cat" not in str(refused.value)
    with pytest.raises(DataError, match=r"\['cat'\] are unknown to the base model.*--train_class_embedding"):
        train(base_args(tiny_dit_base, tmp_path / "refused", **flags) + ["--class_names", "0", "cat"])  # public now
    assert not (tmp_path / "refused" / ADAPTER_CONFIG_NAME).exists()


@pytest.mark.parametrize(
    "family,preset,expected",
    [
        ("dit", "attention", {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"}),
        ("dit", "attention+ff+adaln", {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj",
                                       "ff.net.2", "norm1.linear"}),  # fmt: skip
        ("compvis-ldm", "attention", {"to_q", "to_k", "to_v", "to_out.0"}),
    ],
)
def test_lora_presets_of_each_family_adapt_its_attention_projections(family, preset, expected, tiny_dit_base,
                                                                     tiny_ldm_base):  # fmt: skip
    pipe = DPLDMPipeline.from_pretrained(tiny_dit_base if family == "dit" else tiny_ldm_base)
    pipe.ensure_peft_unet()
    adapted = add_lora(pipe.unet, make_lora_config(2, targets=preset, presets=pipe.family.lora_target_presets))
    if family == "dit":  # every transformer block, nothing else
        assert set(adapted) == {f"transformer_blocks.{i}.{name}" for i in range(2) for name in expected}
    else:  # the attention blocks of the UNet (down, mid, up)
        assert {name.split(".attentions.")[1].split(".", 1)[1] for name in adapted} == expected
        assert {name.split(".attentions.")[0] for name in adapted} == {"down_blocks.1", "mid_block", "up_blocks.0"}


def test_dit_label_dropout_is_the_loss_s_not_the_transformer_s():
    """DiT's LabelEmbedding drops labels at random in training mode; inside LatentDenoiser it never does (label
    dropout is DiffusionLoss's, per row), so a batch gives each example's own prediction."""
    model = LatentDenoiser(tiny_dit(), DiTFamily).train()
    latents, timesteps, labels = torch.randn(6, 4, 8, 8), torch.randint(0, 1000, (6,)), torch.randint(0, 1000, (6,))
    with torch.no_grad():
        batch = model(latents, timesteps, {"class_labels": labels})
        alone = torch.cat([model(latents[i : i + 1], timesteps[i : i + 1], {"class_labels": labels[i : i + 1]})
                           for i in range(6)])  # fmt: skip
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)
    assert batch.shape == latents.shape  # DiT's learned-sigma half cut off


def test_dit_new_classes_get_rows_trained_under_dp_saved_and_loaded(tiny_dit_base, tmp_path):
    data = digit_folder(tmp_path / "data", ["seven", "cat", "dog"])  # 7 is DiT's, cat and dog are new
    out = tmp_path / "adapter"
    flags = {"--train_data_dir": data, "--max_train_samples": None, "--max_train_steps": 2, "--learning_rate": 0.1,
             "--train_class_embedding": True}  # fmt: skip
    train(base_args(tiny_dit_base, out, **flags) + ["--class_names", "seven", "cat", "dog"])  # the public label set
    config = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    assert config["class_rows"] == "class_rows"
    assert config["id2label"]["1001"] == "cat" and config["id2label"]["1002"] == "dog"  # after the null class
    assert config["id2label"]["7"] == "seven, 7" and "1000" not in config["id2label"]
    rows = DiTClassRows.from_pretrained(out / "class_rows")
    assert rows.config.first_id == 1001 and rows.config.num_rows == 2
    null_row = DiTPipeline.from_pretrained(tiny_dit_base).transformer.transformer_blocks[0].norm1.emb
    null_row = null_row.class_embedder.embedding_table.weight[1000]
    assert all(not torch.equal(row, null_row) for row in rows.embedding.weight)  # both rows trained (from the null)
    report = json.loads((out / DP_REPORT_NAME).read_text())
    lora = sum(t.numel() for t in load_file(out / LORA_WEIGHT_NAME).values())
    assert report["trainable_parameters"] == lora + rows.embedding.weight.numel()  # clipped and noised together

    tuned = DPLDMPipeline.from_pretrained(out)
    assert tuned.num_classes == 1003 and tuned.get_label_ids(["cat", "dog", "seven"]) == [1001, 1002, 7]
    cat = images(tuned, class_labels=[1001])
    assert not (cat == images(tuned, class_labels=[1002])).all()  # each new class has its own row
    tuned.unload_lora_weights()  # the base again: no rows, its own classes
    assert tuned.class_rows is None and tuned.num_classes == 1000
    with pytest.raises(ValueError, match="Unknown class"):
        tuned.get_label_ids(["cat"])


def test_evaluate_runs_on_compvis_and_dit_adapters_through_the_script(tiny_ldm_base, tiny_dit_base, tmp_path):
    """--evaluate on each public family: the unconditional CompVis adapter gets the audit (no downstream
    classifier: its samples have no labels); the DiT adapter samples the data's ten digit classes by name (three
    known by synonym, seven new rows), not the base's 1,000 ImageNet ones."""
    flags = {"--dataset_name": "private-digits", "--max_train_samples": 40, "--max_train_steps": 1, "--evaluate": True,
             "--eval_samples_per_class": 1, "--eval_inference_steps": 1, "--label_column": None,
             "--noise_multiplier": 1.0}  # fmt: skip (sigma given: no calibration, which costs ~10 s at q = 0.5)
    compvis = tmp_path / "compvis"
    train(base_args(tiny_ldm_base, compvis, **flags))
    metrics = json.loads((compvis / "metrics.json").read_text())
    assert "downstream_accuracy" not in metrics and 0 <= metrics["membership_auc"]["value"] <= 1
    assert metrics["membership_auc"]["num_members"] == 40
    tasks = {result.task_name for result in ModelCard.load(compvis / "README.md").data.eval_results}
    assert tasks == {"Unconditional image generation"}  # the card's task follows the family's conditioning

    dit = tmp_path / "dit"
    train(base_args(tiny_dit_base, dit, **flags, **{"--train_class_embedding": True}))
    metrics = json.loads((dit / "metrics.json").read_text())
    assert metrics["downstream_accuracy"]["num_synthetic"] == 10  # one per digit class
    assert metrics["downstream_accuracy"]["num_test"] == 360
    assert 0 <= metrics["membership_auc"]["value"] <= 1
    card = (dit / "README.md").read_text()
    assert "Downstream accuracy" in card
