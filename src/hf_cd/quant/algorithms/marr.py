r"""MARR-style per-module residual scale: a PID controller on α_m, fed by the reconstruction error.

MARR ("Module-Adaptive Residual Reconstruction for Low-Bit Post-Training Quantization", arXiv
2605.17997) scales GPTAQ's residual term by a coefficient α_m per module and refines it with a PID
controller whose feedback is the reconstruction error. Only the abstract is public; the controller
below is this library's design, written down here in full.

Plant. For module m (one linear layer) and a candidate α, quantize the weight with GPTAQ's
correction scaled by α (`hf_cd.quant.algorithms.gptaq`) and measure, on the calibration inputs,

    E(α) = ‖W_q(α) X_q − W X_fp‖_F / ‖W X_fp‖_F                       (relative reconstruction error)

E is cheap to evaluate (one column solve; the norms come from the accumulated input statistics) but
it is not smooth (rounding flips) and its curvature differs by orders of magnitude between modules.

Error signal. A finite-difference slope of E would do as a PID error, but then the gains would have
to match each module's curvature (a 40× spread of curvatures breaks any fixed gains in simulation).
So the measurement is turned into a *distance to the estimated optimum*, which is scale-free:

    α̂_t = argmin over [0, 1] of the parabola through the three most recent distinct (α, E) points
          (an end point of [0, 1] when that parabola is not convex)
    e_t = α̂_t − α_t

Controller (positional form with a step limit), t = 1, 2, …::

    I_t = I_{t−1} + e_t                                   (unless the step saturates; see below)
    u_t = clip(K_p e_t + K_i I_t + K_d (e_t − e_{t−1}), −s_max, s_max)
    α_{t+1} = clip(α_t + u_t, 0, 1)

Anti-windup: conditional integration, i.e. ``e_t`` is not added to ``I`` when the step or α is clipped
and ``e_t`` pushes further into that limit, and ``|I| ≤ s_max / K_i`` always; so α leaves a bound as
soon as the estimate points back inside instead of after the integral has unwound.

Start-up (the excitation an extremum-seeking loop needs): E(0) is GPTQ's error and E(α_0) with
α_0 = 0.25 (GPTAQ's default) the second point; the third is a probe step of 0.25 towards the lower
of the two (α_0 + 0.25 if E(α_0) < E(0), else α_0 / 2). The loop then runs until ``|α_{t+1} − α_t| <
tolerance`` or ``rounds`` evaluations, and the module keeps the evaluated α of least E (the smaller
α on ties), so MARR's calibration error is never above GPTQ's or GPTAQ's at α_0 for that module.

Gains K_p = 0.8, K_i = 0.05, K_d = 0.1, s_max = 0.35, chosen by simulating quadratic, cubic and
jagged plants with curvatures from 0.05 to 5: on a quadratic plant the estimate is exact, so K_p < 1
alone would approach the optimum monotonically; the small K_i (which absorbs a persistent bias of the
parabola model, e.g. on cubic plants) can carry α past it by at most K_i · Σ e_t (≈ 0.02 there), and
K_d damps the jumps of noisy estimates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

DEFAULT_GRID: tuple[float, ...] = tuple(i / 8 for i in range(9))
"""α candidates of the grid-search reference (``marr_grid``): 0, 0.125, …, 1."""


@dataclass(frozen=True)
class PIDGains:
    kp: float = 0.8
    ki: float = 0.05
    kd: float = 0.1

    def __post_init__(self) -> None:
        if min(self.kp, self.ki, self.kd) < 0:
            raise ValueError(f"PID gains must be ≥ 0, got kp={self.kp}, ki={self.ki}, kd={self.kd}.")


class PIDController:
    """Discrete PID on a bounded actuator (α) with a step limit and conditional-integration anti-windup."""

    def __init__(
        self,
        gains: PIDGains = PIDGains(),
        initial: float = 0.25,
        lower: float = 0.0,
        upper: float = 1.0,
        max_step: float = 0.35,
        anti_windup: bool = True,
    ) -> None:
        if not lower <= initial <= upper:
            raise ValueError(f"initial={initial} must lie in [{lower}, {upper}].")
        if max_step <= 0:
            raise ValueError(f"max_step must be > 0, got {max_step}.")
        self.gains, self.lower, self.upper, self.max_step = gains, lower, upper, max_step
        self.anti_windup = anti_windup
        self.alpha = float(initial)
        self.integral = 0.0
        self.previous_error: float | None = None

    def update(self, error: float) -> float:
        """Take the error signal ``e_t`` and return the next α."""
        gains = self.gains
        derivative = 0.0 if self.previous_error is None else error - self.previous_error
        self.previous_error = error
        integral = self.integral + error
        raw = gains.kp * error + gains.ki * integral + gains.kd * derivative
        step = min(max(raw, -self.max_step), self.max_step)
        proposed = self.alpha + step
        if self.anti_windup:
            clipped_up = raw > self.max_step or proposed > self.upper
            clipped_down = raw < -self.max_step or proposed < self.lower
            if not ((clipped_up and error > 0) or (clipped_down and error < 0)):
                self.integral = integral
            if gains.ki > 0:
                limit = self.max_step / gains.ki
                self.integral = min(max(self.integral, -limit), limit)
        else:
            self.integral = integral
        self.alpha = min(max(proposed, self.lower), self.upper)
        return self.alpha


def parabola_minimizer(
    points: Sequence[tuple[float, float]], lower: float = 0.0, upper: float = 1.0
) -> float:
    """argmin over ``[lower, upper]`` of the parabola through three ``(α, E)`` points with distinct α."""
    (x0, y0), (x1, y1), (x2, y2) = points
    # Newton's divided differences: E(α) ≈ y0 + d1 (α − x0) + d2 (α − x0)(α − x1).
    d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    d2 = (d12 - d01) / (x2 - x0)
    d1 = d01

    def model(a: float) -> float:
        return y0 + d1 * (a - x0) + d2 * (a - x0) * (a - x1)

    if d2 > 0:
        vertex = 0.5 * (x0 + x1) - d1 / (2.0 * d2)
        return min(max(vertex, lower), upper)
    return lower if model(lower) <= model(upper) else upper


@dataclass
class AlphaSearch:
    """Every α evaluated for one module, in order, with its error; and the one kept."""

    alphas: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)

    def add(self, alpha: float, error: float) -> None:
        self.alphas.append(float(alpha))
        self.errors.append(float(error))

    @property
    def best_index(self) -> int:
        return min(range(len(self.alphas)), key=lambda i: (self.errors[i], self.alphas[i]))

    @property
    def best_alpha(self) -> float:
        return self.alphas[self.best_index]

    @property
    def best_error(self) -> float:
        return self.errors[self.best_index]


class _Memo:
    """``evaluate`` with results remembered by α, so revisiting an α costs no solve."""

    def __init__(self, evaluate: Callable[[float], float], search: AlphaSearch) -> None:
        self.evaluate, self.search, self.cache = evaluate, search, {}

    def __call__(self, alpha: float) -> float:
        key = round(float(alpha), 12)
        if key not in self.cache:
            self.cache[key] = float(self.evaluate(float(alpha)))
            self.search.add(alpha, self.cache[key])
        return self.cache[key]


def _recent_distinct(search: AlphaSearch, count: int = 3) -> list[tuple[float, float]]:
    points: list[tuple[float, float]] = []
    for alpha, error in zip(reversed(search.alphas), reversed(search.errors)):
        if all(abs(alpha - other) > 1e-9 for other, _ in points):
            points.append((alpha, error))
        if len(points) == count:
            break
    return points


def marr_search(
    evaluate: Callable[[float], float],
    alpha_init: float = 0.25,
    gains: PIDGains = PIDGains(),
    rounds: int = 6,
    probe_step: float = 0.25,
    max_step: float = 0.35,
    tolerance: float = 0.01,
    anti_windup: bool = True,
) -> AlphaSearch:
    """Refine α in [0, 1] for one module with the PID loop of this module's docstring.

    ``evaluate(α)`` returns the module's reconstruction error at α; it is called once for α = 0 and
    at most ``rounds`` more times. Returns the whole trajectory; ``best_alpha`` is the one to keep.
    """
    if not 0.0 < alpha_init <= 1.0:
        raise ValueError(f"alpha_init must lie in (0, 1] (GPTAQ's default is 0.25), got {alpha_init!r}.")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}.")
    search = AlphaSearch()
    error_at = _Memo(evaluate, search)
    reference = error_at(0.0)
    alpha = float(alpha_init)
    first = error_at(alpha)
    if rounds == 1 or reference <= 0.0:
        return search
    alpha = min(alpha + probe_step, 1.0) if first < reference else alpha / 2.0
    controller = PIDController(gains, initial=alpha, max_step=max_step, anti_windup=anti_windup)
    for _ in range(rounds - 1):
        error_at(alpha)
        points = _recent_distinct(search)
        if len(points) < 3:
            break
        next_alpha = controller.update(parabola_minimizer(points) - alpha)
        if abs(next_alpha - alpha) < tolerance:
            break
        alpha = next_alpha
    return search


def grid_search(evaluate: Callable[[float], float], grid: Sequence[float] = DEFAULT_GRID) -> AlphaSearch:
    """The reference: evaluate every α of ``grid`` and keep the least error (``marr_grid``)."""
    if not grid or not all(0.0 <= a <= 1.0 for a in grid):
        raise ValueError(f"The α grid must be a non-empty sequence of values in [0, 1], got {grid!r}.")
    search = AlphaSearch()
    error_at = _Memo(evaluate, search)
    for alpha in grid:
        error_at(alpha)
    return search
