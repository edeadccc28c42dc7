"""The multi-node trainer: `himae-train` (`torchrun ... -m himae_dist.train`, `deepspeed --module himae_dist.train`).

One code path for CPU (gloo, `DS_ACCELERATOR=cpu`) and GPUs (NCCL): the accelerator picks the
backend. Each step masks the batch, reconstructs it and takes the masked-MSE loss. DeepSpeed runs
in fp32 (gradient accumulation, all-reduce, ZeRO, checkpoints); bf16 is `torch.autocast` around
the forward pass, so BatchNorm statistics, gradients and the exported weights stay fp32 masters.
The optimizer (fused AdamW) and schedule are the trainer's (`himae_dist.config`). `train()` is the
step loop; checkpoints (`checkpointer`), the log (`train_log`), the non-finite guard (`guards`)
and validation are components. Between log steps nothing reads the device (at ZeRO 0;
tests/test_objective_sync.py counts it), so the host runs ahead of the GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from data_prep.atomic_write import atomic_path
from data_prep.parent_death import exit_with_parent
from data_prep.storage import StorageError, out_problem, redact_secrets
from himae_dist import fault_injection, run_state
from himae_dist.checkpoint_files import use_weights_only_loading
from himae_dist.checkpointer import Checkpointer, init_weights
from himae_dist.config import (ConfigError, TrainConfig, deepspeed_config, for_world, lr_lambda, parse_cli,
                               resolved, schedule_params)
from himae_dist.dry_run import dry_run
from himae_dist.elastic_attempt import attempt_store
from himae_dist.guards import NonFiniteError, NonFiniteGuard
from himae_dist.model import HiMAE
from himae_dist.objective import make_objective
from himae_dist.precision import autocast, use_bf16
from himae_dist.preemption import PREEMPTED_EXIT, StopRequest
from himae_dist.run_lease import RunLease
from himae_dist.streaming import (DataLostError, OlderStreamError, StreamProgress, check_shards, load_sources,
                                  make_loader)
from himae_dist.train_log import LogWindow, TrainLog, read_log_step
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
        _skip_shm_comm_build()
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


def _skip_shm_comm_build() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory comm op when its backend starts (about 45 s of C++
    on a fresh machine, under torch's build lock, a file with no owner that a rank killed mid-build left
    every later start waiting on). The op serves only DeepSpeed's tensor-parallel `inference_all_reduce`;
    training's collectives are gloo's. Marking it incompatible, in the dict DeepSpeed keeps for such
    edits, skips the build; `tests/test_train_distributed.py::test_two_rank_deepspeed_run_loss_falls_and_resumes`
    checks that a start compiles nothing."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(deepspeed, cfg: TrainConfig, model: HiMAE, device: torch.device, world: int):
    """(engine, optimizer, scheduler, ds_config): an fp32 DeepSpeed engine over the trainer's AdamW and schedule."""
    model.to(device)  # before the optimizer: fused AdamW checks its parameters' device
    if cfg.compile:  # in place: parameter names (and so checkpoints) stay the same; the fused loss stays outside
        model.compile(backend=cfg.compile_backend)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=cfg.weight_decay, fused=True)  # no per-step host read of its step count
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ds = deepspeed_config(cfg, world)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    use_weights_only_loading(engine)  # a resume unpickles nothing (checkpoint_files)
    return engine, optimizer, scheduler, ds


class Preempted(Exception):
    """Every rank saved at `step` on a stop request (`signal_name`) and stops."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"{signal_name}: saved step {step}; run the same command to resume")
        self.step, self.signal_name = step, signal_name


def set_determinism(on: bool, tf32: bool = True) -> None:
    """--deterministic: deterministic cuDNN/cuBLAS kernels (bitwise resume on GPUs), at some speed cost;
    otherwise cuDNN picks the fastest kernels for the (fixed) shapes. --tf32: TF32 for fp32 convs and matmuls."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at the first cuBLAS call
    torch.backends.cudnn.benchmark = not on
    torch.backends.cudnn.deterministic = on
    if torch.are_deterministic_algorithms_enabled() != on:  # the call imports torch._dynamo (~2 s a process)
        torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


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


