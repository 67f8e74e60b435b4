"""What sweeps need from attnlab: OmegaConf resolvers for the sweep configs, the per-variant attention search space
of the Optuna sweeper, and the number a job returns to it.

Importing this module registers the resolvers; train.py imports it, so they exist wherever Hydra resolves a sweep
config (the sweeping process, and each submitit job, which imports the task function's module)."""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re

import yaml
from omegaconf import DictConfig, OmegaConf

from .attention import ConfigError
from .io import atomic_write

log = logging.getLogger("attnlab")

DIRECTIONS = {"min": "minimize", "max": "maximize"}
MAX_DIRNAME = 120  # bytes; a path component may have 255, and the job number and a hash come on top


def direction(mode: str) -> str:
    """A task's `monitor.mode` (min|max, as ModelCheckpoint takes it) as Optuna's study direction."""
    if mode not in DIRECTIONS:
        raise ConfigError(f"monitor.mode is {mode!r}; expected one of {sorted(DIRECTIONS)}. "
                          f"Fix: set `monitor.mode` in the task config (conf/task/*.yaml) to min or max.")
    return DIRECTIONS[mode]


def _short(value: str) -> str:
    """Floats to 4 significant digits (Optuna suggests 0.0012345678901234): the name only, the config keeps all.
    Integers and everything else stay as written."""
    if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+\.?\d*[eE][-+]?\d+)", value) and math.isfinite(float(value)):
        return f"{float(value):.4g}"
    return value


def subdir(num, *, _root_) -> str:
    """A sweep job's directory name: its number, then the overrides that make it differ from the other jobs, e.g.
    `3_attention.decoder.k=6,model.optimizer.lr=0.0012` for `-m hparams_search=copy_optuna trainer.max_steps=50`.

    Overrides fixed for the whole sweep (a plain `key=value` on its command line, read back from the sweep's
    multirun.yaml, written before any job starts by Hydra's basic sweeper, or for Optuna by `search_space`) and
    `hydra.job.config.override_dirname.exclude_keys` are left out; if that leaves nothing, the name lists them all. The job number keeps names unique
    (two Optuna trials may draw the same values); characters a path component cannot hold, or a shell would trip
    over, become `_` (a group override `model/optimizer=adamw` reads `model.optimizer=adamw`); overlong names are cut
    and end in a hash of the full one, so they stay distinct."""
    hydra_cfg = _root_.hydra
    exclude = set(OmegaConf.select(hydra_cfg, "job.config.override_dirname.exclude_keys", default=None) or [])
    items = sorted(o.partition("=") for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") not in exclude)
    fixed = _fixed_keys(str(hydra_cfg.sweep.dir))
    varying = [(k, sep, v) for k, sep, v in items if k.lstrip("+~") not in fixed]
    name = ",".join(k.replace("/", ".") + sep + _short(v) for k, sep, v in (varying or items))
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name) or "defaults"
    if len(name) > MAX_DIRNAME:
        name = name[:MAX_DIRNAME - 9] + "~" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{num}_{name}"


def _fixed_keys(sweep_dir: str) -> set[str]:
    """Keys the sweep's command line sets to one value for every job (its multirun.yaml; empty if there is none)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = os.path.join(sweep_dir, "multirun.yaml")
    try:
        with open(path) as f:
            task = (yaml.safe_load(f) or {}).get("hydra", {}).get("overrides", {}).get("task") or []
        parsed = OverridesParser.create().parse_overrides(task)
    except Exception as e:  # noqa: BLE001 - a folder name is never worth failing a job for
        if not isinstance(e, FileNotFoundError):
            log.warning("could not read the sweep's overrides from %s (%s); naming jobs by all overrides", path, e)
        return set()
    return {o.get_key_element().lstrip("+~") for o in parsed if not o.is_sweep_override()}


for _name, _fn in (("attnlab.direction", direction), ("attnlab.subdir", subdir)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def search_space(cfg: DictConfig, trial) -> None:
    """Optuna sweeper hook (`hydra.sweeper.custom_search_space`), called in the sweeping process for each trial
    before it launches: searches the running variant's own options, and records the sweep.

    An `hparams_search` config lists the options per variant under `attention_search`, in the sweeper's override
    syntax: `attention_search: {memsizer: {decoder.k: "tag(log, int(interval(2, 32)))"}}`. Only the variant the
    trial runs (`attention=...`, fixed or itself searched) gets its options: a conditional search space, which TPE
    handles. The record is the sweep's multirun.yaml (its config and command line), as Hydra's basic sweeper writes
    one and the Optuna plugin does not; job folder names (`subdir`) read the command line's fixed overrides from it."""
    # The plugin's parser of sweep strings, so these read exactly like `hydra.sweeper.params`.
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    _record_sweep(cfg)

    spaces = cfg.get("attention_search") or {}
    name = trial.params.get("attention") or trial.user_attrs.get("attention") or cfg.attention.name
    for option, sweep in (spaces.get(name) or {}).items():
        key = f"attention.{option}"
        if key in trial.user_attrs:  # set on the command line: a fixed value wins over the search
            continue
        dists, fixed = create_params_from_overrides([f"{key}={sweep}"])
        if fixed:
            raise ConfigError(f"attention_search.{name}.{option} is {sweep!r}, not a search range. "
                              f"Fix: write it as a sweep, e.g. 'choice(4, 8)' or 'tag(log, int(interval(2, 32)))'.")
        trial._suggest(key, dists[key])  # what the plugin does for hydra.sweeper.params


def _record_sweep(cfg: DictConfig) -> None:
    path = os.path.join(str(cfg.hydra.sweep.dir), "multirun.yaml")
    if os.path.exists(path):
        return
    atomic_write(path, OmegaConf.to_yaml(cfg))  # unresolved, as Hydra saves it


def objective(results: dict, cfg: DictConfig) -> float | None:
    """The number a sweeper optimises: `optimized_metric` (set by the task; val/loss if a config lacks it)."""
    metric = cfg.get("optimized_metric") or "val/loss"
    value = results["metrics"].get(metric)
    if value is None:
        log.warning("optimized_metric %r is not among this run's metrics %s; a sweeper gets None",
                    metric, sorted(results["metrics"]))
    return value
