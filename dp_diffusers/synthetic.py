"""DP synthetic data sets: images sampled from a DP-LoRA adapter, written as an ``imagefolder`` that
``datasets.load_dataset("imagefolder", data_dir=...)`` loads, with a dataset card, shareable as a Hub *dataset*.

Sampling from the released adapter is post-processing of the DP training: the data set costs no further privacy
and carries the adapter's (epsilon, delta). Images are written in batches, each batch from its own seeded generator,
so a rerun fills what an interrupted run left missing with exactly the images it would have written.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import DatasetCard, DatasetCardData, HfApi
from tqdm.auto import tqdm

from .adapter_config import DPLoRAConfig
from .constants import DP_REPORT_NAME
from .hub import _is_hub_id, load_dp_report
from .loaders import adapter_folder

IMAGES_FOLDER = "images"
METADATA_NAME = "metadata.jsonl"
GENERATION_NAME = "generation.json"


@dataclass
class GenerationSettings:
    """What defines a synthetic data set: rerunning with the same settings resumes it; other settings are another
    data set (refused in the same folder)."""

    adapter: str
    base_model: str | None
    num_images: int
    seed: int
    batch_size: int
    num_inference_steps: int
    guidance_scale: float | None
    sampler: str
    labels: list[str] | None = None
    prompts: list[str] | None = None
    resolution: int | None = None

    def condition(self, index: int) -> dict[str, str]:
        """Image ``index``'s metadata: its class name (``label``) or prompt (``text``), balanced (round robin)."""
        if self.labels:
            return {"label": self.labels[index % len(self.labels)]}
        if self.prompts:
            return {"text": self.prompts[index % len(self.prompts)]}
        return {}


def _public_name(source: str) -> str:
    """A Hub id as it is; a local folder by its name only (no local path goes into files that get uploaded)."""
    return source if _is_hub_id(source) and not Path(source).expanduser().exists() else Path(source).name


def _check_folder(output_dir: Path, settings: GenerationSettings) -> None:
    record = output_dir / GENERATION_NAME
    if record.is_file():
        found = json.loads(record.read_text())
        if found != asdict(settings):
            changed = sorted(key for key in found.keys() | asdict(settings).keys()
                             if found.get(key) != asdict(settings).get(key))  # fmt: skip
            raise ValueError(f"{output_dir} holds another synthetic data set (different {changed}): use another "
                             "--output_dir, or the same settings to resume it.")  # fmt: skip
    elif output_dir.is_dir() and any(output_dir.iterdir()):
        raise ValueError(f"{output_dir} is not empty and holds no synthetic data set of dp-diffusers: use an empty "
                         "or new --output_dir.")  # fmt: skip