@contextlib.contextmanager
def _session(cfg: TrainConfig):
    """(run, attempt, watchdog) for the step loop: determinism flags, the watchdog, the process group,
    the lease on --out and everything `_start` builds; the lease and watchdog end with it."""
    set_determinism(cfg.deterministic, cfg.tf32)
    # The start (process group, engine, resume, shard checks) may read a large checkpoint, from S3 too:
    # a longer bound than a collective's, but a bound (a hung start exits, so torchrun acts).
    watchdog = Watchdog(max(cfg.collective_timeout_s, 900), int(os.environ.get("RANK", 0)))
    watchdog.beat("start: process group, DeepSpeed engine, resume")
    try:
        deepspeed, device, attempt = _init_distributed(cfg.collective_timeout_s)
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        given, cfg = cfg.grad_accum, for_world(cfg, world)  # --global-batch: the accumulation this world needs
        if given not in (1, cfg.grad_accum) and rank == 0:
            print(f"[himae-train] --grad-accum {given} replaced by {cfg.grad_accum}: --global-batch {cfg.global_batch} "
                  f"on {world} rank(s) x --micro-batch {cfg.micro_batch}", flush=True)
        lease = _take_lease(Path(cfg.out), rank, attempt)
        try:
            yield _start(cfg, deepspeed, device, rank, world, attempt), attempt, watchdog
        finally:
            if lease is not None:
                lease.release()
    finally:
        watchdog.stop()


def train(cfg: TrainConfig, stop: StopRequest | None = None) -> dict:
    """The step loop. Device values are read once per log step (`_log_step`) and at saves."""
    stop = stop or StopRequest(install=False)  # main() installs the handlers; an in-process caller keeps its own
    with _session(cfg) as (run, attempt, watchdog):
        cfg, engine, win = run.cfg, run.engine, run.win
        history, last_save = [], time.monotonic()
        watchdog.beat("the first step", timeout_s=cfg.collective_timeout_s)  # from here on, a collective's bound
        for step in fault_injection.steps(range(run.start, cfg.steps), run.rank, attempt, stop, watchdog.beat):
            watchdog.beat(f"step {step}")
            done = step + 1
            log_step = done % cfg.log_every == 0 or done == cfg.steps
            for micro in range(cfg.grad_accum):
                x, batch = run.next_batch()  # [B, C, L] on the device, stored dtype
                if run.keys_log is not None:
                    run.keys_log.write(f"{step} {micro} {' '.join(map(str, batch['key']))}\n")
                x, keep = run.guard.clean(x, batch)  # non-finite samples dropped on the device
                x_masked, mask = run.objective.mask(x, step, micro, run.model_dtype)
                with autocast(run.device, run.bf16):
                    recon = engine(x_masked, apply_tanh=run.objective.apply_tanh)  # [B, C, L], bf16 under autocast
                loss = run.objective.loss(recon, x, mask, keep)  # fp32 loss; gradients in recon's dtype
                engine.backward(loss)  # all-reduces the gradients at the accumulation boundary
                win.add(loss)
                if win.src is not None:  # several sources: each one's loss too (device sums, no sync)
                    sse, n = run.objective.row_losses(recon, x, mask)
                    keep_f = keep.float() if keep is not None else 1.0
                    src = batch["source"].to(run.device, non_blocking=True).long()  # pinned on CUDA: no sync
                    win.add_sources(sse * keep_f, n * keep_f, src)
                _optimizer_step(run, measure=log_step and micro == cfg.grad_accum - 1)
            run.log.step()
            if run.validator and (done % cfg.val_every == 0 or done == cfg.steps):
                plot = cfg.plot_every and done % cfg.plot_every == 0 and run.rank == 0
                win.val_sum, per_source = run.validator.run(engine.module, run.out / "plots" / f"recon_{done:07d}.png"
                                                            if plot else None, done)
                win.val_n = len(run.validator.batches)
                if win.val_src is not None:
                    win.val_src, win.val_src_n = per_source, run.validator.per_source_n
            stopping = save_due = False
            if log_step:
                rec, stopping, save_due = _log_step(run, done, stop, last_save)
                history.append(rec)
            if stopping or save_due or (cfg.save_every and done % cfg.save_every == 0 and done != cfg.steps):
                watchdog.beat(f"step {done} (saving)")
                run.save(done)
                last_save = time.monotonic()
                if stopping:
                    run.log.close()
                    run.ckpt.close(failing_ok=True)  # the saved weights reach --export-url too (a re-run syncs)
                    raise Preempted(done, stop.signal_name or "a stop request on another rank")
        watchdog.beat("the last step (final save)")
        run.ckpt.finish(run.start, run.state)
        run.log.close()
        if run.rank == 0 and history:
            last = history[-1]
            print(f"[himae-train] done at step {last['step']}: {last['failed_shard_reads']} of {last['shard_reads']} "
                  f"shard reads failed ({last['lost_segments']} segments lost), {last['nonfinite_samples']} "
                  f"non-finite samples dropped", flush=True)
        run.ckpt.close()  # after the last collective: the other ranks may exit meanwhile
        return {"history": history, "start_step": run.start}


