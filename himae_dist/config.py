"""The trainer's one config object, its command line, and the DeepSpeed config it implies.

Defaults are the seed's recipe: patch 5, mask ratio 0.8, AdamW lr 1e-3, weight decay 1e-3,
10 % linear warmup then linear decay. Values come from the dataclass defaults, then an
optional `--config FILE` (TOML with one table per section, or a run's flat config.json), then
command-line flags; the resolved result is printed at start. Each field's metadata (help,
choices, section) documents it once: `build_parser` makes the flags and their help from it, and
the TOML tables follow the sections. Values are type-checked: a typo is an error naming the flag,
or the file and key, never a silent default.
The optimizer and schedule are built by the trainer (`train.build_engine`, `lr_lambda`), not by
DeepSpeed: PyTorch's fused AdamW on GPUs (no JIT build), and a schedule whose every update has
lr > 0. A user `--ds-config` may tune DeepSpeed but not contradict a flag (`deepspeed_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass

from data_prep.storage import REDACTED, json_object, redact_secrets
from himae_dist.model import DEFAULT_CHANNELS


SECTIONS = ("data", "model", "optim", "checkpoint", "log")  # the TOML config's tables


def _opt(default, section: str, help: str, choices: tuple | None = None, metavar: str | None = None):
    """A TrainConfig field whose metadata documents it: the flag's help, its choices and its TOML section."""
    assert section in SECTIONS, section
    return dataclasses.field(default=default, metadata={"help": help, "section": section, "choices": choices,
                                                        "metavar": metavar})


