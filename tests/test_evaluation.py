"""Tests for dp_diffusers.evaluation: clean-fid FID, downstream accuracy, membership audit.

FID runs the real clean-fid pipeline with a tiny TorchScript stand-in for the Inception file
(same interface: a ``layers`` submodule mapping (N, 3, 299, 299) images in [-1, 1] to 2048
features). Each FID costs one 2048x2048 ``sqrtm`` (~10 s on 2 cores), so there are three in all.
"""

import copy
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cleanfid import fid as cleanfid_fid
from PIL import Image
from torch import nn

from dp_diffusers.evaluation import (
    INCEPTION_PATH_ENV,
    INCEPTION_URL,
    CleanFIDInception,
    InceptionWeightsNotFoundError,
    accuracy,
    audit,
    compute_fid,
    denoising_loss_scores,
    downstream_accuracy,
    load_inception_feature_extractor,
    membership_auc,
    train_classifier,
)

# --------------------------------------------------------------------------------------------- FID


class _StandInLayers(nn.Module):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("projection", torch.randn(3 * 8 * 8, 2048, generator=generator) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 8).flatten(1)
        return torch.tanh(pooled @ self.projection).view(x.shape[0], 2048, 1, 1)


class _StandInInception(nn.Module):
    """Same interface as inception-2015-12-05.pt: ``layers`` on [-1, 1] input, forward on [0, 255]."""

    def __init__(self):
        super().__init__()
        self.layers = _StandInLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers((x - 128) / 128).view(x.shape[0], 2048)


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "standin-inception.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script deprecation
        torch.jit.script(_StandInInception()).save(str(path))
    return str(path)


def _images(seed: int, n: int, low: int, high: int, channels: int = 3) -> np.ndarray:
    shape = (n, 16, 16, channels) if channels > 1 else (n, 16, 16)
    return np.random.default_rng(seed).integers(low, high, size=shape, dtype=np.uint8)


def _save_folder(folder, images: np.ndarray) -> str:
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return str(folder)


def test_feature_extractor_interface(inception_path):
    extractor = load_inception_feature_extractor(inception_path)
    assert isinstance(extractor, CleanFIDInception)
    feats = extractor(torch.full((2, 3, 299, 299), 255.0))
    assert feats.shape == (2, 2048)
    with pytest.raises(ValueError, match="299"):
        extractor(torch.zeros(1, 3, 64, 64))


def test_fid_identical_sets_is_zero(tmp_path, inception_path):
    gray = _images(0, 24, 0, 256, channels=1)
    folder = _save_folder(tmp_path / "ref", gray)  # grayscale PNGs, converted to RGB by clean-fid
    with pytest.warns(UserWarning, match="< 2048"):
        result = compute_fid(gray, folder, inception_path=inception_path)
    assert abs(result["fid"]) < 1e-3
    assert result["num_generated"] == result["num_reference"] == 24
    assert result["mode"] == "clean"
    assert result["feature_extractor"] == "standin-inception.pt"


def test_fid_different_sets_matches_cleanfid(tmp_path, inception_path, monkeypatch):
    # clean-fid's fid_from_feats is a pure function: memoised on its inputs, the reference below costs a second
    # 2048x2048 sqrtm only where clean-fid's own pipeline gives other features than compute_fid's
    computed = {}
    real_fid_from_feats = cleanfid_fid.fid_from_feats

    def fid_from_feats(*feats):
        key = tuple(np.ascontiguousarray(f).tobytes() for f in feats)
        if key not in computed:
            computed[key] = real_fid_from_feats(*feats)
        return computed[key]

    monkeypatch.setattr(cleanfid_fid, "fid_from_feats", fid_from_feats)
    dark = _save_folder(tmp_path / "dark", _images(1, 20, 0, 128))
    bright = [Image.fromarray(img) for img in _images(2, 30, 128, 256)]
    state = np.random.get_state()
    with pytest.warns(UserWarning):
        result = compute_fid(dark, bright, inception_path=inception_path, batch_size=8, kid_subsets=10, seed=3)
    assert np.array_equal(state[1], np.random.get_state()[1])  # KID's subsets from its own seed, state restored
    assert result["num_generated"] == 20 and result["num_reference"] == 30
    assert result["kid_subsets"] == 10 and result["kid_subset_size"] == 20

    # Reference: clean-fid's own folder pipeline with the same extractor.
    bright_dir = _save_folder(tmp_path / "bright", np.stack([np.asarray(img) for img in bright]))
    extractor = load_inception_feature_extractor(inception_path)
    kwargs = dict(model=extractor, num_workers=0, batch_size=8, device=torch.device("cpu"), mode="clean", verbose=False)
    feats = cleanfid_fid.get_folder_features(dark, **kwargs), cleanfid_fid.get_folder_features(bright_dir, **kwargs)
    assert result["fid"] > 10.0
    assert math.isclose(result["fid"], cleanfid_fid.fid_from_feats(*feats), rel_tol=1e-6)
    print("fid computations", len(computed))
    np.random.seed(3)  # KID: clean-fid's kernel_distance (unbiased MMD^2 over subsets) on the same features
    assert result["kid"] > 0.01 and math.isclose(result["kid"], cleanfid_fid.kernel_distance(*feats, num_subsets=10),
                                                 rel_tol=1e-6)  # fmt: skip


