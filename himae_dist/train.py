"""The multi-node trainer: `torchrun ... -m himae_dist.train` or `deepspeed --module himae_dist.train`.

One code path for CPU (gloo, `DS_ACCELERATOR=cpu`) and GPUs (NCCL): the accelerator picks the
backend. Each step masks the batch, reconstructs it and takes the masked-MSE loss. DeepSpeed runs
in fp32 (gradient accumulation, all-reduce, ZeRO, checkpoints); bf16 is `torch.autocast` around
the forward pass, so BatchNorm statistics, gradients and the exported weights stay fp32 masters.
The optimizer (AdamW, fused on GPUs) and schedule are the trainer's (`himae_dist.config`).
Outputs under --out: `checkpoints/` (DeepSpeed + `himae_run_state.pt`, resumable exactly, the
last --keep-checkpoints kept), `weights/step_XXXXXXX.pt` and `himae_final.pt` (plain fp32
weights with the seed's names), `metrics.jsonl`, `config.json`, `ds_config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from data_prep.atomic_write import atomic_path
from data_prep.parent_death import exit_with_parent
from data_prep.storage import StorageError
from himae_dist import run_state, weights_export
from himae_dist.bn_sync import digest as bn_digest
from himae_dist.bn_sync import restore_batchnorm_stats, sync_batchnorm_stats
from himae_dist.checkpoint import save_weights
from himae_dist.config import (TrainConfig, deepspeed_config, lr_lambda, parse_config, resolved, resume_refusal,
                               schedule_params)
from himae_dist.guards import NonFiniteError, bad_rows, check_weights_finite, describe
from himae_dist.model import HiMAE
from himae_dist.elastic_attempt import attempt_store
from himae_dist.objective import make_objective
from himae_dist.preemption import PREEMPTED_EXIT, StopRequest
from himae_dist.precision import autocast, use_bf16
from himae_dist.run_lease import RunLease
from himae_dist.train_log import TrainLog
from himae_dist.streaming import DataLostError, StreamProgress, check_shards, load_manifest, make_loader
from himae_dist.validation import Validator
from himae_dist.watchdog import Watchdog
from kernels.masked_mse_reference import check_masking_args


def _init_distributed(timeout_s: int = 300):
    """(deepspeed, device, attempt): the process group, in a key namespace all nodes agree on under torchrun."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    backend, timeout = acc.communication_backend_name(), timedelta(seconds=timeout_s)
    if acc.device_name() == "cpu":
        _clear_stale_build_lock()
    store, attempt, formed = attempt_store(timeout)  # torchrun's restart count differs across nodes
    if store is not None:
        import torch.distributed as dist

        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        formed()
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts the group if already made
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if acc.device_name() == "cuda":
        acc.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return deepspeed, device, attempt


def _clear_stale_build_lock(max_age_s: float = 600.0) -> None:
    """On CPU, DeepSpeed JIT-loads its shared-memory comm op under torch's build lock, a file with no
    owner: a rank SIGKILLed while holding it left every later start waiting forever. A lock older
    than any build (minutes) is removed, with a warning."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except Exception:  # noqa: BLE001 (no lock, or another torch layout: nothing to clear)
        return
    if age > max_age_s:
        print(f"[himae-train] warning: removing {lock}, a build lock {age:.0f} s old (its process died)", flush=True)
        lock.unlink(missing_ok=True)


def build_engine(deepspeed, cfg: TrainConfig, model: HiMAE, device: torch.device, world: int):
    """(engine, optimizer, scheduler, ds_config): an fp32 DeepSpeed engine over the trainer's AdamW and schedule."""
    model.to(device)  # before the optimizer: fused AdamW checks its parameters' device (torch < 2.4: CUDA only)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=cfg.weight_decay, fused=device.type == "cuda")  # no JIT build on GPU
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ds = deepspeed_config(cfg, world)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    return engine, optimizer, scheduler, ds


