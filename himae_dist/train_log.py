"""What the trainer shows and records: progress bar, per-log-step metrics, plots.

All timing is host-side and device values arrive in the trainer's one read per log step, so
none of this syncs the device. Rank 0 writes `metrics.jsonl`, wandb (`--wandb offline|online`)
and the PNGs; every rank returns the same records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data_prep.storage import redact_argv
from himae_dist.config import config_record


@dataclasses.dataclass
class LogWindow:
    """What accumulates between log steps, per rank, on the device; kept in checkpoints so a resumed log is exact."""

    loss_sum: torch.Tensor  # device scalar: no host sync per micro-step
    val_sum: torch.Tensor  # the latest validation, read at the next log step
    grad_norm: torch.Tensor  # the log step's update's (device scalar)
    loss_n: int = 0
    val_n: int = 0
    last_logged: int = 0
    lr: float = 0.0  # the log step's update's (host)
    # several sources: per source, [masked squared error, masked samples] of the training rows [2, S], and the
    # latest validation's batch-loss sums [S] (val_src_n batches each); None with one source
    src: torch.Tensor | None = None
    val_src: torch.Tensor | None = None
    val_src_n: list | None = None

    @classmethod
    def new(cls, device: torch.device, start: int, saved: dict | None = None, n_sources: int = 1) -> "LogWindow":
        saved = saved or {}
        t = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
        win = cls(t(float(saved.get("loss_sum", 0.0))), t(float(saved.get("val_sum", 0.0))),
                  torch.zeros((), device=device), saved.get("loss_n", 0), saved.get("val_n", 0),
                  saved.get("last_logged", start))
        if n_sources > 1:
            src = saved.get("src")
            win.src = t(src) if src and len(src[0]) == n_sources else torch.zeros(2, n_sources, device=device)
            win.val_src = torch.zeros(n_sources, device=device)
        return win

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.loss_n += 1

    def add_sources(self, sse: torch.Tensor, n: torch.Tensor, source: torch.Tensor) -> None:
        """Per-row masked squared error and count [B] into their sources' sums (on the device)."""
        self.src[0].index_add_(0, source, sse)
        self.src[1].index_add_(0, source, n)

    def reset(self, step: int) -> None:
        self.loss_sum.zero_()
        if self.src is not None:
            self.src.zero_()
        self.loss_n, self.val_n, self.last_logged = 0, 0, step

    def to_dict(self) -> dict:  # host copies: only at saves, which sync anyway
        d = {"loss_sum": float(self.loss_sum), "loss_n": self.loss_n, "val_sum": float(self.val_sum),
             "val_n": self.val_n, "last_logged": self.last_logged}
        if self.src is not None:
            d["src"] = self.src.tolist()
        return d


def read_log_step(win: LogWindow, nonfinite: torch.Tensor, flags: list[float]) -> tuple[list[float], float]:
    """Collective: sums over ranks of (loss, val loss, grad norm, non-finite samples, *flags, and with
    several sources the per-source sums: training [2, S] flattened, validation [S]), and this rank's
    non-finite count: the host flags copied to the device, one all-reduce, one copy back (the log
    step's syncs; between log steps there are none)."""
    device = win.loss_sum.device
    parts = [torch.stack([win.loss_sum.double(), win.val_sum.double(), win.grad_norm.double(), nonfinite.double()]),
             torch.tensor(flags, dtype=torch.float64).to(device)]  # host -> device: a sync on a GPU
    if win.src is not None:
        parts += [win.src.double().flatten(), win.val_src.double()]
    stats = torch.cat(parts)
    dist.all_reduce(stats)
    host = torch.cat([stats, nonfinite.double().reshape(1)]).cpu()  # the one device->host copy
    values = host.tolist()
    return values[:-1], values[-1]


