"""Observers: streaming statistics of one activation site over the calibration batches.

Each observer turns what it saw into `QuantParams`. Those that pick a range by minimum squared
error take two passes over the calibration images: the first keeps only the tails needed for the
candidate percentiles, the second sums the error of every candidate. The second pass runs on
copies of the first pass's activations when they fit in the group's `ReplayBudget`
(`hf_cd.quant.calibration.REPLAY_BYTES`), which halves the calibration forwards; otherwise the
images are forwarded again and nothing close to the whole activation is held. Observers compute
in float32 on the device the activations live on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_cd.quant.algorithms.params import QuantParams
from hf_cd.quant.algorithms.quantizers import (
    asymmetric_params,
    fake_quantize_asymmetric,
    fake_quantize_log_sqrt2,
    quantization_mse,
    symmetric_scale,
    tail_length,
    upper_quantile_from_top,
)


class NoCalibrationDataError(RuntimeError):
    """An activation site saw no data during calibration (its module never ran)."""


class ReplayBudget:
    """Bytes that the observers of one calibration group may hold to replay their later passes.

    An observer that needs more than one pass keeps what it sees in the first pass while the budget
    lasts; if all of it fit, it runs its later passes on those copies and the group skips the extra
    forwards (the activations are the same: nothing is quantized while its group is observed).
    """

    def __init__(self, total_bytes: int) -> None:
        self.left = int(total_bytes)

    def take(self, nbytes: int) -> bool:
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True

    def give_back(self, nbytes: int) -> None:
        self.left += nbytes


class Observer:
    """Base class: counts passes and images; subclasses say how many passes they need and what to keep."""

    num_passes: int = 1

    def __init__(self, bits: int, name: str = "") -> None:
        self.bits = bits
        self.name = name
        self.pass_index = -1
        self.num_images = 0
        self.seen = [0] * self.num_passes
        self.replayed = False  # the later passes ran on copies of the first pass's activations
        self._budget: ReplayBudget | None = None
        self._recorded: list[torch.Tensor] | None = None
        self._recorded_bytes = 0

    def needs_pass(self, pass_index: int) -> bool:
        """Whether calibration must forward the images for pass ``pass_index`` of this observer."""
        return pass_index < self.num_passes and not self.replayed

    def record_for_replay(self, budget: ReplayBudget) -> None:
        """Keep the first pass's activations (within ``budget``) to run the later passes on them."""
        if self.num_passes > 1:
            self._budget, self._recorded, self._recorded_bytes = budget, [], 0

    def begin_pass(self, pass_index: int, num_images: int) -> None:
        """Start pass ``pass_index`` over ``num_images`` images (each pass sees the same images)."""
        if not self.replayed:
            self.pass_index, self.num_images = pass_index, num_images

    def observe(self, x: torch.Tensor) -> None:
        if self.pass_index >= self.num_passes or self.replayed:
            return  # another site of the same calibration group needs more passes than this one
        if self.pass_index == 0 and self._recorded is not None:
            self._record(x)
        self.seen[self.pass_index] += x.shape[0] if x.ndim else 1
        self._observe(x.detach().float(), self.pass_index)

    def _record(self, x: torch.Tensor) -> None:
        nbytes = x.numel() * 4
        if self._budget.take(nbytes):
            # a copy: the model may change its activations in place after the hook has run
            self._recorded.append(x.detach().to(torch.float32, copy=True))
            self._recorded_bytes += nbytes
        else:  # over budget: forget what was kept; the later passes forward the images again
            self._drop_recording()

    def _drop_recording(self) -> None:
        if self._budget is not None:
            self._budget.give_back(self._recorded_bytes)
        self._budget, self._recorded, self._recorded_bytes = None, None, 0

    def end_pass(self) -> None:
        if self.replayed:
            return
        if self.pass_index < self.num_passes and self.seen[self.pass_index] == 0:
            raise NoCalibrationDataError(
                f"Activation site {self.name or '?'} saw no data in calibration pass {self.pass_index}: its "
                "module never ran. If it is an attention matmul, the model's attention does not dispatch "
                "through transformers' ALL_ATTENTION_FUNCTIONS, which hf_cd.quant relies on."
            )
        if self.pass_index < self.num_passes:
            self._end_pass(self.pass_index)
        if self.pass_index == 0 and self._recorded is not None:
            self._replay()

    def _replay(self) -> None:
        """Run passes 1… on the recorded activations, exactly as forwards would feed them."""
        recorded = self._recorded
        self._recorded = None  # `observe` must not record again
        for pass_index in range(1, self.num_passes):
            self.begin_pass(pass_index, self.num_images)
            for x in recorded:
                self.observe(x)
            self.end_pass()
        self.replayed = True
        self._recorded = recorded
        self._drop_recording()

    def params(self) -> QuantParams:
        raise NotImplementedError

    def _observe(self, x: torch.Tensor, pass_index: int) -> None:
        raise NotImplementedError

    def _end_pass(self, pass_index: int) -> None:
        """Hook for work once a pass has seen every image."""


