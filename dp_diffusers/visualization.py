"""Labelled image grids (samples.png) for scripts, the demo and model cards."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw


def labelled_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], scale: int = 4) -> Image.Image:
    """One row of images per label, the label written at the left; images upscaled ``scale`` times."""
    if not rows or not rows[0]:
        raise ValueError("labelled_grid needs at least one image.")
    w, h = rows[0][0].size
    w, h = w * scale, h * scale
    margin = max(24, 8 * max(len(str(label)) for label in row_labels))
    grid = Image.new("RGB", (margin + w * max(len(r) for r in rows), h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (images, label) in enumerate(zip(rows, row_labels)):
        draw.text((4, i * h + h // 2 - 5), str(label), fill="black")
        for j, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((w, h), Image.NEAREST), (margin + j * w, i * h))
    return grid


def sample_grid(
    pipeline,
    labels: Sequence[str] | None,
    per_class: int = 8,
    num_inference_steps: int = 50,
    seed: int = 0,
    prompts: Sequence[str] | None = None,
    resolution: int | None = None,
) -> Image.Image | None:
    """Generate ``per_class`` images for each class name with a seeded generator and grid them; ``labels=None``
    (an unconditional model): one row of ``per_class`` images; ``prompts`` (a text-to-image model): a row per prompt,
    labelled by its number. ``pipeline``: a ``DPLDMPipeline``, sampled as its adapter was trained
    (``trained_call_kwargs``: its training resolution, T5's sequence length), else at the base's defaults;
    ``resolution``: the images' side in pixels instead. ``None`` when there is nothing to draw: ``per_class`` 0, or a
    text-to-image model without public prompts (its captions are private: never sampled from)."""
    import torch

    if per_class <= 0 or (pipeline.conditioning == "text" and not prompts):
        return None
    generator = torch.Generator().manual_seed(seed)
    settings = {**pipeline.trained_call_kwargs(), **({"height": resolution, "width": resolution} if resolution else {})}
    if prompts:
        images = pipeline(
            prompt=list(prompts), num_images_per_prompt=per_class, num_inference_steps=num_inference_steps,
            generator=generator, **settings,
        ).images  # fmt: skip
        rows = [images[i * per_class : (i + 1) * per_class] for i in range(len(prompts))]
        return labelled_grid(rows, [str(i + 1) for i in range(len(prompts))])
    if labels is None:
        images = pipeline(batch_size=per_class, num_inference_steps=num_inference_steps, generator=generator,
                          **settings).images  # fmt: skip
        return labelled_grid([images], [""])
    ids = pipeline.get_label_ids(list(labels))
    images = pipeline(
        class_labels=ids, num_images_per_prompt=per_class, num_inference_steps=num_inference_steps, generator=generator,
        **settings,
    ).images
    rows = [images[i * per_class : (i + 1) * per_class] for i in range(len(ids))]
    return labelled_grid(rows, labels)