def generate_dataset(
    adapter: str,
    output_dir: str | os.PathLike,
    num_images: int,
    labels: list[str] | None = None,
    prompts: list[str] | None = None,
    batch_size: int = 16,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    scheduler: str | None = None,
    seed: int = 0,
    resolution: int | None = None,
    device: str | None = None,
) -> Path:
    """Sample ``num_images`` images from the adapter (a folder or Hub id) into ``output_dir``: ``images/*.png``,
    ``metadata.jsonl`` (a ``label`` column of class names for class-conditional adapters, balanced over ``labels``,
    all its classes by default; the ``text`` prompt for text-to-image ones, balanced over ``prompts``, its validation
    prompts by default), ``generation.json`` (the settings: seed, sampler, steps) and a dataset card. Resumable.
    Images are ``resolution`` pixels wide, by default the adapter's training resolution (text adapters: at its T5
    sequence length too); ``guidance_scale`` by default the family's for synthetic data (1, no guidance, for
    ``train_ldm.py``'s bases: it trains better classifiers), else the pipeline's; other arguments not given take the
    pipeline's defaults.

    Raises ``ValueError`` for ``num_images`` < 1, labels the adapter does not know, a text adapter without prompts,
    or a folder holding another data set.
    """
    from .pipelines import DPLDMPipeline

    if num_images < 1:
        raise ValueError(f"--num_images must be >= 1, got {num_images}")
    pipe = DPLDMPipeline.from_pretrained(adapter)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.set_scheduler(scheduler)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if guidance_scale is None:
        guidance_scale = pipe.family.synthetic_data_guidance_scale
    conditioning = pipe.conditioning
    if conditioning == "class":
        labels = list(labels or pipe.labels or [str(i) for i in range(pipe.num_classes)])
        pipe.get_label_ids(labels)  # unknown names: the ValueError naming the model's classes
    elif labels:
        raise ValueError(f"{adapter} is not class-conditional: it takes no --labels.")
    if conditioning == "text":
        prompts = list(prompts or pipe.condition_options.validation_prompts or [])
        if not prompts:
            raise ValueError(f"{adapter} is text-to-image: pass --prompts (it records no validation prompts).")
    elif prompts:
        raise ValueError(f"{adapter} is not text-to-image: it takes no --prompts.")
    sampler = type(pipe.scheduler).__name__
    source = adapter_folder(adapter)
    config = DPLoRAConfig.from_pretrained(source) if source is not None else None
    base = _public_name(config.base_model) if config is not None else None
    settings = GenerationSettings(_public_name(adapter), base, num_images, seed, batch_size, num_inference_steps,
                                  guidance_scale, sampler, labels or None, prompts or None, resolution)  # fmt: skip
    out = Path(output_dir)
    _check_folder(out, settings)
    (out / IMAGES_FOLDER).mkdir(parents=True, exist_ok=True)
    (out / GENERATION_NAME).write_text(json.dumps(asdict(settings), indent=2) + "\n")
    report = load_dp_report(source) if source is not None else None
    if report:  # the guarantee the data set carries, with it (public, as on the adapter's card)
        (out / DP_REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")

    files = [out / IMAGES_FOLDER / f"{i:06d}.png" for i in range(num_images)]
    batches = [range(start, min(start + batch_size, num_images)) for start in range(0, num_images, batch_size)]
    for number, batch in enumerate(tqdm(batches, desc="Synthetic images", unit="batch")):
        if all(files[i].is_file() for i in batch):
            continue  # written by an earlier (interrupted) run
        generator = torch.Generator().manual_seed(seed * 1_000_003 + number)  # each batch on its own: resumable
        # as the adapter was trained (its resolution, T5's length) unless told otherwise
        call: dict[str, Any] = {**pipe.trained_call_kwargs(), "num_inference_steps": num_inference_steps,
                                "generator": generator}  # fmt: skip
        if guidance_scale is not None:
            call["guidance_scale"] = guidance_scale
        if resolution is not None:
            call.update(height=resolution, width=resolution)
        if conditioning == "class":
            call["class_labels"] = pipe.get_label_ids([settings.condition(i)["label"] for i in batch])
        elif conditioning == "text":
            call["prompt"] = [settings.condition(i)["text"] for i in batch]
        else:
            call["batch_size"] = len(batch)
        for i, image in zip(batch, pipe(**call).images):
            tmp = files[i].with_suffix(".tmp.png")
            image.save(tmp)
            os.replace(tmp, files[i])  # a file that exists is complete
    rows = [{"file_name": f"{IMAGES_FOLDER}/{files[i].name}", **settings.condition(i)} for i in range(num_images)]
    (out / METADATA_NAME).write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_dataset_card(out)
    return out


def write_dataset_card(output_dir: Path, repo_id: str | None = None) -> Path:
    """``README.md`` of a synthetic data set folder: YAML (tags, ``dp_epsilon``, ``dp_delta``, the source adapter
    and base) and the statement that it is post-processing of the DP adapter."""
    settings = GenerationSettings(**json.loads((output_dir / GENERATION_NAME).read_text()))
    report = load_dp_report(output_dir)
    base = settings.base_model
    dp = {"dp_epsilon": report["epsilon"], "dp_delta": report["delta"]} if report else {}
    unit = report.get("privacy_unit") if report else None
    data = DatasetCardData(tags=["synthetic", "differential-privacy", "dp-diffusers"], license="apache-2.0",
                           source_adapter=settings.adapter, base_model=base, **dp)  # fmt: skip
    guarantee = (
        f"The adapter is (ε = {report['epsilon']:.4g}, δ = {report['delta']:g})-differentially private with respect "
        f"to {'all examples of one `' + unit + '`' if unit else 'one training example'} of its private data. "
        "These images were sampled from it: post-processing of the DP training, so the data set costs no further "
        "privacy and carries the same guarantee."
        if report else "**The adapter has no privacy report: no differential-privacy guarantee is claimed.**"
    )
    column = "`label` (class names)" if settings.labels else "`text` (the prompt)" if settings.prompts else "none"
    load = f'load_dataset("{repo_id}")' if repo_id else f'load_dataset("imagefolder", data_dir="{output_dir}")'
    guidance = settings.guidance_scale if settings.guidance_scale is not None else "the pipeline's default"
    text = f"""---
{data.to_yaml()}
---

# Synthetic images from `{settings.adapter}`

{settings.num_images} images sampled with `dp-diffusers generate` from the DP-LoRA adapter `{settings.adapter}`
(base `{base}`). {guarantee}

Sampler {settings.sampler}, {settings.num_inference_steps} steps, guidance {guidance}, seed {settings.seed}
(batches of {settings.batch_size}, each from its own generator); label column: {column}.

```python
from datasets import load_dataset

data = {load}
```
"""
    path = output_dir / "README.md"
    DatasetCard(text).save(path)
    return path


def push_dataset(output_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False,
                 api: HfApi | None = None) -> str:  # fmt: skip
    """Upload a synthetic data set folder as a Hub *dataset* repo (created if needed); returns its URL."""
    out = Path(output_dir)
    if not (out / METADATA_NAME).is_file():
        raise ValueError(f"{out} holds no finished synthetic data set ({METADATA_NAME} missing): run generate first.")
    write_dataset_card(out, repo_id=repo_id)
    api = api or HfApi(token=token)
    url = api.create_repo(repo_id, token=token, private=private, repo_type="dataset", exist_ok=True)
    api.upload_folder(repo_id=url.repo_id, folder_path=out, repo_type="dataset", token=token,
                      commit_message="Upload a DP synthetic data set with dp-diffusers",
                      ignore_patterns=["*.tmp.png"])  # fmt: skip
    return str(url)