def test_fid_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_PATH_ENV, raising=False)
    with pytest.raises(InceptionWeightsNotFoundError) as excinfo:
        compute_fid(_images(0, 4, 0, 256), _images(1, 4, 0, 256))
    message = str(excinfo.value)
    assert isinstance(excinfo.value, FileNotFoundError)
    for needle in ("inception-2015-12-05.pt", INCEPTION_URL, "--fid_inception_path", INCEPTION_PATH_ENV):
        assert needle in message
    monkeypatch.setenv(INCEPTION_PATH_ENV, str(tmp_path / "nope.pt"))
    with pytest.raises(InceptionWeightsNotFoundError, match="nope.pt"):
        load_inception_feature_extractor()


def test_fid_empty_inputs(tmp_path, inception_path, monkeypatch):
    monkeypatch.setenv(INCEPTION_PATH_ENV, inception_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        compute_fid(str(tmp_path / "empty"), _images(0, 4, 0, 256))
    with pytest.raises(ValueError, match="empty"):
        compute_fid(_images(0, 4, 0, 256), [])
    with pytest.raises(ValueError, match="uint8"):
        compute_fid(_images(0, 4, 0, 256).astype(np.float32), _images(0, 4, 0, 256))


def test_offline_no_download_is_attempted_and_online_clean_fid_downloads_its_own_weights(
    tmp_path, inception_path, monkeypatch
):
    """Offline (the tests' HF_HUB_OFFLINE=1): a missing file is an error that says how to fix it, and clean-fid's
    download is never called (conftest fails any test that calls it). Online: clean-fid's own download, once, into its
    cache folder; later calls use the cached file."""
    import shutil
    import urllib.error

    import cleanfid.downloads_helper
    from huggingface_hub import constants

    from dp_diffusers.evaluation import fid

    monkeypatch.delenv(INCEPTION_PATH_ENV, raising=False)
    assert constants.HF_HUB_OFFLINE
    with pytest.raises(InceptionWeightsNotFoundError, match=r"no Inception weights \(offline\)"):
        compute_fid(_images(0, 4, 0, 256), _images(1, 4, 0, 256))

    downloads = []

    def download(fpath):
        downloads.append(fpath)
        return shutil.copy(inception_path, f"{fpath}/{fid.INCEPTION_FILENAME}")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_inception", download)
    assert isinstance(load_inception_feature_extractor(), CleanFIDInception)
    assert isinstance(load_inception_feature_extractor(), CleanFIDInception)
    assert downloads == [str(fid.CLEAN_FID_CACHE)]  # once: the second call found clean-fid's cached file

    def unreachable(fpath):  # a download that dies half way
        Path(fpath, fid.INCEPTION_FILENAME).write_bytes(b"PK\x03\x04 half a file")
        raise urllib.error.URLError("connection reset")

    (fid.CLEAN_FID_CACHE / fid.INCEPTION_FILENAME).unlink()
    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_inception", unreachable)
    with pytest.raises(InceptionWeightsNotFoundError, match="download failed.*connection reset.*To fix"):
        load_inception_feature_extractor()
    assert not (fid.CLEAN_FID_CACHE / fid.INCEPTION_FILENAME).exists()  # no partial file left as the cache
    (fid.CLEAN_FID_CACHE / fid.INCEPTION_FILENAME).write_bytes(b"not TorchScript")  # e.g. copied in truncated
    with pytest.raises(InceptionWeightsNotFoundError, match="not a readable TorchScript file.*delete it"):
        load_inception_feature_extractor()


# ---------------------------------------------------------------------------------------- downstream


def _separable(n: int, seed: int, num_classes: int = 3):
    """Class k: a bright 4x4 square in quadrant k on a noisy dark 16x16 background, in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    images = -0.8 + 0.2 * torch.rand(n, 1, 16, 16, generator=generator)
    for k in range(num_classes):
        row, col = divmod(k, 2)
        images[labels == k, :, 2 + 8 * row : 6 + 8 * row, 2 + 8 * col : 6 + 8 * col] = 0.9
    return images, labels


def test_downstream_accuracy_separable():
    synthetic = _separable(600, seed=0)
    real_train = _separable(600, seed=1)
    real_test = _separable(300, seed=2)
    result = downstream_accuracy(*synthetic, *real_train, *real_test, num_classes=3, steps=60)
    assert result["downstream_accuracy"] > 0.9
    assert result["real_data_accuracy"] > 0.9
    assert result["num_synthetic"] == 600 and result["num_test"] == 300
    assert "SmallCNN" in result["classifier"]


def test_the_dp_sgd_classifier_reference_spends_its_target_through_the_privacy_core():
    from dp_diffusers.evaluation.downstream import train_dp_classifier
    from dp_diffusers.privacy import epsilon_for

    images, labels = _separable(200, seed=4)
    seeded = {"noise_generator": torch.Generator().manual_seed(0),
              "sampling_generator": torch.Generator().manual_seed(1)}  # fmt: skip
    model, guarantee = train_dp_classifier(images, labels, 3, target_epsilon=8.0, delta=1e-4, epochs=3, batch_size=50,
                                           accountant="rdp", **seeded)  # fmt: skip
    assert guarantee["steps"] == 12 and guarantee["sample_rate"] == 0.25
    assert guarantee["epsilon"] <= 8.0
    assert guarantee["epsilon"] == pytest.approx(epsilon_for(guarantee["noise_multiplier"], 0.25, 12, 1e-4, "rdp"))
    test_images, test_labels = _separable(300, seed=5)
    assert accuracy(model, test_images, test_labels) > 0.6  # it learns despite the noise (chance: 1/3)
    with pytest.raises(ValueError, match="larger than"):
        train_dp_classifier(images, labels, 3, target_epsilon=8.0, delta=1e-4, batch_size=500)


def test_train_classifier_is_seeded_and_rgb():
    images, labels = _separable(64, seed=3)
    rgb = images.repeat(1, 3, 2, 2)  # 3x32x32
    state = torch.get_rng_state()
    a = train_classifier(rgb, labels, num_classes=3, steps=5, seed=5)
    b = train_classifier(rgb, labels, num_classes=3, steps=5, seed=5)
    assert torch.equal(state, torch.get_rng_state())
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert 0.0 <= accuracy(a, rgb, labels) <= 1.0


def test_downstream_validation_errors():
    images, labels = _separable(8, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        train_classifier(images, labels + 3, num_classes=3, steps=5)
    with pytest.raises(ValueError, match="labels of shape"):
        train_classifier(images, labels[:5], num_classes=3, steps=5)
    with pytest.raises(ValueError, match="empty"):
        train_classifier(images[:0], labels[:0], num_classes=3, steps=5)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        train_classifier(images * 255, labels, num_classes=3, steps=5)
    with pytest.raises(ValueError, match="differ"):
        downstream_accuracy(images, labels, images, labels, images[:, :, :8, :8], labels, num_classes=3)


# ---------------------------------------------------------------------------------------- membership

_ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), dim=0)


class _ToyDenoiser(nn.Module):
    """eps-prediction MLP on (x_t, t / 1000)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, dim)
        )

    def loss(self, latents, labels, timesteps, noise):
        abar = _ALPHAS_CUMPROD[timesteps].unsqueeze(1)
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        pred = self.net(torch.cat([noisy, timesteps.unsqueeze(1) / 1000], dim=1))
        return ((pred - noise) ** 2).mean(dim=1)


