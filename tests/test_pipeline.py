"""DPLDMPipeline: sampling, DP-LoRA adapter folders (load, scale, fuse/unfuse, unload, mismatches, Hub), the
unconditional CompVis layout, and the ``dp-diffusers`` command. Offline, tiny models."""

import json
import re
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from helpers import (
    T5_LENGTH,
    scheduler,
    script,
    tiny_cond_unet,
    tiny_uncond_unet,
    tiny_vae,
    tiny_vq,
    write_adapter,
    write_text_adapter,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dp_diffusers import ClassEmbedder, DPLDMPipeline, UNet2DModelWithLoRA, cli
from dp_diffusers.constants import ADAPTER_CONFIG_NAME, LORA_WEIGHT_NAME
from dp_diffusers.lora import LORA_TARGET_PRESETS


def sample(pipe, **kw):
    kw.setdefault("class_labels", [3, 7])
    return pipe(num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0), **kw).images


def lora_weights(pipe) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights by module and part, whatever the adapter's name (``default``, ``default_0``...)."""
    return {
        re.sub(r"\.default(_\d+)?\.", ".", name): param.detach().clone()
        for name, param in pipe.unet.named_parameters()
        if "lora_" in name
    }


def lora_layers(pipe) -> list[str]:
    return sorted(name for name, module in pipe.unet.named_modules() if isinstance(module, BaseTunerLayer))


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_images(tiny_base):
    return sample(DPLDMPipeline.from_pretrained(tiny_base))


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory):
    """(adapter folder, samples of the in-memory model it was saved from)."""
    pipe = DPLDMPipeline.from_pretrained(tiny_base)
    folder = write_adapter(tmp_path_factory.mktemp("adapter"), pipe.unet, tiny_base)
    return folder, sample(pipe)


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


def test_set_scheduler_swaps_the_sampler_and_keeps_the_noise_schedule(tiny_base):
    pipe = DPLDMPipeline.from_pretrained(tiny_base)
    ddim = sample(pipe)
    pipe.set_scheduler("DPMSolverMultistepScheduler")

    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert torch.equal(pipe.scheduler.betas, DPLDMPipeline.from_pretrained(tiny_base).scheduler.betas)
    first, again = sample(pipe), sample(pipe)  # the multistep solver's history restarts with every call
    assert torch.equal(first, again) and not torch.equal(first, ddim)
    with pytest.raises(ValueError, match="not a diffusers scheduler.*DPMSolverMultistepScheduler"):
        pipe.set_scheduler("UNet2DModel")


@pytest.mark.parametrize("targets", sorted(LORA_TARGET_PRESETS))
def test_every_lora_weight_loads_back_for_every_target_preset(tiny_base, tmp_path, targets):
    """Attention next to proj_in / convolution adapters: once saved in two namings, of which diffusers loaded one."""
    pipe = DPLDMPipeline.from_pretrained(tiny_base)
    folder = write_adapter(tmp_path / "adapter", pipe.unet, tiny_base, targets=targets)
    saved = lora_weights(pipe)
    loaded = lora_weights(DPLDMPipeline.from_pretrained(folder))
    assert sorted(loaded) == sorted(saved) and any(".attn1.to_q." in n for n in loaded)
    for name, weight in saved.items():
        assert torch.equal(loaded[name], weight), name


def test_adapter_file_mixing_diffusers_and_peft_names_loads_whole(tiny_base, tmp_path):
    """Files of earlier versions: attention weights in diffusers' old `.lora.down` naming, the rest in peft's."""
    pipe = DPLDMPipeline.from_pretrained(tiny_base)
    folder = write_adapter(tmp_path / "adapter", pipe.unet, tiny_base, targets="attention+proj+conv_out")
    path = folder / LORA_WEIGHT_NAME
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    mixed = {
        re.sub(r"(to_[qkv]|to_out\.0)\.lora_([AB])", lambda m: f"{m[1]}.lora.{'down' if m[2] == 'A' else 'up'}", k): v
        for k, v in load_file(path).items()
    }
    assert any(".lora.down." in k for k in mixed) and any(".lora_A." in k for k in mixed)
    save_file(mixed, str(path), metadata=metadata)
    saved, loaded = lora_weights(pipe), lora_weights(DPLDMPipeline.from_pretrained(folder))
    assert sorted(loaded) == sorted(saved)
    for name, weight in saved.items():
        assert torch.equal(loaded[name], weight), name


