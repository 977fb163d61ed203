"""``dp-diffusers tune``: private hyper-parameter selection, with the tuning inside the reported epsilon.

    dp-diffusers tune --search_space space.json --expected_runs 3 \\
        --pretrained_model_name_or_path outputs/base --output_dir outputs/dp-lora-tuned --target_epsilon 10

Draws K (secret; ``--repeat_distribution`` with mean ``--expected_runs``) and K candidates from the search space
(secret; uniform over each list, or a range's distribution), trains each candidate with ``train_dp_lora.py`` on the
private train split minus a validation part held out by a public rule (``--validation_split``), scores each run with
a DP score on that part, and keeps only the best run's folder: its adapter, its card, and a ``dp_report.json`` whose
``epsilon`` is the whole tuning's (``dp_diffusers.privacy.selection``: Papernot & Steinke's repeat-and-select).

The scores (``--score``):

* ``accuracy`` (class-conditional bases): a small CNN trained on the run's synthetic samples (post-processing) and
  each validation example's (unit's: the mean over its examples) correctness; the sum, sensitivity 1, plus Gaussian
  noise of std ``--score_noise_multiplier``; the score is that noisy count over the (public) number of units;
* ``denoising_loss`` (any base): each validation example's denoising loss at fixed timesteps and noise, clipped to
  ``[0, --score_loss_bound]`` (a unit's: the mean over its examples); minus the noisy sum, sensitivity the bound.

Nothing about K, the other runs or their scores is written to the winner's folder, a card, the Hub or a tracker; the
state that lets a killed tuning resume (K, the candidates, the scores drawn so far) lives in ``OUTPUT_DIR/.tuning``,
local, and is deleted when the tuning ends. The operator's terminal shows the runs as they go.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .privacy import PrivacyBudgetError, Release
from .privacy.selection import (
    REPEAT_DISTRIBUTIONS,
    RunSchedule,
    calibrate_tuning,
    check_tuning,
    noisy_score,
    run_epsilon,
    sample_num_runs,
    tuned_epsilon,
)

logger = logging.getLogger(__name__)

#: flags whose values change what a run spends (sigma, q, steps, other releases): finite lists only
PRIVACY_FLAGS = ("batch_size", "num_train_epochs", "max_train_steps", "noise_multiplier",
                 "central_image_noise_multiplier")  # fmt: skip
#: flags a search space may not vary: the guarantee's terms, the data, the outputs, the audit and the trackers
FIXED_FLAGS = ("target_epsilon", "target_delta", "accountant", "privacy_unit_column", "max_examples_per_unit",
               "pretrained_model_name_or_path", "revision", "pretrained_vae_model_name_or_path", "output_dir",
               "dataset_name", "dataset_config_name", "train_data_dir", "image_column", "label_column",
               "caption_column", "cache_dir", "max_train_samples", "validation_split", "validation_split_seed",
               "class_names", "class_names_from_data", "resume_from_checkpoint", "report_to", "logging_dir",
               "report_private_loss", "evaluate", "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo",
               "num_canaries", "disable_dp", "seed")  # fmt: skip
#: range distributions of a search space
RANGES = ("uniform", "log_uniform", "int_uniform")
STATE_DIR = ".tuning"
#: the largest score noise std, as a fraction of the score's range, that a validation part may leave
MAX_SCORE_NOISE = 0.2
#: the most classes the accuracy score samples (every class of the adapter's public label set)
MAX_SCORE_CLASSES = 100
SCORES = ("accuracy", "denoising_loss")
#: the tuning's own settings: a tuning resumes only with the same ones
TUNE_SETTINGS = ("expected_runs", "repeat_distribution", "score", "score_noise_multiplier", "score_loss_bound",
                 "score_samples_per_class", "score_inference_steps", "validation_split", "validation_split_seed")


class TuningError(ValueError):
    """A search space, a tuning setting or a tuning folder that cannot be used; raised before any training."""


# ---- the search space --------------------------------------------------------------------------------------------


@dataclass
class SearchSpace:
    """Training flags (names without ``--``) -> a list of values (drawn uniformly) or a range ``{"low", "high",
    "distribution"}`` (``uniform``, ``log_uniform``, ``int_uniform``). Privacy-relevant flags take lists."""

    flags: dict[str, Any]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SearchSpace:
        path = Path(path)
        if not path.is_file():
            raise TuningError(f"--search_space {path.name!r} is not a file.")
        text, yaml_file = path.read_text(), path.suffix.lower() in (".yaml", ".yml")
        try:
            if yaml_file:
                import yaml

                flags = yaml.safe_load(text)
            else:
                flags = json.loads(text)
        except Exception as err:  # the parser's own message says where
            kind = "YAML" if yaml_file else "JSON"
            raise TuningError(f"--search_space {path.name!r} is not valid {kind}: {err}") from None
        return cls.checked(flags)

    @classmethod
    def checked(cls, flags: Any) -> SearchSpace:
        if not isinstance(flags, dict) or not flags:
            raise TuningError("The search space must map at least one training flag (without --) to values.")
        for name, values in flags.items():
            name = str(name).lstrip("-")
            if name in FIXED_FLAGS:
                raise TuningError(f"--{name} cannot be tuned: it sets the guarantee, the data or the outputs. Give it "
                                  "as a fixed flag.")  # fmt: skip
            if isinstance(values, list):
                if not values:
                    raise TuningError(f"--{name}: an empty list of values.")
            elif isinstance(values, dict):
                if name in PRIVACY_FLAGS:
                    raise TuningError(f"--{name} changes the privacy of a run: give it a finite list of values, not a "
                                      "range.")  # fmt: skip
                unknown = set(values) - {"low", "high", "distribution"}
                low, high = values.get("low"), values.get("high")
                kind = values.get("distribution", "uniform")
                if unknown or not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or low >= high \
                        or kind not in RANGES or (kind == "log_uniform" and low <= 0):  # fmt: skip
                    raise TuningError(f"--{name}: a range is {{'low': a, 'high': b, 'distribution': one of {RANGES}}} "
                                      f"with a < b (a > 0 for log_uniform), got {values}.")  # fmt: skip
            else:
                raise TuningError(f"--{name}: give a list of values or a range, got {values!r}.")
        return cls({str(name).lstrip("-"): values for name, values in flags.items()})

    def draw(self, rng: np.random.Generator) -> dict[str, Any]:
        """One candidate: each flag's value drawn from ``rng`` independently (no adaptivity)."""
        candidate = {}
        for name, values in sorted(self.flags.items()):
            if isinstance(values, list):
                candidate[name] = values[int(rng.integers(len(values)))]
            elif values.get("distribution", "uniform") == "log_uniform":
                candidate[name] = float(math.exp(rng.uniform(math.log(values["low"]), math.log(values["high"]))))
            elif values.get("distribution") == "int_uniform":
                candidate[name] = int(rng.integers(int(values["low"]), int(values["high"]) + 1))
            else:
                candidate[name] = float(rng.uniform(values["low"], values["high"]))
        return candidate

    def privacy_combinations(self) -> list[dict[str, Any]]:
        """Every combination of the privacy-relevant flags' values in the space (one empty one if there are none)."""
        names = [name for name in PRIVACY_FLAGS if name in self.flags]
        return [dict(zip(names, values)) for values in itertools.product(*(self.flags[n] for n in names))]

    def examples(self) -> list[dict[str, Any]]:
        """Candidates that between them use every listed value and every range's ends (to check them up front)."""
        longest = max((len(v) if isinstance(v, list) else 2) for v in self.flags.values())
        out = []
        for i in range(longest):
            out.append({name: (values[i % len(values)] if isinstance(values, list) else
                               (values["low"] if i % 2 == 0 else values["high"]))
                        for name, values in self.flags.items()})  # fmt: skip
        return out


