"""Fixtures only (functions shared by tests live in helpers.py): tiny bases built in the test session, no
download, seconds on 2 CPU cores."""

import json
import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import (  # noqa: E402
    base_args,
    load_app,
    save_class_base,
    save_dit_base,
    save_flux_base,
    save_ldm_base,
    save_sd3_base,
    save_sd_base,
    save_sdxl_base,
    train,
)

from dp_diffusers.constants import METRICS_NAME  # noqa: E402
from dp_diffusers.hub import write_model_card  # noqa: E402

# Under pytest-xdist (`make test`: one worker per core) each worker computes on one thread.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))

#: The metrics.json of the Space's adapter (no FID).
SPACE_METRICS = {"downstream_accuracy": {"value": 0.75, "classifier": "logistic-regression"}, "membership_auc": 0.5125}


@pytest.fixture(autouse=True)
def no_inception_download(tmp_path_factory, monkeypatch):
    """Every test sees an empty clean-fid cache, and clean-fid's Inception download fails the test if it is tried
    (the tests run offline: FID is computed from a given stand-in file or recorded as not computed)."""
    import cleanfid.downloads_helper

    from dp_diffusers.evaluation import fid

    def download(*args, **kwargs):
        pytest.fail("clean-fid's Inception download was attempted in a test")

    monkeypatch.setattr(fid, "CLEAN_FID_CACHE", tmp_path_factory.mktemp("clean-fid-cache"))
    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_inception", download)


def _session_base(save: Callable[[Path], Path], doc: str):
    """A session fixture: the tiny base folder (random weights) that ``save`` writes once per test session, in a
    folder named after the fixture."""

    def base(tmp_path_factory, request) -> Path:
        return save(tmp_path_factory.mktemp(request.fixturename.replace("_", "-")))

    base.__doc__ = doc
    return pytest.fixture(scope="session")(base)


tiny_base = _session_base(save_class_base, "A class-conditional base folder (DPLDMPipeline) with digit class names.")
tiny_ldm_base = _session_base(save_ldm_base, "A CompVis-style unconditional base folder (LDMPipeline layout).")
tiny_dit_base = _session_base(save_dit_base, "A DiT base folder (DiTPipeline layout + id2label).")
tiny_sd_base = _session_base(save_sd_base, "A Stable Diffusion base (StableDiffusionPipeline, CLIP text encoder).")
tiny_sd3_base = _session_base(save_sd3_base, "An SD3.5 base (StableDiffusion3Pipeline: two CLIPs, T5, dual attention).")
tiny_flux_base = _session_base(save_flux_base, "A FLUX.1-dev base (FluxPipeline: CLIP, T5, guidance embeddings).")
tiny_sdxl_base = _session_base(save_sdxl_base, "An SDXL base (StableDiffusionXLPipeline, two CLIP text encoders).")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose ~10x when other processes share the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def app():
    """The Space's app module (examples/space/app.py)."""
    return load_app()


@pytest.fixture(scope="session")
def space_adapter(tiny_base, tmp_path_factory):
    """An adapter folder of train_dp_lora.py (2 DP steps, a large learning rate so that the LoRA shows in 8-bit
    images), with a metrics.json that has no FID and a model card."""
    out = tmp_path_factory.mktemp("space") / "dp-lora"
    overrides = {"--max_train_samples": 40, "--batch_size": 8, "--max_train_steps": 2, "--learning_rate": 0.1}
    train(base_args(tiny_base, out, **overrides))
    (out / METRICS_NAME).write_text(json.dumps(SPACE_METRICS))
    write_model_card(out)
    return out
