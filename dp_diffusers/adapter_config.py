"""``dp_lora_config.json``: what a DP-LoRA adapter folder holds and which public base it goes onto.

Defined once here (in the style of peft's ``LoraConfig``: a dataclass with field metadata and save / load);
the training script writes it, and the pipeline, the evaluation, the model card and the Space read it through
:meth:`DPLoRAConfig.from_pretrained`. Folders written by earlier versions (no ``base_family``, no
``class_rows``, no ``resolution``) load with those fields' defaults. Nothing here is private data: captions are never
recorded, only a text base's public caption template and validation prompts.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .constants import ADAPTER_CONFIG_NAME, LORA_WEIGHT_NAME


@dataclass
class DPLoRAConfig:
    """The adapter config of a ``train_dp_lora.py`` output folder."""

    base_model: str = field(metadata={"help": "The public base: a local folder (as given) or a Hub id."})
    revision: str | None = field(default=None, metadata={"help": "The base's Hub revision the adapter was trained on."})
    base_family: str = field(default="dp-ldm", metadata={"help": "dp_diffusers.families name of the base's layout."})
    lora_weights: str = field(default=LORA_WEIGHT_NAME, metadata={"help": "The LoRA weights file (diffusers format)."})
    class_embedder: str | None = field(
        default=None, metadata={"help": "Folder of the trained ClassEmbedder (own bases, --train_class_embedding)."}
    )
    class_rows: str | None = field(
        default=None, metadata={"help": "Folder of the trained DiTClassRows (new classes of a DiT base)."}
    )
    id2label: dict[int, str] | None = field(
        default=None, metadata={"help": "Class names by id, the adapter's classes (None: unconditional)."}
    )
    train_subset: dict[str, float] | None = field(
        default=None,
        metadata={"help": "The train-split rows trained on (the audit's members): {max_samples, seed} of "
                  "--max_train_samples and {validation_split, validation_split_seed} of the part held out."},
    )
    canaries: dict[str, int] | None = field(
        default=None, metadata={"help": "{num_canaries, seed, resolution, coins, per_unit} of the audit's canaries: "
                                "2 * num_canaries canary units, each trained on by a secret coin (coins: true; the "
                                "coins stay in the folder's hidden .audit/), or the first half (older runs)."}
    )
    caption_column: str | None = field(
        default=None, metadata={"help": "Text bases: the data's caption column (None: 'text', or the template)."}
    )
    caption_template: str | None = field(
        default=None, metadata={"help": "Text bases: the --caption_template captions were made from labels with."}
    )
    validation_prompts: list[str] | None = field(
        default=None,
        metadata={"help": "Text bases: the public --validation_prompt prompts (samples.png, the card's widget)."},
    )
    max_sequence_length: int | None = field(
        default=None,
        metadata={"help": "T5 bases: the T5 tokens the captions were encoded to (None: not recorded, the family's "
                  "default)."},
    )
    resolution: int | None = field(
        default=None,
        metadata={"help": "The training resolution in pixels, which the evaluation and dp-diffusers' sampling use by "
                  "default (None: not recorded; older folders)."},
    )
    guidance_scale: float | None = field(
        default=None, metadata={"help": "Guidance-distilled FLUX bases: --guidance_scale of training (None: default)."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "The embedded or Hub data set trained on (the evaluation's default data)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, if any."})
    local_data: bool = field(
        default=False, metadata={"help": "Trained on a local imagefolder (its path is never recorded)."}
    )
    image_column: str | None = field(default=None, metadata={"help": "The data's image column."})
    label_column: str | None = field(default=None, metadata={"help": "The data's label column, as given."})
    privacy_unit: str | None = field(
        default=None, metadata={"help": "User-level runs: the column of each example's person (the audit's unit)."}
    )
    objective: dict[str, Any] | None = field(
        default=None, metadata={"help": "Flow-matching bases: the objective flags given (weighting_scheme, ...)."}
    )

    def __post_init__(self) -> None:
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def condition_options(self):
        """How the run computed each example's condition (``families.ConditionOptions``), to compute it alike."""
        from .families import ConditionOptions

        return ConditionOptions(
            caption_column=self.caption_column, caption_template=self.caption_template,
            validation_prompts=self.validation_prompts, max_sequence_length=self.max_sequence_length,
            guidance_scale=self.guidance_scale,
        )  # fmt: skip

    def trained_resolution(self) -> int | None:
        """The side in pixels the adapter was trained at: recorded, else (older folders) its canaries' side, which
        was the training resolution; ``None`` when neither is known."""
        return self.resolution or (self.canaries or {}).get("resolution")

    def objective_options(self):
        """The objective flags the run gave (``families.ObjectiveOptions``)."""
        from .families import ObjectiveOptions

        return ObjectiveOptions(**(self.objective or {}))

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``dp_lora_config.json`` into ``folder`` (atomically)."""
        path = Path(folder) / ADAPTER_CONFIG_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> DPLoRAConfig:
        """Read ``folder/dp_lora_config.json``. Raises ``ValueError`` for a file that is not such a config."""
        path = Path(folder) / ADAPTER_CONFIG_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict) or "base_model" not in data:
            raise ValueError(f"{path} is not a DP-LoRA adapter config: it names no base_model.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path} has fields this version does not know: {unknown} (written by a newer version?).")
        return cls(**data)

    @classmethod
    def is_adapter_folder(cls, folder: str | os.PathLike) -> bool:
        return (Path(folder) / ADAPTER_CONFIG_NAME).is_file()
