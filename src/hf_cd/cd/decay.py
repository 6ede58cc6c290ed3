"""`ColinearityDecay`: applies the CD step to a model's pairs, batched by shape.

Framework-agnostic on purpose: a plain PyTorch loop calls ``decay.step(lr_of)`` after
``optimizer.step()``; `hf_cd.training.callback.CDCallback` is the thin adapter for `transformers.Trainer`.
The math lives in `hf_cd.cd.colinearity`; this module gathers weights, batches pairs of equal
shape, keeps the warm-started power-iteration vectors, and writes the update back (also into
FSDP2 shards).
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_cd.cd.colinearity import (
    CD_FACTORS,
    CD_MODES,
    colinearity_directions,
    converged_power_iteration,
    direction_flops,
    normalized_alignment,
    power_iteration,
    power_iteration_flops,
)
from hf_cd.cd.pairs import MatrixPair, factor_gradients, factor_heads, head_shapes, model_weights
from hf_cd.cd.weights import ModelWeights, is_trainable, pull_back, read_weights

try:  # FSDP2 parameters are DTensors; plain tensors elsewhere.
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - very old torch
    DTensor, distribute_tensor = (), None


class NonFiniteWeightsError(FloatingPointError):
    """A pair's weights (or its CD direction) hold NaN/Inf; raised before anything is written."""


@dataclass
class _PairGroup:
    """Pairs whose per-head A and B shapes match, so they share one batched product."""

    key: str
    pairs: list[MatrixPair]
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    kind_index: torch.Tensor  # (P,) index into the decay's kinds, one entry per head
    a_vectors: torch.Tensor | None = None
    b_vectors: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return sum(pair.heads for pair in self.pairs)


@dataclass
class StepStats:
    """What one step did; tensors stay on the device so logging never forces a sync per step."""

    alignment_sum: torch.Tensor  # per kind, summed over heads
    alignment_count: torch.Tensor  # per kind
    update_sq_norm: torch.Tensor  # ‖ΔW‖_F² summed over every written parameter
    spectral_norms: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


_STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _encode(tensor: torch.Tensor) -> dict:
    """Exact, JSON-safe: raw bytes in base64 (trainer_state.json holds callback state as JSON)."""
    array = tensor.detach().cpu().contiguous()
    dtype = "float64" if array.dtype == torch.float64 else "float32"
    array = array.to(_STATE_DTYPES[dtype])
    return {
        "shape": list(array.shape),
        "dtype": dtype,
        "data": base64.b64encode(array.numpy().tobytes()).decode(),
    }


def _decode(payload: Mapping, device: torch.device) -> torch.Tensor:
    raw = bytearray(base64.b64decode(payload["data"]))
    dtype = _STATE_DTYPES[payload.get("dtype", "float32")]
    return torch.frombuffer(raw, dtype=dtype).reshape(payload["shape"]).to(device)


@contextlib.contextmanager
def _fp32_math(device: torch.device):
    """Float32 math even inside an autocast region; TF32 tensor cores are fine for a regularizer."""
    previous = torch.get_float32_matmul_precision()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


