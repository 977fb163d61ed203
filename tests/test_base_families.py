"""Public base families (dp_diffusers.families) as a user meets them: a base folder in the layout diffusers' own
pipeline class saves, trained through train_dp_lora.py, its adapter loaded by DPLDMPipeline.from_pretrained."""

import json

import pytest
import torch
from diffusers import DDPMPipeline, LDMPipeline
from helpers import base_args, save_ldm_base, scheduler, tiny_uncond_unet, train, write_adapter

from dp_diffusers import DPLDMPipeline
from dp_diffusers.constants import ADAPTER_CONFIG_NAME, DP_REPORT_NAME, SAMPLES_NAME
from dp_diffusers.data import DataError
from dp_diffusers.families import FAMILIES, UnsupportedBaseError, base_family
from dp_diffusers.lora import NoLoRATargetError

pytestmark = pytest.mark.usefixtures("one_thread")


def images(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(batch_size=2, num_inference_steps=3, generator=generator, output_type="np", **kwargs).images


def test_families_are_read_from_model_index(tiny_base, tiny_ldm_base):
    assert base_family(tiny_base).name == "dp-ldm"
    assert base_family(tiny_ldm_base).name == "compvis-ldm"
    assert {"DPLDMPipeline", "LDMPipeline"} <= set(FAMILIES)


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
        (empty, {}, UnsupportedBaseError, "not a diffusers pipeline"),
        (tiny_ldm_base, {"--label_column": "label"}, DataError, "unconditional"),
        (no_attention, {}, NoLoRATargetError, "no attention"),
    ]
    for i, (base, flags, error, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(error, match=message):
            train(base_args(base, out, **flags))
        assert not (out / ADAPTER_CONFIG_NAME).exists() and not (out / DP_REPORT_NAME).exists()
