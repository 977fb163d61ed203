"""DPLDMPipeline: sampling, adapter loading, fuse/unfuse, unconditional CompVis layout."""

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import scheduler, tiny_uncond_unet
from diffusers import VQModel

from dp_diffusers import DPLDMPipeline, UNet2DModelWithLoRA

ROOT = Path(__file__).resolve().parents[1]


def sample(pipe, **kw):
    kw.setdefault("class_labels", [3, 7])
    return pipe(num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0), **kw).images


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    spec = importlib.util.spec_from_file_location("train_dp_lora", ROOT / "training_scripts" / "train_dp_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(a) for a in [
        "--pretrained_model_name_or_path", tiny_base, "--output_dir", out, "--max_train_samples", 100,
        "--batch_size", 20, "--max_train_steps", 3, "--samples_per_class", 0, "--target_delta", 1e-3,
        "--learning_rate", 0.05, "--init_lora_weights", "true",
    ]])  # fmt: skip
    return out


def test_outputs_and_determinism(tiny_base):
    pipe = DPLDMPipeline.from_pretrained(tiny_base)
    a, b = sample(pipe), sample(pipe)
    assert a.shape == (2, 1, 16, 16) and torch.equal(a, b)
    assert pipe(class_labels=[1], num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 1)
    pil = pipe(class_labels=pipe.get_label_ids(["5"]), num_images_per_prompt=2, num_inference_steps=2).images
    assert len(pil) == 2 and pil[0].size == (16, 16)
    with pytest.raises(ValueError, match="knows"):
        pipe.get_label_ids(["cat"])
    with pytest.raises(ValueError, match="Unknown class id"):
        pipe(class_labels=[12], num_inference_steps=2)


def test_adapter_changes_samples_and_unfuse_restores_base(tiny_base, adapter):
    base_images = sample(DPLDMPipeline.from_pretrained(tiny_base))
    pipe = DPLDMPipeline.from_pretrained(adapter)  # reads dp_lora_config.json, loads the base, applies LoRA
    tuned = sample(pipe)
    assert not torch.allclose(tuned, base_images, atol=1e-4)

    manual = DPLDMPipeline.from_pretrained(tiny_base)
    manual.load_lora_weights(adapter)
    assert torch.equal(sample(manual), tuned)

    manual.set_adapters("default", 0.0)
    assert torch.allclose(sample(manual), base_images, atol=1e-6)
    manual.set_adapters("default", 1.0)

    pipe.fuse_lora()
    assert torch.allclose(sample(pipe), tuned, atol=1e-4)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    # peft unmerges by subtracting the LoRA delta: equal to float rounding, not bit for bit.
    assert torch.allclose(sample(pipe), base_images, atol=1e-5)


def test_adapter_on_a_mismatched_base_names_both(adapter, tmp_path):
    other = tmp_path / "other"
    unet = tiny_uncond_unet()
    DPLDMPipeline(vae=VQModel(in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8,
                              latent_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16),
                  unet=unet, scheduler=scheduler()).save_pretrained(other)  # fmt: skip
    pipe = DPLDMPipeline.from_pretrained(other)
    with pytest.raises(ValueError, match=f"{adapter}.*{other}|does not fit|matched no module"):
        pipe.load_lora_weights(adapter)


def test_unconditional_compvis_layout_round_trip(tmp_path):
    vq = VQModel(in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8, latent_channels=3,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 sample_size=16)  # fmt: skip
    pipe = DPLDMPipeline(vae=vq, unet=tiny_uncond_unet(), scheduler=scheduler())
    pipe.save_pretrained(tmp_path / "ldm")
    loaded = DPLDMPipeline.from_pretrained(tmp_path / "ldm")
    out = loaded(batch_size=2, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="unconditional"):
        loaded(class_labels=[1])
    loaded._ensure_peft_unet()
    assert isinstance(loaded.unet, UNet2DModelWithLoRA) and hasattr(loaded.unet, "load_lora_adapter")
    loaded.save_pretrained(tmp_path / "ldm2")
    again = DPLDMPipeline.from_pretrained(tmp_path / "ldm2")
    assert isinstance(again.unet, UNet2DModelWithLoRA)