class ColinearityDecay:
    """The decoupled CD update over a fixed set of pairs of one model.

    Call `step` once per real optimizer step, after ``optimizer.step()``; ``lr_of`` maps a
    parameter name to the learning rate its group just used (or is one float for all). ``model``
    may be its `hf_cd.cd.weights.ModelWeights`, when the caller has walked the model once already.
    """

    def __init__(
        self,
        model: nn.Module | ModelWeights,
        pairs: Sequence[MatrixPair],
        *,
        power_iters: int = 2,
        power_tol: float | None = 1e-4,
        max_power_iters: int = 100,
        check_finite: bool = True,
        mode: str = "plain",
        threshold: float = 2.0,
        factors: str = "both",
    ):
        if power_iters < 1:
            raise ValueError(f"power_iters must be ≥ 1, got {power_iters}.")
        weights = model_weights(model)  # pair names are relative to the transformers model
        self.model = weights.model
        if mode not in CD_MODES:
            raise ValueError(f"Unknown CD mode {mode!r}; choose from {', '.join(CD_MODES)}.")
        self.mode, self.threshold = mode, float(threshold)
        if factors not in CD_FACTORS:
            raise ValueError(f"Unknown CD factors {factors!r}; choose from {', '.join(CD_FACTORS)}.")
        self.factors = factors
        self.power_iters = power_iters
        self.power_tol = power_tol
        self.max_power_iters = max_power_iters
        self.power_iterations_run = 0  # adaptive extra iterations, for diagnostics
        self.check_finite = check_finite
        self.params: dict[str, nn.Parameter] = weights.params
        self.sources = weights.sources(name for pair in pairs for name in pair.tensor_names)
        trainable = [
            p for p in pairs if any(is_trainable(self.sources[n], self.params) for n in p.param_names)
        ]
        self.skipped_frozen = [p.name for p in pairs if p not in trainable]
        self.pairs = trainable
        self.kinds: list[str] = sorted({p.kind for p in self.pairs})
        self.groups = self._build_groups()
        self.num_steps = 0

    # -- setup ------------------------------------------------------------------------------

    def _build_groups(self) -> list[_PairGroup]:
        shapes = {name: self.params[source.base].shape for name, source in self.sources.items()}
        by_shape: dict[tuple, list[MatrixPair]] = {}
        for pair in self.pairs:
            by_shape.setdefault(head_shapes(pair, shapes), []).append(pair)
        groups = []
        for (a_shape, b_shape), pairs in by_shape.items():
            key = f"A{a_shape[0]}x{a_shape[1]}/B{b_shape[0]}x{b_shape[1]}:{pairs[0].name}..{pairs[-1].name}#{len(pairs)}"
            kind_index = torch.tensor(
                [self.kinds.index(p.kind) for p in pairs for _ in range(p.heads)], dtype=torch.long
            )
            groups.append(_PairGroup(key, pairs, a_shape, b_shape, kind_index))
        return groups

    @property
    def param_names(self) -> list[str]:
        """Every real parameter the update reads (weights, LoRA factors, folded scales)."""
        names: dict[str, None] = {}
        for source in self.sources.values():
            names.update(dict.fromkeys(source.params))
        return list(names)

    @property
    def written_param_names(self) -> list[str]:
        """The trainable parameters the update writes (frozen weights and scales are only read)."""
        names: dict[str, None] = {}
        for pair in self.pairs:
            for name in pair.param_names:
                names.update(
                    dict.fromkeys(n for n in self.sources[name].params if self.params[n].requires_grad)
                )
        return list(names)

    def flops_per_step(self) -> int:
        """Matrix-product flops of one warm `step` (``power_iters`` iterations, no adaptive extra ones).

        The arithmetic floor of CD, to set against a training step's; element-wise work, the small
        QR / eigenvalue problems and LoRA's effective weights are not counted.
        """
        total = 0
        for group in self.groups:
            (r, n), (m, _) = group.a_shape, group.b_shape
            total += direction_flops(group.size, r, m, n)
            total += power_iteration_flops(group.size, r, n, self.power_iters)
            total += power_iteration_flops(group.size, m, r, self.power_iters)
        return total

    # -- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, lr_of: Callable[[str], float] | float, strength: float) -> StepStats:
        """Apply ``W ← W − η_W·strength·direction_W`` to every written weight; returns device-side stats."""
        tensors = read_weights(self.sources, self.params)
        device = next(iter(tensors.values())).device
        if self.check_finite:
            self._check_finite_weights(tensors)
        directions: dict[str, torch.Tensor] = {}
        finite_checks: list[torch.Tensor] = []
        alignment_sum = torch.zeros(len(self.kinds), device=device, dtype=torch.float64)
        alignment_count = torch.zeros(len(self.kinds), device=device, dtype=torch.float64)
        spectral_norms = {}
        with _fp32_math(device):
            for group in self.groups:
                a = torch.cat([factor_heads(p.a, p.heads, tensors) for p in group.pairs])
                b = torch.cat([factor_heads(p.b, p.heads, tensors) for p in group.pairs])
                sigma_a, sigma_b = self._spectral_norms(group, a, b)
                spectral_norms[group.key] = (sigma_a, sigma_b)
                direction_a, direction_b, product_sq_norm = colinearity_directions(
                    a, b, sigma_a, sigma_b, self.mode, self.threshold
                )
                pair_alignment = normalized_alignment(b.square().sum(dim=(1, 2)), sigma_a, product_sq_norm)
                kind_index = group.kind_index.to(device)
                alignment_sum.index_add_(0, kind_index, pair_alignment.double())
                alignment_count.index_add_(
                    0, kind_index, torch.ones_like(pair_alignment, dtype=torch.float64)
                )
                if self.check_finite:
                    finite_checks.append(product_sq_norm.sum() + direction_a.sum() + direction_b.sum())
                offset = 0
                for pair in group.pairs:
                    heads = slice(offset, offset + pair.heads)
                    offset += pair.heads
                    written = {"both": (0, 1), "in": (0,), "out": (1,)}[self.factors]
                    sides = ((pair.a, direction_a[heads]), (pair.b, direction_b[heads]))
                    for factor, direction in (sides[i] for i in written):
                        for weight, grad in factor_gradients(factor, pair.heads, direction, tensors).items():
                            for name, pulled in pull_back(
                                self.sources[weight], grad, tensors, self.params
                            ).items():
                                directions[name] = (
                                    pulled if name not in directions else directions[name] + pulled
                                )
        if finite_checks and not bool(torch.isfinite(torch.stack(finite_checks)).all()):
            self._raise_non_finite_update(directions)
        update_sq_norm = self._apply(directions, lr_of, strength, device)
        self.num_steps += 1
        return StepStats(alignment_sum, alignment_count, update_sq_norm, spectral_norms)

    def _spectral_norms(
        self, group: _PairGroup, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Warm-started block power iteration, continued until the estimates settle.

        ``power_iters`` iterations run unconditionally; then one more at a time while any sigma
        changed by more than ``power_tol`` (relative) over the last one. A per-iteration change ε
        bounds the error near ``sqrt(ε/2)`` even for close top singular values, so 1e-4 keeps the
        estimates within 1%. Early in training, when weights move fast, this adds iterations;
        later it adds none (one host sync per group).
        """
        states = []  # per factor: [matrices, sigma, change, block]
        for matrices, block in ((a, group.a_vectors), (b, group.b_vectors)):
            if block is None or block.shape[:2] != (matrices.shape[0], matrices.shape[2]):
                sigma, block = converged_power_iteration(matrices)
                change = torch.zeros_like(sigma)
            else:
                block = block.to(matrices.device, matrices.dtype)
                sigma, change, block = power_iteration(matrices, block, self.power_iters)
            states.append([matrices, sigma, change, block])
        if self.power_tol is not None:
            for _ in range(self.max_power_iters):
                if bool(torch.cat([state[2] for state in states]).max() <= self.power_tol):
                    break
                for state in states:
                    matrices, sigma, _, block = state
                    new_sigma, _, state[3] = power_iteration(matrices, block, 1)
                    state[1], state[2] = new_sigma, (new_sigma - sigma).abs() / new_sigma.clamp_min(1e-30)
                self.power_iterations_run += 1
        (_, sigma_a, _, group.a_vectors), (_, sigma_b, _, group.b_vectors) = states
        return sigma_a, sigma_b

    def _apply(
        self,
        directions: dict[str, torch.Tensor],
        lr_of: Callable[[str], float] | float,
        strength: float,
        device,
    ) -> torch.Tensor:
        update_sq_norm = torch.zeros((), device=device, dtype=torch.float64)
        for name, direction in directions.items():
            rate = (lr_of if isinstance(lr_of, (int, float)) else lr_of(name)) * strength
            if rate == 0:
                continue
            param = self.params[name]
            update_sq_norm += (rate * torch.linalg.vector_norm(direction)).double().square()
            if isinstance(param, DTensor):
                # Each rank writes back only its own shard; the full update is identical everywhere.
                local = param.to_local()
                shard = distribute_tensor(
                    direction, param.device_mesh, param.placements, src_data_rank=None
                ).to_local()
                local.copy_(torch.sub(local.to(shard.dtype), shard, alpha=rate).to(local.dtype))
            elif param.dtype == direction.dtype:
                param.sub_(direction, alpha=rate)
            else:  # bf16 / fp16 weights: one rounding, from float32 math
                param.copy_(torch.sub(param.to(direction.dtype), direction, alpha=rate).to(param.dtype))
        return update_sq_norm

    def _check_finite_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """One host sync for all weights; on failure, find and name the pair before anything is written."""
        norms = torch._foreach_norm([tensors[name] for name in self.param_names])  # real parameters only
        if bool(torch.isfinite(torch.stack(norms)).all()):
            return
        for pair in self.pairs:
            names = [n for weight in pair.tensor_names for n in self.sources[weight].params]
            bad = [n for n in names if not bool(torch.isfinite(tensors[n]).all())]
            if bad:
                counts = ", ".join(
                    f"{n} ({int((~torch.isfinite(tensors[n])).sum())} non-finite values)" for n in bad
                )
                raise NonFiniteWeightsError(
                    f"Colinearity Decay found NaN/Inf weights in pair '{pair.name}': {counts}. Training has "
                    "diverged before this step; nothing was written. Lower the learning rate, enable gradient "
                    "clipping (max_grad_norm), or resume from an earlier checkpoint."
                )

    def _raise_non_finite_update(self, directions: dict[str, torch.Tensor]) -> None:
        bad_directions = {n for n, d in directions.items() if not bool(torch.isfinite(d).all())}
        owners = [
            p.name
            for p in self.pairs
            if {n for w in p.param_names for n in self.sources[w].params} & bad_directions
        ]
        raise NonFiniteWeightsError(
            f"Colinearity Decay produced a non-finite update for pair(s) {owners} although the weights are finite "
            "(float32 overflow: are the weights extremely large?). Nothing was written; lower the CD strength."
        )

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-ready state: the step count and the power-iteration vectors, exactly (base64 bytes)."""
        vectors = {}
        for group in self.groups:
            if group.a_vectors is not None and group.b_vectors is not None:
                vectors[group.key] = {"a": _encode(group.a_vectors), "b": _encode(group.b_vectors)}
        return {"num_steps": self.num_steps, "vectors": vectors}

    def load_state_dict(self, state: Mapping) -> list[str]:
        """Restore vectors by group key; returns the groups that found none (they cold-start)."""
        self.num_steps = int(state.get("num_steps", 0))
        device = next(iter(self.params.values())).device
        missing = []
        for group in self.groups:
            payload = state.get("vectors", {}).get(group.key)
            if payload is None:
                missing.append(group.key)
                continue
            group.a_vectors, group.b_vectors = _decode(payload["a"], device), _decode(payload["b"], device)
        return missing