def _fault_hook(rank: int, step: int, attempt: int, stop: StopRequest) -> None:
    """Test hook: HIMAE_FAULT=WHAT:RANK:STEP[,...] acts in the first attempt (as all nodes count it).

    kill: SIGKILL this rank; stall: sleep until a stop is requested (the others' next collective
    waits); term: SIGTERM the torchrun agent (a preemption).
    """
    spec = os.environ.get("HIMAE_FAULT")
    if not spec or attempt != 0:
        return
    for what, r, s in (item.split(":") for item in spec.split(",")):
        if int(r) == rank and int(s) == step:
            if what == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif what == "term":
                os.kill(os.getppid(), signal.SIGTERM)
            else:
                deadline = time.monotonic() + 3600
                while not stop.requested and time.monotonic() < deadline:
                    time.sleep(0.05)


@dataclasses.dataclass
class _Window:
    """What accumulates between log steps, per rank; kept in checkpoints so a resumed log is exact."""

    loss_sum: torch.Tensor  # device scalar: no host sync per micro-step
    loss_n: int = 0
    val_sum: torch.Tensor | None = None  # the latest validation, read at the next log step
    val_n: int = 0
    skipped: int = 0  # non-finite batches skipped by this rank (the per-rank limit counts these)
    last_logged: int = 0
    skipped_before: int = 0  # all ranks' skips before a world-size change (rank 0 carries them, for the log)

    @classmethod
    def new(cls, device: torch.device, start: int, saved: dict | None = None) -> "_Window":
        saved = saved or {}
        t = lambda v: torch.tensor(float(v), dtype=torch.float32, device=device)  # noqa: E731
        return cls(t(saved.get("loss_sum", 0.0)), saved.get("loss_n", 0), t(saved.get("val_sum", 0.0)),
                   saved.get("val_n", 0), saved.get("skipped", 0), saved.get("last_logged", start),
                   saved.get("skipped_before", 0))

    def to_dict(self) -> dict:  # host copies: only at saves, which sync anyway
        return {"loss_sum": float(self.loss_sum), "loss_n": self.loss_n, "val_sum": float(self.val_sum),
                "val_n": self.val_n, "skipped": self.skipped, "last_logged": self.last_logged,
                "skipped_before": self.skipped_before}


@dataclasses.dataclass
class _Resume:
    start: int = 0
    loader: dict | None = None  # this rank's LoaderState, or None for a new stream
    stream_seed: int = 0
    window: dict | None = None


def _resume(engine, optimizer, scheduler, cfg: TrainConfig, ckpt_dir: Path, out: Path, rank: int,
            world: int, schedule: dict) -> _Resume:
    """Collective: load rank 0's newest complete checkpoint (if any) and this rank's run state."""
    tag, saved = run_state.choose_resume(ckpt_dir, rank)
    if tag is None:
        if rank == 0:  # a fresh start (or a restart before the first checkpoint): no stale records
            run_state.truncate_metrics(out / "metrics.jsonl", 0)
        return _Resume(stream_seed=cfg.seed)
    changed, refusal = resume_refusal(saved["schedule"], schedule, cfg.allow_schedule_change)
    if refusal:
        raise ValueError(f"{ckpt_dir / tag}: {refusal}")
    engine.load_checkpoint(str(ckpt_dir), tag=tag)
    start = engine.global_steps
    if start != saved["step"]:
        raise ValueError(f"{ckpt_dir / tag}: DeepSpeed step {start} != run state step {saved['step']}")
    if changed:  # the optimizer state restored the old lr and weight decay: the new schedule from here on
        f = lr_lambda(cfg)
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
        scheduler.lr_lambdas = [f] * len(optimizer.param_groups)
        for g in optimizer.param_groups:
            g.update(lr=cfg.lr * f(start), initial_lr=cfg.lr, weight_decay=cfg.weight_decay)
    res = _Resume(start=start, stream_seed=cfg.seed + start)  # a new data stream unless this rank's continues
    if len(saved["ranks"]) == world:  # same world size: this rank's stream, RNG and log window continue
        mine = saved["ranks"][rank]
        res.loader, res.window = mine["loader"], mine.get("window")
        res.stream_seed = mine["loader"]["seed"]
        run_state.set_rng_state(mine["rng"])
        restore_batchnorm_stats(engine.module, mine.get("bn_before_sync", {}))  # its own, as if never saved
    elif rank == 0:
        print(f"[himae-train] world size {len(saved['ranks'])} -> {world}: a new data stream starts "
              f"(seed {res.stream_seed})", flush=True)
        res.window = {"skipped_before": sum(r.get("window", {}).get("skipped", 0) + r.get("window", {}).get(
            "skipped_before", 0) for r in saved["ranks"]), "last_logged": start}
    if rank == 0:
        run_state.truncate_metrics(out / "metrics.jsonl", start)
        print(f"[himae-train] resumed from {ckpt_dir / tag} at step {start}", flush=True)
    return res


