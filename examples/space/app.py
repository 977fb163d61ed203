#!/usr/bin/env python
"""Hugging Face Spaces demo of a DP-LoRA adapter: class-conditional samples (a class picker) or, for a Stable
Diffusion adapter, text-to-image samples (a prompt box), the public base next to the private fine-tune (LoRA scale
0 to 1), and the adapter's privacy guarantee and evaluation.

Run locally: ``python examples/space/app.py --adapter outputs/dp-lora-eps10`` (the ``make demo`` output, the
default). On a Space, set ``DP_LDM_ADAPTER`` to the adapter's Hub id (the base it names is loaded with it).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from huggingface_hub import snapshot_download
from PIL import Image

from dp_diffusers import ClassEmbedder, DPLDMPipeline
from dp_diffusers.adapter_config import DPLoRAConfig
from dp_diffusers.constants import CARD_NAME, DP_REPORT_NAME, METRICS_NAME
from dp_diffusers.hub import load_dp_report, load_metrics

DEFAULT_ADAPTER = Path(__file__).resolve().parents[2] / "outputs" / "dp-lora-eps10"
ADAPTER_NAME = "dp"
MAX_IMAGES = 16
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
MAX_QUEUE = 20
EPSILON_ELEM_ID = "dp-epsilon"
# metrics.json key -> name shown in the privacy panel
METRICS_SHOWN = {
    "fid": "FID",
    "kid": "KID",
    "downstream_accuracy": "Downstream accuracy",
    "membership_auc": "Membership-inference audit AUC",
    "one_run_audit": "Empirical ε lower bound (one-run audit, 95%)",
}


class AdapterLoadError(RuntimeError):
    """The adapter (or the base it names) cannot be loaded."""


@dataclass
class SpaceModel:
    """A loaded adapter: the pipeline with the LoRA as adapter ``ADAPTER_NAME``, and the class conditioning
    (class embedding, class name -> id) of the private fine-tune and of the public base (none for a text-to-image
    adapter, which takes prompts; ``prompts``: its public validation prompts, the prompt box's examples)."""

    source: str
    pipe: DPLDMPipeline
    embedder: ClassEmbedder | None
    labels: dict[str, int]
    base_embedder: ClassEmbedder | None
    base_labels: dict[str, int]
    prompts: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def text_to_image(self) -> bool:
        return self.pipe.conditioning == "text"

    @property
    def class_names(self) -> list[str]:
        return sorted(self.labels, key=self.labels.get)


def _class_labels(pipe: DPLDMPipeline) -> dict[str, int]:
    """Class name -> id; the ids themselves for a class-conditional model without names; none for text-to-image."""
    if pipe.conditioning == "text":
        return {}
    if pipe.num_classes is None:
        raise ValueError("it is unconditional, and this demo samples class-conditional models")
    return dict(pipe.labels) or {str(i): i for i in range(pipe.num_classes)}


def load_model(source: str | os.PathLike, device: str | None = None) -> SpaceModel:
    """Load a DP-LoRA adapter (a folder or Hub id) onto the base it was trained on.

    Raises:
        AdapterLoadError: naming the adapter and the reason (missing, a base without adapter, unconditional, ...).
    """
    source = str(source)
    try:
        pipe = DPLDMPipeline.from_pretrained(source)
        if not pipe.get_active_adapters():
            raise ValueError("it holds no LoRA adapter (give the --output_dir of train_dp_lora.py)")
        labels = _class_labels(pipe)
        pipe.unload_lora_weights()  # the public base, with its own class embedding and class names
        base_embedder, base_labels = pipe.class_embedder, _class_labels(pipe)
        pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pipe.load_lora_weights(source, adapter_name=ADAPTER_NAME)
        folder = Path(source).expanduser()
        config = DPLoRAConfig.from_pretrained(folder) if DPLoRAConfig.is_adapter_folder(folder) else None
    except (OSError, ValueError) as err:
        raise AdapterLoadError(f"Cannot load the DP-LoRA adapter {source!r}: {err}") from err
    prompts = (config.validation_prompts or []) if config is not None else []
    return SpaceModel(source, pipe, pipe.class_embedder, labels, base_embedder, base_labels, prompts)


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}, got {value}.")


