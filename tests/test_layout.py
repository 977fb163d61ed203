"""The layout's promises: the privacy core stands alone, file names and the version are defined once, and test
files share code only through helpers.py."""

import ast
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

import dp_diffusers
from dp_diffusers import constants

TESTS = Path(__file__).resolve().parent


def test_the_privacy_core_loads_neither_diffusers_nor_the_pipelines():
    code = "import sys, dp_diffusers.privacy; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('diffusers', 'peft', 'dp_diffusers')))"  # fmt: skip
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'diffusers" not in loaded and "'peft" not in loaded
    assert "dp_diffusers.pipelines" not in loaded and "dp_diffusers.models" not in loaded
    assert "dp_diffusers.privacy.grad_sample.fused_grad_sample_module" in loaded
    # of the package above it, only the lazy root and the file names: privacy/ can be audited alone
    above = {name for name in ast.literal_eval(loaded) if not name.startswith("dp_diffusers.privacy")}
    assert above == {"dp_diffusers", "dp_diffusers.constants"}, above


def test_version_and_file_names_come_from_one_place():
    assert dp_diffusers.__version__ == version("dp-diffusers")
    assert constants.LORA_WEIGHT_NAME == LORA_WEIGHT_NAME_SAFE  # diffusers' own name for the LoRA file
    assert dp_diffusers.DPLDMPipeline.__name__ == "DPLDMPipeline"  # the lazy root still exports it


def test_test_files_import_no_other_test_file_nor_conftest():
    local = {path.stem for path in TESTS.glob("*.py")} - {"helpers"}
    for path in TESTS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module.split(".")[0]]
            assert not set(names) & local, f"{path.name} imports {set(names) & local}: share code through helpers.py"


def test_the_adapter_config_is_one_type_and_earlier_folders_still_load(tmp_path):
    from dp_diffusers.adapter_config import DPLoRAConfig

    config = DPLoRAConfig(base_model="me/base", base_family="dit", class_rows="class_rows", id2label={1001: "cat"},
                          train_subset={"max_samples": 40, "seed": 0})  # fmt: skip
    config.save_pretrained(tmp_path)
    assert DPLoRAConfig.from_pretrained(tmp_path) == config  # id2label keys come back as ints
    # what versions before the base families wrote: no base_family, no class_rows
    earlier = {"base_model": "outputs/base", "revision": None, "lora_weights": "pytorch_lora_weights.safetensors",
               "class_embedder": None, "id2label": {"0": "0"}, "train_subset": None, "canaries": None}  # fmt: skip
    (tmp_path / "dp_lora_config.json").write_text(json.dumps(earlier))
    loaded = DPLoRAConfig.from_pretrained(tmp_path)
    assert loaded.base_family == "dp-ldm" and loaded.class_rows is None and loaded.id2label == {0: "0"}
    (tmp_path / "dp_lora_config.json").write_text(json.dumps({**earlier, "from_the_future": 1}))
    with pytest.raises(ValueError, match="from_the_future"):
        DPLoRAConfig.from_pretrained(tmp_path)
    (tmp_path / "dp_lora_config.json").write_text(json.dumps({"lora_weights": "x"}))
    with pytest.raises(ValueError, match="names no base_model"):
        DPLoRAConfig.from_pretrained(tmp_path)


def test_the_dp_report_is_one_type_with_the_contract_s_flat_keys(tmp_path):
    from dp_diffusers.privacy import DPReport, PrivacyBudget, build_dp_report

    budget = PrivacyBudget("prv", 1.0, 0.1, 1e-5, planned_steps=10)
    budget.accountant.history = [(1.0, 0.1, 3)]
    report = build_dp_report(budget, max_grad_norm=1e-3, noise_multiplicity=2, dataset_size=200, batch_size=20,
                             world_size=1, trainable_parameters=10, lora_rank=2, lora_alpha=2.0,
                             adapted_modules=["to_q"], base_model="me/base", ema_decay=0.9)  # fmt: skip
    assert report.steps == 3 and report.epochs == pytest.approx(0.3) and report.ema_decay == 0.9
    report.save_pretrained(tmp_path)
    assert DPReport.from_pretrained(tmp_path) == report
    assert json.loads((tmp_path / "dp_report.json").read_text())["other_releases"] == []  # DP-SGD is the only one
    with pytest.raises(TypeError):  # an unknown setting is not silently written
        build_dp_report(budget, max_grad_norm=1.0, noise_multiplicity=1, dataset_size=1, batch_size=1, world_size=1,
                        trainable_parameters=1, lora_rank=1, lora_alpha=1.0, adapted_modules=[], base_model="b",
                        sigma_was_tuned=True)  # fmt: skip


def test_what_differs_between_base_families_lives_in_the_family_classes():
    """Outside ``dp_diffusers/families`` no module names a family of a public layout (only the project's own, the
    default of a hand-built pipeline and what train_ldm.py writes) nor asks whether a model is text-to-image: what
    differs between bases is a family method (``docs/bases.md``: adding a family is adding a class)."""
    from dp_diffusers.families import FAMILIES

    public = {family.__name__ for family in FAMILIES.values()} - {"DPLDMFamily"}
    root = TESTS.parent
    sources = [*(root / "dp_diffusers").rglob("*.py"), *(root / "training_scripts").glob("*.py"),
               *(root / "examples").rglob("*.py")]  # fmt: skip
    for path in sources:
        if "families" in path.parts:
            continue
        names = {node.id for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Name)}
        names |= {alias.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)
                  for alias in node.names}  # fmt: skip
        assert not names & public, f"{path.relative_to(root)} names {names & public}"
        assert "is_text_to_image" not in path.read_text(), path
