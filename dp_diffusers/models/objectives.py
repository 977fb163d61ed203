"""What a denoiser is trained to predict, for every base family, and the per-row training loss.

An :class:`Objective` turns clean latents, a timestep and Gaussian noise into the noisy input, the target and a
per-row loss weight, from the base's own scheduler config (diffusers' training scripts compute the same):

* :class:`NoisePrediction`: DDPM-type bases (``prediction_type`` epsilon, ``v_prediction`` or ``sample``), timesteps
  uniform over the scheduler's training steps, Min-SNR weights optional (``snr_gamma``);
* :class:`FlowMatching`: rectified-flow bases (SD3, FLUX): ``(1 - sigma) x0 + sigma noise``, target ``noise - x0``,
  timesteps and weights by diffusers' own ``compute_density_for_timestep_sampling`` and
  ``compute_loss_weighting_for_sd3``.

:class:`DiffusionLoss` is the loss every training path uses (stage 1, the DP stage, the warm-up, the benchmarks):
it draws each row's randomness (timestep, noise, caption or label dropout, random flip) and returns one loss per
row. Every draw is per row, so under DP it stays inside that example's clipped gradient (and each
noise-multiplicity copy draws its own); under DP each row draws from its own keyed generator
(``dp_diffusers.privacy.RowRandomness``), so a row's draws never depend on the other rows of its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

Conditions = Mapping[str, torch.Tensor]
#: ``draw(rows, generator) -> (rows, ...)``: one kind of draw for ``rows`` rows from ``generator`` (``None``: torch's
#: global generator)
Draw = Callable[[int, "torch.Generator | None"], torch.Tensor]


def draw_rows(draw: Draw, rows: int, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """``draw`` for every row: all at once from torch's global generator, or row by row from each row's own
    generator (``generators``, one per row: the DP loss's keyed draws)."""
    if generators is None:
        return draw(rows, None)
    if len(generators) != rows:
        raise ValueError(f"{rows} rows but {len(generators)} row generators.")
    return torch.cat([draw(1, generator) for generator in generators])


def per_row_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each row, in fp32: shape (rows,)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


class Objective:
    """A training objective: ``sample_timesteps`` draws each row's timestep, ``loss`` is the per-row loss of
    ``model(noisy, timesteps, conditions)`` for given timesteps and noise (fixed draws: the audit, the tests)."""

    def sample_timesteps(
        self, rows: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:  # fmt: skip
        """``rows`` training timesteps, drawn from ``generator`` (on ``device``) or torch's global generator."""
        raise NotImplementedError

    def timesteps_at(self, levels: torch.Tensor) -> torch.Tensor:
        """The training timesteps at noise levels ``levels`` in [0, num_train_timesteps) (0: the least noise), the
        membership audit's fixed timesteps."""
        raise NotImplementedError

    def loss(
        self, model: nn.Module, latents: torch.Tensor, conditions: Conditions, timesteps: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        raise NotImplementedError


class NoisePrediction(Objective):
    """DDPM-type objective (diffusers' ``train_text_to_image.py``): ``noisy = scheduler.add_noise(x0, noise, t)``,
    target the noise (``epsilon``), ``scheduler.get_velocity`` (``v_prediction``) or ``x0`` (``sample``), following
    ``scheduler.config.prediction_type``; ``t`` uniform over ``num_train_timesteps``. ``snr_gamma`` weights rows by
    Min-SNR (Hang et al. 2023): min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v-prediction)."""

    def __init__(self, scheduler, snr_gamma: float | None = None):
        kind = scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"Unknown prediction_type {kind!r} (epsilon, v_prediction or sample).")
        self.scheduler = scheduler
        self.snr_gamma = snr_gamma

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def sample_timesteps(self, rows, device, generator=None):
        return torch.randint(0, self.num_train_timesteps, (rows,), device=device, generator=generator)

    def timesteps_at(self, levels: torch.Tensor) -> torch.Tensor:
        return levels

    def loss(self, model, latents, conditions, timesteps, noise):
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction = model(noisy, timesteps, conditions)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        loss = per_row_mse(prediction, target)
        if self.snr_gamma is not None:
            loss = loss * self.min_snr_weights(timesteps)
        return loss

    def min_snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, timesteps)
        weights = snr.clamp(max=self.snr_gamma)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return weights / snr
        if kind == "v_prediction":
            return weights / (snr + 1)
        return weights


class FlowMatching(Objective):
    """Rectified flow, as diffusers' SD3 and FLUX DreamBooth LoRA scripts train it.

    Each row draws ``u`` from ``compute_density_for_timestep_sampling(weighting_scheme, ...)`` (``logit_normal``:
    sigmoid of N(logit_mean, logit_std); ``mode``: with ``mode_scale``; otherwise uniform), its timestep is
    ``scheduler.timesteps[int(u * num_train_timesteps)]`` and its sigma the scheduler's at that timestep (the scripts'
    ``get_sigmas``, here one vectorised lookup: the draws need no host sync inside the loss); ``noisy = (1 - sigma)
    x0 + sigma noise``; the target is ``noise - x0``, or with ``precondition_outputs`` (SD3's default) the model's
    output becomes ``output * (-sigma) + noisy`` against ``x0``; rows are weighted by
    ``compute_loss_weighting_for_sd3(weighting_scheme, sigma)`` (``sigma_sqrt``, ``cosmap``; otherwise 1). Timesteps
    run from ``num_train_timesteps`` (pure noise) down; the family's ``predict`` scales them for its transformer.
    """

    def __init__(self, scheduler, weighting_scheme: str = "none", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, precondition_outputs: bool = False):  # fmt: skip
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)  # a copy at its training state
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.precondition_outputs = precondition_outputs

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def sample_timesteps(self, rows, device, generator=None):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        # on the generator's device (a row's keyed generator is the latents' device's), else on the CPU as diffusers
        where = "cpu" if generator is None else generator.device
        u = compute_density_for_timestep_sampling(self.weighting_scheme, rows, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, mode_scale=self.mode_scale, device=where,
                                                  generator=generator)  # fmt: skip
        indices = (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)  # (u = 1 in fp32)
        return self.scheduler.timesteps[indices.cpu()].to(device)

    def timesteps_at(self, levels: torch.Tensor) -> torch.Tensor:
        return self.scheduler.timesteps[self.num_train_timesteps - 1 - levels.cpu()].to(levels.device)

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Each row's sigma: the scheduler's at that training timestep (diffusers' scripts' ``get_sigmas``)."""
        schedule = self.scheduler.timesteps.to(timesteps.device)
        matches = schedule[None, :] == timesteps[:, None].to(schedule.dtype)
        if not bool(matches.any(1).all()):
            raise ValueError("Flow-matching timesteps must be the scheduler's training timesteps.")
        return self.scheduler.sigmas.to(timesteps.device)[matches.float().argmax(1)]

    def loss(self, model, latents, conditions, timesteps, noise):
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        sigmas = self.sigmas(timesteps).view(-1, *[1] * (latents.dim() - 1))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        prediction = model(noisy, timesteps, conditions)
        if self.precondition_outputs:
            prediction, target = prediction.float() * (-sigmas) + noisy, latents
        else:
            target = noise - latents
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas).float()
        return (weighting * (prediction.float() - target.float()).pow(2)).flatten(1).mean(1)


def drop_conditions(
    conditions: Conditions, null: Conditions, probability: float,
    generators: Sequence[torch.Generator] | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Each row's conditions replaced by ``null`` (one row per name, broadcast) with ``probability``, one draw per
    row for all of its names (from the row's generator, if given); names without a null value (SDXL's time ids) are
    kept."""
    out = dict(conditions)
    if probability <= 0 or not null:
        return out
    rows = len(next(iter(conditions.values())))
    device = next(iter(conditions.values())).device
    drop = draw_rows(lambda n, g: torch.rand(n, device=device, generator=g), rows, generators) < probability
    for name, value in null.items():
        current = conditions[name]
        mask = drop.view(-1, *[1] * (current.dim() - 1))
        out[name] = torch.where(mask, value.to(device=current.device, dtype=current.dtype), current)
    return out


