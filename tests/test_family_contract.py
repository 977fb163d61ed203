"""Adding a base family is adding a class: a layout dp-diffusers does not know (a toy diffusers pipeline, defined
here) is refused, then trains through train_dp_lora.py, loads and samples once one small family class is
registered. Nothing outside the family class changes."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel
from helpers import base_args, tiny_vq, train

from dp_diffusers import DPLDMPipeline
from dp_diffusers.constants import DP_REPORT_NAME
from dp_diffusers.data import DataError
from dp_diffusers.families import FAMILIES, ClassFamily, UnsupportedBaseError, register_family

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = {i: str(i) for i in range(10)}


class ToyLDMPipeline(DiffusionPipeline):
    """A public base layout of its own: a VQ autoencoder and a UNet2DModel that adds class labels to its time
    embedding (``num_class_embeds``), class names in ``model_index.json``."""

    def __init__(self, vqvae, unet, scheduler):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler)


class ToyFamily(ClassFamily):
    """The whole contract of the toy layout."""

    name = "toy-ldm"
    pipeline_class_name = "ToyLDMPipeline"
    description = "a test's toy layout: VQModel + class-embedding UNet2DModel"
    lora_target_presets = {"attention": ["to_q", "to_k", "to_v", "to_out.0"]}
    predictions = 0  # how often the family's own denoiser call ran

    @classmethod
    def pipeline_class(cls):
        return ToyLDMPipeline

    @classmethod
    def components(cls, pretrained_model_name_or_path, **kwargs):
        toy = ToyLDMPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
        id2label = DiffusionPipeline.load_config(str(pretrained_model_name_or_path))["id2label"]
        return {"vae": toy.vqvae, "unet": toy.unet, "scheduler": toy.scheduler, "id2label": id2label}

    @classmethod
    def num_classes(cls, modules):
        return modules.unet.config.num_class_embeds

    @classmethod
    def null_class_id(cls, modules):
        return None  # no null class: no label dropout, no guidance

    @classmethod
    def add_classes(cls, pipe, count):
        raise DataError("The toy base cannot learn new classes.")

    @classmethod
    def predict(cls, denoiser, noisy_latents, timesteps, conditions):
        cls.predictions += 1
        return denoiser.backbone(noisy_latents, timesteps, class_labels=conditions["class_labels"])


@pytest.fixture
def toy_base(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=8,
                       num_class_embeds=10)  # fmt: skip
    folder = tmp_path / "toy-base"
    ToyLDMPipeline(vqvae=tiny_vq(), unet=unet, scheduler=DDIMScheduler()).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "id2label": DIGITS}))
    return folder


@pytest.fixture
def registered():
    register_family(ToyFamily)
    yield ToyFamily
    FAMILIES.pop(ToyFamily.pipeline_class_name)


def test_a_new_family_is_one_class(toy_base, tmp_path, request):
    with pytest.raises(UnsupportedBaseError, match="ToyLDMPipeline"):
        DPLDMPipeline.from_pretrained(toy_base)
    request.getfixturevalue("registered")
    out = tmp_path / "adapter"
    train(base_args(toy_base, out, **{"--samples_per_class": 1, "--num_inference_steps": 2, "--learning_rate": 0.1}))
    assert ToyFamily.predictions > 0
    report = json.loads((out / DP_REPORT_NAME).read_text())
    assert report["steps"] == 4 and all(".attentions." in name for name in report["adapted_modules"])
    assert json.loads((out / "dp_lora_config.json").read_text())["base_family"] == "toy-ldm"

    tuned, base = DPLDMPipeline.from_pretrained(out), DPLDMPipeline.from_pretrained(toy_base)
    assert tuned.family is ToyFamily and tuned.get_active_adapters() and tuned.num_classes == 10
    images = [pipe(class_labels=[3, 7], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="np").images for pipe in (tuned, base)]  # fmt: skip
    assert images[0].shape == (2, 16, 16, 1) and not (images[0] == images[1]).all()