@dataclass
class TrainConfig:
    # data
    data: str | list = _opt("", "data", "manifest.json (path or URL) or the folder holding it; repeat it to mix "
                            "several sources (TOML: a list, or [[data.sources]] tables)", metavar="URL")
    weights: tuple[float, ...] | None = _opt(None, "data", "each --data source's share of every global batch, "
                                             "comma-separated (default: equal), e.g. 0.7,0.3", metavar="W1,W2,...")
    sources: list | None = _opt(None, "data", "the sources as a list of {url, weight} (TOML: [[data.sources]] "
                                "tables; a flag takes JSON); instead of --data and --weights", metavar="JSON")
    stream_readers: int = _opt(0, "data", "canonical readers of the data stream; with --seed, --shuffle-shards, "
                               "the global batch and the sources it fixes the sample order on any world size or "
                               "worker count (default: world size x max(1, --num-workers) at the run's first "
                               "start, then kept)")
    storage_options: dict | None = _opt(None, "data", "fsspec options for s3:// data and --export-url, as a JSON "
                                        "object (e.g. '{\"anon\": false}')")
    num_workers: int = _opt(4, "data", "DataLoader workers per rank (pinned memory on CUDA)")
    shuffle_shards: int = _opt(4, "data", "shards loaded and shuffled together per reader")
    strict_data: bool = _opt(False, "data", "a missing/corrupt shard is fatal instead of skipped with a warning")
    max_bad_data: float = _opt(0.01, "data", "stop when more than this fraction of shard reads failed (all ranks, "
                               "so far)")
    verify_data: bool = _opt(False, "data", "check every shard read against the manifest's sha256 (costs a hash "
                             "per read)")
    on_nonfinite: str = _opt("abort", "data", "samples with NaN/inf (dropped on the device): abort naming shard "
                             "and keys, or skip them (counted)", ("abort", "skip"))
    # model
    in_chans: int = _opt(1, "model", "signal channels per segment (must match the manifest)")
    channels: tuple[int, ...] = _opt(DEFAULT_CHANNELS, "model", "encoder widths, comma-separated (TOML/JSON: a "
                                     "list of integers)")
    patch_size: int = _opt(5, "model", "masking patch length in samples")
    mask_ratio: float = _opt(0.8, "model", "fraction of patches masked, in (0, 1)")
    precision: str = _opt("auto", "model", "auto (bf16 on GPUs that support it, else fp32), fp32, bf16 (autocast; "
                          "CPU too)", ("auto", "fp32", "bf16"))
    loss_impl: str = _opt("auto", "model", "masked-MSE implementation: auto (fused Triton on CUDA when "
                          "available), reference, fused", ("auto", "reference", "fused"))
    compile: bool = _opt(False, "model", "torch.compile the model (forward and backward; the fused loss stays a "
                         "Triton kernel)")
    compile_backend: str = _opt("inductor", "model", "torch.compile backend (aot_eager: graph capture without code "
                                "generation)", ("inductor", "aot_eager", "eager", "cudagraphs"))
    tf32: bool = _opt(True, "model", "TF32 for fp32 convolutions and matmuls on Ampere+ GPUs (bf16 runs do not "
                      "use it)")
    deterministic: bool = _opt(False, "model", "deterministic cuDNN/cuBLAS kernels: bitwise resume on GPUs too "
                               "(CPU always)")
    # optim
    micro_batch: int = _opt(64, "optim", "segments per micro-batch, per rank")
    grad_accum: int = _opt(1, "optim", "micro-batches per optimizer step (with --global-batch: derived from it)")
    global_batch: int = _opt(0, "optim", "samples per optimizer step over all ranks, fixed across world sizes: "
                             "--grad-accum = it / (world size x --micro-batch), which must be whole (0 = --micro-batch "
                             "x --grad-accum x world size)")
    steps: int = _opt(1000, "optim", "optimizer steps of the whole run")
    lr: float = _opt(1e-3, "optim", "peak AdamW learning rate")
    weight_decay: float = _opt(1e-3, "optim", "AdamW weight decay")
    warmup_frac: float = _opt(0.1, "optim", "fraction of --steps with linear warmup (then linear decay), in [0, 1)")
    grad_clip: float = _opt(0.0, "optim", "gradient-norm clipping (0 = off, as the seed)")
    zero_stage: int = _opt(0, "optim", "DeepSpeed ZeRO stage (a 1.2 M-parameter model gains nothing from ZeRO)",
                           (0, 1, 2))
    seed: int = _opt(0, "optim", "seed of the initial weights, masks and data order")
    ds_config: str | None = _opt(None, "optim", "JSON file merged over the generated DeepSpeed config (may not "
                                 "contradict a flag)", metavar="FILE")
    collective_timeout_s: int = _opt(300, "optim", "a collective waiting longer (stalled/dead rank) is an error, "
                                     "in seconds")
    # checkpoint
    out: str = _opt("runs/himae", "checkpoint", "run folder: checkpoints, weights, metrics.jsonl, config.json "
                    "(shared by every node)", metavar="DIR")
    resume: str = _opt("auto", "checkpoint", "auto: the newest complete checkpoint in --out, if any; never: start "
                       "at step 0 and refuse an --out that holds checkpoints; or PATH: that checkpoint tag folder "
                       "(e.g. runs/a/checkpoints/step0001000). A torchrun restart of the same job resumes its own "
                       "newest checkpoint in every mode", metavar="{auto,never,PATH}")
    init_from: str | None = _opt(None, "checkpoint", "weights a new run starts from at step 0 with its own "
                                 "schedule: himae_final.pt, weights/step_*.pt, a seed Lightning .ckpt, a DeepSpeed "
                                 "checkpoint folder or an s3:// URL (architecture checked; not used when a "
                                 "checkpoint is resumed)", metavar="WEIGHTS")
    save_every: int = _opt(0, "checkpoint", "also save every N steps (0 = off)")
    save_every_min: float = _opt(30.0, "checkpoint", "also save at the first log step after N minutes since the "
                                 "last save (0 = off)")
    keep_checkpoints: int = _opt(3, "checkpoint", "complete checkpoints kept in --out/checkpoints (older ones "
                                 "deleted)")
    allow_schedule_change: bool = _opt(False, "checkpoint", "resume even if --steps/lr/warmup/batch/... differ "
                                       "from the checkpoint's")
    export_url: str | None = _opt(None, "checkpoint", "also place weights/step_*.pt and himae_final.pt here "
                                  "(s3://... or a path)", metavar="URL")
    # log
    log_every: int = _opt(10, "log", "log (one all-reduce and host read) every N steps")
    val_every: int = _opt(0, "log", "masked MSE on the val split every N steps (0 = off), logged at the next log "
                          "step")
    val_batches: int = _opt(4, "log", "val micro-batches per rank (the same ones every time)")
    plot_every: int = _opt(0, "log", "reconstruction PNG of val samples every N steps (needs --val-every; 0 = off)")
    wandb: str = _opt("off", "log", "Weights & Biases logging", ("off", "offline", "online"))
    wandb_project: str = _opt("himae-dist", "log", "Weights & Biases project", metavar="NAME")

    def validate(self) -> None:
        def bad(name: str, want: str) -> None:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: expected {want}")

        try:
            self.data_sources()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.global_batch < 0 or self.stream_readers < 0:
            bad("global_batch" if self.global_batch < 0 else "stream_readers", "an integer >= 0 (0 = the default)")
        for name in ("micro_batch", "grad_accum", "steps", "patch_size", "in_chans", "log_every", "shuffle_shards"):
            if getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        if not 0.0 < self.mask_ratio < 1.0:
            bad("mask_ratio", "a value in (0, 1)")
        if not 0.0 <= self.warmup_frac < 1.0:
            bad("warmup_frac", "a value in [0, 1)")
        if self.zero_stage not in (0, 1, 2):
            bad("zero_stage", "0, 1 or 2 (a 1.2 M-parameter model gains nothing from stage 3)")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                bad(f.name, "one of " + ", ".join(map(str, choices)))
        if not self.resume:
            bad("resume", "auto, never or the path of a checkpoint tag folder")
        if REDACTED in json.dumps(dataclasses.asdict(self), default=str):  # a saved config.json, given back as is
            raise ConfigError(f"the config holds {REDACTED!r} where a credential or URL password was: a saved "
                              f"config.json hides them; give them again (--storage-options, the URL) or through the "
                              f"environment (AWS_* variables, a profile)")
        if not self.channels or any(c < 1 for c in self.channels):
            bad("channels", "one or more widths >= 1, e.g. 16,32,64")
        if self.keep_checkpoints < 1 or self.collective_timeout_s < 1:
            bad("keep_checkpoints" if self.keep_checkpoints < 1 else "collective_timeout_s", "an integer >= 1")
        if self.plot_every < 0:
            bad("plot_every", "an integer >= 0")
        if self.plot_every and (not self.val_every or self.plot_every % self.val_every):
            bad("plot_every", "0, or a multiple of --val-every (the plots show validation samples)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad("lr", "a finite learning rate > 0")
        for name in ("weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                bad(name, "a finite value >= 0")
        if self.val_every < 0 or self.val_batches < 1:
            bad("val_every" if self.val_every < 0 else "val_batches", ">= 0" if self.val_every < 0 else ">= 1")
        if not 0.0 <= self.max_bad_data <= 1.0:
            bad("max_bad_data", "a fraction in [0, 1] of shard reads that may fail")
        if not (math.isfinite(self.save_every_min) and self.save_every_min >= 0):
            bad("save_every_min", "a finite number of minutes >= 0 (0 = off)")
        if self.num_workers < 0 or self.save_every < 0:
            bad("num_workers" if self.num_workers < 0 else "save_every", "an integer >= 0")

    def data_sources(self) -> list[tuple[str, float]]:
        """(manifest URL, weight) of every source: --data (repeated) with --weights, or `sources`."""
        urls = [self.data] if isinstance(self.data, str) else list(self.data)
        urls = [u for u in urls if u]
        if self.sources:
            if urls or self.weights:
                raise ValueError("give the sources either as [data] sources ([[data.sources]], --sources) or as "
                                 "--data/--weights, not both")
            out = []
            for i, src in enumerate(self.sources):
                if not (isinstance(src, dict) and isinstance(src.get("url"), str) and src["url"]
                        and set(src) <= {"url", "weight"}):
                    raise ValueError(f"sources[{i}] = {src!r}: expected a table with a url and, optionally, a weight")
                w = src.get("weight", 1.0)
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0):
                    raise ValueError(f"sources[{i}].weight = {w!r}: expected a number > 0")
                out.append((src["url"], float(w)))
            return out
        if not urls and self.sources is not None:
            raise ValueError(f"sources = {self.sources!r}: expected at least one source, a table with a url and, "
                             f"optionally, a weight ([[data.sources]])")
        if not urls:
            raise ValueError("--data='': expected a manifest.json path/URL or the folder holding it")
        weights = list(self.weights) if self.weights else [1.0] * len(urls)
        if len(weights) != len(urls):
            raise ValueError(f"--weights={','.join(map(str, weights))}: {len(weights)} weight(s) for {len(urls)} "
                             f"--data source(s); give one per source")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"--weights={','.join(map(str, weights))}: expected numbers > 0")
        return list(zip(urls, weights))

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_frac * self.steps))