def test_adapter_folder_loads_as_trained_and_scales(tiny_base, adapter, base_images):
    folder, trained = adapter
    pipe = DPLDMPipeline.from_pretrained(folder)  # reads dp_lora_config.json, loads the base, applies the LoRA
    tuned = sample(pipe)
    assert torch.equal(tuned, trained)  # rank 2, alpha 8: the LoraConfig of the file's metadata is used
    assert not torch.allclose(tuned, base_images, atol=1e-3)

    manual = DPLDMPipeline.from_pretrained(tiny_base)
    manual.load_lora_weights(folder, adapter_name="dp")
    assert manual.get_active_adapters() == ["dp"] and torch.equal(sample(manual), tuned)
    manual.set_adapters("dp", 0.0)
    assert torch.equal(sample(manual), base_images)
    manual.set_adapters("dp", 1.0)
    assert torch.equal(sample(manual), tuned)

    from_dict = DPLDMPipeline.from_pretrained(tiny_base)
    with safe_open(str(folder / LORA_WEIGHT_NAME), "pt") as f:
        metadata = json.loads(f.metadata()[LORA_ADAPTER_METADATA_KEY])
    from_dict.load_lora_weights(load_file(folder / LORA_WEIGHT_NAME), metadata=metadata)
    assert from_dict.get_active_adapters() == ["default_0"] and torch.equal(sample(from_dict), tuned)


def test_train_dp_lora_output_folder_loads(tiny_base, base_images, tmp_path):
    """The contract with train_dp_lora.py: its output folder loads, with LoRA on the modules it reports."""
    out = tmp_path / "dp-lora"
    script("train_dp_lora").main([str(a) for a in [
        "--pretrained_model_name_or_path", tiny_base, "--output_dir", out, "--max_train_samples", 40,
        "--batch_size", 8, "--max_train_steps", 2, "--samples_per_class", 0, "--target_delta", 1e-3,
    ]])  # fmt: skip
    pipe = DPLDMPipeline.from_pretrained(out)
    report = json.loads((out / "dp_report.json").read_text())
    assert lora_layers(pipe) == report["adapted_modules"] and pipe.get_active_adapters() == ["default_0"]
    assert not torch.equal(sample(pipe), base_images)


def test_fuse_unfuse_unload_and_saving_a_fused_model(adapter, base_images, tmp_path):
    folder, trained = adapter
    pipe = DPLDMPipeline.from_pretrained(folder)
    pipe.fuse_lora()
    fused = sample(pipe)
    assert torch.allclose(fused, trained, atol=1e-5)
    pipe.unfuse_lora()
    assert torch.equal(sample(pipe), trained)  # the weights before fusing are put back bit for bit
    pipe.unload_lora_weights()
    assert not lora_layers(pipe) and torch.equal(sample(pipe), base_images)

    pipe.load_lora_weights(folder)
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="unload_lora_weights"):
        pipe.save_pretrained(tmp_path / "refused")
    pipe.unload_lora_weights()  # the fused adapter stays in the weights
    assert torch.equal(sample(pipe), fused)
    pipe.save_pretrained(tmp_path / "fused")
    assert torch.equal(sample(DPLDMPipeline.from_pretrained(tmp_path / "fused")), fused)


def test_adapter_class_embedding_replaces_the_base_classes_until_unloaded(tiny_base, base_images, tmp_path):
    base = DPLDMPipeline.from_pretrained(tiny_base)
    torch.manual_seed(2)
    embedder = ClassEmbedder(11, 16)  # the base's 10 digits and a new class
    id2label = {**{i: str(i) for i in range(10)}, 10: "cat"}
    folder = write_adapter(tmp_path / "adapter", base.unet, tiny_base, class_embedder=embedder, id2label=id2label)

    pipe = DPLDMPipeline.from_pretrained(folder)
    assert pipe.class_embedder.config.num_classes == 11 and pipe.get_label_ids(["cat", "3"]) == [10, 3]
    assert sample(pipe, class_labels=pipe.get_label_ids(["cat"])).shape == (1, 1, 16, 16)
    assert pipe.config.id2label[10] == "cat"  # what save_pretrained records, e.g. after fusing

    pipe.unload_lora_weights()
    assert pipe.class_embedder.config.num_classes == 10 and torch.equal(sample(pipe), base_images)
    with pytest.raises(ValueError, match="Unknown class label"):
        pipe.get_label_ids(["cat"])