def _optimizer_step(run: "_Run", measure: bool) -> None:
    """engine.step() (an update at the accumulation boundary); `measure`: keep this update's lr and
    gradient norm (device scalar) for the log step."""
    if measure:
        run.win.lr = run.optimizer.param_groups[0]["lr"]  # this update's (host float)
        if run.cfg.zero_stage == 0:
            run.win.grad_norm = _grad_norm(run.params, run.device)  # before step() zeroes the gradients
    run.engine.step()
    if measure and run.cfg.zero_stage > 0:  # ZeRO holds the gradients in its partitions
        run.win.grad_norm = _as_scalar(run.engine.get_global_grad_norm(), run.device)


def _log_step(run: "_Run", done: int, stop: StopRequest, last_save: float) -> tuple[dict, bool, bool]:
    """Collective: the one all-reduce and host read of the log step; (record, stop now, save now)."""
    cfg, win, progress = run.cfg, run.win, run.progress
    # host values ride along: whether this rank was asked to stop or is due a time-based save, and the data lost
    due = cfg.save_every_min > 0 and time.monotonic() - last_save >= 60 * cfg.save_every_min
    values, nonfinite_mine = read_log_step(
        win, run.guard.count, [stop.requested, due, progress.failed(), progress.reads(), progress.lost_segments()])
    loss_total, val_total, gn_total, nonfinite, stops, dues, bad_reads, reads, lost = values[:9]
    lost_data = {"failed_shard_reads": int(bad_reads), "shard_reads": int(reads), "lost_segments": int(lost)}
    if bad_reads > cfg.max_bad_data * reads:  # the same verdict on every rank: stop, naming the shards
        _too_much_lost(lost_data, progress, run.shard_names, cfg.max_bad_data, done)
    run.guard.settle(nonfinite, nonfinite_mine, done, run.world)  # abort (naming shards and keys) or warn
    mean = loss_total / (win.loss_n * run.world)
    if not math.isfinite(mean):
        raise NonFiniteError(f"loss is {mean} at steps {win.last_logged + 1}..{done} on finite data; "
                             f"lower --lr or set --grad-clip (last good checkpoint kept)")
    rec = run.log.record(done, mean, win.lr, val_total / (win.val_n * run.world) if win.val_n else None,
                         gn_total / run.world, int(nonfinite), lost_data,  # the same norm on every rank
                         _per_source(run, values[9:], win.val_n > 0))
    win.reset(done)
    stopping = stops > 0 and done < cfg.steps  # the same verdict on every rank
    return rec, stopping, dues > 0 and done < cfg.steps


