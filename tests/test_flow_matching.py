"""Flow-matching transformer bases, as a user meets them: SD3 / SD3.5 and FLUX.1 folders in the layout
``StableDiffusion3Pipeline`` / ``FluxPipeline.save_pretrained`` writes (tiny CLIP and T5 encoders, T5 tokenizer built
with ``tokenizers``: no download), private captioned images trained through train_dp_lora.py, the adapter loaded
with each pipeline's standard ``load_lora_weights``."""

import functools
import json
import math

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from helpers import (
    T5_DIM,
    T5_LENGTH,
    TEXT_DIM,
    TEXT_LENGTH,
    TextRuns,
    base_args,
    caption_folder,
    digit_folder,
    fixed_loss,
    flow_scheduler,
    lora_denoiser,
    private,
    save_flux_base,
    save_sd3_base,
    save_sd3_patch_base,
    train,
)
from huggingface_hub import ModelCard
from safetensors import safe_open
from torch.utils.data import TensorDataset

from dp_diffusers import DPLDMPipeline
from dp_diffusers.constants import ADAPTER_CONFIG_NAME, DP_REPORT_NAME, LORA_WEIGHT_NAME
from dp_diffusers.data import DataError
from dp_diffusers.families import FluxFamily, StableDiffusion3Family, UnsupportedBaseError
from dp_diffusers.models.objectives import FlowMatching
from dp_diffusers.privacy import private_backward

pytestmark = pytest.mark.usefixtures("one_thread")

FLOW = TextRuns(batch_size=6, steps=2, guidance_scale=3.0, secret="xylophonequartz",
                flags={"--max_sequence_length": T5_LENGTH})
#: the bases of the end-to-end tests: (fixture or builder, diffusers pipeline class, image side, what diffusers'
#: from_pretrained needs: a base without T5 is loaded with text_encoder_3=None, as diffusers documents)
NO_T5 = {"text_encoder_3": None, "tokenizer_3": None}
BASES = {
    "sd3": ("tiny_sd3_base", StableDiffusion3Pipeline, 16, {}),
    "sd3-without-t5": (lambda tmp: save_sd3_base(tmp / "sd3-no-t5", with_t5=False), StableDiffusion3Pipeline, 16,
                       NO_T5),  # fmt: skip
    "flux-dev": ("tiny_flux_base", FluxPipeline, 32, {}),
    "flux-schnell": (lambda tmp: save_flux_base(tmp / "schnell", guidance_embeds=False), FluxPipeline, 32, {}),
}


def base_folder(name, request, tmp_path):
    source = BASES[name][0]
    return request.getfixturevalue(source) if isinstance(source, str) else source(tmp_path)


def images(pipe, size, **kwargs):
    return FLOW.images(pipe, height=size, width=size, **kwargs)


def flow_args(base, out, data, size, **flags):
    return FLOW.args(base, out, data, **{"--resolution": size, **flags})


@pytest.mark.parametrize("name", list(BASES))
def test_a_flow_base_trains_and_its_adapter_is_the_pipeline_s_standard_lora(name, request, tmp_path):
    """2 DP steps through the script; the adapter is the pipeline's own LoRA (``transformer.`` keys, a non-default
    alpha in the metadata): ``<Pipeline>.from_pretrained(base)`` + ``load_lora_weights`` gives exactly the images of
    ``DPLDMPipeline.from_pretrained(adapter)``, and they differ from the base's. No caption is written."""
    base, (pipeline_class, size, load) = base_folder(name, request, tmp_path), BASES[name][1:]
    data = FLOW.captioned(tmp_path / "data", 12, sizes=[(size, size), (size + 8, size)])
    out = tmp_path / "adapter"
    train(flow_args(base, out, data, size, **{"--lora_alpha": 4, "--validation_prompt": FLOW.prompts[0],
                                             "--samples_per_class": 1, "--num_inference_steps": 2}))  # fmt: skip
    report = json.loads((out / DP_REPORT_NAME).read_text())
    assert report["steps"] == 2 and report["dataset_size"] == 12 and report["lora_alpha"] == 4
    assert report["training_guidance_scale"] == (1.0 if name == "flux-dev" else None)
    config = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    assert config["max_sequence_length"] == T5_LENGTH
    with safe_open(out / LORA_WEIGHT_NAME, "pt") as weights:
        assert all(key.startswith("transformer.") for key in weights.keys())
        assert json.loads(weights.metadata()["lora_adapter_metadata"])["transformer.lora_alpha"] == 4

    FLOW.assert_standard_adapter(pipeline_class, base, out, load, height=size, width=size,
                                 max_sequence_length=T5_LENGTH)  # fmt: skip
    card = ModelCard.load(out / "README.md")
    assert f"{pipeline_class.__name__}.from_pretrained" in card.text