class MinMaxObserver(Observer):
    """Running minimum and maximum → asymmetric per-tensor range (the plain textbook calibration).

    ``include_zero`` (`BaseQuantConfig.activation_include_zero`) widens the range to contain 0.
    """

    def __init__(self, bits: int, name: str = "", include_zero: bool = True) -> None:
        super().__init__(bits, name)
        self.include_zero = include_zero
        self.minimum: torch.Tensor | None = None
        self.maximum: torch.Tensor | None = None

    def _observe(self, x: torch.Tensor, pass_index: int) -> None:
        low, high = x.amin(), x.amax()
        self.minimum = low if self.minimum is None else torch.minimum(self.minimum, low)
        self.maximum = high if self.maximum is None else torch.maximum(self.maximum, high)

    def params(self) -> QuantParams:
        scale, zero_point = asymmetric_params(self.minimum, self.maximum, self.bits, self.include_zero)
        return QuantParams("asymmetric", self.bits, scale, zero_point)


class AbsMaxObserver(Observer):
    """Running maximum of ``|x|`` → symmetric per-tensor scale (static AbsMax)."""

    def __init__(self, bits: int, name: str = "") -> None:
        super().__init__(bits, name)
        self.absmax: torch.Tensor | None = None

    def _observe(self, x: torch.Tensor, pass_index: int) -> None:
        absmax = x.abs().amax()
        self.absmax = absmax if self.absmax is None else torch.maximum(self.absmax, absmax)

    def params(self) -> QuantParams:
        return QuantParams("symmetric", self.bits, symmetric_scale(self.absmax, self.bits))