class Preempted(Exception):
    """Every rank saved at `step` on a stop request (`signal_name`) and stops."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"{signal_name}: saved step {step}; run the same command to resume")
        self.step, self.signal_name = step, signal_name


def set_determinism(on: bool) -> None:
    """--deterministic: deterministic cuDNN/cuBLAS kernels (bitwise resume on GPUs), at some speed cost."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at the first cuBLAS call
        torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = on
    torch.use_deterministic_algorithms(on)


def _take_lease(out: Path, rank: int, attempt: int) -> RunLease | None:
    """Collective: rank 0 takes the lease on --out before anything is written there; all ranks share its verdict."""
    lease, problem = None, None
    if rank == 0:
        lease = RunLease(out, os.environ.get("TORCHELASTIC_RUN_ID", "none"), attempt)
        try:
            note = lease.acquire()
        except Exception as e:  # noqa: BLE001 (LeaseHeld, a folder that cannot hold it, an odd lease: named on every rank)
            problem, lease = (str(e) if isinstance(e, ValueError) else f"--out {out}: cannot take the lease "
                              f"{out / '.himae_lease.json'}: {type(e).__name__}: {e}"), None
        else:
            if note:
                print(f"[himae-train] {note}", flush=True)
            lease.start_heartbeat()
    problem = run_state.broadcast(problem)
    if problem:
        raise ValueError(problem)
    return lease


def train(cfg: TrainConfig, stop: StopRequest | None = None) -> dict:
    stop = stop or StopRequest(install=False)  # main() installs the handlers; an in-process caller keeps its own
    set_determinism(cfg.deterministic)
    # The start (process group, engine, resume, shard checks) may build DeepSpeed's CPU op and read a
    # checkpoint: a longer bound than a collective's, but a bound (a hung start exits, so torchrun acts).
    watchdog = Watchdog(max(cfg.collective_timeout_s, 900), int(os.environ.get("RANK", 0)))
    watchdog.beat("start: process group, DeepSpeed engine, resume")
    try:
        deepspeed, device, attempt = _init_distributed(cfg.collective_timeout_s)
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        out = Path(cfg.out)
        lease = _take_lease(out, rank, attempt)
        try:
            return _train(cfg, stop, deepspeed, device, attempt, rank, world, out, watchdog)
        finally:
            if lease is not None:
                lease.release()
    finally:
        watchdog.stop()


