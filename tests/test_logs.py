"""What a run prints: its own progress lines, and never a private caption.

Captions are private data. Libraries echo the text they cut (diffusers' "The following part of your input was
truncated because CLIP can only handle sequences up to N tokens: [...]", in every pipeline's ``encode_prompt``), at
WARNING on their own stderr handlers, which ``caplog`` does not see: these tests capture the file descriptors too,
with every logger at DEBUG. The script's own INFO lines must show in a user's run whatever configured logging first
(opacus calls ``logging.basicConfig`` at import).
"""

import logging
import os
import subprocess
import sys

import pytest
from helpers import ROOT, base_args, caption_folder, digit_folder, train

pytestmark = pytest.mark.usefixtures("one_thread")

#: unique words in the part of each caption the tiny tokenizers (16 tokens) cut off
SECRET_WORDS = ["zyxwvut", "qqqqkkkk", "belongingtopatient"]


def long_captions(n: int) -> list[str]:
    return [f"x{i} belongingtopatient zyxwvut diagnosis qqqqkkkk" for i in range(n)]


def run_args(base, out, data, **flags):
    return base_args(base, out, **{"--train_data_dir": data, "--max_train_samples": None, "--batch_size": 6,
                                   "--max_train_steps": 2, "--noise_multiplier": 1.0, "--samples_per_class": 1,
                                   "--validation_prompt": "a public prompt", "--num_inference_steps": 2,
                                   **flags})  # fmt: skip


@pytest.fixture
def every_logger_at_debug():
    """Every logger (diffusers', transformers' and datasets' library loggers, with their own handlers) at DEBUG."""
    import datasets
    import diffusers
    import transformers

    libraries = (diffusers.utils.logging, transformers.utils.logging, datasets.utils.logging)
    levels = {name: logging.getLogger(name).level for name in ["", *logging.root.manager.loggerDict]}
    verbosity = [library.get_verbosity() for library in libraries]
    for library in libraries:
        library.set_verbosity_debug()
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    yield
    for library, level in zip(libraries, verbosity):
        library.set_verbosity(level)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("base", ["tiny_sd_base", "tiny_sdxl_base", "tiny_sd3_base", "tiny_flux_base"])
def test_no_caption_reaches_any_log_at_any_level(base, request, tmp_path, capfd, caplog, every_logger_at_debug):
    data = caption_folder(tmp_path / "data", long_captions(12))
    flow = base in ("tiny_sd3_base", "tiny_flux_base")  # and T5, which diffusers' encode_prompt also echoes
    with caplog.at_level(logging.DEBUG):
        train(run_args(request.getfixturevalue(base), tmp_path / "adapter", data,
                       **({"--max_sequence_length": 12} if flow else {})))  # fmt: skip
    out, err = capfd.readouterr()
    logged = out + err + caplog.text
    assert "12 of 12 captions are longer than the 16 tokens tokenizer keeps" in logged  # a count, never the text
    if flow:
        assert "12 of 12 captions are longer than the 12 tokens tokenizer_" in logged
    assert "DEBUG" in caplog.text  # the loggers really were at DEBUG
    assert not [word for word in SECRET_WORDS if word in logged]


def test_a_user_s_run_prints_its_progress_and_no_caption(tiny_sdxl_base, tmp_path):
    """``python training_scripts/train_dp_lora.py ...`` as a user runs it (opacus configures logging at import):
    the script's INFO lines show, the truncation is counted, no caption text is printed."""
    data = caption_folder(tmp_path / "data", long_captions(12))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "training_scripts" / "train_dp_lora.py"),
               *map(str, run_args(tiny_sdxl_base, tmp_path / "adapter", data))]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    printed = run.stdout + run.stderr
    assert run.returncode == 0, printed[-3000:]
    for line in ("LoRA on ", "12 private examples, q=", "epsilon=", "Adapter in ", "Model card: "):
        assert line in run.stderr, f"{line!r} missing from the run's log"
    assert "captions are longer than the 16 tokens" in run.stderr
    assert not [word for word in SECRET_WORDS if word in printed]


def test_trackers_get_hyperparameters_and_never_a_token_or_a_path(tiny_base, tmp_path):
    """A run with ``--report_to tensorboard``, a (fake) Hub token and a private data folder: TensorBoard's hparams
    have the hyper-parameters, and no file the run writes holds a byte of the token or of the data path."""
    token, data = "hf_SECRETtokenZZZ123", digit_folder(tmp_path / "patients-of-dr-x", ["3", "7"], per_class=12)
    out = tmp_path / "adapter"
    train(base_args(tiny_base, out, **{"--train_data_dir": data, "--max_train_samples": None, "--batch_size": 8,
                                       "--max_train_steps": 2, "--report_to": "tensorboard", "--hub_token": token,
                                       "--cache_dir": tmp_path / "cache"}))  # fmt: skip
    hparams = next(out.rglob("hparams.yml")).read_text()
    assert "learning_rate" in hparams and "noise_multiplier" in hparams
    written = [path for path in out.rglob("*") if path.is_file()]
    assert any("events.out.tfevents" in path.name for path in written)
    for secret in (token, str(data), data.name):
        assert not [path for path in written if secret.encode() in path.read_bytes()], secret


class Tracker:
    def __init__(self, name: str):
        self.name, self.logged = name, []

    def log(self, values, step):
        self.logged.append(values)


def test_the_private_loss_goes_to_local_trackers_only_unless_asked():
    """The loss on private batches (no noise: outside epsilon) reaches local TensorBoard, not a remote tracker,
    unless ``--report_private_loss``; epsilon (a function of the schedule) reaches every tracker."""
    from types import SimpleNamespace

    from dp_diffusers.training_utils import log_to_trackers, remote_trackers

    for to_remote in (False, True):
        trackers = [Tracker("tensorboard"), Tracker("wandb")]
        accelerator = SimpleNamespace(is_main_process=True, trackers=trackers)
        log_to_trackers(accelerator, {"loss": 0.5, "epsilon": 1.0}, 3, ("loss",), to_remote)
        assert trackers[0].logged == [{"loss": 0.5, "epsilon": 1.0}]
        assert trackers[1].logged == [{"loss": 0.5, "epsilon": 1.0} if to_remote else {"epsilon": 1.0}]
        assert remote_trackers(accelerator) == ["wandb"]
