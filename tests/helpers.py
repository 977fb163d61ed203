"""Shared test helpers (as opacus' ``tests/utils.py``): tiny random models, the training scripts as a user runs
them, adapter folders, the one-example-at-a-time gradient reference and the DP wiring with test settings.

Test files import from here, never from each other or from ``conftest`` (which holds only fixtures).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    LDMPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dp_diffusers import ClassEmbedder, LatentDenoiser, NoisePrediction
from dp_diffusers.constants import ADAPTER_CONFIG_NAME, LORA_WEIGHT_NAME
from dp_diffusers.families import (
    CompVisLDMFamily,
    DiTFamily,
    DPLDMFamily,
    FluxFamily,
    StableDiffusion3Family,
    StableDiffusionFamily,
    StableDiffusionXLFamily,
)
from dp_diffusers.lora import LORA_TARGET_PRESETS, add_lora, make_lora_config, resolve_target_modules, save_lora_weights
from dp_diffusers.models import DiTClassRows
from dp_diffusers.privacy import DPTraining, PrivacyBudget, make_private, private_backward

ROOT = Path(__file__).resolve().parents[1]
APP_PATH = ROOT / "examples" / "space" / "app.py"

# ---- tiny random models (seconds on 2 CPU cores) ---------------------------------------------------------------


def tiny_vae(channels: int = 1) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=8,
        sample_size=16,
    )


def tiny_vq() -> VQModel:
    torch.manual_seed(0)
    return VQModel(in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8, latent_channels=3,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                   sample_size=16)  # fmt: skip


#: What the tiny UNets share: 8x8x3 latents, two levels, attention at the second.
_TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                  attention_head_dim=8, norm_num_groups=8)  # fmt: skip


def tiny_cond_unet(conv_projection: bool = False) -> UNet2DConditionModel:
    """The class-conditional layout: cross-attention on a 16-dim context (a class embedding)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        **_TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        use_linear_projection=not conv_projection,
    )


def tiny_uncond_unet() -> UNet2DModel:
    """The CompVis unconditional LDM layout: UNet2DModel with attention blocks."""
    torch.manual_seed(0)
    return UNet2DModel(
        **_TINY_UNET, down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")
    )


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False
    )