def flags_to_argv(candidate: dict[str, Any]) -> list[str]:
    """``--name value`` for each flag (``True``: the switch alone; ``False``/``None``: left out; a list: repeated)."""
    argv = []
    for name, value in candidate.items():
        if value is True:
            argv.append(f"--{name}")
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            argv += [f"--{name}", *map(str, value)]
        else:
            argv += [f"--{name}", str(value)]
    return argv


# ---- the tuning's state (local, deleted at the end) ---------------------------------------------------------------


class TuningState:
    """``OUTPUT_DIR/.tuning/state.json``: the secret draws (K, the candidates, their noise multipliers) and each
    finished run's noisy score, written before anything else happens with them, so that a resumed tuning neither
    redraws K nor scores a run twice (a second noisy score would be one more release)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / STATE_DIR / "state.json"

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> dict[str, Any]:
        return json.loads(self.path.read_text())

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.path)

    def run_dir(self, run: int) -> Path:
        return self.folder / STATE_DIR / f"run-{run}"

    def remove(self) -> None:
        shutil.rmtree(self.folder / STATE_DIR, ignore_errors=True)


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ---- the command -------------------------------------------------------------------------------------------------


def add_tune_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--search_space", required=True, help="JSON or YAML: training flag -> list of values or range.")
    parser.add_argument("--expected_runs", type=float, default=3.0, help="E[K], the mean number of runs (>= 1).")
    parser.add_argument("--repeat_distribution", default="logarithmic", choices=sorted(REPEAT_DISTRIBUTIONS),
                        help="K's distribution (Papernot & Steinke 2022); logarithmic is the cheapest at small E[K]; "
                        "poisson may draw K = 0 (then nothing is released).")  # fmt: skip
    parser.add_argument("--score", default=None, choices=SCORES,
                        help="The DP score (default: accuracy for class-conditional bases, else denoising_loss).")
    parser.add_argument("--score_noise_multiplier", type=float, default=10.0,
                        help="Gaussian noise std of the score's sum / its sensitivity (one validation unit).")
    parser.add_argument("--score_loss_bound", type=float, default=1.0,
                        help="denoising_loss: each unit's loss is clipped to [0, B] (the sum's sensitivity).")
    parser.add_argument("--score_samples_per_class", type=int, default=50,
                        help="accuracy: synthetic images per class the score's classifier trains on.")
    parser.add_argument("--score_inference_steps", type=int, default=10, help="Denoising steps of those images.")


@dataclass
class TuningPlan:
    """What the tuning will spend, computed from the space, the fixed flags and N before any training."""

    schedules: list[RunSchedule]
    #: privacy combination (as a sorted JSON string) -> its noise multiplier
    noise_multipliers: dict[str, float]
    epsilon: float
    run_epsilon: float
    num_units: int
    num_validation_units: int


def _key(combination: dict[str, Any]) -> str:
    return json.dumps(combination, sort_keys=True)


def plan_tuning(space: SearchSpace, fixed: argparse.Namespace, tune_args: argparse.Namespace, train) -> TuningPlan:
    """N and the validation part's size (counted, nothing else read), each privacy combination's schedule and noise,
    and the total epsilon; a clear error when the target cannot be met."""
    from .data import privacy_unit_members
    from .training_utils import load_training_dataset

    def units(part: str) -> int:
        dataset = load_training_dataset(fixed, part)
        column = fixed.privacy_unit_column
        return len(privacy_unit_members(dataset, column)) if column else len(dataset)

    n, n_validation = units("train"), units("validation")
    if tune_args.score_noise_multiplier / n_validation > MAX_SCORE_NOISE:  # (a unit's term spans the sensitivity)
        raise TuningError(
            f"The validation part has {n_validation} units: the score's noise std ({tune_args.score_noise_multiplier} "
            f"sensitivities) would be {tune_args.score_noise_multiplier / n_validation:.0%} of its range. Use a larger "
            "--validation_split or a smaller --score_noise_multiplier."
        )
    templates, combinations = [], space.privacy_combinations()
    for combination in combinations:
        values = {**vars(fixed), **combination}
        steps = train.planned_steps(argparse.Namespace(**values), n)
        sigma = values.get("noise_multiplier")
        releases = (Release(values["central_image_noise_multiplier"]),) if values.get(
            "central_image_noise_multiplier") else ()  # fmt: skip
        templates.append(RunSchedule(math.nan if sigma is None else float(sigma), values["batch_size"] / n, steps,
                                     releases))  # fmt: skip
    delta, distribution, mean = fixed.target_delta, tune_args.repeat_distribution, tune_args.expected_runs
    sigma_s = tune_args.score_noise_multiplier
    if any(math.isnan(t.noise_multiplier) for t in templates):
        target = fixed.target_epsilon if fixed.target_epsilon is not None else train.DEFAULT_TARGET_EPSILON
        schedules = calibrate_tuning(templates, sigma_s, mean, distribution, target, delta)
    else:
        schedules = templates
    epsilon = tuned_epsilon(schedules, sigma_s, mean, distribution, delta)
    if fixed.target_epsilon is not None and epsilon > fixed.target_epsilon:
        raise PrivacyBudgetError(f"The tuning would spend epsilon={epsilon:.3f} > --target_epsilon "
                                 f"{fixed.target_epsilon} with the given noise multipliers.")  # fmt: skip
    sigmas = {_key(c): s.noise_multiplier for c, s in zip(combinations, schedules)}
    return TuningPlan(schedules, sigmas, epsilon, run_epsilon(schedules, sigma_s, delta), n, n_validation)


def _sensitivity(tune_args: argparse.Namespace) -> float:
    """One validation unit's largest effect on the score's sum: 1 (a correctness in [0, 1]) or the loss bound."""
    return tune_args.score_loss_bound if tune_args.score == "denoising_loss" else 1.0


# ---- the DP score of a run ---------------------------------------------------------------------------------------


def _unit_means(values: np.ndarray, validation, column: str | None) -> np.ndarray:
    """Each unit's mean of ``values`` (one per validation row): the rows themselves without a unit column."""
    if column is None:
        return values
    from .data import privacy_unit_members

    return np.array([values[members].mean() for members in privacy_unit_members(validation, column)])


