"""The statistics of an ablation report: paired differences over seeds, their Student-t
intervals and p-values, Holm's correction for the many comparisons a report makes, and the
smallest difference the seeds could have shown (docs/results/README.md uses all of them).

Pure Python and NumPy: the t distribution comes from the regularised incomplete beta
function, evaluated by its continued fraction, so no SciPy is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 0.05  # two-sided level of every interval and verdict
POWER = 0.80  # the power at which the minimum detectable difference is stated


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), accurate where x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        # the even step, then the odd step of the fraction's terms
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return fraction


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, degrees_of_freedom: int) -> float:
    """P(|T| >= |t|) for Student's t with the given degrees of freedom."""
    nu = float(degrees_of_freedom)
    return regularized_beta(nu / 2.0, 0.5, nu / (nu + t * t))


def t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """The `probability` quantile (0.5 < probability < 1) of Student's t, by bisection of its CDF."""
    if not 0.5 < probability < 1.0:
        raise ValueError(f"t_quantile takes a probability in (0.5, 1), got {probability}")
    tail = 2.0 * (1.0 - probability)  # the two-sided p of the quantile
    low, high = 0.0, 1.0
    while t_two_sided_p(high, degrees_of_freedom) > tail:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_two_sided_p(middle, degrees_of_freedom) > tail:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True, kw_only=True)
class Paired:
    """One comparison: the differences of a figure between a sampler and the baseline, paired by seed."""

    mean: float
    std: float | None  # sample standard deviation of the differences; None for one seed
    n: int

    @property
    def half_width(self) -> float | None:
        """Half the width of the two-sided 1 - ALPHA interval of the mean difference."""
        if self.std is None:
            return None
        return t_quantile(1.0 - ALPHA / 2.0, self.n - 1) * self.std / math.sqrt(self.n)

    @property
    def p_value(self) -> float | None:
        """Two-sided p of the paired t-test of mean difference 0."""
        if self.std is None:
            return None
        if self.std == 0.0:
            return 0.0 if self.mean != 0.0 else 1.0
        return t_two_sided_p(self.mean / (self.std / math.sqrt(self.n)), self.n - 1)

    def minimum_detectable(self, *, alpha: float = ALPHA, power: float = POWER) -> float | None:
        """The smallest true mean difference that a two-sided paired t-test at `alpha` on this many
        seeds would show with probability `power`, taking the observed spread as the true one:
        (t_{1 - alpha/2} + t_{power}) * std / sqrt(n), both with n - 1 degrees of freedom."""
        if self.std is None:
            return None
        quantiles = t_quantile(1.0 - alpha / 2.0, self.n - 1) + t_quantile(power, self.n - 1)
        return quantiles * self.std / math.sqrt(self.n)


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None: no test, left out of the family).

    The i-th smallest of m p-values is multiplied by m - i + 1, made monotone and capped at 1:
    rejecting where the adjusted p is below ALPHA keeps the chance of any false claim in the
    family at most ALPHA."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[index] = running
    return adjusted