class TrainLog:
    def __init__(self, cfg, rank: int, start: int, out: Path, segments_per_step: int, device: torch.device):
        from tqdm import tqdm

        self.cfg, self.rank, self.out, self.device = cfg, rank, out, device
        self.segments_per_step = segments_per_step
        self.bar = tqdm(total=cfg.steps, initial=start, disable=rank != 0, unit="step", mininterval=1.0,
                        desc="himae-train", dynamic_ncols=True)
        self.wandb = _wandb(cfg) if rank == 0 else None
        self._t, self._wait, self._steps = time.perf_counter(), 0.0, 0
        self._t0 = self._t

    def waited(self, seconds: float) -> None:
        """Time spent blocked on the data loader (host clock)."""
        self._wait += seconds

    def step(self) -> None:
        self._steps += 1
        self.bar.update(1)

    def record(self, step: int, loss: float, lr: float, val_loss: float | None, grad_norm: float | None,
               nonfinite: int = 0, lost: dict | None = None, sources: dict | None = None) -> dict:
        """One log step's record; `lr` is the last update's, `nonfinite` the non-finite samples dropped so far and
        `lost` the failed shard reads, all reads and the segments lost so far (all ranks, cumulative);
        `sources` (several sources): per source name, its loss, val_loss, samples and epochs so far."""
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        rec = {"step": step, "loss": loss, "lr": lr}
        if val_loss is not None:
            rec["val_loss"] = val_loss
        if grad_norm is not None and math.isfinite(grad_norm):
            rec["grad_norm"] = grad_norm
        rec["nonfinite_samples"] = nonfinite
        rec.update(lost or {})
        if sources:
            rec["sources"] = sources
        rec["segments_per_s"] = round(self._steps * self.segments_per_step / dt, 1)  # all ranks
        rec["elapsed_s"] = round(now - self._t0, 3)  # since this attempt's first step was set up
        rec["data_wait_frac"] = round(self._wait / dt, 4)
        rec["peak_mem_mb"] = round(_peak_mem_mb(self.device), 1)
        self._t, self._wait, self._steps = now, 0.0, 0
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            bad = rec.get("failed_shard_reads", 0)
            lost_s = f" LOST {bad} shard reads ({rec['lost_segments']} segments)" if bad else ""
            self.bar.set_postfix(loss=f"{loss:.4f}", seg_s=f"{rec['segments_per_s']:.0f}", refresh=False,
                                 **({"lost_reads": bad} if bad else {}))
            val = f" val {val_loss:.5f}" if val_loss is not None else ""
            per = "".join(f" | {name} loss {v['loss']:.5f}" + (f" val {v['val_loss']:.5f}" if "val_loss" in v else "")
                          + f" {v['samples']} seen ({v['epochs']:.2f} ep)" for name, v in (sources or {}).items())
            self.bar.write(f"[himae-train] step {step}/{self.cfg.steps} loss {loss:.5f}{val} lr {lr:.2e} "
                           f"{rec['segments_per_s']:.0f} seg/s data-wait {rec['data_wait_frac']:.0%}{lost_s}{per}")
            if self.wandb:
                self.wandb.log(rec, step=step)
        return rec

    def close(self) -> None:
        self.bar.close()
        if self.rank == 0:
            plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss_curve.png")
        if self.wandb:
            self.wandb.finish()


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak RSS


def _wandb(cfg):
    if cfg.wandb == "off":
        return None
    import wandb

    argv = sys.argv  # W&B records the command line too (the run's metadata): the redacted one
    sys.argv = redact_argv(argv)
    try:
        return wandb.init(project=cfg.wandb_project, config=config_record(cfg), dir=cfg.out, mode=cfg.wandb)
    finally:
        sys.argv = argv


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(metrics: Path, png: Path) -> None:
    """Training (and validation) loss against step, from metrics.jsonl."""
    if not metrics.is_file():
        return
    recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label="train (masked MSE)")
    val = [r for r in recs if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val (held-out patients)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_reconstructions(x: torch.Tensor, mask: torch.Tensor, recon: torch.Tensor, png: Path, step: int, n: int = 4) -> None:
    """Rows: original, masked spans shaded, reconstruction. x, recon [B, C, L]; mask [B, 1, L] (1 = masked)."""
    plt = _plt()
    x, recon, mask = x[:n, 0].float().cpu(), recon[:n, 0].float().cpu(), mask[:n, 0].float().cpu()
    fig, axes = plt.subplots(len(x), 1, figsize=(8, 1.8 * len(x)), squeeze=False)
    for ax, xi, ri, mi in zip(axes[:, 0], x, recon, mask):
        ax.plot(xi.numpy(), lw=0.8, label="original")
        ax.plot(ri.numpy(), lw=0.8, label="reconstruction")
        ax.fill_between(range(len(mi)), -1.05, 1.05, where=mi.numpy() > 0.5, color="grey", alpha=0.25, lw=0,
                        label="masked")
        ax.set_ylim(-1.1, 1.1)
    axes[0, 0].legend(loc="upper right", fontsize=7)
    axes[0, 0].set_title(f"step {step}")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