def perturb_lora_b(model: nn.Module, std: float = 0.1, seed: int | None = None) -> None:
    """LoRA B starts at zero: give it random weights so that every LoRA parameter has a gradient and the
    adapter changes the model's output."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)


def lora_denoiser(kind: str, targets: str, train_class_embedding: bool = False, rank: int = 2) -> LatentDenoiser:
    """A tiny denoiser with LoRA on ``targets`` (a preset of its family): ``kind`` "cond" (cross-attention on a
    class embedding), "uncond" (the CompVis UNet2DModel layout), "dit" (DiT, class labels through adaLN), "text"
    (Stable Diffusion's layout, a text context through cross-attention) or "sdxl" (SDXL's: a two-encoder context,
    pooled embeddings and time ids through the UNet's text_time embedding)."""
    rows, embedder = None, None
    if kind == "cond":
        unet, family = tiny_cond_unet(conv_projection=targets != "attention"), DPLDMFamily
        embedder = ClassEmbedder(10, unet.config.cross_attention_dim)
    elif kind == "dit":
        unet, family = tiny_dit(), DiTFamily
    elif kind == "text":
        unet, family = tiny_text_unet(), StableDiffusionFamily
    elif kind == "sdxl":
        unet, family = tiny_sdxl_unet(), StableDiffusionXLFamily
    elif kind == "sd3":
        unet, family = tiny_sd3_transformer(), StableDiffusion3Family
    elif kind in ("flux", "flux-schnell"):
        unet, family = tiny_flux_transformer(guidance_embeds=kind == "flux"), FluxFamily
    else:
        unet, family = tiny_uncond_unet(), CompVisLDMFamily
    if kind in ("dit", "sd3", "flux", "flux-schnell"):
        names = family.lora_targets(targets, unet)
    else:
        names = resolve_target_modules(targets, LORA_TARGET_PRESETS)  # (any UNet preset)
    add_lora(unet, make_lora_config(rank=rank, targets=names, init_lora_weights=True))
    perturb_lora_b(unet)
    if embedder is not None:
        embedder.requires_grad_(train_class_embedding)
    if kind == "dit" and train_class_embedding:  # two private classes DiT lacks, rows after its null class
        rows = DiTClassRows.from_null_row(unet, 2)
        with torch.no_grad():
            rows.embedding.weight.normal_()  # distinct rows, so that each one's gradient is its own
    return LatentDenoiser(unet, family, embedder, rows)


# ---- per-sample gradients: the reference and the DP wiring -----------------------------------------------------

#: (kind, LoRA targets, train the class embedding): every LoRA target family of the exactness tests.
GRADIENT_CASES = [
    ("cond", "attention", False),
    ("cond", "attention+proj", True),
    ("cond", "attention+proj+conv_out", False),
    ("uncond", "attention+proj+conv_out", False),
    ("cond", "attention+resnets", False),  # LoRA on the ResNet blocks' 3x3 convolutions
    ("dit", "attention", False),
    ("dit", "attention+ff+adaln", False),  # the feed-forward and adaLN-Zero projections too
    ("dit", "attention", True),  # with label rows for new classes, shared by every block
    ("text", "attention", False),  # self- and cross-attention, each example's own text context flowing through
    ("sdxl", "attention", False),  # each example's own context, pooled embedding and time ids
    ("sdxl", "attention+proj", False),
    ("sd3", "attention", False),  # joint attention (and SD3.5's attn2) under the flow-matching loss
    ("sd3", "attention+ff", False),
    ("flux", "attention", False),  # packed latents, image / text ids, each example's guidance
    ("flux", "attention+ff", False),
    ("flux", "attention+ff+single", False),  # the single blocks' proj_mlp / proj_out too
    ("flux-schnell", "attention", False),  # no guidance input
]


def latent_shape(model: LatentDenoiser) -> tuple[int, int, int]:
    """One example's latents for ``model``'s tiny denoiser (FLUX's transformer takes them 2x2-packed)."""
    config = model.unet.config
    if model.family is FluxFamily:
        return (config.in_channels // 4, 8, 8)
    return (config.in_channels, config.sample_size, config.sample_size)


def random_conditions(model: LatentDenoiser, n: int) -> dict[str, torch.Tensor]:
    """``n`` examples' own random conditions of the kind ``model``'s family takes (class ids, a caption context,
    SDXL's pooled embedding and time ids); none for an unconditional model."""
    family = model.family
    if family.conditioning == "none":
        return {}
    if family is StableDiffusionFamily:
        return {"encoder_hidden_states": torch.randn(n, TEXT_LENGTH, TEXT_DIM)}
    if family is StableDiffusion3Family:
        return {"encoder_hidden_states": torch.randn(n, TEXT_LENGTH + T5_LENGTH, T5_DIM),
                "pooled_projections": torch.randn(n, 2 * TEXT_DIM)}  # fmt: skip
    if family is FluxFamily:
        conditions = {"encoder_hidden_states": torch.randn(n, T5_LENGTH, T5_DIM),
                      "pooled_projections": torch.randn(n, TEXT_DIM)}  # fmt: skip
        if model.unet.config.guidance_embeds:
            conditions["guidance"] = torch.rand(n) * 4
        return conditions
    if family is StableDiffusionXLFamily:
        sizes = torch.randint(16, 64, (n, 2))
        time_ids = torch.cat([sizes, torch.randint(0, 8, (n, 2)), torch.full((n, 2), 16)], 1).float()
        context = torch.randn(n, TEXT_LENGTH, SDXL_CONTEXT_DIM)
        return {"encoder_hidden_states": context, "text_embeds": torch.randn(n, TEXT_DIM), "time_ids": time_ids}
    labels = torch.randint(0, 10, (n,))
    rows = model.class_rows
    if rows is not None:  # the first examples are of the new classes
        labels[: rows.config.num_rows] = rows.config.first_id + torch.arange(rows.config.num_rows)
    return {"class_labels": labels}


def gradient_case(build: Callable[[], nn.Module], k: int, n: int, seed: int, labelled: bool = True):
    """A model from ``build()``, an untouched copy of it (the reference), and ``n`` examples with k copies each:
    ``(model, reference, latents, conditions, timesteps, noise)``; the conditions (named per-example tensors,
    :func:`random_conditions`) are empty unless ``labelled``."""
    torch.manual_seed(seed)
    model = build()
    reference = copy.deepcopy(model)
    shape = latent_shape(model)
    latents = torch.randn(n, *shape)
    conditions = random_conditions(model, n) if labelled else {}
    timesteps = model_objective(model).timesteps_at(torch.randint(0, 1000, (n * k,)))
    noise = torch.randn(n * k, *shape)
    return model, reference, latents, conditions, timesteps, noise


def flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def fixed_loss(timesteps: torch.Tensor, noise: torch.Tensor, names=("class_labels",), objective=None):
    """``(objective, loss_fn)``: a ``loss_fn`` for ``private_backward`` whose rows use the given timesteps and noise
    (row r: ``timesteps[r]``); its condition columns are ``names`` (a ``None`` column: no such condition); the
    objective: DDPM noise prediction, or the one given."""
    objective = objective or NoisePrediction(scheduler())

    def loss_fn(model, latents, *columns):
        conditions = {name: column for name, column in zip(names, columns) if column is not None}
        return objective.loss(model, latents, conditions, timesteps, noise)

    return objective, loss_fn


def reference_grads(reference: nn.Module, objective, latents, conditions: dict, timesteps, noise, k: int) -> list[dict]:
    """Per-example gradients, one example at a time through plain autograd: example i's k copies use rows
    ``i*k .. i*k+k-1`` of ``timesteps`` and ``noise``, and its gradient is that of their mean loss."""
    params = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    out = []
    for i in range(len(latents)):
        rows = slice(i * k, (i + 1) * k)
        own = {name: value[i : i + 1].repeat_interleave(k, 0) for name, value in conditions.items()}
        copies = latents[i : i + 1].repeat(k, 1, 1, 1)
        loss = objective.loss(reference, copies, own, timesteps[rows], noise[rows]).mean()
        out.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    return out


def assert_per_example_close(got: dict[str, torch.Tensor], ref: list[dict], atol: float) -> None:
    """``got[name][i]`` (a per-sample gradient) equals the reference gradient ``ref[i][name]`` of example i."""
    assert len(ref) > 0 and set(ref[0]) == set(got) and len(got) > 0
    for i, grads in enumerate(ref):
        for name, g in grads.items():
            torch.testing.assert_close(got[name][i], g, rtol=1e-4, atol=atol, msg=f"{name} example {i}")


def private(
    model: nn.Module,
    dataset: TensorDataset,
    *,
    sigma: float,
    clip: float,
    batch: float,
    k: int = 1,
    mode: str = "fused",
    lr: float = 1.0,
    planned_steps: int = 10_000,
    **kw,
) -> tuple[DPTraining, PrivacyBudget]:
    """``make_private`` with plain SGD (lr 1: the update is ``p.grad``) and expected batch ``batch`` (examples, or
    with ``units=`` privacy units); sigma 0 is allowed here (no target epsilon), to compare updates without noise."""
    params = [p for p in model.parameters() if p.requires_grad]
    population = len(kw["units"]) if kw.get("units") is not None else len(dataset)
    budget = PrivacyBudget("prv", sigma, batch / population, 1e-5, planned_steps=planned_steps)
    optimizer = torch.optim.SGD(params, lr=lr)
    dp = make_private(
        model, optimizer, dataset, budget=budget, max_grad_norm=clip, noise_multiplicity=k, grad_sample_mode=mode, **kw
    )
    return dp, budget


def dp_setup(model, noise_multiplier=0.0, max_grad_norm=1e9, k=1, lr=1.0, n=64, batch_size=8) -> DPTraining:
    """The DP step (fused mode) on ``n`` random 3x8x8 latents with labels in 0..9, expected batch ``batch_size``."""
    dataset = TensorDataset(torch.randn(n, 3, 8, 8), torch.randint(0, 10, (n,)))
    dp, _ = private(model, dataset, sigma=noise_multiplier, clip=max_grad_norm, batch=batch_size, k=k, lr=lr,
                    planned_steps=10)  # fmt: skip
    return dp


def model_objective(model: LatentDenoiser):
    """The objective ``model``'s family trains with, on the tiny bases' schedule."""
    return model.family.objective(flow_scheduler() if model.family.lora_prefix == "transformer" else scheduler())


def per_sample_gradients(model, latents, conditions: dict, timesteps, noise, k: int, mode: str = "fused"):
    """One ``private_backward`` of ``latents`` (k copies each, rows using ``timesteps`` / ``noise``) with their
    ``conditions`` through ``make_private`` in ``mode``: the per-sample gradients are then in ``p.grad_sample``.
    Returns (dp, objective): the family's objective."""
    objective, loss_fn = fixed_loss(timesteps, noise, tuple(conditions), model_objective(model))
    dataset = TensorDataset(latents, torch.zeros(len(latents)))
    dp, _ = private(model, dataset, sigma=1.0, clip=1.0, batch=len(latents) / 2, k=k, mode=mode, lr=0.1,
                    planned_steps=1)  # fmt: skip
    private_backward(dp.model, dp.optimizer, loss_fn, latents, *conditions.values())
    return dp, objective


def flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


# ---- the scripts and folders a user works with ------------------------------------------------------------------


def load_module(path: Path, name: str | None = None) -> ModuleType:
    """A script (training script, example, Space app) imported from its file, as a fresh module."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def script(name: str) -> ModuleType:
    """``training_scripts/<name>.py`` as a module (its ``main(argv)`` is the command line)."""
    return load_module(ROOT / "training_scripts" / f"{name}.py")


def train(argv: list) -> None:
    """``train_dp_lora.py ARGV``, in this process."""
    script("train_dp_lora").main([str(a) for a in argv])


def crash_after_checkpoints(monkeypatch, module: ModuleType) -> Callable:
    """``module`` (train_dp_lora.py) raises KeyboardInterrupt right after it saves a checkpoint, as a kill would;
    returns the real ``save_checkpoint`` (patch it back to let a resumed run finish)."""
    real_save = module.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash right after a checkpoint")

    monkeypatch.setattr(module, "save_checkpoint", save_then_crash)
    return real_save


def base_args(tiny_base: Path, out: Path, **overrides) -> list:
    """A 4-step DP run of train_dp_lora.py on 200 examples of the embedded digits. ``None`` drops a flag,
    ``True`` passes a switch."""
    args = {"--pretrained_model_name_or_path": tiny_base, "--output_dir": out, "--max_train_samples": 200,
            "--batch_size": 20, "--max_train_steps": 4, "--samples_per_class": 0, "--epsilon_log_steps": 1,
            "--target_delta": 1e-4}  # fmt: skip
    args.update(overrides)
    return [x for k, v in args.items() if v is not None for x in ([k] if v is True else [k, v])]


def write_adapter(
    folder: Path, unet, base_model, class_embedder=None, id2label=None, targets="attention", lora_std: float = 0.05,
    family=DPLDMFamily,
) -> Path:
    """An adapter folder as train_dp_lora.py writes it for a base of ``family``; LoRA (rank 2, alpha 8) is injected
    into ``unet`` in place, with B weights of std ``lora_std`` (non-zero by default, so that it changes the samples;
    0: a zero adapter)."""
    add_lora(unet, make_lora_config(2, 8.0, targets=targets, presets=family.lora_target_presets))
    perturb_lora_b(unet, std=lora_std, seed=1)
    save_lora_weights(unet, folder, family)
    if class_embedder is not None:
        class_embedder.save_pretrained(folder / "class_embedder")
    embedder_folder = "class_embedder" if class_embedder is not None else None
    config = {"base_model": str(base_model), "revision": None, "lora_weights": LORA_WEIGHT_NAME,
              "class_embedder": embedder_folder, "id2label": id2label, "base_family": family.name}  # fmt: skip
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    return folder


def digit_folder(root: Path, names: list[str], per_class: int = 15) -> Path:
    """An imagefolder of random 16x16 grayscale images, ``per_class`` in each class folder ``names``."""
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.random.default_rng(i).integers(0, 255, (16, 16), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def save_class_base(folder: Path) -> Path:
    """A class-conditional base in the project's own layout (DPLDMPipeline, random weights), digit class names."""
    from dp_diffusers import DPLDMPipeline

    unet = tiny_cond_unet()
    embedder = ClassEmbedder(10, unet.config.cross_attention_dim)
    pipe = DPLDMPipeline(vae=tiny_vae(), unet=unet, scheduler=scheduler(), class_embedder=embedder,
                         id2label={i: str(i) for i in range(10)})  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def save_ldm_base(folder: Path, attention: bool = True) -> Path:
    """A CompVis-style base (``CompVis/ldm-celebahq-256``'s layout, random weights) as diffusers' ``LDMPipeline``
    saves it: ``vqvae`` (VQModel), ``unet`` (UNet2DModel), ``scheduler``. ``attention=False``: a UNet without
    attention blocks."""
    unet = tiny_uncond_unet()
    if not attention:
        torch.manual_seed(0)
        blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
        unet = UNet2DModel(**_TINY_UNET, **blocks, add_attention=False)  # none in the mid block either
    LDMPipeline(vqvae=tiny_vq(), unet=unet, scheduler=scheduler()).save_pretrained(folder)
    return folder


#: The tiny DiT's class names, DiT-style: ImageNet-like ids 0..999, some names with comma-separated synonyms.
DIT_ID2LABEL = {i: f"class {i}" for i in range(1000)} | {0: "zero, 0", 1: "one, 1", 7: "seven, 7"}


def tiny_dit() -> DiTTransformer2DModel:
    """DiT-XL-2's architecture at toy size: patch 2, adaLN-Zero, learned sigma, 1,000 classes + null (diffusers'
    ``DiTPipeline`` hard-codes the null class 1000)."""
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                 norm_num_groups=1)  # fmt: skip


def save_dit_base(folder: Path) -> Path:
    """A ``facebook/DiT-XL-2-256``-style base (random weights): what diffusers' ``DiTPipeline.save_pretrained``
    writes (``transformer``, ``vae``, ``scheduler``), plus ``id2label`` in ``model_index.json`` as the Hub repo has
    it (``DiTPipeline`` does not save it itself)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16)  # fmt: skip
    DiTPipeline(transformer=tiny_dit(), vae=vae, scheduler=scheduler()).save_pretrained(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["id2label"] = {str(k): v for k, v in DIT_ID2LABEL.items()}
    index_path.write_text(json.dumps(index, indent=2))
    return folder


#: The tiny CLIP text encoder's width (the tiny text UNet's cross_attention_dim) and its tokenizer's length.
TEXT_DIM, TEXT_LENGTH = 32, 16


def tiny_text_unet() -> UNet2DConditionModel:
    """SD's UNet layout at toy size: cross-attention on the text encoder's (L, 32) context, 4x8x8 latents."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
                                attention_head_dim=4, norm_num_groups=8)  # fmt: skip