class DiffusionLoss:
    """The per-row training loss of every training path, shape (rows,).

    Called as ``loss(model, latents, *conditions)`` with the conditions in the order of ``condition_names`` (a
    family's; what a ``TensorDataset`` of the encoded examples yields). Per row: with ``random_flip`` the latents
    are (rows, 2, c, h, w), an image's and its mirror's, and one of the two is used (diffusers' ``--random_flip``,
    drawn anew at every step); with ``dropout`` > 0 the conditions become ``null_condition`` with that probability
    (label dropout or caption dropout, which makes classifier-free guidance work); then the objective's own timestep
    and Gaussian noise. All of it is per row: a row's draws change only its own loss, so under DP they stay inside
    that example's clipped gradient.

    ``generators`` (one per row): every row draws, in that order, its flip pick, dropout, noise and timestep from
    its own generator, so its draws do not depend on the other rows; ``private_backward`` passes the DP run's keyed
    ones (``draws_per_row``). Without them the rows draw together from torch's global generator (public training,
    the warm-up, ``--disable_dp``).
    """

    #: ``private_backward`` must key this loss's draws (``generators=``): see ``dp_diffusers.privacy.RowRandomness``
    draws_per_row = True

    def __init__(
        self,
        objective: Objective,
        condition_names: Sequence[str] = (),
        *,
        null_condition: Conditions | None = None,
        dropout: float = 0.0,
        random_flip: bool = False,
    ):
        if dropout > 0 and not null_condition:
            raise ValueError("Condition dropout needs a null condition (a null class or an empty prompt) to drop to.")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        unknown = set(null_condition or {}) - set(condition_names)
        if unknown:
            raise ValueError(f"null_condition names {sorted(unknown)} are not conditions {list(condition_names)}.")
        self.objective = objective
        self.condition_names = tuple(condition_names)
        self.null_condition = dict(null_condition or {})
        self.dropout = dropout
        self.random_flip = random_flip

    def __call__(
        self, model: nn.Module, latents: torch.Tensor, *conditions: torch.Tensor,
        generators: Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        if len(conditions) != len(self.condition_names):
            raise ValueError(f"Expected conditions {list(self.condition_names)}, got {len(conditions)} tensors.")
        rows, device = len(latents), latents.device
        if self.random_flip:  # (rows, 2, c, h, w): each row's own pick of the image or its mirror
            pick = draw_rows(lambda n, g: torch.randint(0, 2, (n,), device=device, generator=g), rows, generators)
            latents = latents[torch.arange(rows, device=device), pick]
        named = dict(zip(self.condition_names, conditions))
        if named:
            named = drop_conditions(named, self.null_condition, self.dropout, generators)
        shape = latents.shape[1:]
        noise = draw_rows(lambda n, g: torch.randn((n, *shape), device=device, dtype=latents.dtype, generator=g),
                          rows, generators)  # fmt: skip
        timesteps = draw_rows(lambda n, g: self.objective.sample_timesteps(n, device, g), rows, generators)
        return self.objective.loss(model, latents, named, timesteps, noise)