def test_flow_bases_load_as_their_own_pipelines_sample(tiny_sd3_base, tiny_flux_base):
    for base, pipeline_class, size in ((tiny_sd3_base, StableDiffusion3Pipeline, 16),
                                       (tiny_flux_base, FluxPipeline, 32)):  # fmt: skip
        pipe = FLOW.assert_samples_as(pipeline_class, base, height=size, width=size)  # T5's length: the default
        assert pipe.family.lora_prefix == "transformer"


def test_captions_are_encoded_by_each_pipeline_s_own_encode_prompt(tiny_sd3_base, tiny_flux_base, tmp_path):
    sd3 = DPLDMPipeline.from_pretrained(tiny_sd3_base)
    options = type(sd3.condition_options)(max_sequence_length=T5_LENGTH)
    encoded = StableDiffusion3Family.encode_prompts(sd3, ["a cat", "b"], options)
    context, _, pooled, _ = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_base).encode_prompt(
        "a cat", None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH)
    assert encoded["encoder_hidden_states"].shape == (2, TEXT_LENGTH + T5_LENGTH, T5_DIM)
    torch.testing.assert_close(encoded["encoder_hidden_states"][:1], context)
    torch.testing.assert_close(encoded["pooled_projections"][:1], pooled)
    no_t5 = DPLDMPipeline.from_pretrained(save_sd3_base(tmp_path / "no-t5", with_t5=False))
    context = StableDiffusion3Family.encode_prompts(no_t5, ["a cat"], options)["encoder_hidden_states"]
    assert context.shape == (1, TEXT_LENGTH + T5_LENGTH, T5_DIM) and not context[:, TEXT_LENGTH:].any()

    flux = DPLDMPipeline.from_pretrained(tiny_flux_base)
    encoded = FluxFamily.encode_prompts(flux, ["a cat"], options)
    context, pooled, _ = FluxPipeline.from_pretrained(tiny_flux_base).encode_prompt(
        "a cat", None, device="cpu", max_sequence_length=T5_LENGTH)
    torch.testing.assert_close(encoded["encoder_hidden_states"], context)
    torch.testing.assert_close(encoded["pooled_projections"], pooled)
    assert encoded["pooled_projections"].shape == (1, TEXT_DIM)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none", "sigma_sqrt", "cosmap"])