def generate(
    model: SpaceModel,
    class_name: str | None,
    num_images: int = 4,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    lora_scale: float = 1.0,
    prompt: str | None = None,
) -> list[Image.Image]:
    """Sample ``num_images`` images of ``class_name`` (a text-to-image adapter: of ``prompt``), reproducibly per
    ``seed``.

    ``lora_scale`` weights the LoRA layers: 0 is exactly the public base (with its own class embedding), 1 the
    private fine-tune; in between, the LoRA is scaled and an adapter's trained class embedding is used.

    Raises:
        ValueError: a limit is exceeded, or the class is unknown (to the base, for ``lora_scale=0``).
    """
    _check_range("The number of images", num_images, 1, MAX_IMAGES)
    _check_range("The number of inference steps", num_inference_steps, 1, MAX_STEPS)
    _check_range("The guidance scale", guidance_scale, 1.0, MAX_GUIDANCE)
    _check_range("The LoRA scale", lora_scale, 0.0, 1.0)
    _check_range("The seed", seed, 0, 2**63 - 1)
    public = lora_scale == 0
    if model.text_to_image:
        if not prompt or not prompt.strip():
            raise ValueError("Enter a prompt: this is a text-to-image adapter.")
        with model.lock:
            model.pipe.set_adapters(ADAPTER_NAME, float(lora_scale))
            return model.pipe(
                prompt=[prompt],
                num_images_per_prompt=int(num_images),
                num_inference_steps=int(num_inference_steps),
                guidance_scale=float(guidance_scale),
                generator=torch.Generator().manual_seed(int(seed)),
                **model.pipe.trained_call_kwargs(),  # the adapter's training resolution and T5 length
            ).images
    labels = model.base_labels if public else model.labels
    if class_name not in labels:
        known = "the public base (LoRA scale 0)" if public and class_name in model.labels else "this model"
        raise ValueError(f"Unknown class {class_name!r}: {known} knows {', '.join(labels)}.")
    with model.lock:  # the pipeline's adapter weight and class embedding are shared by all requests
        model.pipe.class_embedder = model.base_embedder if public else model.embedder
        model.pipe.set_adapters(ADAPTER_NAME, float(lora_scale))
        return model.pipe(
            class_labels=[labels[class_name]],
            num_images_per_prompt=int(num_images),
            num_inference_steps=int(num_inference_steps),
            guidance_scale=float(guidance_scale),
            generator=torch.Generator().manual_seed(int(seed)),
        ).images


def _adapter_files(source: str) -> tuple[Path, str | None]:
    """The folder holding the adapter's report, metrics and card (downloaded for a Hub id), and its Hub URL."""
    if Path(source).expanduser().exists():
        return Path(source).expanduser(), None
    patterns = [DP_REPORT_NAME, METRICS_NAME, CARD_NAME]
    return Path(snapshot_download(source, allow_patterns=patterns)), f"https://huggingface.co/{source}"


def privacy_summary(source: str | os.PathLike) -> dict[str, Any]:
    """The adapter's guarantee (``dp_report.json``), its evaluation (``metrics.json``) and model card.

    Keys: ``epsilon``, ``delta``, ``accountant``, ``noise_multiplier`` (``None`` without a report), one per
    ``METRICS_SHOWN`` key (``None`` when not measured, ``"not computed"`` when the evaluation could not compute it,
    e.g. FID offline without Inception weights), ``model_card`` (a URL or path; ``None`` if missing) and
    ``generate_command`` (the command line that samples a synthetic data set from this adapter).
    """
    folder, url = _adapter_files(str(source))
    report = load_dp_report(folder) or {}
    metrics = load_metrics(folder) or {}
    card = url or (str(folder / CARD_NAME) if (folder / CARD_NAME).is_file() else None)
    summary = {key: report.get(key) for key in ("epsilon", "delta", "accountant", "noise_multiplier")}
    for key in METRICS_SHOWN:
        metric = metrics.get(key, {})
        summary[key] = "not computed" if metric.get("not_computed") else metric.get("value")
    summary["model_card"] = card
    summary["generate_command"] = f"dp-diffusers generate {source} --num_images 1000 --output_dir synthetic-data"
    return summary