@dataclasses.dataclass
class _Run:
    """What the step loop works with, built by `_start`: the engine and its parts, the batches, the
    components (checkpointer, guard, log, validator) and this rank's stream position."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    engine: object
    optimizer: torch.optim.Optimizer
    objective: object
    bf16: bool
    ckpt: Checkpointer
    guard: NonFiniteGuard
    log: TrainLog
    win: LogWindow
    validator: Validator | None
    batches: object  # RankBatches: this rank's micro-batches; .batches = global batches consumed
    progress: StreamProgress
    shard_names: list[str]
    params: list[torch.Tensor]
    start: int
    sources: list  # per source: (name, samples per global batch, train segments)
    stream_start: int  # global batches of this stream consumed when this attempt began
    keys_log: object = None  # test hook (fault_injection.keys_log)

    @property
    def model_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def next_batch(self) -> tuple[torch.Tensor, dict]:
        """(this rank's next signal batch on the device [B, C, L], the batch: keys, shards)."""
        t = time.perf_counter()
        batch = next(self.batches)
        self.log.waited(time.perf_counter() - t)
        self.progress.update(batch)
        return batch["signal"].to(self.device, non_blocking=True), batch

    def state(self) -> dict:
        """This rank's part of a checkpoint (host values: read at saves, which sync anyway)."""
        return {"loader": self.progress.state(self.batches.batches).to_dict(), "window": self.win.to_dict(),
                "nonfinite": self.guard.settled}

    def save(self, step: int) -> None:
        """Collective: non-finite samples since the last log step are settled first (abort saves nothing)."""
        if self.guard.pending():
            self.guard.settle(*read_guard(self.guard.count), step, self.world)
        self.ckpt.save(step, self.state())


def read_guard(count: torch.Tensor) -> tuple[float, float]:
    """Collective, at a save off the log step: (every rank's non-finite count, this rank's)."""
    import torch.distributed as dist

    total = count.double().reshape(1).clone()
    dist.all_reduce(total)
    return float(total), float(count)


def _start(cfg: TrainConfig, deepspeed, device: torch.device, rank: int, world: int, attempt: int = 0) -> _Run:
    """Collective: data checks, model (--init-from) and engine, resume, loader and components, in that order."""
    out = Path(cfg.out)
    sources = cfg.data_sources()
    manifests = load_sources([url for url, _ in sources], cfg.storage_options, cfg.in_chans)
    manifest = manifests[0]
    check_masking_args(manifest.length, cfg.patch_size, cfg.mask_ratio)
    bf16 = use_bf16(cfg.precision, device)
    objective = make_objective(cfg.loss_impl, device, cfg.patch_size, cfg.mask_ratio, cfg.seed, rank, world,
                               cfg.grad_accum)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = HiMAE(cfg.in_chans, cfg.channels)
    init_note = init_weights(model, cfg, rank)  # --init-from; a checkpoint resumed below replaces them
    engine, optimizer, scheduler, ds = build_engine(deepspeed, cfg, model, device, world)
    if rank == 0:
        print(f"[himae-train] world={world} device={device.type} bf16={bf16} "
              f"objective={type(objective).__name__} resolved config:\n{resolved(cfg)}", flush=True)
    run_state.check_shared_out(out, rank, wait_s=min(30.0, cfg.collective_timeout_s / 4))
    schedule = schedule_params(cfg, world, precision="bf16" if bf16 else "fp32", loss_impl=objective.impl)
    extra = {"preprocess": manifest.preprocess, "data": redact_secrets(manifest.url)}  # evaluation scales its data so
    if len(manifests) > 1:
        extra["sources"] = [{"data": redact_secrets(m.url), "weight": w, "preprocess": m.preprocess}
                            for m, (_, w) in zip(manifests, sources)]
    ckpt = Checkpointer(engine, optimizer, scheduler, cfg, out, rank, world, schedule, extra, ds, attempt, init_note)
    res = ckpt.resume()

    # Rank 0 lists the shards once and every rank takes the same decision (no rank waits in a collective alone).
    broken, problem = run_state.broadcast(_start_checks(manifests, cfg, ckpt) if rank == 0 else None)
    if problem:
        raise ValueError(problem)
    n_train = sum(len(m.shards("train")) for m in manifests)
    where = redact_secrets(manifest.url) if len(manifests) == 1 else f"{len(manifests)} sources"
    if broken and (cfg.strict_data or len(broken) > cfg.max_bad_data * n_train):
        raise ValueError(f"{where}: {len(broken)} of {n_train} train shard(s) missing or damaged: {broken[:5]} "
                         f"(--max-bad-data={cfg.max_bad_data:g}{', --strict-data' if cfg.strict_data else ''}); "
                         f"re-run himae-prep")
    if broken and rank == 0:
        print(f"[himae-train] warning: {len(broken)} shard(s) missing or damaged, they will be skipped: "
              f"{broken[:5]}; re-run himae-prep to rebuild them", flush=True)
    batches, lstate = _loader(manifests, [w for _, w in sources], cfg, res, rank, world, device)
    shard_names = _shard_names(manifests)
    validator = Validator(manifests, cfg, rank, world, device, objective, bf16) if cfg.val_every else None
    if rank == 0 and res.start >= cfg.steps:
        print(f"[himae-train] already at step {res.start} >= --steps={cfg.steps}; nothing to train", flush=True)
    names = source_names([m.base for m in manifests])
    per_batch = [int(src[1]) for src in lstate.sources]
    return _Run(cfg, rank, world, device, out, engine, optimizer, objective, bf16, ckpt,
                NonFiniteGuard(cfg.on_nonfinite, rank, device, shard_names, res.nonfinite, res.nonfinite_all, res.start),
                TrainLog(cfg, rank, res.start, out, cfg.micro_batch * cfg.grad_accum * world, device),
                LogWindow.new(device, res.start, res.window, len(manifests)),
                validator if validator and validator.enabled else None, batches,
                StreamProgress(lstate, [[sh.n_samples for sh in m.shards("train")] for m in manifests], rank, world),
                shard_names, [p for p in engine.module.parameters() if p.requires_grad], res.start,
                [(n, k, m.n_samples("train")) for n, k, m in zip(names, per_batch, manifests)], lstate.batches,
                fault_injection.keys_log(rank))


def source_names(bases: list[str]) -> list[str]:
    """Short names of the sources for the log: their folders' last parts, made unique with their index."""
    names = [redact_secrets(b).rstrip("/").rsplit("/", 1)[-1].rsplit("@", 1)[-1] or f"source{i}"  # no user:password@
             for i, b in enumerate(bases)]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def _shard_names(manifests: list) -> list[str]:
    """Every source's train shards, in the stream's shard numbering (sources in order), named for messages."""
    if len(manifests) == 1:
        return [sh.name for sh in manifests[0].shards("train")]
    return [f"{redact_secrets(m.base)}/{sh.name}" for m in manifests for sh in m.shards("train")]


def _per_source(run: "_Run", values: list[float], validated: bool) -> dict | None:
    """The log record's per-source numbers (several sources): loss, val loss, samples and epochs so far."""
    if run.win.src is None:
        return None
    S = len(run.sources)
    sse, n, val = values[:S], values[S:2 * S], values[2 * S:3 * S]
    consumed = run.batches.batches  # global batches of this stream (the exact per-source counts follow)
    out = {}
    for i, (name, per_batch, size) in enumerate(run.sources):
        seen = per_batch * consumed
        rec = {"loss": sse[i] / n[i] if n[i] else float("nan"), "samples": seen, "epochs": seen / max(1, size)}
        if validated and run.win.val_src_n and run.win.val_src_n[i]:
            rec["val_loss"] = val[i] / (run.win.val_src_n[i] * run.world)
        out[name] = rec
    return out


def _loader(manifests: list, weights: list[float], cfg: TrainConfig, res, rank: int, world: int,
            device: torch.device):
    """(this rank's batches, the stream's state): the saved stream continued at its global position (on any
    world size), or a new one when there is none, or when what fixes the order changed and
    --allow-schedule-change allows a new stream."""
    saved_readers = res.loader.get("readers") if isinstance(res.loader, dict) else None
    loader_args = dict(seed=res.stream_seed, rank=rank, world_size=world, num_workers=cfg.num_workers,
                       shuffle_shards=cfg.shuffle_shards, storage_options=cfg.storage_options,
                       strict=cfg.strict_data, pin_memory=device.type == "cuda", verify=cfg.verify_data,
                       global_batch=cfg.micro_batch * cfg.grad_accum * world, weights=weights,
                       readers=cfg.stream_readers or saved_readers or world * max(1, cfg.num_workers))
    try:
        batches, state = make_loader(manifests, cfg.micro_batch, state=res.loader, **loader_args)
        if rank == 0 and res.loader is not None:
            print(f"[himae-train] the data stream goes on at global batch {state.batches}", flush=True)
        return batches, state
    except ValueError as e:  # the saved stream cannot continue under the loader options given now
        if res.loader is None:
            raise
        if not cfg.allow_schedule_change:
            if isinstance(e, OlderStreamError):
                raise  # no option of today's brings that stream back: its message says what does
            raise ValueError(f"{e}; resume with the data options it was saved with, or pass "
                             f"--allow-schedule-change to start a new data stream") from e
        loader_args["seed"] = cfg.seed + res.start  # the loader options changed: a new stream, on every rank alike
        loader_args["readers"] = cfg.stream_readers or world * max(1, cfg.num_workers)
        if rank == 0:
            print(f"[himae-train] data stream options changed ({e}): a new data stream starts "
                  f"(seed {cfg.seed + res.start})", flush=True)
        return make_loader(manifests, cfg.micro_batch, **loader_args)


def _too_much_lost(lost: dict, progress: StreamProgress, shard_names: list[str], limit: float, step: int) -> None:
    """Collective (every rank reaches it on the same all-reduced counts): raise naming every rank's failed shards."""
    import torch.distributed as dist

    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, [shard_names[i] for i in progress.failed_shards()])
    bad = sorted({n for ns in names for n in ns})
    raise DataLostError(f"{lost['failed_shard_reads']} of {lost['shard_reads']} shard reads failed by step {step} "
                        f"({lost['lost_segments']} segments lost), more than --max-bad-data={limit:g}: shard(s) "
                        f"{bad[:10]}{' ...' if len(bad) > 10 else ''}; re-run himae-prep (or raise --max-bad-data)")