def test_timestep_density_and_weighting_are_diffusers_own(scheme):
    """For the same draws, the timesteps, sigmas, noisy inputs, target and weights are what diffusers' SD3 / FLUX
    scripts compute (``compute_density_for_timestep_sampling``, ``get_sigmas``' loop,
    ``compute_loss_weighting_for_sd3``)."""
    scheduler = flow_scheduler()
    objective = FlowMatching(scheduler, weighting_scheme=scheme, logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    torch.manual_seed(3)
    timesteps = objective.sample_timesteps(64, "cpu")
    torch.manual_seed(3)
    u = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    expected = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
    torch.testing.assert_close(timesteps, expected, rtol=0, atol=0)
    sigmas = torch.stack([scheduler.sigmas[(scheduler.timesteps == t).nonzero().item()] for t in timesteps])
    torch.testing.assert_close(objective.sigmas(timesteps), sigmas, rtol=0, atol=0)

    latents, noise = torch.randn(64, 4, 2, 2), torch.randn(64, 4, 2, 2)
    seen = []

    def model(noisy, t, conditions):
        seen.append(noisy)
        return torch.ones_like(noisy)

    loss = objective.loss(model, latents, {}, timesteps, noise)
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(seen[0], (1 - s) * latents + s * noise)
    weights = compute_loss_weighting_for_sd3(scheme, s)
    torch.testing.assert_close(loss, (weights * (1 - (noise - latents)) ** 2).flatten(1).mean(1))
    preconditioned = FlowMatching(scheduler, weighting_scheme=scheme, precondition_outputs=True)
    expected = (weights * ((-s) + seen[0] - latents) ** 2).flatten(1).mean(1)  # SD3's: x0 from output * -sigma + noisy
    torch.testing.assert_close(preconditioned.loss(model, latents, {}, timesteps, noise), expected)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("k", [1, 3])
def test_one_enormous_example_moves_the_update_by_exactly_lr_c_over_b(kind, k):
    """Sensitivity under the flow-matching loss: an example whose latents and text embeddings are enormous moves
    the update by exactly lr * C / B (noise off), its k copies averaged before the one clip."""
    torch.manual_seed(0)
    model = lora_denoiser(kind, "attention+ff")
    objective = model.family.objective(flow_scheduler())
    context, pooled = (TEXT_LENGTH + T5_LENGTH, 2 * TEXT_DIM) if kind == "sd3" else (T5_LENGTH, TEXT_DIM)
    columns = [torch.randn(64, context, T5_DIM), torch.randn(64, pooled)]
    names = ["encoder_hidden_states", "pooled_projections"]
    if kind == "flux":
        columns.append(torch.full((64,), 1.0))
        names.append("guidance")
    lr, clip = 0.5, 1e-7
    dp, _ = private(model, TensorDataset(torch.randn(64, 4, 8, 8), *columns), sigma=0.0, clip=clip, batch=8, k=k,
                    lr=lr, planned_steps=10)  # fmt: skip
    timesteps = objective.timesteps_at(torch.randint(0, 1000, (k,)))
    _, loss_fn = fixed_loss(timesteps, torch.randn(k, 4, 8, 8), names, objective)
    enormous = [column[:1] * (1e4 if column.dim() > 1 else 1) for column in columns]
    private_backward(dp.model, dp.optimizer, loss_fn, torch.randn(1, 4, 8, 8) * 1e4, *enormous)
    dp.optimizer.step()
    moved = lr * torch.sqrt(sum((p.grad.double() ** 2).sum() for p in dp.optimizer.params))
    bound = lr * clip / dp.optimizer.expected_batch_size
    assert bound * 0.99 <= moved <= bound * (1 + 1e-4)


def test_flux_presets_adapt_the_single_blocks_mlp_not_the_output_layer():
    model = lora_denoiser("flux", "attention+ff+single")
    adapted = {name.removesuffix(".lora_A.default") for name, _ in model.unet.named_modules()
               if name.endswith(".lora_A.default")}  # fmt: skip
    assert {"single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"} <= adapted
    assert "proj_out" not in adapted and "single_transformer_blocks.0.attn.to_q" in adapted
    assert "transformer_blocks.0.ff_context.net.2" in adapted
    sd3 = lora_denoiser("sd3", "attention")
    adapted = {name for name, _ in sd3.unet.named_modules() if name.endswith(".lora_A.default")}
    assert any(".attn2.to_q." in name for name in adapted) and any(".attn.to_add_out." in name for name in adapted)


def test_bad_flow_inputs_fail_before_anything_is_written(tiny_sd3_base, tiny_flux_base, tiny_sd_base, tmp_path):
    data = caption_folder(tmp_path / "data", [f"caption {i}" for i in range(12)], sizes=[(32, 32)])
    labelled = digit_folder(tmp_path / "labelled", ["cat", "dog"])
    no_t5 = save_flux_base(tmp_path / "flux-no-t5", without=("text_encoder_2",))
    no_clip_g = save_sd3_base(tmp_path / "sd3-no-clip-g", without=("text_encoder_2",))
    schnell = save_flux_base(tmp_path / "schnell", guidance_embeds=False)
    cases = [
        (tiny_flux_base, data, {"--resolution": 30}, DataError, "FLUX packs 2x2 latents.*multiples of 4"),
        (tiny_flux_base, data, {"--train_class_embedding": True}, DataError, "no class embedding"),
        (tiny_sd3_base, labelled, {"--resolution": 16}, DataError, "needs captions.*--caption_template"),
        (no_t5, data, {}, UnsupportedBaseError, "without \\['text_encoder_2'\\]"),
        (no_clip_g, data, {"--resolution": 16}, UnsupportedBaseError, "without \\['text_encoder_2'\\]"),
        (schnell, data, {"--guidance_scale": 3.5}, DataError, "takes no guidance input"),
        (tiny_sd3_base, data, {"--resolution": 16, "--guidance_scale": 3.5}, DataError, "takes no guidance input"),
        (tiny_sd_base, data, {"--resolution": 16}, DataError, "--max_sequence_length: flags of the flow-matching"),
        (tiny_sd_base, data, {"--resolution": 16, "--max_sequence_length": None, "--weighting_scheme": "cosmap"},
         DataError, "--weighting_scheme: flags of the flow-matching"),
        (tiny_flux_base, data, {"--gradient_checkpointing": True, "--grad_sample_mode": "hooks"}, SystemExit, ""),
    ]
    for i, (base, folder, flags, error, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(error, match=message):
            train(flow_args(base, out, folder, 32, **{"--batch_size": 4, **flags}))
        assert not out.exists() or not any(out.iterdir())


def test_sd3_refuses_a_resolution_its_patches_do_not_tile_before_encoding_anything(tiny_sd3_base, tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    """SD3 cuts the latents into patch x patch tokens: --resolution must be a multiple of the autoencoder's factor
    times the patch size (16 for SD3 / SD3.5), StableDiffusion3Pipeline's own multiple. Refused before any image is
    encoded (not at the first step, after encoding the whole data set)."""
    from dp_diffusers import data as data_module

    base = save_sd3_patch_base(tmp_path / "patch-2", tiny_sd3_base)  # autoencoder factor 2, patch 2: multiples of 4
    standard = StableDiffusion3Pipeline.from_pretrained(base)
    with pytest.raises(ValueError, match="divisible by 4"):
        standard(prompt="a", height=18, width=18, num_inference_steps=1)  # diffusers' own check
    pipe = DPLDMPipeline.from_pretrained(base)
    StableDiffusion3Family.check_resolution(pipe, 20)
    with pytest.raises(DataError, match="--resolution 18: SD3 .* 2x2 patches, so it takes multiples of 4; use e.g. 16"):
        StableDiffusion3Family.check_resolution(pipe, 18)

    encoded = []
    monkeypatch.setattr(data_module, "dataset_latents", lambda *args, **kwargs: encoded.append(args) or 1 / 0)
    data = caption_folder(tmp_path / "data", [f"caption {i}" for i in range(8)], sizes=[(18, 18)])
    out = tmp_path / "out"
    with pytest.raises(DataError, match="multiples of 4"):
        train(flow_args(base, out, data, 18, **{"--batch_size": 4}))
    assert not encoded and (not out.exists() or not any(out.iterdir()))


def test_a_sampler_the_family_cannot_use_is_refused_naming_those_it_can(tiny_sd3_base, tiny_flux_base, tiny_sd_base,
                                                                       tmp_path):  # fmt: skip
    """An epsilon-prediction sampler (DPMSolverMultistep) on a flow-matching base samples noise silently: set_scheduler
    and --scheduler refuse it, naming the samplers the family can use (diffusers' compatibles of the base's scheduler,
    and Heun for SD3, which StableDiffusion3Pipeline runs); a flow sampler on an epsilon base is refused too."""
    sd3 = DPLDMPipeline.from_pretrained(tiny_sd3_base)
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler cannot sample a stable-diffusion-3 base .*: "
                       "FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler\\.$"):
        sd3.set_scheduler("DPMSolverMultistepScheduler")
    assert type(sd3.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"  # unchanged
    sd3.set_scheduler("FlowMatchHeunDiscreteScheduler")
    assert images(sd3, 16).shape == (2, 16, 16, 3)
    flux = DPLDMPipeline.from_pretrained(tiny_flux_base)
    for name in ("DPMSolverMultistepScheduler", "DDIMScheduler", "FlowMatchHeunDiscreteScheduler"):
        with pytest.raises(ValueError, match="the samplers it can use: FlowMatchEulerDiscreteScheduler\\.$"):
            flux.set_scheduler(name)
    sd = DPLDMPipeline.from_pretrained(tiny_sd_base)
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler cannot sample a stable-diffusion base.*"
                       "DPMSolverMultistepScheduler"):
        sd.set_scheduler("FlowMatchEulerDiscreteScheduler")
    sd.set_scheduler("DPMSolverMultistepScheduler")

    out = tmp_path / "out"  # the script: refused before anything is read or written
    with pytest.raises(DataError, match="--scheduler: DPMSolverMultistepScheduler cannot sample a stable-diffusion-3"):
        train(base_args(tiny_sd3_base, out, **{"--scheduler": "DPMSolverMultistepScheduler"}))
    assert not out.exists() or not any(out.iterdir())


def test_evaluation_and_sampling_work_at_the_training_resolution_and_t5_length(tiny_sd3_base, tmp_path, monkeypatch,
                                                                                capsys):  # fmt: skip
    """A run at --resolution 8 on a base whose autoencoder's sample_size is 16, without --max_sequence_length:
    dp_lora_config.json records both (8, SD3's default 77); --evaluate samples, audits and scores FID at 8 pixels and
    samples at 77 T5 tokens, and ``dp-diffusers sample`` draws 8-pixel images."""
    from PIL import Image

    from dp_diffusers import cli
    from dp_diffusers.evaluation import evaluate as evaluate_module
    from dp_diffusers.evaluation.fid import InceptionWeightsNotFoundError

    scored, audited, calls = [], [], []

    def fid_sizes(generated, reference, **kwargs):
        scored.append((generated.shape, reference.shape))
        raise InceptionWeightsNotFoundError("offline")  # as without Inception weights: recorded as not computed

    monkeypatch.setattr(evaluate_module, "compute_fid", fid_sizes)
    real_audit = evaluate_module.audit
    monkeypatch.setattr(evaluate_module, "audit", lambda *a, **kw: audited.append(a) or real_audit(*a, **kw))
    real_call = StableDiffusion3Pipeline.__call__
    monkeypatch.setattr(StableDiffusion3Pipeline, "__call__", functools.wraps(real_call)(
        lambda self, *a, **kw: calls.append(kw) or real_call(self, *a, **kw)))
    data = tmp_path / "data"  # an imagefolder with a held-out test/ split
    FLOW.captioned(data / "train", 8, sizes=[(16, 16), (24, 16)])
    FLOW.captioned(data / "test", 4, sizes=[(16, 16)])
    out = tmp_path / "adapter"
    flags = {"--batch_size": 4, "--resolution": 8, "--max_sequence_length": None, "--evaluate": True,
             "--eval_inference_steps": 1}  # fmt: skip
    train(flow_args(tiny_sd3_base, out, data, 8, **flags))
    config = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    assert config["resolution"] == 8 and config["max_sequence_length"] == 77
    assert scored == [((4, 8, 8, 3), (4, 8, 8, 3))]  # one sample per held-out caption, the held-out images: 8 pixels
    member_latents, member_conditions, nonmember_latents = audited[0][1:4]
    assert member_latents.shape == nonmember_latents.shape == (4, 4, 4, 4)  # latents of 8-pixel images
    assert member_conditions["encoder_hidden_states"].shape[1] == TEXT_LENGTH + 77
    sampled = [call for call in calls if "prompt" in call]
    assert sampled and all(call["height"] == call["width"] == 8 and call["max_sequence_length"] == 77
                           for call in sampled)  # fmt: skip

    grid = tmp_path / "grid.png"
    cli.main(["sample", str(out), "--prompts", "a cat", "--num_images", "1", "--num_inference_steps", "1",
              "--device", "cpu", "--out", str(grid)])  # fmt: skip
    capsys.readouterr()
    with Image.open(grid) as image:
        assert image.size[1] == 8 * 4  # one row of 8-pixel images, upscaled 4x


def test_samples_png_is_drawn_at_the_run_s_max_sequence_length(tiny_sd3_base, tmp_path):
    """samples.png of a run with --max_sequence_length is the image StableDiffusion3Pipeline + load_lora_weights
    draws at that T5 length (not at the family's default 77)."""
    from PIL import Image

    from dp_diffusers.constants import SAMPLES_NAME
    from dp_diffusers.visualization import labelled_grid

    data = FLOW.captioned(tmp_path / "data", 8, sizes=[(16, 16)])
    out = tmp_path / "adapter"
    train(flow_args(tiny_sd3_base, out, data, 16, **{"--batch_size": 4, "--validation_prompt": FLOW.prompts[0],
                                                    "--samples_per_class": 2, "--num_inference_steps": 2}))  # fmt: skip
    assert json.loads((out / ADAPTER_CONFIG_NAME).read_text())["max_sequence_length"] == T5_LENGTH
    standard = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_base)
    standard.load_lora_weights(out)
    standard.set_progress_bar_config(disable=True)
    drawn = standard(prompt=[FLOW.prompts[0]], num_images_per_prompt=2, num_inference_steps=2, height=16, width=16,
                     generator=torch.Generator().manual_seed(0), max_sequence_length=T5_LENGTH).images  # fmt: skip
    with Image.open(out / SAMPLES_NAME) as written:
        np.testing.assert_array_equal(np.asarray(written.convert("RGB")), np.asarray(labelled_grid([drawn], ["1"])))


def test_guidance_is_each_example_s_training_guidance_and_never_dropped(tiny_flux_base, tmp_path):
    """A guidance-distilled FLUX base gets the training guidance (default 1) as a per-example condition; caption
    dropout replaces the text embeddings only."""
    from dp_diffusers.families import ConditionOptions, PrivateExamples

    pipe = DPLDMPipeline.from_pretrained(tiny_flux_base)
    data = caption_folder(tmp_path / "d", ["a", "b", "c"], sizes=[(32, 32)])
    from dp_diffusers.data import load_image_dataset

    dataset = load_image_dataset(train_data_dir=str(data))
    for given, expected in ((None, 1.0), (3.5, 3.5)):
        options = ConditionOptions(max_sequence_length=T5_LENGTH, guidance_scale=given)
        examples = PrivateExamples(dataset, "image", 32, captions=list(dataset["text"]), options=options)
        conditions = FluxFamily.encode_conditions(pipe, examples)
        assert conditions["guidance"].tolist() == [expected] * 3
    assert set(FluxFamily.null_condition(pipe, options)) == {"encoder_hidden_states", "pooled_projections"}
    assert math.isclose(FluxFamily.guidance_scale(ConditionOptions()), 1.0)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_expanded_weights_mode_also_gives_the_per_sample_gradients(kind):
    """opacus' fourth mode (``ew``) on the transformers too (the other three: test_privacy_gradients.py)."""
    from functools import partial

    from helpers import assert_per_example_close, gradient_case, per_sample_gradients, reference_grads

    from dp_diffusers.privacy import average_over_copies

    model, reference, latents, conditions, timesteps, noise = gradient_case(partial(lora_denoiser, kind, "attention"),
                                                                            2, 3, seed=1)  # fmt: skip
    _, objective = per_sample_gradients(model, latents, conditions, timesteps, noise, 2, "ew")
    got = {n: average_over_copies(p.grad_sample, 2) for n, p in model.named_parameters() if p.requires_grad}
    assert_per_example_close(got, reference_grads(reference, objective, latents, conditions, timesteps, noise, 2), 1e-6)