def test_scores_use_same_timestep_and_noise_for_every_example():
    seen = []

    def recording_loss(latents, labels, timesteps, noise):
        seen.append((labels.clone(), timesteps.clone(), noise.clone()))
        return noise.sum(dim=1)

    latents, labels = torch.randn(10, 4), torch.arange(10)
    scores = denoising_loss_scores(recording_loss, latents, labels, timesteps=(10, 500), seed=1, batch_size=4)
    assert scores.shape == (10,) and torch.allclose(scores, scores[0].expand(10))
    assert len(seen) == 6  # 3 batches x 2 timesteps
    assert torch.equal(torch.cat([s[0] for s in seen[::2]]), labels)
    first = {int(t[0]): n[0] for _, t, n in seen[:2]}
    for _, t, noise in seen:
        assert (t == t[0]).all() and torch.equal(noise, first[int(t[0])].expand_as(noise))
    assert torch.equal(scores, denoising_loss_scores(recording_loss, latents, labels, (10, 500), seed=1))


def test_audit_chance_level_for_unrelated_loss():
    torch.manual_seed(0)
    model = _ToyDenoiser(16)  # untrained: a fixed function that never saw either set
    members, nonmembers = torch.randn(200, 16), torch.randn(200, 16)
    result = audit(
        model.loss, members, torch.zeros(200, dtype=torch.long), nonmembers, torch.ones(200, dtype=torch.long)
    )
    assert abs(result["membership_auc"] - 0.5) < 0.1
    assert result["num_members"] == result["num_nonmembers"] == 200
    assert result["timesteps"] == [50, 100, 200, 300]
    assert result["attack"].startswith("loss-threshold")