def test_mismatched_adapter_names_adapter_and_base(adapter, tiny_base, tmp_path):
    folder, _ = adapter

    def fails(base_path, reason, adapter_folder=folder):
        pipe = DPLDMPipeline.from_pretrained(base_path)
        names = f"adapter {str(adapter_folder)!r} does not fit the base model {str(base_path)!r}: "
        with pytest.raises(ValueError, match=f"{re.escape(names)}.*{re.escape(reason)}"):
            pipe.load_lora_weights(adapter_folder)
        assert not lora_layers(pipe)  # nothing half-loaded

    uncond = tmp_path / "uncond"
    DPLDMPipeline(vae=tiny_vq(), unet=tiny_uncond_unet(), scheduler=scheduler()).save_pretrained(uncond)
    fails(uncond, "the base has no layer for its LoRA weights of down_blocks.1.attentions.0")

    no_mid = tmp_path / "no-mid"  # every other module fits: peft alone would only warn
    unet = UNet2DConditionModel(**{**tiny_cond_unet().config, "mid_block_type": None})  # from_config drops None
    DPLDMPipeline(vae=tiny_vae(), unet=unet, scheduler=scheduler(),
                  class_embedder=ClassEmbedder(10, 16)).save_pretrained(no_mid)  # fmt: skip
    fails(no_mid, "no layer for its LoRA weights of mid_block.attentions.0")

    wide = tmp_path / "wide"
    unet = UNet2DConditionModel.from_config({**tiny_cond_unet().config, "block_out_channels": (16, 48)})
    DPLDMPipeline(vae=tiny_vae(), unet=unet, scheduler=scheduler(),
                  class_embedder=ClassEmbedder(10, 16)).save_pretrained(wide)  # fmt: skip
    fails(wide, "do not match the shapes of down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k")

    other_classes = shutil.copytree(folder, tmp_path / "letters")
    config = json.loads((other_classes / ADAPTER_CONFIG_NAME).read_text())
    (other_classes / ADAPTER_CONFIG_NAME).write_text(json.dumps({**config, "id2label": dict(enumerate("abcdefghij"))}))
    fails(tiny_base, "its classes", adapter_folder=other_classes)

    narrow_embedding = write_adapter(
        tmp_path / "narrow", tiny_cond_unet(), tiny_base, class_embedder=ClassEmbedder(10, 8)
    )
    fails(tiny_base, "class embedding has 8 dimensions", adapter_folder=narrow_embedding)


def test_base_found_relative_to_the_adapter_and_hub_adapters(adapter, tiny_base, tmp_path, monkeypatch):
    folder, trained = adapter
    run = tmp_path / "run"  # trained in `run` with --pretrained_model_name_or_path base --output_dir out/dp
    shutil.copytree(tiny_base, run / "base")
    moved = shutil.copytree(folder, run / "out" / "dp")
    config = json.loads((moved / ADAPTER_CONFIG_NAME).read_text())
    (moved / ADAPTER_CONFIG_NAME).write_text(json.dumps({**config, "base_model": "base"}))
    monkeypatch.chdir(tmp_path)
    assert torch.equal(sample(DPLDMPipeline.from_pretrained(moved)), trained)

    for missing in ("nobody/no-such-base", str(tmp_path / "deleted-base")):
        (moved / ADAPTER_CONFIG_NAME).write_text(json.dumps({**config, "base_model": missing}))
        with pytest.raises(OSError, match=f"{re.escape(str(moved))}.*{re.escape(missing)}"):
            DPLDMPipeline.from_pretrained(moved)

    module = "dp_diffusers.loaders"  # where adapters are fetched from the Hub
    with (
        mock.patch(f"{module}.hf_hub_download", return_value=str(folder / ADAPTER_CONFIG_NAME)) as download,
        mock.patch(f"{module}.snapshot_download", return_value=str(folder)) as snapshot,
    ):
        pipe = DPLDMPipeline.from_pretrained("me/dp-lora-digits", revision="v1")
    assert download.call_args.args == ("me/dp-lora-digits", ADAPTER_CONFIG_NAME)
    assert download.call_args.kwargs == {"revision": "v1"}
    assert snapshot.call_args.kwargs["allow_patterns"] == [ADAPTER_CONFIG_NAME, LORA_WEIGHT_NAME]
    assert torch.equal(sample(pipe), trained)


def test_unconditional_compvis_layout_with_an_adapter(tmp_path):
    DPLDMPipeline(vae=tiny_vq(), unet=tiny_uncond_unet(), scheduler=scheduler()).save_pretrained(tmp_path / "ldm")
    base = DPLDMPipeline.from_pretrained(tmp_path / "ldm")
    assert base.class_embedder is None and base.num_classes is None
    base_images = sample(base, class_labels=None, batch_size=2)
    assert base_images.shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="unconditional"):
        base(class_labels=[1])

    unet = UNet2DModelWithLoRA.from_config(base.unet.config)
    unet.load_state_dict(base.unet.state_dict())
    folder = write_adapter(tmp_path / "adapter", unet, tmp_path / "ldm")
    pipe = DPLDMPipeline.from_pretrained(folder)
    assert isinstance(pipe.unet, UNet2DModelWithLoRA)
    tuned = sample(pipe, class_labels=None, batch_size=2)
    assert not torch.allclose(tuned, base_images, atol=1e-3)
    pipe.set_adapters(pipe.get_active_adapters(), 0.0)
    assert torch.equal(sample(pipe, class_labels=None, batch_size=2), base_images)
    pipe.set_adapters(pipe.get_active_adapters(), 1.0)

    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = sample(pipe, class_labels=None, batch_size=2)
    assert torch.allclose(fused, tuned, atol=1e-5)
    pipe.save_pretrained(tmp_path / "fused")  # records dp_diffusers' UNet2DModelWithLoRA
    again = DPLDMPipeline.from_pretrained(tmp_path / "fused")
    assert isinstance(again.unet, UNet2DModelWithLoRA)
    assert torch.equal(sample(again, class_labels=None, batch_size=2), fused)

    out = str(tmp_path / "u.png")
    cli.main(["sample", str(tmp_path / "ldm"), "--num_images", "3", "--num_inference_steps", "2", "--out", out])
    assert image_size(tmp_path / "u.png") == (24 + 3 * 64, 64)