def validation_sum(adapter_dir: Path, validation, fixed: argparse.Namespace, tune_args: argparse.Namespace) -> float:
    """The score's sum before noise over the validation units (each unit's term in [0, 1] for ``accuracy``, in [0,
    B] for ``denoising_loss``; negated there, so that higher is better): one unit moves it by at most the
    sensitivity."""
    import torch

    from .data import dataset_to_tensors, encode_latents, resolve_columns
    from .evaluation.downstream import train_classifier
    from .evaluation.evaluate import denoiser_loss_fn, generate_labelled, synthetic_call_kwargs
    from .evaluation.membership import denoising_loss_scores
    from .pipelines import DPLDMPipeline

    pipe = DPLDMPipeline.from_pretrained(adapter_dir)
    pipe.set_progress_bar_config(disable=True)
    resolution, call_kwargs = synthetic_call_kwargs(pipe, fixed.eval_guidance_scale)
    image_column, label_column = resolve_columns(validation, fixed.image_column, fixed.label_column)
    channels, column = pipe.vae.config.in_channels, fixed.privacy_unit_column
    if tune_args.score == "accuracy":
        # the classifier's classes: the adapter's public label set, never the validation data's (one example's
        # label would then change the classifier every other example is judged by: sensitivity above 1)
        id2label = pipe.adapter_config.id2label or {}
        if not id2label or len(id2label) > MAX_SCORE_CLASSES:
            raise TuningError(f"--score accuracy needs a class-conditional adapter with at most {MAX_SCORE_CLASSES} "
                              "classes (pass --class_names); use --score denoising_loss otherwise.")  # fmt: skip
        names = [id2label[i] for i in sorted(id2label)]
        pixels, labels = dataset_to_tensors(validation, resolution, channels, image_column, label_column, names)
        conditions = pipe.family.sampling_conditions(pipe, names, pipe.adapter_config.condition_options())
        synthetic, synthetic_labels = generate_labelled(pipe, conditions, tune_args.score_samples_per_class,
                                                        tune_args.score_inference_steps, fixed.seed, resolution,
                                                        **call_kwargs)  # fmt: skip
        classifier = train_classifier(synthetic, synthetic_labels, len(names), seed=fixed.seed)
        with torch.no_grad():
            predicted = torch.cat([classifier(x).argmax(1) for x in pixels.split(512)])
        terms = (predicted == labels).double().numpy()
    else:
        examples = pipe.family.prepare_examples(pipe, validation, image_column, label_column, resolution,
                                                pipe.adapter_config.condition_options())  # fmt: skip
        pixels, _ = dataset_to_tensors(validation, resolution, channels, image_column, None)
        latents, conditions = encode_latents(pipe.vae, pixels), pipe.family.encode_conditions(pipe, examples)
        losses = denoising_loss_scores(denoiser_loss_fn(pipe, pipe.adapter_config.objective_options()), latents,
                                       conditions, seed=fixed.seed)  # fmt: skip
        terms = losses.double().numpy().clip(0.0, tune_args.score_loss_bound)
    total = float(_unit_means(terms, validation, column).sum())
    return total if tune_args.score == "accuracy" else -total