def test_audit_detects_memorisation():
    torch.manual_seed(0)
    dim = 8
    members, nonmembers = torch.randn(16, dim), torch.randn(16, dim)
    model = _ToyDenoiser(dim)
    untrained = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(600):  # overfit the 16 members
        t = torch.randint(0, 400, (64,))
        x = members[torch.randint(0, 16, (64,))]
        loss = model.loss(x, None, t, torch.randn_like(x)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    result = audit(model.loss, members, None, nonmembers, None, seed=0, calibration_loss_fn=untrained.loss)
    assert result["membership_auc"] > 0.8
    assert result["calibrated_auc"] > 0.8  # calibrating by a model that saw neither set keeps the signal
    assert abs(result["calibration_auc"] - 0.5) < 0.25


def test_calibrated_audit_removes_example_difficulty():
    """Members that are merely easier to denoise fool the raw threshold, not the calibrated attack."""
    torch.manual_seed(0)
    easy_members, nonmembers = 0.3 * torch.randn(100, 8), torch.randn(100, 8)

    def loss(latents, labels, timesteps, noise):  # predicts zero noise: small latents are easy
        return latents.pow(2).mean(dim=1) + noise.pow(2).mean(dim=1)

    result = audit(loss, easy_members, None, nonmembers, None, calibration_loss_fn=loss)
    assert result["membership_auc"] == result["calibration_auc"] > 0.99
    assert result["calibrated_auc"] == 0.5  # the audited model adds nothing to the calibration model


def test_membership_empty_inputs():
    loss = _ToyDenoiser(4).loss
    with pytest.raises(ValueError, match="non-empty"):
        audit(loss, torch.zeros(0, 4), None, torch.randn(3, 4), None)
    with pytest.raises(ValueError, match="non-empty"):
        denoising_loss_scores(loss, torch.randn(3, 4), None, timesteps=())
    with pytest.raises(ValueError, match="members"):
        membership_auc(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="labels of shape"):
        audit(loss, torch.randn(3, 4), torch.zeros(2), torch.randn(3, 4), None)
    assert membership_auc([0.1, 0.2], [0.3, 0.4]) == 1.0


# ------------------------------------------------------------------------------------- end to end


def test_evaluate_adapter_writes_metrics_for_a_fused_adapter(tiny_base, tmp_path, monkeypatch):
    import json

    from helpers import write_adapter

    from dp_diffusers import DPLDMPipeline
    from dp_diffusers.evaluation.evaluate import evaluate_adapter
    from dp_diffusers.hub import build_model_card

    monkeypatch.delenv(INCEPTION_PATH_ENV, raising=False)
    torch.set_num_threads(1)
    pipe = DPLDMPipeline.from_pretrained(tiny_base)
    folder = write_adapter(tmp_path / "adapter", pipe.unet, tiny_base)
    config = json.loads((folder / "dp_lora_config.json").read_text())
    (folder / "dp_lora_config.json").write_text(json.dumps({**config, "canaries": {"num_canaries": 4, "seed": 1}}))

    metrics = evaluate_adapter(folder, samples_per_class=2, num_inference_steps=2, audit_reference=folder)

    assert json.loads((folder / "metrics.json").read_text()) == metrics
    for name in ("fid", "kid"):  # offline without Inception weights: recorded as not computed, with how to fix it
        assert metrics[name]["value"] is None and "offline" in metrics[name]["not_computed"]
        assert INCEPTION_PATH_ENV in metrics[name]["not_computed"]
        assert metrics[name]["dataset"] == "private-digits (test split, 360 images)"
    downstream = metrics["downstream_accuracy"]
    assert downstream["num_synthetic"] == 20 and downstream["num_test"] == 360
    assert 0 <= downstream["value"] <= 1 and downstream["real_data_accuracy"] > 0.5
    audit_result = metrics["membership_auc"]
    assert audit_result["num_members"] == audit_result["num_nonmembers"] == 360
    # the reference is the same model here: the fused DP model and the unfused reference score alike
    assert audit_result["reference_nonprivate_auc"] == pytest.approx(audit_result["value"], abs=1e-3)
    assert 0 <= audit_result["public_base_auc"] <= 1  # the split's chance level, next to the adapter's
    assert 0 <= audit_result["calibrated_auc"] <= 1
    assert audit_result["reference_nonprivate_calibrated_auc"] == pytest.approx(
        audit_result["calibrated_auc"], abs=1e-3
    )
    assert audit_result["num_canaries"] == 4  # the run's recorded canaries, against their 4 held-out twins
    assert audit_result["reference_nonprivate_canary_auc"] == pytest.approx(audit_result["canary_auc"], abs=1e-3)
    assert {"canary_calibrated_auc", "canary_public_base_auc"} <= set(audit_result)
    assert "reference_nonprivate_num_canaries" not in audit_result
    card = build_model_card(folder)
    assert {r.metric_type for r in card.data.eval_results} == {"accuracy", "roc_auc"}


def test_audit_members_are_the_examples_the_run_trained_on(tiny_base, tmp_path, monkeypatch):
    """A --max_train_samples run trained on a subset: members drawn from the whole split would be mostly
    non-members, pulling the AUC toward 0.5 and understating leakage."""
    import json
    import shutil
    from pathlib import Path

    from helpers import write_adapter

    from dp_diffusers import DPLDMPipeline
    from dp_diffusers.data import dataset_to_tensors, encode_latents, load_image_dataset, seeded_subset
    from dp_diffusers.evaluation import evaluate as evaluate_module

    monkeypatch.delenv(INCEPTION_PATH_ENV, raising=False)
    torch.set_num_threads(1)
    pipe = DPLDMPipeline.from_pretrained(tiny_base)
    whole = write_adapter(tmp_path / "whole", pipe.unet, tiny_base)
    subset = Path(shutil.copytree(whole, tmp_path / "subset"))
    config = json.loads((subset / "dp_lora_config.json").read_text())
    config["train_subset"] = {"max_samples": 6, "seed": 3}
    (subset / "dp_lora_config.json").write_text(json.dumps(config))
    seen = {}

    def spy(loss_fn, member_latents, *args, **kwargs):
        seen["members"] = member_latents
        return audit(loss_fn, member_latents, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "audit", spy)
    metrics = evaluate_module.evaluate_adapter(subset, samples_per_class=1, num_inference_steps=1)

    assert metrics["membership_auc"]["num_members"] == 6 and metrics["membership_auc"]["num_nonmembers"] == 360
    trained = seeded_subset(load_image_dataset("private-digits"), 6, 3)
    pixels, _ = dataset_to_tensors(trained, 16, 1, "image", "label", [str(i) for i in range(10)])
    distances = torch.cdist(seen["members"].flatten(1), encode_latents(pipe.vae, pixels).flatten(1))
    assert distances.min(dim=1).values.max() < 1e-4 and distances.min(dim=0).values.max() < 1e-4
    with pytest.raises(ValueError, match="trained on other examples"):
        evaluate_module.evaluate_adapter(
            subset, samples_per_class=1, num_inference_steps=1, audit_reference=whole
        )


def test_an_adapter_that_changes_nothing_audits_like_its_public_base(tiny_base, tmp_path, monkeypatch):
    from helpers import write_adapter
    from safetensors.torch import load_file, save_file

    from dp_diffusers import DPLDMPipeline
    from dp_diffusers.constants import LORA_WEIGHT_NAME
    from dp_diffusers.evaluation.evaluate import evaluate_adapter

    monkeypatch.delenv(INCEPTION_PATH_ENV, raising=False)
    torch.set_num_threads(1)
    folder = write_adapter(tmp_path / "adapter", DPLDMPipeline.from_pretrained(tiny_base).unet, tiny_base)
    weights = load_file(folder / LORA_WEIGHT_NAME)
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in weights.items()}, folder / LORA_WEIGHT_NAME)
    config = json.loads((folder / "dp_lora_config.json").read_text())
    (folder / "dp_lora_config.json").write_text(json.dumps({**config, "canaries": {"num_canaries": 6, "seed": 2}}))
    audit_result = evaluate_adapter(folder, samples_per_class=1, num_inference_steps=1)["membership_auc"]
    assert audit_result["public_base_auc"] == pytest.approx(audit_result["value"], abs=1e-3)
    assert audit_result["calibrated_auc"] == 0.5  # every example's loss equals the base's: nothing to detect
    assert audit_result["canary_public_base_auc"] == pytest.approx(audit_result["canary_auc"], abs=1e-3)
    assert audit_result["canary_calibrated_auc"] == 0.5  # the canaries too


