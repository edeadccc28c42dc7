"""`himae-demo`: the whole system end to end, as a user runs it: on the embedded synthetic PVC cohort, or
with `--real DIR` on real PhysioNet ECG (launch/demo_real.py).

It stands above the three jobs: it runs their CLIs as subprocesses and reads their outputs.

cohort (`himae-synth`: a downstream cohort in the seed's shape and a pretraining cohort of other
patients) -> `himae-prep` shards of the pretraining cohort only -> 2-rank DeepSpeed pretraining
(torchrun) -> `himae-probe` of every saved checkpoint, random-init baselines and MiniRocket on the
downstream cohort, whose patients the encoder never saw. Each stage is the job's own CLI run as
a subprocess, and each resumes: a re-run skips what is already complete.

The verdict reads the probe's paired patient-bootstrap difference of the last checkpoint against
random init (and MiniRocket): "ahead by d [lo, hi]" only when the paired 95 % CI excludes 0.
`--full` (22 minutes on 2 idle CPU cores) pretrains on more data for more steps and adds the
label-efficiency curve; the default recipe fits about 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(cmd: list[str], env: dict | None = None) -> None:
    print("[himae-demo] $", " ".join(cmd[2:] if cmd[1] == "-m" else cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def pretrain(shards: Path, run_dir: Path, nproc: int, steps: int, micro_batch: int, lr: float, seed: int,
             save_every: int) -> Path:
    """Launch the trainer under torchrun exactly as a user would."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "himae_dist.train", "--data", str(shards), "--out", str(run_dir),
        "--steps", str(steps), "--micro-batch", str(micro_batch), "--lr", str(lr), "--num-workers", "0",
        "--log-every", str(max(1, steps // 10)), "--seed", str(seed), "--save-every", str(save_every),
    ]
    run_cli(cmd, env)
    return run_dir


FAST = {"scale": 0.1, "pretrain_scale": 0.1, "steps": 800, "checkpoints": 2, "micro_batch": 64, "lr": 1e-3,
        "minirocket_kernels": 1000, "label_fractions": "", "label_draws": 2}
FULL = {"scale": 0.25, "pretrain_scale": 0.25, "steps": 2000, "checkpoints": 2, "micro_batch": 64, "lr": 1e-3,
        "minirocket_kernels": 10_000, "label_fractions": "0.25,0.5", "label_draws": 2}


def verdict(res: dict, full: bool = False) -> str:
    """The last checkpoint against random init and MiniRocket, read from the paired CIs of the differences."""
    from probes.report import verdict_phrase

    ckpts = [m for m in res["models"] if m["kind"] == "checkpoint"]
    last = max(ckpts, key=lambda m: m["step"] or 0)
    auc = last["headline"]["metrics"]["roc_auc"]
    ci = f" [{auc['ci95'][0]:.3f}, {auc['ci95'][1]:.3f}]" if auc["ci95"] else ""
    lines = [f"Pretrained encoder {last['name']} (headline level {last['headline']['selected_mode']}, ROC-AUC "
             f"{auc['value']:.3f}{ci}), on patients it was not pretrained on, under BatchNorm policy "
             f"{res['batchnorm']['policy']}:"]
    for base, d in sorted(last["paired"].items(), key=lambda kv: kv[0] != "random init"):
        ap = d["ap"]
        ap_ci = f" [{ap['ci95'][0]:+.3f}, {ap['ci95'][1]:+.3f}]" if ap["ci95"] else ""
        lines.append(f"  ROC-AUC: {verdict_phrase(d, base)}; AP difference {ap['value']:+.3f}{ap_ci}")
    rnd = last["paired"].get("random init")
    if rnd is None or rnd["roc_auc"]["ci95"] is None or rnd["roc_auc"]["ci95"][0] <= 0:
        lines.append("  At this budget the paired 95 % CI of pretrained minus random init does not exclude 0: this run "
                     "does not show that pretraining pays." + ("" if full else
                                                              " `himae-demo --full` pretrains longer on more data."))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="himae-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None, help="default himae_demo_run (himae_demo_full with --full, himae_demo_real with --real)")
    ap.add_argument("--full", action="store_true",
                    help=f"the science run, 22 min on 2 idle CPU cores: {FULL['steps']} steps on a pretraining cohort "
                         f"at scale {FULL['pretrain_scale']}, MiniRocket with {FULL['minirocket_kernels']} kernels, "
                         f"label efficiency at {FULL['label_fractions']} of the training patients")
    ap.add_argument("--real", default=None, metavar="DIR",
                    help="the real benchmark: DIR holds PhysioNet's bidmc/ and mitdb/ in WFDB form; pretrain on bidmc "
                         "lead II, probe PVC on mitdb (30 min on 2 idle CPU cores; outputs in himae_demo_real)")
    ap.add_argument("--rate", type=float, default=None, help="with --real: the model's sampling rate in Hz (default 100)")
    ap.add_argument("--stride-s", type=float, default=None,
                    help="with --real: seconds between pretraining windows' starts (default 2)")
    ap.add_argument("--scale", type=float, default=None, help="the downstream cohort's size vs the authors' 55,861 segments")
    ap.add_argument("--pretrain-scale", type=float, default=None, help="the pretraining cohort's size, likewise")
    ap.add_argument("--steps", type=int, default=None, help="pretraining optimizer steps")
    ap.add_argument("--checkpoints", type=int, default=None, help="checkpoints saved during pretraining and probed")
    ap.add_argument("--micro-batch", type=int, default=None, help="per trainer rank")
    ap.add_argument("--lr", type=float, default=None, help="pretraining peak learning rate")
    ap.add_argument("--nproc", type=int, default=2, help="trainer ranks")
    ap.add_argument("--random-baselines", type=int, default=3, help="random-init encoders probed")
    ap.add_argument("--minirocket-kernels", type=int, default=None, help="0: no MiniRocket baseline")
    ap.add_argument("--label-fractions", default=None, help="label-efficiency fractions, e.g. 0.25,0.5 ('' = off)")
    ap.add_argument("--label-draws", type=int, default=None, help="draws of training patients per label fraction")
    ap.add_argument("--n-boot", type=int, default=1000, help="patient bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0, help="seed of the cohort, the trainer and the probe")
    a = ap.parse_args(argv)
    if a.real is not None and a.full:
        ap.error("--real and --full are two different runs: give one")
    if a.real is None and (a.rate is not None or a.stride_s is not None):
        ap.error("--rate and --stride-s go with --real")
    if a.real is not None and (a.scale is not None or a.pretrain_scale is not None):
        ap.error("--scale and --pretrain-scale size the synthetic cohorts; --real reads its data from DIR")
    from launch.demo_real import REAL, run_real

    recipe = dict(REAL if a.real else FULL if a.full else FAST)
    for k in recipe:
        if getattr(a, k, None) is not None:
            recipe[k] = getattr(a, k)
    kind = " (--real)" if a.real else " (--full)" if a.full else ""
    print(f"[himae-demo] recipe{kind}: " + ", ".join(f"{k} {v}" for k, v in recipe.items()), flush=True)
    if a.real:
        run_real(Path(a.real), Path(a.workdir or "himae_demo_real"), recipe, a.nproc, a.random_baselines, a.n_boot,
                 a.seed)
        return
    work, t0 = Path(a.workdir or ("himae_demo_full" if a.full else "himae_demo_run")), time.time()
    py = sys.executable

    cohort, shards, run_dir, probe_out = work / "cohort", work / "shards", work / "run", work / "probe"
    run_cli([py, "-m", "data_prep.synth_cohort", "--out", str(cohort), "--scale", str(recipe["scale"]),
          "--pretrain-scale", str(recipe["pretrain_scale"]), "--seed", str(a.seed), "--segments-per-shard", "2000"])
    run_cli([py, "-m", "data_prep.convert", "--index", str(cohort / "pretrain_index.csv"), "--out", str(shards),
          "--workers", "2", "--samples-per-shard", "250"])
    t_train = time.time()
    pretrain(shards, run_dir, a.nproc, recipe["steps"], recipe["micro_batch"], recipe["lr"], a.seed,
             max(1, recipe["steps"] // recipe["checkpoints"]))
    t_train = time.time() - t_train
    manifest = json.loads((shards / "manifest.json").read_text())
    # the shards' recorded preprocessing, for checkpoints that do not carry their own, and the
    # pretraining data the random encoders' BatchNorm statistics come from
    manifest_flag = ["--manifest", str(shards / "manifest.json")] if "preprocess" in manifest else []
    label_flag = (["--label-fractions", recipe["label_fractions"], "--label-draws", str(recipe["label_draws"])]
                  if recipe["label_fractions"] else [])
    t_probe = time.time()
    run_cli([py, "-m", "probes.evaluate", "--run", str(run_dir), "--h5", str(cohort / "downstream.h5"),
          "--out", str(probe_out), "--random-baselines", str(a.random_baselines), "--n-boot", str(a.n_boot),
          "--minirocket-kernels", str(recipe["minirocket_kernels"]), "--seed", str(a.seed), *manifest_flag, *label_flag])
    t_probe = time.time() - t_probe

    res = json.loads((probe_out / "results.json").read_text())
    coh = json.loads((cohort / "cohort.json").read_text())
    print(f"\n[himae-demo] pretrained {recipe['steps']} steps x {a.nproc} ranks x {recipe['micro_batch']} on "
          f"{coh['pretrain']['n_segments']} unlabelled segments of {coh['pretrain']['n_patients']} patients; probed on "
          f"{res['n_segments']} segments ({res['n_pvc']} PVC) of {res['n_patients']} other patients")
    print((probe_out / "table.txt").read_text())
    print("\n" + verdict(res, a.full))
    print(f"[himae-demo] done in {time.time() - t0:.0f} s (pretraining {t_train:.0f} s, probe {t_probe:.0f} s); outputs "
          f"in {work}/ (tables: {probe_out}/results.md, figures: {probe_out}/*.png)")


if __name__ == "__main__":
    main()