def _start_checks(manifests: list, cfg: TrainConfig, ckpt: Checkpointer) -> tuple[list[str], str | None]:
    """Rank 0, before the first step: damaged shards of every source (train, and val when validating; fatal in
    val, which every rank caches at start) and an --export-url that cannot be written."""
    broken = []
    for m in manifests:
        bad = check_shards(m, "train", cfg.storage_options)
        broken += bad if len(manifests) == 1 else [f"{redact_secrets(m.base)}/{b}" for b in bad]
        if cfg.val_every and m.splits.get("val"):
            bad_val = check_shards(m, "val", cfg.storage_options)
            if bad_val:
                return broken, (f"{redact_secrets(m.url)}: val shard(s) missing or damaged: {bad_val[:5]}; "
                                f"re-run himae-prep")
    return broken, ckpt.check_export()


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


LAUNCHER_REPORTS_ENV = "HIMAE_LAUNCHER_REPORTS_ERRORS"  # set by himae_dist.torchrun: it prints the root cause
PEER_EXITED = "a peer rank exited or died mid-collective"  # a consequence, not a root cause (himae_dist.torchrun)


def error_line(e: BaseException, cfg: TrainConfig | None) -> str | None:
    """The one `himae-train: error:` line for a failure the user can act on, or None (a bug: keep the traceback)."""
    out = cfg.out if cfg else "?"
    if isinstance(e, (ValueError, FileNotFoundError, StorageError)):  # bad options, data or store
        msg = str(e)
        if "Original Traceback" in msg:  # raised in a DataLoader worker: its own message is the last line
            msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
        return f"himae-train: error: {msg}"
    text = str(e)
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in text or (
            isinstance(e, RuntimeError) and ("inline_container.cc" in text or "file write failed" in text)):
        return (f"himae-train: error: writing under --out {out} failed: the disk is full or failing "
                f"({_free_space(out)}); free space or pick another --out, then run the same command to resume "
                f"from the last complete checkpoint ({text.strip().splitlines()[0][:200]})")
    if isinstance(e, OSError) and e.filename:  # a file that cannot be written or read: named
        if cfg and _inside(str(e.filename), cfg.out):  # --out: a file in its place, permissions, read-only
            return (f"himae-train: error: --out {out}: cannot write {e.filename}: {e.strerror or e} "
                    f"({type(e).__name__}); pick a writable --out")
        return f"himae-train: error: {e.filename}: {e.strerror or e} ({type(e).__name__})"
    if isinstance(e, RuntimeError):  # a collective that waited past --collective-timeout-s, or lost a rank
        msg = text.lower()
        if "connection closed by peer" in msg or "connection reset by peer" in msg:
            return (f"himae-train: error: {PEER_EXITED} (the first failing rank's own error names the cause): "
                    f"{text.splitlines()[0]}")
        if "timeout" in msg or "timed out" in msg:
            limit = cfg.collective_timeout_s if cfg else "?"
            return (f"himae-train: error: a collective timed out after --collective-timeout-s={limit} s "
                    f"(a rank stalled or died): {text.splitlines()[0]}")
    return None