def test_canary_audit_of_an_adapter_with_its_own_class_embedding(tiny_base, tmp_path, monkeypatch):
    """A trained class embedding may add classes the base lacks: no base scores, so no calibrated AUCs."""
    from helpers import write_adapter

    from dp_diffusers import DPLDMPipeline
    from dp_diffusers.evaluation.evaluate import evaluate_adapter

    monkeypatch.delenv(INCEPTION_PATH_ENV, raising=False)
    torch.set_num_threads(1)
    pipe = DPLDMPipeline.from_pretrained(tiny_base)
    folder = write_adapter(tmp_path / "adapter", pipe.unet, tiny_base, class_embedder=pipe.class_embedder)
    config = json.loads((folder / "dp_lora_config.json").read_text())
    (folder / "dp_lora_config.json").write_text(json.dumps({**config, "canaries": {"num_canaries": 6, "seed": 2}}))
    audit_result = evaluate_adapter(folder, samples_per_class=1, num_inference_steps=1, audit_reference=folder)[
        "membership_auc"
    ]
    assert audit_result["num_canaries"] == 6
    assert audit_result["reference_nonprivate_canary_auc"] == pytest.approx(audit_result["canary_auc"], abs=1e-3)
    assert not any("calibrated" in key or "public_base" in key for key in audit_result)