def test_cli_card_sample_and_push_offline(adapter, tmp_path, capsys):
    folder = shutil.copytree(adapter[0], tmp_path / "adapter")
    cli.main(["card", str(folder), "--repo_id", "me/dp-lora"])
    assert 'from_pretrained("me/dp-lora")' in (folder / "README.md").read_text()

    grid = tmp_path / "grid.png"
    cli.main(["sample", str(folder), "--labels", "3", "7", "--num_images", "2", "--num_inference_steps", "2",
              "--out", str(grid)])  # fmt: skip
    assert image_size(grid) == (24 + 2 * 64, 2 * 64)  # label margin + 2 images of 16 px x4, 2 rows
    with pytest.raises(SystemExit):
        cli.main(["sample", str(folder), "--labels", "cat", "--out", str(grid)])
    assert "Unknown class label(s) ['cat']" in capsys.readouterr().err

    (folder / "README.md").unlink()
    with mock.patch("dp_diffusers.hub.HfApi") as api_class:
        api = api_class.return_value
        api.create_repo.return_value = mock.Mock(repo_id="me/dp-lora")
        api.upload_folder.return_value = mock.Mock(pr_url="https://huggingface.co/me/dp-lora/discussions/1")
        cli.main(["push", str(folder), "--repo_id", "me/dp-lora", "--private", "--create_pr"])
    assert (folder / "README.md").is_file()  # the card is written before the upload
    assert api.create_repo.call_args.kwargs["private"] is True
    assert api.upload_folder.call_args.kwargs["create_pr"] is True
    assert capsys.readouterr().out.strip().endswith("/discussions/1")


#: text bases: (fixture, their own diffusers pipeline, image side, T5 base)
TEXT_BASES = {"sd": ("tiny_sd_base", "StableDiffusionPipeline", 16, False),
              "sdxl": ("tiny_sdxl_base", "StableDiffusionXLPipeline", 16, False),
              "sd3": ("tiny_sd3_base", "StableDiffusion3Pipeline", 16, True),
              "flux": ("tiny_flux_base", "FluxPipeline", 32, True)}  # fmt: skip


@pytest.mark.parametrize("name", list(TEXT_BASES))
def test_a_text_adapter_samples_as_its_base_pipeline_with_the_adapter_called_the_same_way(name, request, tmp_path):
    """``DPLDMPipeline.from_pretrained(adapter)(prompt=...)`` and ``<Pipeline>.from_pretrained(base)`` +
    ``load_lora_weights(adapter)``, called with only prompt, steps, size and generator, give the same images: every
    other argument takes the base pipeline's own default on both sides (its guidance scale, SD3's 256 and FLUX's
    512 T5 tokens), although the adapter records a training T5 length. The arguments it was trained at
    (``trained_call_kwargs``), passed to both, give the same images too."""
    import diffusers

    fixture, pipeline_name, size, t5 = TEXT_BASES[name]
    base = request.getfixturevalue(fixture)
    recorded = {"resolution": size, "max_sequence_length": T5_LENGTH if t5 else None}
    adapter = write_text_adapter(tmp_path / "adapter", base, **recorded)
    ours = DPLDMPipeline.from_pretrained(adapter)
    standard = getattr(diffusers, pipeline_name).from_pretrained(base)
    standard.load_lora_weights(adapter)

    def images(pipe, **kwargs):
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt=["a public prompt", "another"], num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0), **{"height": size, "width": size, **kwargs}).images

    torch.testing.assert_close(images(ours), images(standard), rtol=0, atol=0)
    trained = ours.trained_call_kwargs()
    assert trained == {"height": size, "width": size, **({"max_sequence_length": T5_LENGTH} if t5 else {})}
    torch.testing.assert_close(images(ours, **trained), images(standard, **trained), rtol=0, atol=0)
    with pytest.raises(TypeError, match="takes no argument no_such_argument"):
        ours(prompt="a", no_such_argument=1)

