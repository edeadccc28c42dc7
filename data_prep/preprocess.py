"""Preprocessing applied once, at conversion time, and recorded with the data.

The seed min-max scales every segment to [-1, 1]; a model pretrained on scaled segments and then
probed on raw-unit data sees two input distributions. So the conversion job applies one
`Preprocess`, records it in the shards' manifest (and the trainer copies it into every
checkpoint), and the probe applies the same one to its data.

Order, per segment [C, L]:
  1. length policy against the expected input length `length`:
     `strict` (default): any other length is a bad segment (`wrong_length`);
     `crop`: longer segments keep their first `length` samples (counted as `cropped`), shorter
     ones are bad; `crop-pad`: as `crop`, and shorter ones are padded at the end by repeating
     their last sample (counted as `padded`). Nothing is ever zero-filled.
  2. resampling from `source_rate` to `target_rate` (polyphase, scipy.signal.resample_poly),
     only when both are given and differ; `length * target / source` must be a whole number.
  3. normalisation: `minmax` (default) scales each channel to [-1, 1] as the seed does;
     `none` leaves values as they are (data already normalised).
A segment with a constant channel (flat line: sensor off or saturated) has no min-max scale;
`constant="drop"` (default) drops it and counts it as `constant`; `keep` keeps it (under
`minmax` the constant channel becomes 0, by this documented choice only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np

NORMALIZE = ("minmax", "none")
LENGTH_POLICIES = ("strict", "crop", "crop-pad")
CONSTANT_POLICIES = ("drop", "keep")


@dataclass(frozen=True)
class Preprocess:
    normalize: str = "minmax"
    source_rate: float | None = None  # Hz of the input segments (None: unknown, no resampling)
    target_rate: float | None = None  # Hz after resampling (None: keep the source rate)
    length: int | None = None  # expected input length in samples (None: decided from the data)
    length_policy: str = "strict"
    constant: str = "drop"

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> None:
            raise ValueError(f"preprocess option {name}={getattr(self, name)!r}: expected {want}")

        if self.normalize not in NORMALIZE:
            bad("normalize", f"one of {', '.join(NORMALIZE)}")
        if self.length_policy not in LENGTH_POLICIES:
            bad("length_policy", f"one of {', '.join(LENGTH_POLICIES)}")
        if self.constant not in CONSTANT_POLICIES:
            bad("constant", f"one of {', '.join(CONSTANT_POLICIES)}")
        for name in ("source_rate", "target_rate"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and np.isfinite(v)):
                bad(name, "a positive number of Hz")
        if self.target_rate is not None and self.source_rate is None:
            bad("target_rate", "to be given together with source_rate (resampling needs both)")
        if self.length is not None and self.length < 1:
            bad("length", "an integer >= 1")

    @property
    def resample_ratio(self) -> tuple[int, int]:
        """(up, down) of the polyphase resampler; (1, 1) when no resampling is asked for."""
        if self.source_rate is None or self.target_rate is None or self.source_rate == self.target_rate:
            return 1, 1
        r = Fraction(self.target_rate).limit_denominator(10_000) / Fraction(self.source_rate).limit_denominator(10_000)
        return r.numerator, r.denominator

    @property
    def output_rate(self) -> float | None:
        return self.target_rate if self.target_rate is not None else self.source_rate

    def output_length(self, length: int | None = None) -> int:
        """Segment length after resampling, for input length `length` (default: self.length)."""
        length = self.length if length is None else length
        if length is None:
            raise ValueError("the input length is not known yet; pass --length or let the job infer it")
        up, down = self.resample_ratio
        if (length * up) % down:
            raise ValueError(
                f"resampling {length} samples from {self.source_rate} Hz to {self.target_rate} Hz gives "
                f"{length * up / down:g} samples, not a whole number; pick rates whose ratio divides the length"
            )
        return length * up // down

    def describe(self) -> str:
        """The options that change values, for messages: e.g. `normalize=none, 100 -> 50 Hz`."""
        up, down = self.resample_ratio
        rate = f", {self.source_rate:g} -> {self.target_rate:g} Hz" if (up, down) != (1, 1) else ""
        return f"normalize={self.normalize}{rate}"

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.length is not None:
            d["output_length"] = self.output_length()
        d["output_rate"] = self.output_rate
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        known = {k: d[k] for k in ("normalize", "source_rate", "target_rate", "length", "length_policy", "constant") if k in d}
        return cls(**known)

    def fit_length(self, seg: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        """Apply the length policy to seg [C, L]: (seg [C, length], note) or (None, reason)."""
        want, have = self.length, seg.shape[-1]
        if want is None or have == want:
            return seg, None
        if have > want and self.length_policy in ("crop", "crop-pad"):
            return seg[..., :want], "cropped"
        if have < want and self.length_policy == "crop-pad":
            return np.pad(seg, [(0, 0)] * (seg.ndim - 1) + [(0, want - have)], mode="edge"), "padded"
        return None, "wrong_length"

    def apply(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x [N, C, L] (already the expected length) -> (y [N', C, L_out] float32, kept [N] bool).

        Rows dropped here are constant segments under `constant="drop"`.
        """
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 3:
            raise ValueError(f"expected segments [N, C, L], got shape {x.shape}")
        lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)  # [N, C, 1]
        constant = (hi == lo).any(axis=(1, 2))  # [N]
        kept = ~constant if self.constant == "drop" else np.ones(len(x), bool)
        x = x[kept]
        up, down = self.resample_ratio
        if (up, down) != (1, 1):
            from scipy.signal import resample_poly

            self.output_length(x.shape[-1])  # clear error if the ratio does not divide the length
            x = resample_poly(x, up, down, axis=-1).astype(np.float32)  # [N', C, L * up / down]
        if self.normalize == "minmax":
            x = _minmax(x)
        return np.ascontiguousarray(x), kept


def _minmax(x: np.ndarray) -> np.ndarray:
    """Each channel of x [N, C, L] float32 scaled to [-1, 1] (a constant one to 0).

    The span hi - lo of finite values near +-3.4e38 overflows float32 (inf, then NaN after the
    division), so segments whose span overflows are scaled in float64; the rest keep the float32
    arithmetic, and so the bytes, of earlier versions.
    """
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)  # [N, C, 1]
    with np.errstate(over="ignore", invalid="ignore"):
        span = hi - lo
        wide = np.isinf(span).any(axis=(1, 2))  # [N]
        if not wide.any():
            return _scale(x, lo, span)
        y = np.empty_like(x)
        y[~wide] = _scale(x[~wide], lo[~wide], span[~wide])
        lo64 = lo[wide].astype(np.float64)
        y[wide] = _scale(x[wide].astype(np.float64), lo64, hi[wide].astype(np.float64) - lo64)
    return y


def _scale(x: np.ndarray, lo: np.ndarray, span: np.ndarray) -> np.ndarray:
    """(x - lo) / span * 2 - 1 as float32, 0 where span is 0."""
    return np.where(span > 0, (x - lo) / np.where(span > 0, span, 1) * 2 - 1, 0).astype(np.float32)