def _inside(path: str, folder: str) -> bool:
    p, f = os.path.abspath(path), os.path.abspath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def _free_space(out: str) -> str:
    path = Path(out)
    while not path.exists() and path.parent != path:
        path = path.parent
    try:
        du = shutil.disk_usage(path)
    except OSError:
        return "free space unknown"
    return f"{du.free / 2**30:.2f} GiB free of {du.total / 2**30:.1f} GiB on the disk holding {path}"


def _report(line: str) -> None:
    """The error line (URL passwords redacted), once. Under torchrun it goes to the rank's error file,
    which torchrun's summary shows and from which himae-torchrun prints the first failing rank's line
    last (then no rank prints it); under plain torchrun only rank 0 prints it too (the others' lines
    are in the summary); without an error file (the DeepSpeed launcher, a lone process) every rank
    prints its own."""
    line = redact_secrets(line)
    recorded = False
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        entry = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
        with contextlib.suppress(OSError):
            with atomic_path(error_file) as tmp:
                tmp.write_text(json.dumps(entry))
            recorded = True
    launcher_prints = recorded and os.environ.get(LAUNCHER_REPORTS_ENV) == "1"
    if not recorded or (not launcher_prints and int(os.environ.get("RANK", "0")) == 0):
        print(line, file=sys.stderr, flush=True)


@record
def main(argv: list[str] | None = None) -> None:
    """`himae-train`: parse, then train (or --dry-run); a failure the user can act on is one line, exit 1 (2: flags)."""
    if "LOCAL_RANK" in os.environ:  # under a launcher: never outlive it (torchrun starts workers in new sessions)
        exit_with_parent()
    stop = StopRequest()  # before the slow start: a signal during it is honoured at the first log step
    cfg = None
    try:
        cfg, opts = parse_cli(argv)
        if opts.dry_run:
            dry_run(cfg)
            return
        problem = out_problem(Path(cfg.out))  # before any rank starts a process group
        if problem:
            raise ValueError(problem)
        train(cfg, stop)
    except Preempted as e:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"himae-train: {e}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT)
    except Exception as e:  # noqa: BLE001 (what error_line does not know is re-raised with its traceback)
        line = error_line(e, cfg)
        if line is None:
            raise
        _report(line)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    import torch.distributed as dist

    if dist.is_initialized():  # no barrier: the others need not wait (in a collective) for rank 0's final upload
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
