"""Wiring opacus for DP-LoRA: per-sample gradients, Poisson sampling, clipping, noise, accounting.

``make_private`` is ``opacus.PrivacyEngine.make_private`` taken apart so that the optimizer can be
the noise-multiplicity one (see ``noise_multiplicity.py``) and the sample rate is exactly
``batch_size / N``, the one the accountant and the noise calibration use. Everything else is
opacus: ``GradSampleModule`` (hooks / functorch / expanded weights), ``DPDataLoader`` (Poisson
sampling), the DP optimizers, ``BatchMemoryManager``; with several processes the sampler is
``DistributedPoissonSampler`` (below), not opacus' own.

Guarantee (per logical step, over the whole global batch): every example is in the batch
independently with probability ``q``; each private example's gradient (the mean over its k noise
draws, over *all* trainable parameters, the class embedding included when it is trained) is
clipped to ``max_grad_norm``; Gaussian noise of std ``noise_multiplier * max_grad_norm`` is added
once (on rank 0 with several processes, then summed across ranks) and the sum is divided by the
expected global batch size ``q * N``; the step is recorded in the accountant with sample rate ``q``.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus.data_loader import DPDataLoader
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.grad_sample.utils import prepare_module
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from .accounting import PrivacyBudget
from .noise_multiplicity import (
    DistributedDPOptimizerWithNoiseMultiplicity,
    DPOptimizerWithNoiseMultiplicity,
    expand_for_noise_multiplicity,
)

GRAD_SAMPLE_MODES = ("fused", "hooks", "functorch", "ew")

# opacus registers full backward hooks on the adapted layers; their inputs (frozen activations)
# need no gradient, which torch reports on every backward. Harmless here: opacus reads the output
# gradients only.
warnings.filterwarnings(
    "ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs"
)


@dataclass
class DPTraining:
    """What ``make_private`` returns: use these three in place of the originals."""

    model: nn.Module
    optimizer: DPOptimizerWithNoiseMultiplicity
    data_loader: DataLoader


def make_conv_inputs_contiguous(model: nn.Module) -> int:
    """Forward pre-hooks that make the input of every trainable ``nn.Conv2d`` contiguous.

    opacus' conv per-sample gradient (``unfold2d``) assumes NCHW strides and returns all-zero
    per-sample gradients, silently, for other layouts; diffusers' attention blocks hand such
    tensors on. Returns the number of hooked modules.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and any(p.requires_grad for p in module.parameters(recurse=False)):
            module.register_forward_pre_hook(lambda _m, args: tuple(a.contiguous() for a in args))
            count += 1
    return count


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the operating system's entropy (``secrets``), not from torch's
    global seed: what DP noise and Poisson sampling must draw from. With the global RNG, a run's
    noise and batches follow from ``--seed`` (public, often 0) and the data set size, and whoever
    knows them can subtract the noise again."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


def train_trainable_layers(model: nn.Module) -> int:
    """Training mode for every module that owns trainable parameters (not recursive: the frozen
    rest keeps its mode). Returns the number of such modules.

    opacus' hooks compute per-sample gradients only for modules in training mode: a trainable
    layer left in eval mode (the class embedding, loaded by ``from_pretrained``, which calls
    ``eval()``) got none and the backward failed ("No activations detected"). All modes then see
    the same trainable layers in the same mode.
    """
    count = 0
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.training = True
            count += 1
    return count