def _train(cfg: TrainConfig, stop: StopRequest, deepspeed, device: torch.device, attempt: int, rank: int, world: int,
           out: Path, watchdog: Watchdog) -> dict:
    import torch.distributed as dist

    manifest = load_manifest(cfg.data, cfg.storage_options)
    if manifest.channels != cfg.in_chans:
        raise ValueError(f"--in-chans={cfg.in_chans} but {manifest.url} holds {manifest.channels}-channel segments")
    check_masking_args(manifest.length, cfg.patch_size, cfg.mask_ratio)
    extra = {"preprocess": manifest.preprocess, "data": manifest.url}  # so evaluation scales its data the same way
    bf16 = use_bf16(cfg.precision, device)
    objective = make_objective(cfg.loss_impl, device, cfg.patch_size, cfg.mask_ratio, cfg.seed, rank, world)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = HiMAE(cfg.in_chans, cfg.channels)
    engine, optimizer, scheduler, ds = build_engine(deepspeed, cfg, model, device, world)
    if rank == 0:
        print(f"[himae-train] world={world} device={device.type} bf16={bf16} "
              f"objective={type(objective).__name__} resolved config:\n{resolved(cfg)}", flush=True)
    run_state.check_shared_out(out, rank, wait_s=min(30.0, cfg.collective_timeout_s / 4))

    ckpt_dir = out / "checkpoints"
    schedule = schedule_params(cfg, world, precision="bf16" if bf16 else "fp32", loss_impl=objective.impl)
    res = _resume(engine, optimizer, scheduler, cfg, ckpt_dir, out, rank, world, schedule)
    start = res.start
    if rank == 0:  # only now that the resume checks passed
        with atomic_path(out / "config.json") as tmp:
            tmp.write_text(resolved(cfg) + "\n")
        with atomic_path(out / "ds_config.json") as tmp:
            tmp.write_text(json.dumps(ds, indent=2, sort_keys=True) + "\n")  # as used

    # Rank 0 lists the shards once and every rank takes the same decision (no rank waits in a collective alone).
    exporter = weights_export.Exporter(out, cfg.export_url, cfg.storage_options) if cfg.export_url and rank == 0 else None
    broken, problem = run_state.broadcast(_start_checks(manifest, cfg, exporter) if rank == 0 else None)
    if problem:
        raise ValueError(problem)
    n_train = len(manifest.shards("train"))
    if broken and (cfg.strict_data or len(broken) > cfg.max_bad_data * n_train):
        raise ValueError(f"{manifest.url}: {len(broken)} of {n_train} train shard(s) missing or damaged: {broken[:5]} "
                         f"(--max-bad-data={cfg.max_bad_data:g}{', --strict-data' if cfg.strict_data else ''}); "
                         f"re-run himae-prep")
    if broken and rank == 0:
        print(f"[himae-train] warning: {len(broken)} shard(s) missing or damaged, they will be skipped: "
              f"{broken[:5]}; re-run himae-prep to rebuild them", flush=True)
    # The stream position is the number of micro-batches consumed, so a resumed run continues it.
    loader_args = dict(seed=res.stream_seed, rank=rank, world_size=world, num_workers=cfg.num_workers,
                       shuffle_shards=cfg.shuffle_shards, storage_options=cfg.storage_options,
                       strict=cfg.strict_data, pin_memory=device.type == "cuda", verify=cfg.verify_data)
    try:
        loader, lstate = make_loader(manifest, cfg.micro_batch, state=res.loader, **loader_args)
    except ValueError as e:  # the saved stream cannot continue under the loader options given now
        if res.loader is None:
            raise
        if not cfg.allow_schedule_change:
            raise ValueError(f"{e}; resume with the loader options it was saved with, or pass "
                             f"--allow-schedule-change to start a new data stream") from e
        loader_args["seed"] = cfg.seed + start  # the loader options changed: a new stream, on every rank alike
        loader, lstate = make_loader(manifest, cfg.micro_batch, **loader_args)
        if rank == 0:
            print(f"[himae-train] loader options changed ({e}): a new data stream starts (seed {cfg.seed + start})",
                  flush=True)
    consumed = lstate.batches
    shard_names = [sh.name for sh in manifest.shards("train")]
    progress = StreamProgress(lstate, [sh.n_samples for sh in manifest.shards("train")])  # what was actually read
    batches = iter(loader)
    win = _Window.new(device, start, res.window)
    validator = Validator(manifest, cfg, rank, world, device, objective, bf16) if cfg.val_every else None
    grad_norm = torch.zeros((), device=device)
    log = TrainLog(cfg, rank, start, out, cfg.micro_batch * cfg.grad_accum * world, device)
    history = []
    params = [p for p in engine.module.parameters() if p.requires_grad]

    def save(step: int, final: bool = False, checkpoint: bool = True) -> None:
        state = {"loader": progress.state(consumed).to_dict(), "window": win.to_dict()}
        _save(engine, ckpt_dir, out, step, rank, extra, state, schedule, cfg, final, checkpoint)
        if exporter:
            exporter.kick()  # uploads in the background: no rank waits on the store in a collective

    if rank == 0 and start >= cfg.steps:
        print(f"[himae-train] already at step {start} >= --steps={cfg.steps}; nothing to train", flush=True)
    watchdog.beat("the first step", timeout_s=cfg.collective_timeout_s)  # from here on, a collective's bound
    last_save = time.monotonic()
    for step in range(start, cfg.steps):
        watchdog.beat(f"step {step}")
        _fault_hook(rank, step, attempt, stop)
        done = step + 1
        log_step = done % cfg.log_every == 0 or done == cfg.steps
        for micro in range(cfg.grad_accum):
            t_wait = time.perf_counter()
            batch = next(batches)
            log.waited(time.perf_counter() - t_wait)
            consumed += 1
            progress.update(batch)
            while len(rows := bad_rows(batch["signal"])):  # host-side check, before the copy to the device
                what = f"rank {rank}, step {done}: {describe(batch, rows, shard_names)}"
                if cfg.on_nonfinite == "abort":
                    raise NonFiniteError(f"{what}; fix the data or pass --on-nonfinite skip")
                win.skipped += 1
                print(f"[himae-train] warning: skipped batch {win.skipped} of this rank ({what})", file=sys.stderr, flush=True)
                if win.skipped > max(100, step):
                    raise NonFiniteError(f"{what}: {win.skipped} batches skipped on this rank; the data is broken")
                batch = next(batches)  # the same micro-step count on every rank: no collective mismatch
                consumed += 1
                progress.update(batch)
            x = batch["signal"].to(device, non_blocking=True).float()  # [B, C, L], stored fp16/fp32
            x_masked, mask = objective.mask(x, step, micro, torch.bfloat16 if bf16 else None)
            with autocast(device, bf16):
                recon = engine(x_masked, apply_tanh=objective.apply_tanh)  # [B, C, L], bf16 under autocast
            loss = objective.loss(recon.float(), x, mask)  # fp32 loss and gradients
            engine.backward(loss)  # all-reduces the gradients at the accumulation boundary
            boundary = micro == cfg.grad_accum - 1
            if boundary and log_step:
                lr = optimizer.param_groups[0]["lr"]  # this update's (host float)
                if cfg.zero_stage == 0:
                    grad_norm = _grad_norm(params, device)  # device scalar, before step() zeroes the gradients
            engine.step()
            if boundary and log_step and cfg.zero_stage > 0:  # ZeRO holds the gradients in its partitions
                grad_norm = _as_scalar(engine.get_global_grad_norm(), device)
            win.loss_sum += loss.detach()
            win.loss_n += 1
        log.step()
        if validator and validator.enabled and (done % cfg.val_every == 0 or done == cfg.steps):
            plot = out / "plots" / f"recon_{done:07d}.png" if rank == 0 and cfg.plot_every and done % cfg.plot_every == 0 else None
            win.val_sum, win.val_n = validator.run(engine.module, plot, done), len(validator.batches)
        save_now = False
        if log_step:
            # host values ride along: skipped batches, and whether this rank was asked to stop or is due a save
            due = cfg.save_every_min > 0 and time.monotonic() - last_save >= 60 * cfg.save_every_min
            flags = torch.tensor([win.skipped + win.skipped_before, stop.requested, due, progress.failed(),
                                  progress.reads(), progress.lost_segments()], dtype=torch.float64)
            stats = torch.cat([torch.stack([win.loss_sum, win.val_sum, grad_norm]).double(), flags.to(device)])
            dist.all_reduce(stats)  # collective: every rank reaches it at the same step
            host = stats.cpu()  # the one device->host copy (sync) per log step
            loss_total, val_total, gn_total, skipped, stops, dues, bad_reads, reads, lost = (float(v) for v in host)
            lost_data = {"failed_shard_reads": int(bad_reads), "shard_reads": int(reads), "lost_segments": int(lost)}
            if bad_reads > cfg.max_bad_data * reads:  # the same verdict on every rank: stop, naming the shards
                _too_much_lost(lost_data, progress, shard_names, cfg.max_bad_data, done)
            stopping = stops > 0 and done < cfg.steps  # the same verdict on every rank
            save_now = stopping or (dues > 0 and done < cfg.steps)
            mean = loss_total / (win.loss_n * world)
            if not math.isfinite(mean):
                raise NonFiniteError(f"loss is {mean} at steps {win.last_logged + 1}..{done} on finite data; "
                                     f"lower --lr or set --grad-clip (last good checkpoint kept)")
            rec = log.record(done, mean, lr, val_total / (win.val_n * world) if win.val_n else None,
                             gn_total / world, int(skipped), lost_data)  # the same norm on every rank (all-reduced)
            win.loss_sum.zero_()
            win.loss_n, win.val_n, win.last_logged = 0, 0, done
            history.append(rec)
        if save_now or (cfg.save_every and done % cfg.save_every == 0 and done != cfg.steps):
            watchdog.beat(f"step {done} (saving)")
            save(done)
            last_save = time.monotonic()
            if save_now and stopping:
                log.close()
                if exporter:  # the saved weights reach --export-url too; a failure is a warning (a re-run syncs)
                    try:
                        exporter.finish()
                    except StorageError as e:
                        print(f"[himae-train] warning: {e}", file=sys.stderr, flush=True)
                raise Preempted(done, stop.signal_name or "a stop request on another rank")
    watchdog.beat("the last step (final save)")
    need_final = run_state.broadcast(_needs_final(start, out, cfg) if rank == 0 else None)
    if need_final:  # decided by rank 0: _save is collective
        # Nothing trained in this attempt: the checkpoint it resumed from is the final one, kept as it is.
        save(max(start, cfg.steps), final=True, checkpoint=start < cfg.steps)
    log.close()
    if rank == 0 and history:
        last = history[-1]
        print(f"[himae-train] done at step {last['step']}: {last['failed_shard_reads']} of {last['shard_reads']} shard "
              f"reads failed ({last['lost_segments']} segments lost), {last['skipped_batches']} non-finite batches "
              f"skipped", flush=True)
    if exporter:  # after the last collective: the other ranks may exit meanwhile
        exporter.finish()
    return {"history": history, "start_step": start}