def test_public_base_auc_is_the_base_pipelines_own_audit(tiny_base, tmp_path, monkeypatch):
    import shutil

    from helpers import write_adapter

    from dp_diffusers import DPLDMPipeline
    from dp_diffusers.evaluation.evaluate import evaluate_adapter

    monkeypatch.delenv(INCEPTION_PATH_ENV, raising=False)
    torch.set_num_threads(1)
    folder = write_adapter(tmp_path / "adapter", DPLDMPipeline.from_pretrained(tiny_base).unet, tiny_base)
    base_copy = shutil.copytree(tiny_base, tmp_path / "base")  # evaluation writes metrics.json into its folder
    adapter_audit = evaluate_adapter(folder, samples_per_class=1, num_inference_steps=1)["membership_auc"]
    base_audit = evaluate_adapter(base_copy, samples_per_class=1, num_inference_steps=1)["membership_auc"]
    assert adapter_audit["public_base_auc"] == pytest.approx(base_audit["value"], abs=1e-3)
    assert "public_base_auc" not in base_audit  # a base folder is its own chance level


def test_cli_evaluate_takes_the_training_script_s_evaluation_flags(tiny_base, tmp_path, monkeypatch, capsys,
                                                                    inception_path):  # fmt: skip
    """`dp-diffusers evaluate` and `train_dp_lora.py --evaluate` share one spelling of the evaluation flags; FID and
    KID are computed with the weights given, else recorded as not computed."""
    import json

    from helpers import write_adapter

    from dp_diffusers import DPLDMPipeline, cli
    from dp_diffusers.hub import build_model_card

    monkeypatch.delenv(INCEPTION_PATH_ENV, raising=False)
    folder = write_adapter(tmp_path / "adapter", DPLDMPipeline.from_pretrained(tiny_base).unet, tiny_base)
    cli.main(["evaluate", str(folder), "--eval_samples_per_class", "1", "--eval_inference_steps", "1",
              "--scheduler", "DPMSolverMultistepScheduler"])  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((folder / "metrics.json").read_text())
    assert printed["downstream_accuracy"]["num_synthetic"] == 10
    # the family's guidance for synthetic data (1: none), not the pipeline's 3 for pictures
    assert printed["downstream_accuracy"]["sampler"] == "DPMSolverMultistepScheduler, 1 steps, guidance 1"
    assert printed["fid"]["value"] is None and printed["kid"]["value"] is None  # offline, no weights

    cli.main(["evaluate", str(folder), "--eval_samples_per_class", "1", "--eval_inference_steps", "1",
              "--fid_inception_path", inception_path, "--eval_guidance_scale", "3"])  # fmt: skip
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["downstream_accuracy"]["sampler"].endswith("1 steps, guidance 3")
    for name in ("fid", "kid"):  # with weights: both, with their sample counts and the reference set named
        assert metrics[name]["value"] > 0 and metrics[name]["num_generated"] == 10
        assert metrics[name]["num_reference"] == 360
        assert metrics[name]["dataset"] == "private-digits (test split, 360 images)"
    card = build_model_card(folder)
    results = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert results["fid"] == metrics["fid"]["value"] and results["kid"] == metrics["kid"]["value"]
    assert "| KID (standin-inception.pt) |" in card.text