class _TailObserver(Observer):
    """Pass 0 keeps the largest (and smallest) values per column; pass 1 scores candidate ranges.

    Columns are the channels (last dimension) when ``per_channel``, else the whole tensor is one
    column. The number of values to keep is fixed at the first batch from the per-image element
    count and the number of images of the pass, so the quantiles are exact.
    """

    num_passes = 2

    def __init__(
        self,
        bits: int,
        percentiles: Sequence[float],
        per_channel: bool = False,
        lower_tail: bool = True,
        name="",
    ) -> None:
        super().__init__(bits, name)
        self.percentiles = tuple(float(p) for p in percentiles)
        self.per_channel = per_channel
        self.lower_tail = lower_tail
        self.count = 0  # rows of the (rows × columns) view seen so far
        self.count_expected = 0  # … and over all images of the pass
        self.keep = 0
        self.top: torch.Tensor | None = None
        self.bottom: torch.Tensor | None = None  # largest values of −x
        self.candidates: list[tuple[torch.Tensor, ...]] = []
        self.errors: list[torch.Tensor] = []

    def _columns(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]) if self.per_channel else x.reshape(-1, 1)

    def _observe(self, x: torch.Tensor, pass_index: int) -> None:
        if pass_index == 0:
            self._keep_tails(x)
        else:
            for index, candidate in enumerate(self.candidates):
                x_hat = self._quantize(x, candidate)
                error = quantization_mse(self._columns(x), self._columns(x_hat), dim=0)
                self.errors[index] = self.errors[index] + (error if self.per_channel else error.sum())

    def _keep_tails(self, x: torch.Tensor) -> None:
        columns = self._columns(x)
        if self.keep == 0:
            rows_per_image = columns.shape[0] // max(x.shape[0], 1)
            self.count_expected = rows_per_image * self.num_images
            self.keep = tail_length(self.count_expected, min(self.percentiles))
        self.count += columns.shape[0]
        self.top = self._merge(self.top, columns)
        if self.lower_tail:
            self.bottom = self._merge(self.bottom, -columns)

    def _merge(self, kept: torch.Tensor | None, columns: torch.Tensor) -> torch.Tensor:
        if kept is not None:
            columns = torch.cat([kept, columns], dim=0)
        k = min(self.keep, columns.shape[0])
        return columns.topk(k, dim=0, largest=True, sorted=True).values

    def _end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            if self.count != self.count_expected:
                raise RuntimeError(
                    f"Activation site {self.name}: expected {self.count_expected} rows over "
                    f"{self.num_images} images but saw {self.count}; do all images have the same size?"
                )
            self.candidates = [self._candidate(p) for p in self.percentiles]
            self.errors = [torch.zeros((), device=self.top.device) for _ in self.candidates]

    def _quantile_pair(self, p: float) -> tuple[torch.Tensor, torch.Tensor]:
        high = upper_quantile_from_top(self.top, self.count, p)
        low = -upper_quantile_from_top(self.bottom, self.count, p) if self.lower_tail else None
        return low, high

    def _best(self) -> tuple[torch.Tensor, ...]:
        """The winning candidate, chosen per channel when per-channel."""
        errors = torch.stack(self.errors)  # candidates × (channels)
        best = errors.argmin(dim=0)
        stacked = [torch.stack(parts) for parts in zip(*self.candidates)]
        if errors.ndim == 1:
            return tuple(part[best] for part in stacked)
        return tuple(part.gather(0, best.unsqueeze(0)).squeeze(0) for part in stacked)

    def _candidate(self, p: float) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _quantize(self, x: torch.Tensor, candidate: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError


class PercentileObserver(_TailObserver):
    """Asymmetric range ``[quantile(1 − p), quantile(p)]``, ``p`` of least squared error (RepQ-ViT's search).

    With ``prefix_tokens`` (per-tensor only, (batch, tokens, channels) tensors), the search is
    prefix-aware: the squared error of each of the first ``prefix_tokens`` tokens (CLS) is weighted
    by the number of patch tokens, and the candidates include each percentile range widened to
    cover the prefix tokens. A plain per-tensor error weighs the CLS token 1/N and clips its rare
    large values, which are what a classifier reads (`BaseQuantConfig.weight_prefix_tokens`).

    Per-channel ranges (RepQ-ViT's post-LayerNorm calibration before reparameterization) never
    force 0 into the range. Per-tensor ranges do when ``include_zero``
    (`BaseQuantConfig.activation_include_zero`, on by default), so the zero-point is a valid code;
    RepQ-ViT's per-tensor ranges don't.
    """

    def __init__(
        self,
        bits: int,
        percentiles: Sequence[float],
        per_channel: bool = False,
        name: str = "",
        include_zero: bool = True,
        prefix_tokens: int = 0,
    ) -> None:
        super().__init__(bits, percentiles, per_channel=per_channel, name=name)
        self.include_zero = include_zero and not per_channel
        self.prefix_tokens = 0 if per_channel else prefix_tokens
        self.prefix_min: torch.Tensor | None = None
        self.prefix_max: torch.Tensor | None = None
        self.prefix_weight = 1.0

    def _observe(self, x: torch.Tensor, pass_index: int) -> None:
        weighted = (
            self.prefix_tokens and x.ndim == 3 and x.shape[1] > self.prefix_tokens
        )  # (batch, tokens, ch.)
        if not weighted:
            super()._observe(x, pass_index)
        elif pass_index == 0:
            prefix = x[:, : self.prefix_tokens]
            low, high = prefix.amin(), prefix.amax()
            self.prefix_min = low if self.prefix_min is None else torch.minimum(self.prefix_min, low)
            self.prefix_max = high if self.prefix_max is None else torch.maximum(self.prefix_max, high)
            self.prefix_weight = float(x.shape[1] - self.prefix_tokens)  # one prefix token = all patch tokens
            super()._observe(x, pass_index)
        else:
            for index, candidate in enumerate(self.candidates):
                error = (x - self._quantize(x, candidate)).square_()
                error[:, : self.prefix_tokens] *= self.prefix_weight
                self.errors[index] = self.errors[index] + error.sum()

    def _end_pass(self, pass_index: int) -> None:
        super()._end_pass(pass_index)
        if pass_index == 0 and self.prefix_max is not None:
            # the same percentiles, widened to cover the prefix tokens: candidates that do not clip them
            self.candidates += [self._candidate(p, cover_prefix=True) for p in self.percentiles]
            self.errors = [torch.zeros((), device=self.top.device) for _ in self.candidates]

    def _candidate(self, p: float, cover_prefix: bool = False) -> tuple[torch.Tensor, ...]:
        low, high = self._quantile_pair(p)
        squeeze = (lambda t: t.reshape(-1)) if self.per_channel else (lambda t: t.reshape(()))
        low, high = squeeze(low), squeeze(high)
        if cover_prefix:
            low, high = torch.minimum(low, self.prefix_min), torch.maximum(high, self.prefix_max)
        scale, zero_point = asymmetric_params(low, high, self.bits, self.include_zero)
        return scale, zero_point

    def _quantize(self, x: torch.Tensor, candidate: tuple[torch.Tensor, ...]) -> torch.Tensor:
        scale, zero_point = candidate
        return fake_quantize_asymmetric(x, scale, zero_point, self.bits)

    def params(self) -> QuantParams:
        scale, zero_point = self._best()
        return QuantParams("asymmetric", self.bits, scale, zero_point)


class LogSqrt2Observer(_TailObserver):
    """log√2 quantizer for softmax probabilities: ``delta = quantile(p)``, ``p`` of least squared error.

    ``reserve_zero_code`` picks the b-bit variant of `fake_quantize_log_sqrt2` (scheme
    ``log_sqrt2_zero_code``) instead of RepQ-ViT's 2^b levels plus zero (scheme ``log_sqrt2``).
    """

    def __init__(
        self, bits: int, percentiles: Sequence[float], name: str = "", reserve_zero_code: bool = False
    ) -> None:
        super().__init__(bits, percentiles, per_channel=False, lower_tail=False, name=name)
        self.reserve_zero_code = reserve_zero_code

    def _candidate(self, p: float) -> tuple[torch.Tensor, ...]:
        _, high = self._quantile_pair(p)
        return (high.reshape(()).clamp(min=1e-8),)

    def _quantize(self, x: torch.Tensor, candidate: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return fake_quantize_log_sqrt2(x, candidate[0], self.bits, self.reserve_zero_code)

    def params(self) -> QuantParams:
        (delta,) = self._best()
        return QuantParams("log_sqrt2_zero_code" if self.reserve_zero_code else "log_sqrt2", self.bits, delta)