def _save(engine, ckpt_dir: Path, out: Path, step: int, rank: int, extra: dict, state: dict, schedule: dict,
          cfg: TrainConfig, final: bool = False, checkpoint: bool = True) -> None:
    """Collective: BatchNorm sync, DeepSpeed's files, every rank's run state, `latest`, exported weights, pruning."""
    import torch.distributed as dist

    bn_before = sync_batchnorm_stats(engine.module)  # collective: every rank saves/exports the pooled statistics
    if checkpoint:
        check_weights_finite(engine.module, step)  # the same verdict on every rank: never save NaN weights
        engine.save_checkpoint(str(ckpt_dir), tag=run_state.tag_for(step), save_latest=False)  # collective
        state = {**state, "bn_before_sync": bn_before, "bn_digest": bn_digest(engine.module)}  # drift, per rank
        run_state.write_run_state(ckpt_dir, step, state["loader"], schedule, rank,
                                  {k: v for k, v in state.items() if k != "loader"})
    if rank == 0:
        save_weights(engine.module, out / "weights" / f"step_{step:07d}.pt", step, extra)
        if final:
            save_weights(engine.module, out / "himae_final.pt", step, extra)
            print(f"[himae-train] wrote {out / 'himae_final.pt'} (step {step})", flush=True)
        run_state.prune(ckpt_dir, cfg.keep_checkpoints)
    restore_batchnorm_stats(engine.module, bn_before)  # training goes on with this rank's own estimates
    dist.barrier()  # nobody runs ahead of (or exits before) rank 0's writes