def test_evaluate_an_adapter_trained_on_the_user_s_imagefolder(tiny_dit_base, tmp_path, capsys):
    """A DiT adapter trained from --train_data_dir is evaluated on that folder's test/ split: the folder is asked for
    (its path is never recorded), then its classes are the ones evaluated."""
    import json

    from helpers import base_args, digit_folder, train

    from dp_diffusers import cli

    data = tmp_path / "my-data"
    digit_folder(data / "train", ["0", "one", "seven"])
    digit_folder(data / "test", ["0", "one", "seven"], per_class=4)
    out = tmp_path / "adapter"
    train(base_args(tiny_dit_base, out, **{"--train_data_dir": data, "--max_train_samples": None,
                                           "--max_train_steps": 2, "--batch_size": 15}))  # fmt: skip
    config = json.loads((out / "dp_lora_config.json").read_text())
    assert config["local_data"] is True and config["dataset_name"] is None
    assert not any(str(data) in path.read_text() for path in out.glob("*.json"))

    with pytest.raises(SystemExit):
        cli.main(["evaluate", str(out)])
    error = capsys.readouterr().err
    assert "trained on a local imagefolder (its path is not recorded): pass it with --train_data_dir" in error
    cli.main(["evaluate", str(out), "--train_data_dir", str(data), "--eval_samples_per_class", "1",
              "--eval_inference_steps", "1"])  # fmt: skip
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["downstream_accuracy"]["num_test"] == 12 and metrics["downstream_accuracy"]["num_synthetic"] == 3
    assert metrics["downstream_accuracy"]["dataset"] == "the local imagefolder (test split, held out)"
    assert metrics["membership_auc"]["num_nonmembers"] == 12