class DistributedPoissonSampler(DistributedUniformWithReplacementSampler):
    """Poisson sampling of the whole data set across ranks: rank ``r`` takes the sampled indices
    ``i`` with ``i % world_size == r``.

    Guarantees: every example is in a logical batch independently with probability
    ``sample_rate``, so the union of the ranks' batches is exactly the batch the accountant
    assumes, whatever the ranks' generators (each step draws one mask over all N examples; ranks
    with identically seeded generators draw the same mask, independent ones independent shares);
    every rank yields exactly ``num_batches`` batches per epoch, empty ones included, so all ranks
    step, and all-reduce, together. opacus' sampler drops a rank's empty local batch (that rank
    then falls a step behind the others: mismatched all-reduces, a hang at the end) and masks by
    position inside each rank's shard (identically seeded ranks then pick their examples in pairs).
    """

    def __init__(self, *, total_size: int, sample_rate: float, generator: torch.Generator | None = None):
        super().__init__(total_size=total_size, sample_rate=sample_rate, shuffle=False, generator=generator)

    def __iter__(self):
        for _ in range(self.num_batches):
            mask = torch.rand(self.total_size, generator=self.generator) < self.sample_rate
            selected = mask.nonzero().reshape(-1)
            yield selected[selected % self.num_replicas == self.rank].tolist()


def poisson_data_loader(
    dataset: Dataset, sample_rate: float, *, distributed: bool, generator: torch.Generator | None = None
) -> DataLoader:
    """opacus' ``DPDataLoader`` (Poisson sampling, empty batches as zero-length tensors); with
    ``distributed`` the same loader over ``DistributedPoissonSampler``."""
    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=generator)
    if not distributed:
        return loader
    sampler = DistributedPoissonSampler(total_size=len(dataset), sample_rate=sample_rate, generator=generator)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=loader.collate_fn, generator=generator)


# ---------------------------------------------------------------------------------------------
# grad_sample_mode="fused": per-sample gradients computed inside the trainable layers' backward.
#
# Each trainable Linear / Conv2d / Embedding / LayerNorm / GroupNorm runs through an autograd
# Function whose backward returns the input gradient (the frozen network needs it) and, instead
# of the summed weight gradient, writes the per-*example* gradient to ``p.grad_sample``: the k
# adjacent rows of an example (``expand_for_noise_multiplicity``) are contracted together, so the
# (B*k, ...) per-row tensor never exists and ``p.grad`` is never computed by autograd. Numbers are
# those of opacus' hooks mode followed by ``average_over_copies`` (``loss_reduction="mean"`` over
# the B*k rows: row r's gradient is B*k times its share of the mean loss's gradient, so the mean
# over an example's k rows is B times their sum).


class _FusedState:
    """What the layers' Functions share: noise multiplicity, forward generation, on/off."""

    def __init__(self, noise_multiplicity: int):
        self.k = int(noise_multiplicity)
        self.generation = 0
        self.enabled = True


def _rows_to_examples(rows: int, k: int) -> int:
    if rows % k:
        raise ValueError(f"{rows} rows are not a multiple of noise_multiplicity={k}: expand the batch with "
                         "expand_for_noise_multiplicity (private_backward does).")  # fmt: skip
    return rows // k