def _too_much_lost(lost: dict, progress: StreamProgress, shard_names: list[str], limit: float, step: int) -> None:
    """Collective (every rank reaches it on the same all-reduced counts): raise naming every rank's failed shards."""
    import torch.distributed as dist

    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, [shard_names[i] for i in progress.failed_shards()])
    bad = sorted({n for ns in names for n in ns})
    raise DataLostError(f"{lost['failed_shard_reads']} of {lost['shard_reads']} shard reads failed by step {step} "
                        f"({lost['lost_segments']} segments lost), more than --max-bad-data={limit:g}: shard(s) "
                        f"{bad[:10]}{' ...' if len(bad) > 10 else ''}; re-run himae-prep (or raise --max-bad-data)")


def _start_checks(manifest, cfg: TrainConfig, exporter) -> tuple[list[str], str | None]:
    """Rank 0, before the first step: damaged shards (train, and val when validating; fatal in val,
    which every rank caches at start) and an --export-url that cannot be written."""
    broken = check_shards(manifest, "train", cfg.storage_options)
    if cfg.val_every and manifest.splits.get("val"):
        bad_val = check_shards(manifest, "val", cfg.storage_options)
        if bad_val:
            return broken, f"{manifest.url}: val shard(s) missing or damaged: {bad_val[:5]}; re-run himae-prep"
    if exporter is not None:  # the other ranks wait in a collective meanwhile: bounded well below its timeout
        try:
            exporter.check(timeout_s=cfg.collective_timeout_s / 3)
        except Exception as e:  # noqa: BLE001 (named, on every rank)
            return broken, f"--export-url={cfg.export_url}: cannot write there: {type(e).__name__}: {e}"
    return broken, None