class ConfigError(ValueError):
    """A bad flag or config-file value: one line naming the flag, or the file and key, and what was expected."""


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _strict_bool(s: str) -> bool:
    """A flag's boolean: a typo (`--strict-data ture`) is an error, never a silent false."""
    v = s.strip().lower()
    if v in _TRUE or v in _FALSE:
        return v in _TRUE
    raise argparse.ArgumentTypeError(f"expected true or false (or 1/0, yes/no, on/off), got {s!r}")


def _int_list(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 16,32,64, got {s!r}") from None


def _float_list(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(c) for c in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.7,0.3, got {s!r}") from None


def _json_list(s: str) -> list:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON list, got {s!r} ({e})") from None
    if not isinstance(v, list):
        raise argparse.ArgumentTypeError(f"expected a JSON list, got {type(v).__name__}")
    return v


def _base_type(tp: object) -> object:
    """bool, int, float, str, dict, tuple (of ints), "floats" or list for a field's annotation (Optional stripped)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        return "floats" if typing.get_args(tp)[0] is float else tuple
    if args and typing.get_origin(tp) is not tuple:
        return _base_type(args[0])
    return tp


_FLAG_TYPE = {bool: _strict_bool, int: int, float: float, str: str, dict: json_object, tuple: _int_list,
              "floats": _float_list, list: _json_list}
_WANT = {bool: "true or false (a boolean, not a string)", int: "an integer", float: "a number", str: "a string",
         dict: "a table/object of fsspec options", tuple: "a list of integers such as [16, 32, 64]",
         "floats": "a list of numbers such as [0.7, 0.3]", list: "a list", "strs": "a string or a list of strings"}


def _shown(v: object) -> str:
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else str(v)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line (not the usage of 45 flags), raised to main
        raise ConfigError(f"{message} (see himae-train --help)")


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags, one per TrainConfig field, documented from the fields' metadata, grouped by section."""
    hints = typing.get_type_hints(TrainConfig)
    ap = _Parser(prog="himae-train", description="Pretrain HiMAE with DeepSpeed: torchrun [torchrun flags] -m "
                 "himae_dist.train [flags], or python -m himae_dist.torchrun (launch/*.sh). Values come from the "
                 "defaults, then --config, then these flags.")
    ap.add_argument("--config", metavar="FILE", help="TOML file with [data] [model] [optim] [checkpoint] [log] "
                    "tables, or a flat JSON object (a run's config.json); flags override it")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config, world size and global batch, "
                    "epochs covered by --steps, the shards and the checkpoint it would resume from, then exit 0 "
                    "without writing anything (no DeepSpeed engine is started)")
    # The deepspeed launcher passes --local_rank; torchrun sets LOCAL_RANK. Accept both.
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    groups = {s: ap.add_argument_group(f"{s} (TOML table [{s}])") for s in SECTIONS}
    for f in dataclasses.fields(TrainConfig):
        tp, choices = _base_type(hints[f.name]), f.metadata["choices"]
        kw: dict = {"dest": f.name, "type": _FLAG_TYPE[tp], "default": None}
        if f.name == "data":
            kw["action"] = "append"  # several sources: --data A --data B (URLs hold colons and commas)
        if tp is bool:
            kw.update(nargs="?", const=True, metavar="{true,false}")
        elif f.metadata["metavar"]:
            kw["metavar"] = f.metadata["metavar"]
        elif choices:
            kw["metavar"] = "{" + ",".join(map(str, choices)) + "}"
        else:
            kw["metavar"] = {int: "N", float: "X", tuple: "C1,C2,...", dict: "JSON"}.get(tp, "VALUE")
        default = "" if f.default in ("", None) else f" (default: {_shown(f.default)})"
        groups[f.metadata["section"]].add_argument(f"--{f.name.replace('_', '-')}", help=f.metadata["help"] + default,
                                                   **kw)
    return ap


def _read_config_file(path: str) -> dict:
    """The config file's values by field name, type-checked; TOML by its .toml suffix, else flat JSON."""
    try:
        raw = open(path, "rb").read()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from e
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if path.endswith(".toml"):
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            doc = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from e
        values = {}
        for table, body in doc.items():
            if table not in SECTIONS or not isinstance(body, dict):
                where = fields[table].metadata["section"] if table in fields else None
                raise ConfigError(f"{path}: {table!r} is not a table of this config: expected the tables "
                                  f"{list(SECTIONS)}" + (f" ({table!r} belongs in [{where}])" if where else ""))
            for key, v in body.items():
                if key not in fields:
                    raise ConfigError(f"{path}: unknown config key(s) [{table}] {key!r}")
                if fields[key].metadata["section"] != table:
                    raise ConfigError(f"{path}: key {key!r} belongs in [{fields[key].metadata['section']}], "
                                      f"not [{table}]")
                values[key] = v
    else:
        try:
            values = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); a .toml file is read as TOML") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object of config keys, got {type(values).__name__}")
        unknown = set(values) - set(fields)
        if unknown:
            raise ConfigError(f"{path}: unknown config key(s) {sorted(unknown)}")
    hints = typing.get_type_hints(TrainConfig)
    return {k: _checked(v, hints[k], f"{path}: key {k!r}") for k, v in values.items()}