# ---- the command -------------------------------------------------------------------------------------------------


def training_script():
    """``training_scripts/train_dp_lora.py`` as a module (the tuning calls its ``main`` once per run)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "training_scripts" / "train_dp_lora.py"
    if not path.is_file():
        raise TuningError(f"dp-diffusers tune runs {path.name}, which is not at {path.parent}: use a source checkout.")
    spec = importlib.util.spec_from_file_location("train_dp_lora", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tune(tune_args: argparse.Namespace, training_argv: list[str], key: int | None = None) -> Path:
    """Run the tuning (see the module docstring) and return the output folder with the winner. ``key`` seeds the
    secret draws (K, the candidates, the scores' noise): for tests only; by default 128 secret bits."""
    train = training_script()
    check_tuning(tune_args.expected_runs, tune_args.repeat_distribution)
    space = SearchSpace.from_file(tune_args.search_space)
    given = {arg.lstrip("-").split("=")[0] for arg in training_argv if arg.startswith("--")}
    for name in ("report_to", "num_canaries", "disable_dp", "resume_from_checkpoint"):
        if name in given:
            raise TuningError(f"--{name} is not for a tuning: the runs other than the winner must leave no trace "
                              "(trackers), the winner is a model to ship (no canaries), a tuning resumes by itself.")
    split = ["--validation_split", str(tune_args.validation_split), "--validation_split_seed",
             str(tune_args.validation_split_seed)]  # fmt: skip
    fixed = train.parse_args([*training_argv, *split])
    for example in space.examples():  # every value of the space parses (errors before anything is read)
        train.parse_args([*training_argv, *split, *flags_to_argv(example)])
    out = Path(fixed.output_dir)
    if tune_args.score is None:
        from .pipelines import DPLDMPipeline

        base = DPLDMPipeline.from_pretrained(fixed.pretrained_model_name_or_path, revision=fixed.revision)
        tune_args.score = "accuracy" if base.num_classes is not None else "denoising_loss"
        del base
    settings = {"space": space.flags, "training": training_argv,
                "tune": {name: getattr(tune_args, name) for name in TUNE_SETTINGS}}  # fmt: skip
    plan = plan_tuning(space, fixed, tune_args, train)
    logger.info(f"Tuning: E[K]={tune_args.expected_runs:g} ({tune_args.repeat_distribution}), "
                f"{len(plan.schedules)} privacy combination(s), total epsilon={plan.epsilon:.3f} at delta="
                f"{fixed.target_delta:g} (one run at most {plan.run_epsilon:.3f}); {plan.num_units} training and "
                f"{plan.num_validation_units} validation units")  # fmt: skip

    store = TuningState(out)
    fingerprint = _fingerprint(settings)
    if store.exists():
        state = store.load()
        if state["fingerprint"] != fingerprint:
            raise TuningError(f"{out / STATE_DIR} holds a tuning with other settings. Resume it with its own "
                              "settings, or delete that folder to start over (a new tuning spends its budget "
                              "again).")  # fmt: skip
        logger.info("Resuming the tuning in progress.")
    else:
        if out.exists() and any(p.name != STATE_DIR for p in out.iterdir()):
            raise TuningError(f"--output_dir {out} is not empty: the winner is written there.")
        draws = secret_rng(key, "draws")
        runs = sample_num_runs(tune_args.expected_runs, tune_args.repeat_distribution, draws)
        candidates = [space.draw(draws) for _ in range(runs)]
        state = {"fingerprint": fingerprint, "candidates": candidates, "scores": [], "best": None}
        store.save(state)
    noise_rng = secret_rng(key, "score", len(state["scores"]))

    from .data import privacy_unit_members  # noqa: F401  (imported before training: a missing column fails now)
    from .training_utils import load_training_dataset

    validation = load_training_dataset(fixed, "validation")
    from tqdm.auto import tqdm

    candidates = state["candidates"]
    for run in tqdm(range(len(candidates)), desc="tuning runs", initial=len(state["scores"])):
        if run < len(state["scores"]):
            continue
        candidate = candidates[run]
        sigma = plan.noise_multipliers[_key({k: candidate[k] for k in PRIVACY_FLAGS if k in candidate})]
        run_dir = store.run_dir(run)
        argv = [a for a in _without(training_argv, ("target_epsilon", "output_dir", "evaluate", "push_to_hub",
                                                    "hub_model_id", "hub_token", "hub_private_repo"))]  # fmt: skip
        argv += [*split, *flags_to_argv({**candidate, "noise_multiplier": sigma}), "--output_dir", str(run_dir),
                 "--resume_from_checkpoint", "latest"]  # fmt: skip
        train.main(argv)
        total = validation_sum(run_dir, validation, fixed, tune_args)
        score = noisy_score(total, _sensitivity(tune_args), tune_args.score_noise_multiplier, noise_rng)
        state["scores"].append(score / plan.num_validation_units)
        best = state["best"]
        if best is None or state["scores"][run] > state["scores"][best]:  # ties: the earlier run (data-independent)
            state["best"] = run
        store.save(state)  # the score is recorded before any folder moves: never drawn twice
        loser = run if state["best"] != run else best
        if loser is not None:
            shutil.rmtree(store.run_dir(loser), ignore_errors=True)
    return finish(out, store, state, plan, space, fixed, tune_args, train)


def secret_rng(key: int | None, *words: str | int) -> np.random.Generator:
    """A generator of 128 secret bits; with ``key`` (tests only) one seeded by ``key`` and ``words``."""
    if key is None:
        return np.random.default_rng(secrets.randbits(128))
    return np.random.default_rng([key, *(int(hashlib.sha256(str(w).encode()).hexdigest()[:8], 16) for w in words)])


def _without(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the flags ``names`` and their values."""
    out, skip = [], False
    for arg in argv:
        if skip and not arg.startswith("--"):
            continue
        skip = arg.startswith("--") and arg[2:].split("=")[0] in names
        if not skip:
            out.append(arg)
    return out


def finish(out: Path, store: TuningState, state: dict, plan: TuningPlan, space: SearchSpace,
           fixed: argparse.Namespace, tune_args: argparse.Namespace, train) -> Path:  # fmt: skip
    """Move the winner into ``out``, give its report the tuning's epsilon and the ``tuning`` entry, rewrite its
    card, then delete every trace of the other runs, K and the scores."""
    from .hub import push_to_hub, write_model_card
    from .privacy import DPReport

    out.mkdir(parents=True, exist_ok=True)
    if state["best"] is None:  # K = 0 (Poisson): the fixed, data-independent output is "nothing"
        store.remove()
        logger.warning("The tuning drew no run (K = 0): nothing is released. Running it again is a new tuning "
                       "that spends its budget again.")  # fmt: skip
        return out
    winner = store.run_dir(state["best"])
    for path in winner.iterdir():
        if path.name == "checkpoints":
            continue
        target = out / path.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        shutil.move(str(path), target)
    report = DPReport.from_pretrained(out)
    report.epsilon = plan.epsilon
    report.target_epsilon = fixed.target_epsilon if fixed.target_epsilon is not None else train.DEFAULT_TARGET_EPSILON
    report.accountant = "rdp"
    report.epsilon_history = [[report.steps, plan.epsilon]]
    report.group_privacy = []  # the run's own group privacy does not cover the tuning
    report.tuning = {
        "distribution": tune_args.repeat_distribution,
        "expected_runs": tune_args.expected_runs,
        "search_space": space.flags,
        "validation_split": {"fraction": tune_args.validation_split, "seed": tune_args.validation_split_seed,
                             "num_units": plan.num_validation_units},  # fmt: skip
        "score": {"name": tune_args.score, "mechanism": "gaussian",
                  "noise_multiplier": tune_args.score_noise_multiplier, "sensitivity": _sensitivity(tune_args),
                  "measures": SCORE_MEANING[tune_args.score]},  # fmt: skip
        # the released run's own output under PS22 (its candidate and noisy score), never its position among K
        "winner": {"flags": state["candidates"][state["best"]], "score": state["scores"][state["best"]]},
        "per_run": [s.to_dict() for s in plan.schedules],
        "per_run_epsilon": plan.run_epsilon,
        "accounting": "Papernot & Steinke 2022 repeat-and-select over the maximum of the candidates' RDP curves "
                      "(dp-accounting)",
    }
    report.save_pretrained(out)
    store.remove()
    write_model_card(out, repo_id=fixed.hub_model_id)
    if fixed.evaluate:
        from .evaluation.evaluate import evaluate_from_args

        evaluate_from_args(out, fixed)
        write_model_card(out, repo_id=fixed.hub_model_id)
    if fixed.push_to_hub:
        push_to_hub(out, fixed.hub_model_id or out.resolve().name, token=fixed.hub_token,
                    private=fixed.hub_private_repo)  # fmt: skip
    logger.info(f"Tuned adapter in {out}: epsilon={plan.epsilon:.3f} (delta={fixed.target_delta:g}), tuning included")
    return out


SCORE_MEANING = {
    "accuracy": "correct predictions on the validation units of a classifier trained on the run's synthetic samples "
                "(a unit: the mean over its examples), over the number of units",
    "denoising_loss": "minus the denoising loss on the validation units at fixed timesteps and noise, each clipped "
                      "to [0, score_loss_bound] (a unit: the mean over its examples), over the number of units",
}