def _needs_final(start: int, out: Path, cfg: TrainConfig) -> bool:
    """Rank 0: steps left, or the final weights missing or from another step (a resume to more steps
    killed before its last write). The export needs no check here: `Exporter.finish` uploads the final."""
    final = out / weights_export.FINAL_NAME
    if start < cfg.steps or not final.exists():
        return True
    try:
        return torch.load(final, map_location="cpu", weights_only=True).get("step") != start
    except Exception:  # noqa: BLE001 (unreadable: write it again)
        return True


def _as_scalar(value, device: torch.device) -> torch.Tensor:
    """DeepSpeed's global gradient norm (tensor, float or None) as a device scalar, NaN when absent."""
    if value is None:
        return torch.full((), float("nan"), device=device)
    if isinstance(value, torch.Tensor):
        return value.detach().float().reshape(()).to(device)
    return torch.tensor(float(value), device=device)


def _grad_norm(params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """L2 norm of the (reduced) gradients as a device scalar: no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if len(grads) < len(params):
        return torch.full((), float("nan"), device=device)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def main(argv: list[str] | None = None) -> None:
    if "LOCAL_RANK" in os.environ:  # under a launcher: never outlive it (torchrun starts workers in new sessions)
        exit_with_parent()
    stop = StopRequest()  # before the slow start: a signal during it is honoured at the first log step
    try:
        cfg = parse_config(argv)
        train(cfg, stop)
    except Preempted as e:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"himae-train: {e}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT)
    except (ValueError, FileNotFoundError, StorageError) as e:  # bad options, data or store: one line, no traceback
        msg = str(e)
        if "Original Traceback" in msg:  # raised in a DataLoader worker: its own message is the last line
            msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
        sys.exit(f"himae-train: error: {msg}")
    except RuntimeError as e:  # a collective that waited past --collective-timeout-s, or lost a rank: say so
        msg = str(e).lower()
        if "connection closed by peer" in msg or "connection reset by peer" in msg:
            sys.exit(f"himae-train: error: a peer rank exited or died mid-collective (its own error, if any, is "
                     f"above): {str(e).splitlines()[0]}")
        if "timeout" not in msg and "timed out" not in msg:
            raise
        sys.exit(f"himae-train: error: a collective timed out after --collective-timeout-s={cfg.collective_timeout_s} s "
                 f"(a rank stalled or died): {str(e).splitlines()[0]}")
    import torch.distributed as dist

    if dist.is_initialized():  # no barrier: the others need not wait (in a collective) for rank 0's final upload
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