def _checked(v: object, hint: object, where: str) -> object:
    """v as the field's type, or a ConfigError: no string taken for a boolean or number."""
    tp = _base_type(hint)
    if tp is str and list in typing.get_args(hint):  # data: one URL or a list of them
        tp = "strs"
    optional = type(None) in typing.get_args(hint)
    if v is None and optional:
        return None
    num = (int, float)
    ok = {bool: lambda: isinstance(v, bool),
          "strs": lambda: isinstance(v, str) or (isinstance(v, list) and all(isinstance(c, str) for c in v)),
          "floats": lambda: isinstance(v, list) and all(isinstance(c, num) and not isinstance(c, bool) for c in v),
          list: lambda: isinstance(v, list),
          int: lambda: isinstance(v, int) and not isinstance(v, bool),
          float: lambda: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda: isinstance(v, str), dict: lambda: isinstance(v, dict),
          tuple: lambda: isinstance(v, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in v)}[tp]()
    if not ok:
        raise ConfigError(f"{where} = {json.dumps(v, default=str)}: expected {_WANT[tp]}")
    return float(v) if tp is float else tuple(v) if tp is tuple else tuple(map(float, v)) if tp == "floats" else v


def parse_cli(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """(the validated config, the command's own options: --dry-run). Defaults, then --config, then flags."""
    ns = build_parser().parse_args(argv)
    values: dict = _read_config_file(ns.config) if ns.config else {}
    skip = ("config", "local_rank", "dry_run")
    values.update({k: v for k, v in vars(ns).items() if v is not None and k not in skip})
    if ns.data is not None and ns.sources is None:  # --data on the command line replaces the file's sources
        values.pop("sources", None)
        if ns.weights is None:
            values.pop("weights", None)
    if isinstance(values.get("data"), list) and len(values["data"]) == 1:
        values["data"] = values["data"][0]  # one source: a plain URL, as before
    cfg = TrainConfig(**values)
    try:
        cfg.validate()
    except ConfigError as e:
        if ns.config and ns.sources is None and "sources" in values and str(e).startswith("sources"):
            raise ConfigError(f"{ns.config}: [data] {e}") from None  # a [[data.sources]] table of the file
        raise
    return cfg, argparse.Namespace(**{k: getattr(ns, k) for k in skip})


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    return parse_cli(argv)[0]


# DeepSpeed keys that a flag sets: a --ds-config may repeat them with the same value only.
_OWNED = {
    ("train_micro_batch_size_per_gpu",): "--micro-batch",
    ("gradient_accumulation_steps",): "--grad-accum",
    ("train_batch_size",): "--micro-batch x --grad-accum x world size",
    ("zero_optimization", "stage"): "--zero-stage",
    ("gradient_clipping",): "--grad-clip",
    ("optimizer",): "--lr/--weight-decay (the trainer builds AdamW)",
    ("scheduler",): "--lr/--warmup-frac/--steps (the trainer builds the schedule)",
    ("bf16",): "--precision (bf16 is autocast over fp32 masters)",
    ("fp16",): "--precision",
}


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config implied by cfg (batch, ZeRO, clipping; fp32 engine), merged with --ds-config.

    DeepSpeed runs in fp32: bf16 is the trainer's autocast, so gradients accumulate and are
    all-reduced in fp32 and the module weights are the fp32 masters. A --ds-config that sets a
    key a flag owns to a different value is refused, so the recorded config is the one used.
    """
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 10**9,  # the trainer logs itself
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device in forward() and step() (on a GPU, a
        # cudaDeviceSynchronize twice per micro-step); the trainer measures throughput itself
        "timers": {"throughput": {"enabled": False}},
        # always written: DeepSpeed's default is 1.0, which would clip (and add an all-reduce per step)
        # where --grad-clip 0 means off, as in the seed's recipe
        "gradient_clipping": cfg.grad_clip,
    }
    if cfg.ds_config:
        try:
            with open(cfg.ds_config) as fh:
                user = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--ds-config={cfg.ds_config}: expected a readable JSON object ({e})") from e
        if not isinstance(user, dict):
            raise ValueError(f"--ds-config={cfg.ds_config}: expected a JSON object, got {type(user).__name__}")
        for path, flag in _OWNED.items():
            mine, theirs = _get(ds, path), _get(user, path)
            if path in (("bf16",), ("fp16",)) and theirs == {"enabled": False}:
                continue  # agrees with the fp32 engine: DeepSpeed's bf16/fp16 modes stay off
            if theirs is not None and theirs != mine:
                raise ValueError(
                    f"--ds-config={cfg.ds_config}: {'.'.join(path)}={theirs!r} contradicts {flag} "
                    f"(= {mine!r}); set it with the flag instead"
                )
        _merge(ds, user)
    return ds


def _get(d: dict, path: tuple[str, ...]):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def lr_lambda(cfg: TrainConfig):
    """Multiplier of --lr for update i (0-based): linear warmup from lr/W, then linear decay to lr/(S-W) > 0.

    No update gets lr 0 (DeepSpeed's WarmupDecayLR gave the first two updates lr 0).
    """
    steps, warm = cfg.steps, min(cfg.warmup_steps, cfg.steps - 1)

    def f(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return max(steps - i, 1) / (steps - warm)

    return f


def for_world(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """The config on `world_size` ranks: with --global-batch, --grad-accum derived from it (refused, with the
    numbers, where it is not whole); a --grad-accum given too is replaced (the caller says so)."""
    if not cfg.global_batch:
        return cfg
    per_step = world_size * cfg.micro_batch
    accum, rest = divmod(cfg.global_batch, per_step)
    if rest or not accum:
        raise ConfigError(f"--global-batch={cfg.global_batch} is not a whole number of micro-batches: {world_size} "
                          f"rank(s) x --micro-batch {cfg.micro_batch} = {per_step} per accumulation step "
                          f"({cfg.global_batch / per_step:g}); pick a global batch that is a multiple of {per_step}, "
                          f"or another --micro-batch or world size")
    return dataclasses.replace(cfg, grad_accum=accum)  # the global batch wins (a saved config.json holds the
    # accumulation of its own world size: given back on another, it must not be refused); the trainer says so


def schedule_params(cfg: TrainConfig, world_size: int, precision: str | None = None,
                    loss_impl: str | None = None) -> dict:
    """What a checkpoint records of the run; a resume with other values is no longer exact (`checkpointer.resume_refusal`).

    `precision` (bf16/fp32) and `loss_impl` (fused/reference) are what "auto" resolved to on this
    hardware, so the same flags on other hardware count as a change, and an explicit value equal
    to the resolved one does not.
    """
    return {"steps": cfg.steps, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "warmup_steps": cfg.warmup_steps,
            "micro_batch": cfg.micro_batch, "grad_accum": cfg.grad_accum, "world_size": world_size,
            "global_batch": cfg.micro_batch * cfg.grad_accum * world_size,
            "seed": cfg.seed, "mask_ratio": cfg.mask_ratio, "patch_size": cfg.patch_size,
            "grad_clip": cfg.grad_clip, "precision": precision or cfg.precision, "loss_impl": loss_impl or cfg.loss_impl,
            "in_chans": cfg.in_chans, "channels": list(cfg.channels), "zero_stage": cfg.zero_stage,
            "compile": cfg.compile, "compile_backend": cfg.compile_backend if cfg.compile else None, "tf32": cfg.tf32}


def _merge(base: dict, over: dict) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def config_record(cfg: TrainConfig) -> dict:
    """The config as printed, saved (config.json) and sent to W&B: credentials in --storage-options
    and passwords in URLs redacted (`data_prep.storage.redact_secrets`)."""
    return redact_secrets(dataclasses.asdict(cfg))


def resolved(cfg: TrainConfig) -> str:
    return json.dumps(config_record(cfg), indent=2, default=list)

