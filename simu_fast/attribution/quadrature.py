"""Quadrature rules for integrated gradients over alpha in [0, 1]: (alphas, weights).

- riemann_right:     alpha_j = j/m, w_j = 1/m, j = 1..m (DEPN and SIMU).
- riemann_trapezoid: captum's definition: alpha = linspace(0, 1, m), w_j = 1/m with the first and last halved.
- gausslegendre:     Gauss-Legendre nodes and weights mapped from [-1, 1] to [0, 1] (exact for polynomials of
                     degree <= 2m - 1).
"""
from __future__ import annotations

import numpy as np

RULES = ("riemann_right", "riemann_trapezoid", "gausslegendre")


def quadrature(rule: str, steps: int) -> tuple[list[float], list[float]]:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if rule == "riemann_right":
        return [j / steps for j in range(1, steps + 1)], [1.0 / steps] * steps
    if rule == "riemann_trapezoid":
        if steps < 2:
            raise ValueError("riemann_trapezoid needs steps >= 2")
        alphas = np.linspace(0.0, 1.0, steps).tolist()
        weights = [1.0 / steps] * steps
        weights[0] /= 2
        weights[-1] /= 2
        return alphas, weights
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (0.5 * (nodes + 1.0)).tolist(), (0.5 * weights).tolist()
    raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