#: The tiny SDXL's context width: its two CLIP encoders' hidden states side by side (SDXL: 768 + 1280 = 2048).
SDXL_CONTEXT_DIM = 2 * TEXT_DIM


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """SDXL's UNet layout at toy size: cross-attention on the two encoders' (L, 64) context, ``text_time`` added
    conditioning (6 time ids of 8 dims each + the 32-dim pooled embedding), 4x8x8 latents."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM,
                                cross_attention_dim=SDXL_CONTEXT_DIM, norm_num_groups=8)  # fmt: skip


def tiny_clip_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, projection_dim=TEXT_DIM, max_position_embeddings=TEXT_LENGTH,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip


def tiny_rgb_vae(sample_size: int = 16, **config) -> AutoencoderKL:
    """A 3-channel AutoencoderKL at toy size: 16x16 images (``sample_size``), 4-channel latents of half the side."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=sample_size, **config)  # fmt: skip


def save_sdxl_base(folder: Path, force_zeros_for_empty_prompt: bool = True, without: tuple[str, ...] = ()) -> Path:
    """An SDXL base (``stabilityai/stable-diffusion-xl-base-1.0``'s layout) with random weights, as diffusers'
    ``StableDiffusionXLPipeline.save_pretrained`` writes it: ``vae`` (with SDXL-style per-channel ``latents_mean`` /
    ``latents_std``), ``text_encoder`` (CLIPTextModel), ``text_encoder_2`` (CLIPTextModelWithProjection), two
    tokenizers, ``unet`` (text_time), ``scheduler`` (Euler, as SDXL's). ``without``: components saved as absent."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(folder / "tokenizer-src")
    vae = tiny_rgb_vae(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 1.0, 2.0], scaling_factor=0.5)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")  # fmt: skip
    components = dict(vae=vae, text_encoder=CLIPTextModel(tiny_clip_config(tokenizer)),
                      text_encoder_2=CLIPTextModelWithProjection(tiny_clip_config(tokenizer)), tokenizer=tokenizer,
                      tokenizer_2=tokenizer, unet=tiny_sdxl_unet(), scheduler=sched)  # fmt: skip
    components.update({name: None for name in without})
    StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                              add_watermarker=False).save_pretrained(folder)  # fmt: skip
    shutil.rmtree(folder / "tokenizer-src")
    return folder


#: The tiny T5's width (its SD3 / FLUX transformer's joint_attention_dim) and token length.
T5_DIM, T5_LENGTH = 64, 24


def tiny_t5(folder: Path):
    """A T5 tokenizer (a Unigram model over printable characters, built with ``tokenizers``: no sentencepiece, no
    download) saved to ``folder``, and a 2-layer ``T5EncoderModel`` of width ``T5_DIM``."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import Metaspace
    from tokenizers.processors import TemplateProcessing
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0), *((c, -2.0) for c in chars),
              *(("\u2581" + c, -1.5) for c in chars)]  # fmt: skip
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer, model.decoder = Metaspace(), decoders.Metaspace()
    model.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                    model_max_length=T5_LENGTH).save_pretrained(folder)  # fmt: skip
    tokenizer = T5TokenizerFast.from_pretrained(folder)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=T5_DIM, d_kv=8, d_ff=37, num_layers=2,
                                      num_heads=4, decoder_start_token_id=0))  # fmt: skip
    return tokenizer, encoder


