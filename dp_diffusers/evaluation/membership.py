"""Membership-inference audit by denoising loss (loss-threshold attack, Carlini et al. 2023).

A model that memorised its training examples denoises them better than unseen examples from the
same distribution. Each example is scored by its denoising loss averaged over fixed timesteps with
fixed noise (the same ``(t, noise)`` for every example, so scores differ only through the example),
and the audit reports the ROC AUC of separating training members from held-out non-members.
AUC 0.5 means the attack does no better than chance; DP training bounds how far above 0.5 any
attack can get.

With a calibration model that never saw either set (the public base), the audit also reports the
difficulty-calibrated attack (Watson et al., ICLR 2022): each example is scored by the audited
model's loss *minus* the calibration model's loss on it. The raw threshold also rewards examples
that are easy to denoise in themselves; a few hundred members and non-members can differ in that by
chance (the calibration model's own AUC shows by how much), and subtracting it leaves what the
fine-tune learnt about each example.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

# Indices into the scheduler's training timesteps (0 .. num_train_timesteps - 1, 1000 for DDPM);
# small-to-medium noise levels separate members best for the loss-threshold attack.
DEFAULT_TIMESTEPS = (50, 100, 200, 300)
ATTACK = "loss-threshold (denoising MSE at fixed timesteps and noise)"

#: each example's conditions: an (N, ...) tensor, named (N, ...) tensors (a base family's), or None
Conditions = torch.Tensor | Mapping[str, torch.Tensor] | None
LossFn = Callable[[torch.Tensor, Conditions, torch.Tensor, torch.Tensor], torch.Tensor]


def _rows(conditions: Conditions, start: int, stop: int) -> Conditions:
    if isinstance(conditions, Mapping):
        return {name: value[start:stop] for name, value in conditions.items()}
    return None if conditions is None else conditions[start:stop]


def _check_inputs(latents: torch.Tensor, labels: Conditions, name: str) -> None:
    if latents.ndim < 2 or len(latents) == 0:
        raise ValueError(f"{name} latents must be a non-empty (N, ...) tensor, got shape {tuple(latents.shape)}")
    values = labels.values() if isinstance(labels, Mapping) else [] if labels is None else [labels]
    for value in values:
        if value.ndim == 0 or len(value) != len(latents):
            raise ValueError(f"{name}: {len(latents)} latents but labels of shape {tuple(value.shape)}")


@torch.no_grad()
def denoising_loss_scores(loss_fn: LossFn, latents: torch.Tensor, labels: Conditions,
                          timesteps: Sequence[int] = DEFAULT_TIMESTEPS, seed: int = 0,
                          batch_size: int = 64) -> torch.Tensor:  # fmt: skip
    """Per-example denoising loss, averaged over ``timesteps``; lower means more member-like.

    ``loss_fn(latents, labels, timesteps, noise)`` (labels: each example's own conditions, e.g. a base
    family's named class ids or caption encodings, sliced along with the latents) returns the per-example
    loss ``(B,)`` of the model under audit (e.g. the MSE of the UNet's noise prediction); ``timesteps`` is a
    ``(B,)`` long tensor and ``noise`` has the shape of ``latents``. For each timestep one noise tensor is drawn from a
    generator seeded with ``seed`` and shared by all examples. Returns a float CPU tensor ``(N,)``.
    """
    _check_inputs(latents, labels, "input")
    timesteps = [int(t) for t in timesteps]
    if not timesteps or min(timesteps) < 0:
        raise ValueError(f"timesteps must be a non-empty sequence of non-negative ints, got {timesteps}")
    generator = torch.Generator().manual_seed(seed)
    noises = [torch.randn(latents.shape[1:], generator=generator, dtype=latents.dtype) for _ in timesteps]
    scores = torch.zeros(len(latents), dtype=torch.float64)
    for start in range(0, len(latents), batch_size):
        x = latents[start : start + batch_size]
        y = _rows(labels, start, start + batch_size)
        for t, noise in zip(timesteps, noises):
            t_batch = torch.full((len(x),), t, dtype=torch.long, device=x.device)
            loss = loss_fn(x, y, t_batch, noise.to(x.device).expand_as(x).contiguous())
            if loss.shape != (len(x),):
                raise ValueError(
                    f"loss_fn must return a per-example loss of shape ({len(x)},), got {tuple(loss.shape)}"
                )
            scores[start : start + len(x)] += loss.detach().double().cpu()
    return (scores / len(timesteps)).float()


def membership_auc(member_scores: torch.Tensor | np.ndarray, nonmember_scores: torch.Tensor | np.ndarray) -> float:
    """ROC AUC in [0, 1] of telling members (positive class) from non-members by low loss.

    0.5 is chance; above 0.5 members have lower loss than non-members.
    """
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError(f"need scores for both members and non-members, got {members.size} and {nonmembers.size}")
    is_member = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    return float(roc_auc_score(is_member, -np.concatenate([members, nonmembers])))


def audit(
    loss_fn: LossFn,
    member_latents: torch.Tensor,
    member_labels: Conditions,
    nonmember_latents: torch.Tensor,
    nonmember_labels: Conditions,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    seed: int = 0,
    batch_size: int = 64,
    calibration_loss_fn: LossFn | None = None,
    member_units: Sequence[Sequence[int]] | None = None,
    nonmember_units: Sequence[Sequence[int]] | None = None,
) -> dict:
    """Loss-threshold membership inference: members (training examples) vs. held-out non-members.

    Non-members should come from the same distribution as members (e.g. the held-out split), else
    the AUC measures distribution shift, not memorisation. Returns ``{"membership_auc",
    "num_members", "num_nonmembers", "timesteps", "attack"}``; with ``calibration_loss_fn`` (a model
    that saw neither set, scored with the same timesteps and noise) also ``"calibration_auc"`` (its
    own raw AUC: the split's chance level) and ``"calibrated_auc"`` (the difficulty-calibrated attack).
    With ``member_units`` and ``nonmember_units`` (each unit: the indices of its examples, e.g. one person's images)
    the members and non-members are units, each scored by the mean of its examples' scores (user-level audit).
    """
    _check_inputs(member_latents, member_labels, "member")
    _check_inputs(nonmember_latents, nonmember_labels, "non-member")
    if member_latents.shape[1:] != nonmember_latents.shape[1:]:
        raise ValueError(
            f"member and non-member latents differ in shape: {tuple(member_latents.shape[1:])} "
            f"vs {tuple(nonmember_latents.shape[1:])}"
        )
    def by_unit(scores: torch.Tensor, units) -> torch.Tensor:
        return scores if units is None else torch.stack([scores[list(members)].mean() for members in units])

    def scores_of(fn: LossFn, latents, labels, units) -> torch.Tensor:
        return by_unit(denoising_loss_scores(fn, latents, labels, timesteps, seed, batch_size), units)

    member_scores = scores_of(loss_fn, member_latents, member_labels, member_units)
    nonmember_scores = scores_of(loss_fn, nonmember_latents, nonmember_labels, nonmember_units)
    result = {
        "membership_auc": membership_auc(member_scores, nonmember_scores),
        "num_members": len(member_scores),
        "num_nonmembers": len(nonmember_scores),
        "timesteps": [int(t) for t in timesteps],
        "attack": ATTACK,
    }
    if calibration_loss_fn is not None:
        member_ref = scores_of(calibration_loss_fn, member_latents, member_labels, member_units)
        nonmember_ref = scores_of(calibration_loss_fn, nonmember_latents, nonmember_labels, nonmember_units)
        result["calibration_auc"] = membership_auc(member_ref, nonmember_ref)
        result["calibrated_auc"] = membership_auc(member_scores - member_ref, nonmember_scores - nonmember_ref)
    return result