def _store_grad_sample(state: _FusedState, generation: int, param: nn.Parameter, grad_sample: torch.Tensor) -> None:
    """Set (or, for a layer used twice in one forward, add to) ``param.grad_sample``."""
    grad_sample = grad_sample.to(param.dtype)
    current = getattr(param, "grad_sample", None)
    if current is not None and getattr(param, "_fused_generation", None) == generation:
        param.grad_sample = current + grad_sample
        return
    if current is not None:
        raise ValueError(
            "Poisson sampling is not compatible with grad accumulation. You need to call optimizer.step() after "
            "every forward/backward pass or consider using BatchMemoryManager"
        )
    param.grad_sample = grad_sample
    param._fused_generation = generation


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state, generation):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.state, ctx.generation = bias is not None, state, generation
        ctx.weight_ref, ctx.bias_ref = weight, bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        state = ctx.state
        examples = _rows_to_examples(x.shape[0], state.k)
        grad_x = grad_out.matmul(weight.to(grad_out.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        g = grad_out.reshape(examples, -1, grad_out.shape[-1])
        a = x.to(g.dtype).reshape(examples, -1, x.shape[-1])
        if ctx.needs_input_grad[1]:
            gs = torch.bmm(g.transpose(1, 2), a)
            _store_grad_sample(state, ctx.generation, ctx.weight_ref, gs.mul_(examples))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            _store_grad_sample(state, ctx.generation, ctx.bias_ref, g.sum(1).mul_(examples))
        return grad_x, None, None, None, None


def _copies_as_batch(t: torch.Tensor, examples: int, k: int) -> torch.Tensor:
    """``(examples * k, C, H, W)`` rows (example-major) -> ``(k, examples * C, H, W)``: copy j of every example
    in batch row j, each example's channels side by side (the layout of a convolution with ``examples`` groups)."""
    if k == 1:
        return t.reshape(1, examples * t.shape[1], *t.shape[2:])
    return t.reshape(examples, k, *t.shape[1:]).transpose(0, 1).reshape(k, examples * t.shape[1], *t.shape[2:])


class _FusedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv, state, generation):
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.state, ctx.generation = conv, state, generation
        ctx.weight_ref, ctx.bias_ref = weight, bias
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        conv, state = ctx.conv, ctx.state
        examples = _rows_to_examples(x.shape[0], state.k)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight.to(grad_out.dtype), None, conv.stride, conv.padding, conv.dilation, False,
                [0, 0], conv.groups, [True, False, False],
            )[0]  # fmt: skip
        if ctx.needs_input_grad[1]:
            # Per-example weight gradients as the weight gradient of ONE grouped convolution: the examples
            # become groups (channels b*C..(b+1)*C belong to example b) and the k copies its batch, so a
            # copy's gradients are summed before clipping. opacus unfolds the input instead (a
            # rows x C*kh*kw x positions copy, then bmm): 4-12x slower for the UNet's 3x3 LoRA convs on CPU.
            k = state.k
            grouped_x = _copies_as_batch(x.to(grad_out.dtype), examples, k)
            grouped_g = _copies_as_batch(grad_out, examples, k)
            grouped_weight = weight.new_empty((examples * weight.shape[0], *weight.shape[1:]), dtype=grad_out.dtype)
            gs = torch.ops.aten.convolution_backward(
                grouped_g, grouped_x, grouped_weight, None, conv.stride, conv.padding, conv.dilation, False,
                [0, 0], examples, [False, True, False],
            )[1]  # fmt: skip
            _store_grad_sample(state, ctx.generation, ctx.weight_ref, gs.mul_(examples).view(-1, *weight.shape))
        if ctx.bias_ref is not None and ctx.needs_input_grad[2]:
            gb = grad_out.reshape(examples, -1, grad_out.shape[1], grad_out[0, 0].numel()).sum((1, 3))
            _store_grad_sample(state, ctx.generation, ctx.bias_ref, gb.mul_(examples))
        return grad_x, None, None, None, None, None


