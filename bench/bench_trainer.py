"""Trainer overhead: the full trainer against a plain PyTorch loop, same model, batch and data, same run.

One rank on this machine. The trainer reads shards (from the page cache) and does everything a
run does (DeepSpeed engine, schedule, non-finite checks, metrics); its segments/s is the mean of
the logged figures after the first log interval (warm-up), eager and under --compile (inductor:
the compile falls in the untimed first interval). The plain loop is AdamW on HiMAE with
the same masking and masked MSE over the same batches, preloaded in memory as float32.

    .venv/bin/python bench/bench_trainer.py [--steps 100] [--micro-batch 64] [--length 1000]

A third path is the authors' setup, a PyTorch Lightning loop over the same model, masking, loss and
in-memory batches (`pip install lightning` for this bench only; it is no dependency of the project).

Ends with: `trainer N seg/s, plain loop M seg/s, lightning K seg/s, overhead P %` (the trainer's
against the plain loop). GPU end-to-end figures (L=1000 bf16 from local tars vs memory) need a
GPU; this script reports the CPU figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.ports import free_port  # noqa: E402 (after the repo root is on the path)


def _shards(tmp: Path, length: int) -> Path:
    from data_prep.convert import ConvertParams, convert_pretrain
    from tests.h5_inputs import random_index

    index = random_index(tmp, n=2400, length=length, n_files=4, patients=8)
    out = tmp / "shards"
    convert_pretrain(str(index), ConvertParams(str(out), samples_per_shard=300))
    return out


_TRAIN_ONE = ("import json, sys; from himae_dist.config import parse_config; from himae_dist.train import train; "
              "print('HIST ' + json.dumps(train(parse_config(sys.argv[1:]))['history']))")


def _compiled_run(argv: list[str]) -> tuple[float, float]:
    """(segments/s, data wait) of the trainer in a fresh process, after the first log interval; NaN if it
    fails (inductor generates C++ on CPU: it needs a compiler), with the reason printed."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _TRAIN_ONE, *argv], cwd=Path(__file__).resolve().parents[1],
                          env=dict(os.environ, MASTER_PORT=str(free_port())), capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("HIST ")]
    if proc.returncode or not lines:
        print(f"bench_trainer: --compile failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:300]}")
        return float("nan"), float("nan")
    hist = json.loads(lines[0][5:])[1:]
    return sum(h["segments_per_s"] for h in hist) / len(hist), sum(h["data_wait_frac"] for h in hist) / len(hist)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--log-every", type=int, default=20)
    a = ap.parse_args(argv)
    if a.steps < 2 * a.log_every:  # the first log interval is warm-up; at least one more is timed
        ap.error(f"--steps={a.steps}: expected >= 2 x --log-every ({2 * a.log_every})")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    from himae_dist.config import parse_config
    from himae_dist.model import HiMAE
    from himae_dist.streaming import load_manifest, make_loader
    from himae_dist.train import train
    from kernels.masked_mse_reference import mask_input, masked_mse

    def plain_loop(batches: list[torch.Tensor]) -> float:
        torch.manual_seed(0)
        model = HiMAE(1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for i, x in enumerate(batches):
            if i == a.log_every:  # the same warm-up as the trainer's first log interval
                t0 = time.perf_counter()
            xm, mask = mask_input(x, 5, 0.8, gen)
            loss = masked_mse(model(xm), x, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (len(batches) - a.log_every) * a.micro_batch / (time.perf_counter() - t0)

    def lightning_loop(batches: list[torch.Tensor]) -> float | None:
        """The authors' setup: a PyTorch Lightning loop over the same model, masking, loss and batches."""
        try:
            import lightning as L
        except ImportError:
            return None

        class MAE(L.LightningModule):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.model, self.gen = HiMAE(1), torch.Generator().manual_seed(0)

            def training_step(self, x, i):
                xm, mask = mask_input(x, 5, 0.8, self.gen)
                return masked_mse(self.model(xm), x, mask)

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=1e-3)

        class Clock(L.Callback):
            t0 = None

            def on_train_batch_start(self, trainer, module, batch, i):
                if i == a.log_every:  # the same warm-up as the others
                    Clock.t0 = time.perf_counter()

        trainer = L.Trainer(max_steps=len(batches), accelerator="cpu", devices=1, logger=False, callbacks=[Clock()],
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
        trainer.fit(MAE(), loader)
        return (len(batches) - a.log_every) * a.micro_batch / (time.perf_counter() - Clock.t0)

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        data = _shards(tmp, a.length)
        loader, _ = make_loader(load_manifest(str(data)), a.micro_batch, seed=0, shuffle_shards=2)
        it = iter(loader)
        batches = [next(it)["signal"].float() for _ in range(a.steps)]  # [B, 1, L] in memory
        del loader, it
        before = plain_loop(batches)  # the plain loop brackets the trainer: load drift shows as a spread
        argv_of = lambda c: ["--data", str(data), "--steps", str(a.steps),  # noqa: E731
                             "--micro-batch", str(a.micro_batch), "--log-every", str(a.log_every),
                             "--num-workers", "0", "--shuffle-shards", "2", "--loss-impl", "reference",
                             "--precision", "fp32"]
        cfg = parse_config([*argv_of(None), "--out", str(tmp / "run")])
        import torch.distributed as dist

        def timed(cfg) -> tuple[float, float]:
            hist = train(cfg)["history"]
            dist.destroy_process_group()  # as the CLI does at exit; a live group slowed the loop after it by ~20 %
            return (sum(h["segments_per_s"] for h in hist[1:]) / len(hist[1:]),
                    sum(h["data_wait_frac"] for h in hist[1:]) / len(hist[1:]))

        trainer, wait = timed(cfg)
        # --compile (inductor) in its own process: DeepSpeed keeps the first process group registered
        compiled, cwait = _compiled_run([*argv_of(cfg), "--out", str(tmp / "run_compiled"), "--compile", "true"])
        after = plain_loop(batches)
        lightning = lightning_loop(batches)
    plain = (before + after) / 2
    overhead = (plain / trainer - 1) * 100
    print(f"run: {time.strftime('%Y-%m-%d')} | {platform.machine()} | {os.cpu_count()} cpus | torch {torch.__version__} "
          f"| threads {torch.get_num_threads()}")
    print("| path | L | micro-batch | steps timed | seg/s | data wait |")
    print("|---|---|---|---|---|---|")
    print(f"| trainer (DeepSpeed, shards) | {a.length} | {a.micro_batch} | {a.steps - a.log_every} | {trainer:.0f} "
          f"| {wait:.1%} |")
    print(f"| trainer --compile (inductor; first interval, with the compile, untimed) | {a.length} | {a.micro_batch} | "
          f"{a.steps - a.log_every} | {compiled:.0f} | {cwait:.1%} |")
    print(f"| plain loop (memory), before / after | {a.length} | {a.micro_batch} | {a.steps - a.log_every} "
          f"| {before:.0f} / {after:.0f} | - |")
    print(f"| PyTorch Lightning loop (memory; the authors' setup) | {a.length} | {a.micro_batch} | "
          f"{a.steps - a.log_every} | {lightning:.0f} | - |" if lightning else
          "| PyTorch Lightning loop | - | - | - | not installed (pip install lightning, for this bench only) | - |")
    print(json.dumps({"trainer_seg_s": round(trainer, 1), "trainer_compiled_seg_s": round(compiled, 1),
                      "plain_seg_s": round(plain, 1),
                      "lightning_seg_s": round(lightning, 1) if lightning else None}))
    print(f"trainer --compile {compiled:.0f} seg/s ({compiled / trainer:.2f} x eager)")
    print(f"trainer {trainer:.0f} seg/s, plain loop {plain:.0f} seg/s, "
          f"lightning {f'{lightning:.0f}' if lightning else 'n/a'} seg/s, overhead {overhead:.1f} %")


if __name__ == "__main__":
    main()