def _format(value: Any) -> str:
    if value is None:
        return "not measured"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def epsilon_markdown(summary: dict[str, Any]) -> str:
    """The one-line guarantee, ``ε = <epsilon to 4 significant digits> (δ = ...)``."""
    if summary["epsilon"] is None:
        return "**No `dp_report.json`: this adapter's privacy guarantee is unknown.**"
    return f"**ε = {summary['epsilon']:.4g}** (δ = {summary['delta']:g})"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The privacy panel: the guarantee, the evaluation on held-out private data, the model card."""
    rows = [
        ("ε (epsilon)", summary["epsilon"]),
        ("δ (delta)", summary["delta"]),
        ("Accountant", summary["accountant"]),
        ("Noise multiplier σ", summary["noise_multiplier"]),
        *((name, summary[key]) for key, name in METRICS_SHOWN.items()),
    ]
    table = "\n".join(f"| {name} | {_format(value)} |" for name, value in rows)
    card = summary["model_card"]
    if card is None:
        card_line = "Model card: none yet (`dp-diffusers card <adapter folder>` writes it)."
    else:
        card_line = f"Model card: [{card}]({card})" if card.startswith("https://") else f"Model card: `{card}`"
    return (
        "### Privacy guarantee and evaluation\n\n| | Value |\n|---|---|\n"
        f"{table}\n\n"
        "The guarantee holds for every LoRA scale: scaling the adapter is post-processing of the DP training.\n\n"
        f"{card_line}\n\n"
        "A synthetic data set from this adapter (an imagefolder with a dataset card; post-processing, so it carries "
        f"the same guarantee at no further privacy cost): `{summary['generate_command']}`"
    )


def build_demo(model: SpaceModel, summary: dict[str, Any] | None = None) -> gr.Blocks:
    """The Gradio UI around ``generate`` and the privacy panel of ``privacy_summary(model.source)``."""
    summary = summary if summary is not None else privacy_summary(model.source)

    def on_generate(
        condition: str,
        num_images: float,
        seed: float,
        steps: float,
        guidance_scale: float,
        lora_scale: float,
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 (Gradio's way to show progress)
    ) -> list[Image.Image]:
        try:
            if model.text_to_image:
                return generate(model, None, num_images, seed, steps, guidance_scale, lora_scale, prompt=condition)
            return generate(model, condition, num_images, seed, steps, guidance_scale, lora_scale)
        except ValueError as err:
            raise gr.Error(str(err)) from err

    with gr.Blocks(title="DP-LoRA latent diffusion", analytics_enabled=False) as demo:
        gr.Markdown(
            "# Differentially private LoRA fine-tune of a latent diffusion model\n"
            f"Adapter `{model.source}` on the public base `{model.pipe.name_or_path}`. "
            "LoRA scale 0 samples the public base, 1 the private fine-tune."
        )
        with gr.Row():
            with gr.Column(scale=1):
                if model.text_to_image:
                    condition = gr.Textbox(value=(model.prompts or [""])[0], label="Prompt", elem_id="prompt")
                else:
                    condition = gr.Dropdown(model.class_names, value=model.class_names[0], label="Class")
                num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images")
                seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                steps = gr.Slider(1, MAX_STEPS, value=25, step=1, label="Inference steps")
                guidance = gr.Slider(1.0, MAX_GUIDANCE, value=3.0, step=0.5, label="Guidance scale")
                lora_scale = gr.Slider(0, 1, value=1, step=0.05, label="LoRA scale (0 = public base, 1 = private)")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Samples", columns=4, format="png", elem_id="gallery")
                gr.Markdown(epsilon_markdown(summary), elem_id=EPSILON_ELEM_ID)
                gr.Markdown(summary_markdown(summary), elem_id="privacy-summary")
        button.click(
            on_generate,
            inputs=[condition, num_images, seed, steps, guidance, lora_scale],
            outputs=gallery,
            concurrency_limit=1,
        )
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--adapter",
        default=os.environ.get("DP_LDM_ADAPTER", str(DEFAULT_ADAPTER)),
        help="Adapter folder or Hub id (default: $DP_LDM_ADAPTER, else outputs/dp-lora-eps10 of `make demo`).",
    )
    args = parser.parse_args(argv)
    try:
        model = load_model(args.adapter)
    except AdapterLoadError as err:
        sys.exit(f"{err}\nRun `make demo` for the default adapter, or pass --adapter / set DP_LDM_ADAPTER.")
    demo = build_demo(model)
    demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUE).launch()


if __name__ == "__main__":
    main()