class _FusedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, weight, padding_idx, state, generation):
        ctx.save_for_backward(indices)
        ctx.num_embeddings, ctx.padding_idx = weight.shape[0], padding_idx
        ctx.state, ctx.generation, ctx.weight_ref = state, generation, weight
        return F.embedding(indices, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        state, v = ctx.state, ctx.num_embeddings
        examples = _rows_to_examples(indices.shape[0], state.k)
        dim = grad_out.shape[-1]
        idx = indices.reshape(examples, -1)
        flat = (idx + v * torch.arange(examples, device=idx.device).unsqueeze(1)).reshape(-1)
        gs = torch.zeros(examples * v, dim, device=grad_out.device, dtype=grad_out.dtype)
        gs.index_add_(0, flat, grad_out.reshape(-1, dim))
        gs = gs.view(examples, v, dim)
        if ctx.padding_idx is not None:
            gs[:, ctx.padding_idx] = 0
        _store_grad_sample(state, ctx.generation, ctx.weight_ref, gs.mul_(examples))
        return None, None, None, None, None


class _FusedAffine(torch.autograd.Function):
    """``y = xhat * weight + bias`` of a LayerNorm (trailing dims) or GroupNorm (channel dim 1);
    ``xhat`` is the normalised input, differentiated by autograd as usual."""

    @staticmethod
    def forward(ctx, xhat, weight, bias, channel_dim, state, generation):
        shape = [1] * xhat.dim()
        if channel_dim is None:  # LayerNorm: weight covers the trailing dims
            shape[xhat.dim() - weight.dim() :] = weight.shape
        else:
            shape[channel_dim] = weight.shape[0]
        ctx.save_for_backward(xhat, weight)
        ctx.shape, ctx.channel_dim, ctx.state, ctx.generation = shape, channel_dim, state, generation
        ctx.weight_ref, ctx.bias_ref = weight, bias
        y = xhat * weight.view(shape)
        return y + bias.view(shape) if bias is not None else y

    @staticmethod
    def backward(ctx, grad_out):
        xhat, weight = ctx.saved_tensors
        state = ctx.state
        examples = _rows_to_examples(xhat.shape[0], state.k)
        grad_xhat = grad_out * weight.view(ctx.shape).to(grad_out.dtype) if ctx.needs_input_grad[0] else None

        def per_example_sum(t):
            if ctx.channel_dim is None:  # (N, ..., *weight.shape) -> (B, *weight.shape)
                return t.reshape(examples, -1, *weight.shape).sum(1)
            c = weight.shape[0]  # (N, C, ...) -> (B, C)
            return t.reshape(examples, state.k, c, -1).sum((1, 3))

        if ctx.needs_input_grad[1]:
            _store_grad_sample(state, ctx.generation, ctx.weight_ref, per_example_sum(grad_out * xhat).mul_(examples))
        if ctx.bias_ref is not None and ctx.needs_input_grad[2]:
            _store_grad_sample(state, ctx.generation, ctx.bias_ref, per_example_sum(grad_out).mul_(examples))
        return grad_xhat, None, None, None, None, None


def _fused_forward(module: nn.Module, state: _FusedState):
    """The replacement ``forward`` of one trainable layer; the layer's own when off or without grad."""
    original = type(module).forward

    def forward(x, *args, **kwargs):
        if not (state.enabled and torch.is_grad_enabled()) or args or kwargs:
            return original(module, x, *args, **kwargs)
        gen = state.generation
        if isinstance(module, nn.Linear):
            return _FusedLinear.apply(x, module.weight, module.bias, state, gen)
        if isinstance(module, nn.Conv2d):
            return _FusedConv2d.apply(x, module.weight, module.bias, module, state, gen)
        if isinstance(module, nn.Embedding):
            return _FusedEmbedding.apply(x, module.weight, module.padding_idx, state, gen)
        if isinstance(module, nn.LayerNorm):
            xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
            return _FusedAffine.apply(xhat, module.weight, module.bias, None, state, gen)
        xhat = F.group_norm(x, module.num_groups, None, None, module.eps)  # nn.GroupNorm
        return _FusedAffine.apply(xhat, module.weight, module.bias, 1, state, gen)

    return forward


def _fused_unsupported_reason(module: nn.Module) -> str | None:
    kind = type(module)
    if kind is nn.Linear:
        return None
    if kind is nn.Conv2d:
        if module.padding_mode != "zeros" or isinstance(module.padding, str) or module.groups != 1:
            return "Conv2d with groups > 1, padding_mode other than 'zeros' or string padding"
        return None
    if kind is nn.Embedding:
        if module.max_norm is not None or module.scale_grad_by_freq:
            return "Embedding with max_norm or scale_grad_by_freq"
        return None
    if kind is nn.LayerNorm:
        return None if module.elementwise_affine else "LayerNorm without affine weights"
    if kind is nn.GroupNorm:
        return None if module.affine else "GroupNorm without affine weights"
    return f"no fused per-sample gradient for {kind.__name__}"


class FusedGradSampleModule(nn.Module):
    """``grad_sample_mode="fused"``: per-sample gradients computed in the trainable layers' own
    backward, the k noise-multiplicity rows of each example contracted there (``p.grad_sample``
    is (B, ...) per *example*, not (B*k, ...) per row), and no summed ``p.grad`` from autograd.

    Supports trainable ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``, ``nn.LayerNorm`` and
    ``nn.GroupNorm`` (exact types: peft's LoRA A/B layers, the UNet's own layers for full
    fine-tuning, the class embedding); any other trainable module raises at wrap time. Frozen
    modules are untouched. Layers run their own forward under ``torch.no_grad`` or
    ``disable_hooks()``, so sampling with the same model object is unaffected.
    """

    def __init__(self, module: nn.Module, noise_multiplicity: int = 1):
        super().__init__()
        self._module = module
        self._fused_state = _FusedState(noise_multiplicity)
        self._patched: list[nn.Module] = []
        problems = []
        for name, sub in module.named_modules():
            if not any(p.requires_grad for p in sub.parameters(recurse=False)):
                continue
            reason = _fused_unsupported_reason(sub)
            if reason is not None:
                problems.append(f"{name or type(module).__name__}: {reason}")
        if problems:
            raise ValueError(
                "grad_sample_mode='fused' cannot handle these trainable modules: "
                + "; ".join(problems[:5])
                + ". Use grad_sample_mode='hooks' (or 'functorch')."
            )
        for sub in module.modules():
            if any(p.requires_grad for p in sub.parameters(recurse=False)):
                sub.forward = _fused_forward(sub, self._fused_state)
                self._patched.append(sub)
        self._pre_hook = module.register_forward_pre_hook(self._next_generation)

    def _next_generation(self, *_):
        self._fused_state.generation += 1

    @property
    def noise_multiplicity(self) -> int:
        return self._fused_state.k

    def forward(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def disable_hooks(self) -> None:
        self._fused_state.enabled = False

    def enable_hooks(self) -> None:
        self._fused_state.enabled = True

    def remove_hooks(self) -> None:
        """Give every layer its own forward back."""
        for sub in self._patched:
            del sub.forward
        self._patched.clear()
        self._pre_hook.remove()


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    *,
    budget: PrivacyBudget,
    max_grad_norm: float,
    noise_multiplicity: int = 1,
    grad_sample_mode: str = "fused",
    secure_mode: bool = False,
    noise_generator: torch.Generator | None = None,
    sampling_generator: torch.Generator | None = None,
) -> DPTraining:
    """Wrap ``model`` (optionally already in opacus' ``DPDDP``), ``optimizer`` and ``dataset``.

    The optimizer must hold exactly the trainable parameters of ``model``; frozen modules get no
    per-sample hooks, the modules owning trainable parameters are put in training mode
    (``train_trainable_layers``). ``budget`` supplies the noise multiplier and the sample rate, and
    receives every real (non-skipped) optimizer step. With ``DPDDP`` every rank calls this with the
    whole data set: the loader gives each rank its share of every Poisson batch, and the
    optimizer's ``expected_batch_size`` is the per-rank share ``q * N / world_size`` (the
    all-reduce averages over ranks, so the update is divided by ``q * N``).

    ``noise_generator`` and ``sampling_generator`` default to ``secret_generator()``s, so the
    randomness the guarantee rests on is independent of ``torch.manual_seed`` / ``set_seed`` (the
    rest of training, e.g. the diffusion noise, stays reproducible from the seed). Pass seeded
    generators for tests only: a known seed voids the guarantee. ``secure_mode`` is opacus' noise
    sampling that resists floating-point attacks; it does not make the generator cryptographic.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
    if noise_multiplicity < 1:
        raise ValueError(f"noise_multiplicity must be >= 1, got {noise_multiplicity}")
    trainable = {p for p in model.parameters() if p.requires_grad}
    in_optimizer = {p for group in optimizer.param_groups for p in group["params"]}
    if trainable != in_optimizer:
        raise ValueError("The optimizer must hold exactly the model's trainable parameters.")
    if not trainable:
        raise ValueError("The model has no trainable parameters.")

    distributed = isinstance(model, DPDDP)
    world_size = torch.distributed.get_world_size() if distributed else 1
    if noise_generator is None:
        noise_generator = secret_generator(next(iter(trainable)).device)
    if sampling_generator is None:
        sampling_generator = secret_generator()
    train_trainable_layers(model)
    if grad_sample_mode == "fused":
        gsm = FusedGradSampleModule(model, noise_multiplicity=noise_multiplicity)
    else:
        make_conv_inputs_contiguous(model)
        gsm = prepare_module(model, grad_sample_mode, batch_first=True, loss_reduction="mean")
        gsm.forbid_grad_accumulation()

    loader = poisson_data_loader(dataset, budget.sample_rate, distributed=distributed, generator=sampling_generator)
    optimizer_class = DistributedDPOptimizerWithNoiseMultiplicity if distributed else DPOptimizerWithNoiseMultiplicity
    dp_optimizer = optimizer_class(
        optimizer,
        noise_multiplicity=noise_multiplicity,
        noise_multiplier=budget.noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=budget.sample_rate * len(dataset) / world_size,
        loss_reduction="mean",
        generator=noise_generator,
        secure_mode=secure_mode,
    )
    # fused mode contracts each example's k rows in the backward already
    dp_optimizer.copies_folded_in_backward = grad_sample_mode == "fused"
    dp_optimizer.attach_step_hook(budget.accountant.get_optimizer_hook_fn(sample_rate=budget.sample_rate))
    return DPTraining(model=gsm, optimizer=dp_optimizer, data_loader=loader)


def private_backward(
    model: nn.Module,
    optimizer: DPOptimizerWithNoiseMultiplicity,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor],
    latents: torch.Tensor,
    labels: torch.Tensor | None,
) -> torch.Tensor | None:
    """Forward and backward of one physical batch; per-sample gradients land in ``p.grad_sample``.

    ``loss_fn(model, latents, labels) -> (rows,)`` draws the diffusion noise and timesteps itself.
    Rows are expanded to ``noise_multiplicity`` copies per example here; the optimizer folds them
    back before clipping. An empty Poisson batch still makes a (noise-only) step: its per-sample
    gradients are empty tensors, so opacus clips nothing and adds the noise. Returns the mean loss.
    """
    k = optimizer.noise_multiplicity
    if len(latents) == 0:
        for p in optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        return None
    rows_latents = expand_for_noise_multiplicity(latents, k)
    rows_labels = expand_for_noise_multiplicity(labels, k)
    loss = loss_fn(model, rows_latents, rows_labels).mean()
    loss.backward()
    return loss.detach()


class PrivateTrainingState:
    """Everything a resumed DP run needs, for ``accelerator.register_for_checkpointing``:
    trainable weights, the optimizer's state and the privacy budget spent (the accountant).

    Guarantee: loading restores the accountant's history, so a resumed run continues counting
    from the steps already taken; it never starts a fresh budget.
    """

    def __init__(self, model: nn.Module, optimizer: DPOptimizerWithNoiseMultiplicity, budget: PrivacyBudget):
        self.model = model
        self.optimizer = optimizer
        self.budget = budget

    def _trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict:
        return {
            "trainable": {name: p.detach().cpu().clone() for name, p in self._trainable().items()},
            "optimizer": self.optimizer.original_optimizer.state_dict(),
            "budget": self.budget.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        params = self._trainable()
        if set(state["trainable"]) != set(params):
            raise ValueError("The checkpoint's trainable parameters do not match this model's LoRA setup.")
        self.budget.load_state_dict(state["budget"])
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["trainable"][name])
        self.optimizer.original_optimizer.load_state_dict(state["optimizer"])
