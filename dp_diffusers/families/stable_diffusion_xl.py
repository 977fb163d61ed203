"""Stable Diffusion XL bases (``stabilityai/stable-diffusion-xl-base-1.0``): diffusers' ``StableDiffusionXLPipeline``.

Components ``vae`` (``AutoencoderKL``; its ``latents_mean`` / ``latents_std`` used when the config has them),
``text_encoder`` (``CLIPTextModel``) and ``text_encoder_2`` (``CLIPTextModelWithProjection``) with ``tokenizer`` and
``tokenizer_2``: the frozen public text encoders, ``unet`` (``UNet2DConditionModel`` with ``text_time`` added
conditioning), ``scheduler``. Each example's condition, as diffusers' SDXL LoRA scripts build it:

* ``encoder_hidden_states``: the caption's (77, 2048) context (both CLIPs' penultimate states) and ``text_embeds``:
  its pooled (1280) embedding, by ``StableDiffusionXLPipeline.encode_prompt``;
* ``time_ids``: (original height, width before the resize, crop top, left, the training resolution twice) of that
  example's own image as decoded (upright by its EXIF orientation; center crop, so a mirrored image has the same ids).

The null condition is zeros for the context and pooled embedding (``force_zeros_for_empty_prompt``, the SDXL
configs' setting, as the pipeline's own unconditional half) or the empty prompt's encoding; time ids are kept.
"""

from __future__ import annotations

import io
import os
import struct
from typing import TYPE_CHECKING, BinaryIO

import torch
from PIL import ExifTags
from PIL import Image as PILImage

from ..data import UNREADABLE_IMAGE_ERRORS, DataError, unreadable_image
from ..lora import LORA_TARGET_PRESETS
from .base import register_family
from .text import TextFamily

if TYPE_CHECKING:
    from datasets import Dataset

#: EXIF orientations whose ``PIL.ImageOps.exif_transpose`` is a transpose or a quarter turn: width and height swap
SWAPPED_ORIENTATIONS = frozenset({5, 6, 7, 8})


def _png_exif(stream: BinaryIO) -> bytes:
    """A PNG's ``eXIf`` chunk wherever it is (PIL reads the chunks after the image data only when it decodes the
    pixels); ``b""`` if it has none. Chunk headers are read and the image data skipped, never decompressed."""
    stream.seek(8)  # past the signature
    while len(header := stream.read(8)) == 8:
        length, kind = struct.unpack(">I4s", header)
        if kind == b"eXIf":
            return stream.read(length)
        if kind == b"IEND":
            break
        stream.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    return b""


def exif_orientation(image: PILImage.Image) -> int:
    """The EXIF orientation (1-8; 1: upright) of an opened, not decoded image, as ``datasets`` reads it before its
    ``exif_transpose`` (``Image.getexif``: the EXIF block or the XMP's ``tiff:Orientation``), without decoding the
    pixels."""
    if image.format == "PNG" and "exif" not in image.info:  # else getexif would decode the image to find it
        image.info["exif"] = _png_exif(image.fp)
    return int(image.getexif().get(ExifTags.Base.Orientation, 1))


def upright_sizes(dataset: Dataset, image_column: str) -> torch.Tensor:
    """(N, 2) long: each image's (height, width) before any resize, upright: as ``datasets`` decodes it (rotated by
    its EXIF orientation, ``PIL.ImageOps.exif_transpose``), which is SDXL's ``original_size`` in diffusers' SDXL
    scripts. Read from the files' headers and EXIF tags only, without decoding the pixels."""
    from datasets import Image

    sizes = []
    for i, raw in enumerate(dataset.cast_column(image_column, Image(decode=False))[image_column]):
        try:
            source = raw["path"] if raw.get("bytes") is None else io.BytesIO(raw["bytes"])
            with PILImage.open(source) as image:
                swapped = exif_orientation(image) in SWAPPED_ORIENTATIONS
                sizes.append((image.width, image.height) if swapped else (image.height, image.width))
        except (*UNREADABLE_IMAGE_ERRORS, SyntaxError, struct.error) as err:
            raise unreadable_image(i, err) from None
    return torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)


def center_crop_time_ids(sizes: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, 6) SDXL time ids of images of (height, width) ``sizes`` resized (shorter side) and center-cropped to
    ``resolution``: ``original_size + crop_top_left + target_size``, the crop as torchvision's ``Resize`` and
    ``CenterCrop`` (and diffusers' SDXL scripts) compute it."""
    short, long = sizes.min(1).values, sizes.max(1).values
    resized_long = (resolution * long.double() / short.double()).long()  # torchvision: int(size * long / short)
    tall = sizes[:, 0] > sizes[:, 1]
    height = torch.where(tall, resized_long, torch.full_like(long, resolution))
    width = torch.where(tall, torch.full_like(long, resolution), resized_long)
    top = torch.round((height - resolution).double() / 2).long().clamp(min=0)
    left = torch.round((width - resolution).double() / 2).long().clamp(min=0)
    target = torch.full_like(top, resolution)
    return torch.stack([sizes[:, 0], sizes[:, 1], top, left, target, target], dim=1).float()


@register_family
class StableDiffusionXLFamily(TextFamily):
    name = "stable-diffusion-xl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    pipeline_options = ("force_zeros_for_empty_prompt",)
    description = "Stable Diffusion XL: AutoencoderKL + two CLIP text encoders + UNet2DConditionModel (text_time)"
    # diffusers' SDXL LoRA scripts' targets; + the transformer blocks' proj_in / proj_out
    lora_target_presets = {name: LORA_TARGET_PRESETS[name] for name in ("attention", "attention+proj")}

    @classmethod
    def check_resolution(cls, pipe, resolution):
        """The training resolution is the time ids' target size: one ``StableDiffusionXLPipeline`` samples at (a
        multiple of 8), and one the autoencoder downsamples evenly."""
        super().check_resolution(pipe, resolution)
        if resolution % 8:
            raise DataError(f"--resolution {resolution}: an SDXL base trains and samples at multiples of 8 (its "
                            f"time ids' target size); use e.g. {max(8, resolution - resolution % 8)}.")  # fmt: skip

    @classmethod
    def encode_prompts(cls, pipe, prompts, options=None):
        view = cls.sampling_pipeline(pipe)
        context, _, pooled, _ = view.encode_prompt(prompts, device=view._execution_device, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)  # fmt: skip
        return {"encoder_hidden_states": context, "text_embeds": pooled}

    @classmethod
    def image_conditions(cls, pipe, examples):
        sizes = upright_sizes(examples.dataset, examples.image_column)
        canaries = torch.full((examples.num_canaries, 2), examples.resolution, dtype=torch.long)  # drawn square
        return {"time_ids": center_crop_time_ids(torch.cat([sizes, canaries]), examples.resolution)}

    @classmethod
    def null_condition(cls, pipe, options=None):
        encoded = super().null_condition(pipe, options)
        if (pipe.config.base_options or {}).get("force_zeros_for_empty_prompt", True):
            return {name: torch.zeros_like(value) for name, value in encoded.items()}
        return encoded

    @classmethod
    def predict(cls, denoiser, noisy_latents, timesteps, conditions):
        context, added = conditions["encoder_hidden_states"], {"text_embeds": conditions["text_embeds"],
                                                               "time_ids": conditions["time_ids"]}  # fmt: skip
        return denoiser.backbone(noisy_latents, timesteps, encoder_hidden_states=denoiser.cast(context),
                                 added_cond_kwargs={name: denoiser.cast(value) for name, value in added.items()})