def tiny_flow_vae(sample_size: int) -> AutoencoderKL:
    """An SD3 / FLUX-style autoencoder at toy size: latents ``(z - shift_factor) * scaling_factor``."""
    return tiny_rgb_vae(sample_size, shift_factor=0.1, scaling_factor=1.5)


def tiny_sd3_transformer(dual_attention: bool = True):
    """SD3's transformer at toy size (2 blocks on 4x8x8 latents, patch 1); ``dual_attention``: SD3.5's second
    attention (``attn2``) in block 0."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=T5_DIM,
                                 pooled_projection_dim=2 * TEXT_DIM, out_channels=4,
                                 dual_attention_layers=(0,) if dual_attention else ())  # fmt: skip


def tiny_flux_transformer(guidance_embeds: bool = True):
    """FLUX's transformer at toy size: 1 double and 1 single block on 2x2-packed 4-channel latents (16 features a
    token); ``guidance_embeds``: FLUX.1-dev's guidance input (schnell has none)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_DIM,
                                  pooled_projection_dim=TEXT_DIM, axes_dims_rope=[4, 4, 8],
                                  guidance_embeds=guidance_embeds)  # fmt: skip


def save_sd3_base(folder: Path, with_t5: bool = True, without: tuple[str, ...] = ()) -> Path:
    """An SD3.5 base (``stabilityai/stable-diffusion-3.5-medium``'s layout, dual attention in block 0) with random
    weights, as ``StableDiffusion3Pipeline.save_pretrained`` writes it: two CLIPTextModelWithProjection encoders with
    their tokenizers, T5 (``with_t5``) with its tokenizer, ``transformer``, ``vae``, flow-matching ``scheduler``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(folder / "tokenizer-src")
    t5_tokenizer, t5 = tiny_t5(folder / "t5-src") if with_t5 else (None, None)
    components = dict(transformer=tiny_sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                      vae=tiny_flow_vae(16), text_encoder=CLIPTextModelWithProjection(tiny_clip_config(tokenizer)),
                      tokenizer=tokenizer, text_encoder_2=CLIPTextModelWithProjection(tiny_clip_config(tokenizer)),
                      tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer)  # fmt: skip
    components.update({name: None for name in without})
    StableDiffusion3Pipeline(**components).save_pretrained(folder)
    for source in ("tokenizer-src", "t5-src"):
        shutil.rmtree(folder / source, ignore_errors=True)
    return folder


def save_flux_base(folder: Path, guidance_embeds: bool = True, without: tuple[str, ...] = ()) -> Path:
    """A FLUX.1 base (``-dev``'s layout with ``guidance_embeds``, ``-schnell``'s without) with random weights, as
    ``FluxPipeline.save_pretrained`` writes it: CLIP and T5 with their tokenizers, ``transformer``, ``vae`` (32x32
    images: 4x16x16 latents, 8x8 packed tokens), flow-matching ``scheduler``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(folder / "tokenizer-src")
    t5_tokenizer, t5 = tiny_t5(folder / "t5-src")
    components = dict(transformer=tiny_flux_transformer(guidance_embeds), vae=tiny_flow_vae(32),
                      scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                      text_encoder=CLIPTextModel(tiny_clip_config(tokenizer)), tokenizer=tokenizer,
                      text_encoder_2=t5, tokenizer_2=t5_tokenizer)  # fmt: skip
    components.update({name: None for name in without})
    FluxPipeline(**components).save_pretrained(folder)
    for source in ("tokenizer-src", "t5-src"):
        shutil.rmtree(folder / source, ignore_errors=True)
    return folder


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` of byte-level characters only (CLIP's 512 base tokens, no merges), saved to ``folder``."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], model_max_length=TEXT_LENGTH)
    tokenizer.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def save_sd_base(folder: Path, prediction_type: str = "epsilon") -> Path:
    """A Stable Diffusion base (SD 1.x's layout; ``v_prediction``: SD 2.x's) with random weights, as diffusers'
    ``StableDiffusionPipeline.save_pretrained`` writes it: ``vae``, ``text_encoder`` (CLIPTextModel), ``tokenizer``
    (CLIPTokenizer), ``unet``, ``scheduler``; no safety checker."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(folder / "tokenizer-src")
    text_encoder = CLIPTextModel(tiny_clip_config(tokenizer))
    vae = tiny_rgb_vae()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)  # fmt: skip
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_text_unet(),
                            scheduler=sched, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)  # fmt: skip
    shutil.rmtree(folder / "tokenizer-src")
    return folder


def caption_folder(root: Path, captions: list[str], sizes: list[tuple[int, int]] | None = None) -> Path:
    """An imagefolder of random RGB images (16x16, or (height, width) ``sizes`` in turn) with captions in
    ``metadata.jsonl`` (its ``text`` column), as diffusers' text-to-image examples lay them out."""
    root.mkdir(parents=True)
    rows = []
    for i, caption in enumerate(captions):
        height, width = sizes[i % len(sizes)] if sizes else (16, 16)
        pixels = np.random.default_rng(i).integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


@dataclass(frozen=True)
class TextRuns:
    """How the tests of a text-to-image family train and sample. :meth:`args`: train_dp_lora.py's flags for 2 DP
    steps of ``batch_size`` on a caption folder (sigma given: the accountant's calibration is tested elsewhere and
    costs seconds a run), with the family's own ``flags``; :meth:`images`: a pipeline's images of ``prompts`` (public;
    ``steps``, ``guidance_scale``; numpy, generator seeded 0). Private captions hold ``secret``, which nothing that a
    run writes may hold."""

    batch_size: int
    steps: int
    guidance_scale: float
    secret: str
    flags: dict = field(default_factory=dict)
    prompts: tuple[str, ...] = ("a public prompt", "another one")
    #: (height, width) of the private images, in turn (16x16 when not given)
    sizes: tuple[tuple[int, int], ...] | None = None

    def captioned(self, root: Path, n: int, sizes: list[tuple[int, int]] | None = None) -> Path:
        """A caption folder (:func:`caption_folder`) of ``n`` images whose captions hold the secret."""
        return caption_folder(root, [f"{self.secret} photo {i}" for i in range(n)], sizes or self.sizes)

    def args(self, base: Path, out: Path, data: Path | None, **flags) -> list:
        defaults = {"--train_data_dir": data, "--max_train_samples": None, "--batch_size": self.batch_size,
                    "--max_train_steps": 2, "--learning_rate": 0.1, "--noise_multiplier": 1.0}  # fmt: skip
        return base_args(base, out, **{**defaults, **self.flags, **flags})

    def images(self, pipe, prompts: Sequence[str] | None = None, **kwargs) -> np.ndarray:
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt=list(prompts or self.prompts), num_inference_steps=self.steps,
                    guidance_scale=self.guidance_scale, generator=torch.Generator().manual_seed(0), output_type="np",
                    **kwargs).images  # fmt: skip

    def assert_samples_as(self, pipeline_class, base: Path, **sampling):
        """``DPLDMPipeline.from_pretrained(base)`` is a text-to-image pipeline that draws exactly the images of
        ``<pipeline_class>.from_pretrained(base)`` and refuses class labels; returns it."""
        from dp_diffusers import DPLDMPipeline

        reference = self.images(pipeline_class.from_pretrained(base), **sampling)
        pipe = DPLDMPipeline.from_pretrained(base)
        assert pipe.conditioning == "text" and pipe.num_classes is None
        np.testing.assert_array_equal(self.images(pipe, **sampling), reference)
        with pytest.raises(ValueError, match="text-to-image: pass prompt"):
            pipe(class_labels=[0], num_inference_steps=1)
        return pipe

    def assert_standard_adapter(self, pipeline_class, base: Path, adapter: Path, load: dict | None = None, **sampling):
        """``<pipeline_class>.from_pretrained(base, **load)`` + its standard ``load_lora_weights(adapter)`` draws
        exactly the images of ``DPLDMPipeline.from_pretrained(adapter)``, and they differ from the base's; and no
        file of the adapter holds the secret. Returns that pipeline."""
        from dp_diffusers import DPLDMPipeline

        standard = pipeline_class.from_pretrained(base, **(load or {}))
        standard.load_lora_weights(adapter)
        tuned = self.images(DPLDMPipeline.from_pretrained(adapter), **sampling)
        np.testing.assert_array_equal(self.images(standard, **sampling), tuned)
        assert not np.array_equal(tuned, self.images(pipeline_class.from_pretrained(base, **(load or {})), **sampling))
        written = [path for path in adapter.rglob("*") if path.is_file() and path.suffix in {".json", ".md", ".txt"}]
        assert written and not any(self.secret in path.read_text() for path in written)
        return standard


def load_app() -> ModuleType:
    """The Space's ``examples/space/app.py``."""
    return load_module(APP_PATH, "space_app")


# ---- the 2-process checks (distributed_worker.py runs them, test_distributed.py replays them) ------------------


@dataclass(frozen=True)
class DistributedChecks:
    """The settings of the 2-process checks, shared by the worker and the test that replays them."""

    n: int = 24  # private examples of the equality and noise checks
    batch: int = 6  # expected global logical batch q * N
    max_k: int = 4
    physical: int = 2  # examples per forward: several physical batches per logical one, their number differing by rank
    equality_cases: tuple = (("fused", 1), ("fused", 4), ("hooks", 1), ("hooks", 4))
    equality_steps: int = 2
    clips: tuple = ((1, 0.15), (4, 0.09))  # by k: clips some examples, not all (the test checks both kinds occur)
    sigma: float = 2.0
    noise_clip: float = 0.5
    noise_steps: int = 6
    poisson_n: int = 40  # with poisson_batch 2: about one example per rank and step, so many empty ones
    poisson_batch: int = 2
    poisson_epochs: int = 50
    unit_size: int = 3  # unit-level checks: the n examples in units of 3 ...
    unit_cap: int = 2  # ... each bringing 2 of them a step
    unit_batch: int = 4  # expected units per logical step
    unit_cases: tuple = (("fused", 1), ("hooks", 4))

    def units(self):
        from dp_diffusers.privacy import PrivacyUnits

        members = [list(range(u, u + self.unit_size)) for u in range(0, self.n, self.unit_size)]
        return PrivacyUnits(members, self.unit_cap)

    def clip(self, k: int) -> float:
        return dict(self.clips)[k]


DIST = DistributedChecks()


def distributed_model(lora_rank: int = 4) -> LatentDenoiser:
    """The same tiny class-conditional denoiser on every call: LoRA on attention+proj (B perturbed
    so every LoRA weight has a gradient) and a trainable class embedding left in eval mode, as
    ``from_pretrained`` leaves it."""
    unet = tiny_cond_unet()
    add_lora(unet, make_lora_config(rank=lora_rank, targets="attention+proj", init_lora_weights=True))
    perturb_lora_b(unet, seed=1)
    embedder = ClassEmbedder(10, unet.config.cross_attention_dim)
    embedder.requires_grad_(True).eval()
    return LatentDenoiser(unet, DPLDMFamily, embedder)


def indexed_examples() -> dict[str, torch.Tensor]:
    """Latents, labels, and per (example, copy) timesteps and diffusion noise, fixed by index."""
    g = torch.Generator().manual_seed(2)
    return {
        "latents": torch.randn(DIST.n, 3, 8, 8, generator=g),
        "labels": torch.randint(0, 10, (DIST.n,), generator=g),
        "timesteps": torch.randint(0, 1000, (DIST.n, DIST.max_k), generator=g),
        "noise": torch.randn(DIST.n, DIST.max_k, 3, 8, 8, generator=g),
    }


def indexed_loss(data: dict[str, torch.Tensor], k: int) -> Callable:
    """``loss_fn`` for ``private_backward`` whose "labels" are example indices: every row's class,
    timestep and noise depend on its example and copy only, not on the batch it lands in."""
    objective = NoisePrediction(scheduler())

    def loss_fn(model: nn.Module, latents: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        copy = torch.arange(len(idx)) % k
        conditions = {"class_labels": data["labels"][idx]}
        return objective.loss(model, latents, conditions, data["timesteps"][idx, copy], data["noise"][idx, copy])

    return loss_fn


def indexed(latents: torch.Tensor) -> TensorDataset:
    """A data set whose second column is each example's index."""
    return TensorDataset(latents, torch.arange(len(latents)))


# ---- base families: photos as phones store them, SD3 with SD3's own patch size ---------------------------------


def oriented_photo_folder(root: Path, photos: list[tuple[str, int, tuple[int, int]]]) -> Path:
    """An imagefolder of random RGB photos with captions (``metadata.jsonl``), one per ``(kind, EXIF orientation,
    (height, width) as stored)``: kind ``"jpeg"`` (EXIF in the APP1 header, as phones write it), ``"png"`` (an
    ``eXIf`` chunk before the image data, as PIL writes it) or ``"png-trailing"`` (the ``eXIf`` chunk after it)."""
    import struct
    import zlib

    root.mkdir(parents=True)
    rows = []
    for i, (kind, orientation, (height, width)) in enumerate(photos):
        image = Image.fromarray(np.random.default_rng(i).integers(0, 255, (height, width, 3), dtype=np.uint8))
        exif = Image.Exif()
        exif[0x0112] = orientation  # ExifTags.Base.Orientation
        name = f"{i}.jpg" if kind == "jpeg" else f"{i}.png"
        if kind == "png-trailing":
            image.save(root / name)
            data = exif.tobytes()[6:]  # the TIFF block, without the JPEG APP1 prefix "Exif\0\0"
            chunk = struct.pack(">I", len(data)) + b"eXIf" + data + struct.pack(">I", zlib.crc32(b"eXIf" + data))
            raw = (root / name).read_bytes()
            (root / name).write_bytes(raw[:-12] + chunk + raw[-12:])  # just before IEND (12 bytes)
        else:
            image.save(root / name, exif=exif)
        rows.append(json.dumps({"file_name": name, "text": f"photo {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def save_sd3_patch_base(folder: Path, source: Path, patch_size: int = 2) -> Path:
    """The SD3 base ``source`` with a transformer of another ``patch_size`` (SD3's own is 2; the tiny bases' 1),
    saved by ``StableDiffusion3Pipeline.save_pretrained``."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(source)
    config = {key: value for key, value in pipe.transformer.config.items() if not key.startswith("_")}
    torch.manual_seed(0)
    pipe.register_modules(transformer=SD3Transformer2DModel(**{**config, "patch_size": patch_size}))
    pipe.save_pretrained(folder)
    return folder


def write_text_adapter(folder: Path, base: Path, **recorded) -> Path:
    """An adapter folder as train_dp_lora.py writes it for the text base ``base`` (a non-zero LoRA on its denoiser's
    ``attention`` preset), its config also recording ``recorded`` (e.g. ``resolution``, ``max_sequence_length``)."""
    from dp_diffusers import DPLDMPipeline

    pipe = DPLDMPipeline.from_pretrained(base)
    write_adapter(folder, pipe.unet, base, family=pipe.family)
    config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps({**config, **recorded}))
    return folder


# ---- what an adapter folder publishes (model cards, errors): private values stay out ------------------------------


def report_folder(folder: Path, metrics: dict | None = None, **report) -> Path:
    """An adapter folder holding only a ``dp_report.json`` (an example-level run of 1,437 examples, as
    ``dp_diffusers.hub`` requires it, with ``report`` overriding its fields) and ``metrics.json`` when given."""
    base = {"accountant": "prv", "epsilon": 9.87, "delta": 1e-5, "target_epsilon": 10.0, "noise_multiplier": 0.93,
            "max_grad_norm": 1e-3, "sample_rate": 0.0445, "steps": 450, "epochs": 20.0, "noise_multiplicity": 4,
            "dataset_size": 1437, "batch_size": 64, "world_size": 1, "trainable_parameters": 12288, "lora_rank": 4,
            "lora_alpha": 4, "adapted_modules": ["to_q"], "base_model": "dp-diffusers/ldm-digits-tiny",
            "epsilon_history": [[450, 9.87]]}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dp_report.json").write_text(json.dumps({**base, **report}))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def one_line(text: str) -> str:
    """``text`` with every run of whitespace one space (a rendered card's sentences, whatever their line breaks)."""
    return " ".join(text.split())
