"""MiniRocket: the baseline a practitioner without pretraining reaches for (random convolutional features).

aeon's MiniRocket is fitted on each outer fold's training inputs only (its dilations and bias
quantiles come from them) and transforms every row; the probe on top is the same standardised
logistic regression, folds and metrics as the encoders'. The transform of a fold is reused by
every label-efficiency draw of that fold. It is an optional extra (`pip install .[baselines]`);
without aeon the probe runs and says so.
"""

from __future__ import annotations

import numpy as np

NAME = "MiniRocket"
CANDIDATE = "minirocket"


def unavailable() -> str | None:
    """None when aeon's MiniRocket imports, else the one line that says why it is skipped."""
    try:
        from aeon.transformations.collection.convolution_based import MiniRocket  # noqa: F401
    except Exception as e:  # ImportError, or a numba/numpy mismatch raising something else
        return (f"MiniRocket baseline skipped: aeon is not importable ({type(e).__name__}: {e}); "
                f"install it with pip install 'himae-dist[baselines]'")
    return None


def fold_features(x: np.ndarray, outer: list[tuple[np.ndarray, np.ndarray]], n_kernels: int,
                  seed: int) -> list[dict[str, np.ndarray]]:
    """x [N, C, L] model inputs -> per outer fold {"minirocket": [N, D]}, the transform fitted on that fold's training rows."""
    from aeon.transformations.collection.convolution_based import MiniRocket

    x = np.ascontiguousarray(x, dtype=np.float32)
    out = []
    for tr, _ in outer:
        mr = MiniRocket(n_kernels=n_kernels, random_state=seed, n_jobs=1).fit(x[tr])
        out.append({CANDIDATE: np.asarray(mr.transform(x), dtype=np.float32)})
    return out
