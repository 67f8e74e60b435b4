"""One run: build the datamodule, the model and the trainer from the config, fit, test, write results.json."""
from __future__ import annotations

import collections.abc
import json
import logging
import os
import resource
import shutil
import socket
import time
import types
import typing
import warnings

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException

from .attention import ROLES, ConfigError, role_options
from .checkpointing import AtomicCheckpointIO, RunCheckpoint, load_checkpoint, remove_stale_tmp
from .io import atomic_write

log = logging.getLogger("attnlab")
# Our datamodules resume by themselves (the train sampler starts at trainer.global_step), so Lightning's warning
# that a mid-epoch resume replays the epoch from its start does not apply.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
# A resumed run writes to its own new folder by design: that its checkpoint dir differs from the old one is expected.
warnings.filterwarnings("ignore", message="The dirpath has changed from")


def _instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a mapping of ``_target_`` configs (callbacks, loggers)."""
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


def _unwrap(e: InstantiationException):
    """Show our message (it names the fix), not Hydra's wrapper."""
    if isinstance(e.__cause__, (ConfigError, ValueError)):
        raise e.__cause__ from None
    raise e


def check_model_fits_task(cfg: DictConfig) -> None:
    """The module must consume the kind of batch the task's datamodule produces (e.g. not task=copy model=seq2seq)."""
    data_cls = hydra.utils.get_class(cfg.task._target_)
    model_cls = hydra.utils.get_class(cfg.model._target_)
    data_kind, model_kind = getattr(data_cls, "batch_kind", None), getattr(model_cls, "batch_kind", None)
    if data_kind != model_kind:
        task = HydraConfig.get().runtime.choices.get("task") if HydraConfig.initialized() else cfg.task._target_
        raise ConfigError(
            f"task {task!r} gives {data_kind!r} batches but the model {cfg.model._target_} trains on {model_kind!r} "
            f"batches. Fix: drop the `model=` override (each task picks its model) or pick a task of that kind.")


def net_config(cfg: DictConfig, datamodule) -> dict:
    """The network's config with what the data determines filled in where the user left it unset (null).

    A value the user set wins, but a length limit below what the data needs is an error now, not mid-training."""
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    for key, value in datamodule.net_args().items():
        if net.get(key) is None:
            net[key] = value
        elif key.startswith("max_") and isinstance(value, int) and net[key] < value:
            raise ConfigError(f"model.net.{key}={net[key]} but the data needs {value}. Fix: raise "
                              f"`model.net.{key}` to at least {value} (or leave it null to take the data's).")
    return net


def build(cfg: DictConfig):
    """Datamodule, LightningModule, Trainer. Any config error (a model that does not fit the task, an unknown option,
    an attention variant that cannot serve a role) is raised here, before training starts."""
    check_model_fits_task(cfg)
    try:
        datamodule = hydra.utils.instantiate(cfg.task, _convert_="all")  # plain containers: checkpoints load safely
        net = hydra.utils.instantiate(net_config(cfg, datamodule))
        model_cfg = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "net"}
        # optimizer / scheduler stay plain config (instantiated by the module): checkpoints hold no callables
        model = hydra.utils.instantiate(model_cfg, net=net, _recursive_=False, _convert_="all")
    except InstantiationException as e:
        _unwrap(e)
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=_instantiate_group(cfg.get("callbacks")),
                                      logger=loggers or False)
    return datamodule, model, trainer


def peak_memory_mb() -> dict:
    out = {"host_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# -- before anything is built ---------------------------------------------------------------------------------------
CLAIM = ".attnlab-run"  # created exclusively in the output dir: two runs never share one


def launch_rank() -> int:
    """This process's rank as the launcher set it (DDP children, torchrun, srun share rank 0's output dir)."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "0") not in ("", "0"):
            return int(os.environ[var])
    return 0


def slurm_job() -> str | None:
    """The Slurm job (array task) this process belongs to; a requeued job keeps it."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID") or None


def claim_output_dir(out_dir: str) -> None:
    """Each run its own output directory: the first run to create the claim file owns it, a second one stops here,
    before it writes anything (default dirs are unique to the microsecond, so this guards a set `hydra.run.dir`).
    The same Slurm job, requeued (after preemption), continues in its folder: Lightning resumes it from the
    hpc_ckpt_<n>.ckpt it saved there."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CLAIM)
    job = slurm_job()
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with open(path) as f:
            owner = f.read().strip()
        try:
            same_job = job is not None and json.loads(owner).get("slurm_job") == job
        except ValueError:
            same_job = False
        if same_job:
            log.info("Slurm job %s requeued: continuing in %s", job, out_dir)
            return
        raise ConfigError(f"output dir {out_dir} already belongs to another run ({owner}); nothing was written. "
                          f"Fix: leave `hydra.run.dir` at its default (a new folder per run) or give a new "
                          f"folder.") from None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                            "slurm_job": job}))


def remove_failed_run_dir(out_dir: str) -> None:
    """A run that failed on its config leaves no folder: remove the output dir if it holds only what Hydra and this
    start wrote (.hydra/, train.log, the claim)."""
    try:
        entries = set(os.listdir(out_dir))
    except OSError:
        return
    if ".hydra" in entries and entries <= {".hydra", "train.log", CLAIM}:
        shutil.rmtree(out_dir, ignore_errors=True)


def _type_ok(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or isinstance(tp, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if origin is typing.Literal:
        return value in args and type(value) in {type(a) for a in args}
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    return True  # a type a config cannot hold (an object): Lightning checks it


def check_trainer_config(trainer_cfg) -> None:
    """The trainer options' types, checked against Trainer's signature before anything is built, so
    `trainer.max_steps=abc` names the option instead of failing deep inside Lightning."""
    hints = typing.get_type_hints(pl.Trainer.__init__)
    for key, value in OmegaConf.to_container(trainer_cfg, resolve=True).items():
        if key != "_target_" and key not in hints:
            raise ConfigError(f"trainer.{key}: pytorch_lightning.Trainer has no such option. Fix: drop it (see "
                              f"conf/trainer/default.yaml for the options in use).")
        if key in hints and not (isinstance(value, dict) and "_target_" in value) and not _type_ok(value, hints[key]):
            want = str(hints[key]).replace("typing.", "")
            raise ConfigError(f"trainer.{key}={value!r} is not a valid value: it must be {want}. "
                              f"Fix: `trainer.{key}=<value of that type>`.")


ROLES_USED = {"lm": ("decoder",), "seq2seq": ("encoder", "decoder", "cross"), "ctc": ("encoder",)}


def attention_roles(cfg: DictConfig, batch_kind: str) -> dict:
    """The attention each role of the model gets, after per-role defaults and overrides (what the model builds)."""
    attn = OmegaConf.to_container(cfg.attention, resolve=True)
    return {role: dict(zip(("name", "options"), role_options(attn, role)))
            for role in ROLES_USED.get(batch_kind, ROLES)}


# -- resuming -------------------------------------------------------------------------------------------------------
def _flat(d, prefix: str) -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}"))
    return out


def resume_changes(ckpt: dict, model) -> dict:
    """Optimisation options that differ between the checkpoint and this run: {"model.optimizer.lr": [old, new]}."""
    old = ckpt.get("hyper_parameters") or {}
    changes = {}
    for key in ("optimizer", "scheduler", "scheduler_interval"):
        before, now = _flat(old.get(key), f"model.{key}"), _flat(model.hparams.get(key), f"model.{key}")
        for k in sorted(set(before) | set(now)):
            if before.get(k) != now.get(k):
                changes[k] = [before.get(k), now.get(k)]
    if "model.optimizer._target_" in changes:
        a, b = changes["model.optimizer._target_"]
        raise ConfigError(f"the checkpoint's optimizer state is for {a}, this run asks for {b}: it cannot continue "
                          f"that state. Fix: resume with the checkpoint's optimizer (drop `model/optimizer=`).")
    if "model.scheduler_interval" in changes:
        raise ConfigError(f"model.scheduler_interval changed on resume {changes['model.scheduler_interval']}. Fix: "
                          f"resume with the checkpoint's value.")
    return changes


class ApplyOnResume(pl.Callback):
    """Options changed on resume take effect on top of the restored state (Lightning restores the optimizer's
    param groups and the schedule from the checkpoint, which would silently keep the old lr): the optimizer's options
    are set in its param groups, and a changed lr or schedule rebuilds the schedule and replays it to this step."""

    def __init__(self, changes: dict):
        self.changes = changes

    def on_train_start(self, trainer, pl_module):
        h = pl_module.hparams
        opt = trainer.optimizers[0]
        options = {k: v for k, v in h.optimizer.items() if k not in ("_target_", "_partial_", "lr")}
        for group in opt.param_groups:
            for k, v in options.items():
                group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
        if not any(k == "model.optimizer.lr" or k.startswith("model.scheduler") for k in self.changes):
            return
        lr = h.optimizer.get("lr", opt.defaults["lr"])
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = lr
        configs = trainer.lr_scheduler_configs
        if h.scheduler and configs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": a replay
                sched = hydra.utils.instantiate(h.scheduler, optimizer=opt)
                for _ in range(trainer.global_step if h.scheduler_interval == "step" else trainer.current_epoch):
                    sched.step()
            configs[0].scheduler = sched
        elif configs:  # the schedule was dropped: a constant lr from here
            configs.clear()
        log.info("resumed with changed options, applied from step %d: %s; lr now %g", trainer.global_step,
                 self.changes, opt.param_groups[0]["lr"])


def _describe(roles: dict) -> str:
    return "; ".join(f"{r}: {v['name']} {v['options']}" for r, v in roles.items())


def parameter_mismatch(saved: dict, model) -> list[str]:
    """How the parameters in a checkpoint's state_dict differ from the model's (a few of each kind), or []."""
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    extra = [k for k in saved if k not in own]
    shapes = [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(v.shape)]
    return [f"{what} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing from the checkpoint", missing), ("not in this model", extra),
                               ("of another shape (checkpoint vs model)", shapes)) if keys]


def check_checkpoint(cfg: DictConfig, ckpt: dict, model, path: str) -> dict:
    """What a resume / an evaluation of ``ckpt`` changes, logged and (for training) applied or refused."""
    trained = (ckpt.get("attnlab") or {}).get("attention_roles")
    now = attention_roles(cfg, model.batch_kind)
    mismatch = parameter_mismatch(ckpt.get("state_dict", {}), model)
    if mismatch:
        was = f" It was trained with attention {_describe(trained)}; this run builds {_describe(now)}." \
            if trained and trained != now else ""
        raise ConfigError(f"{path} does not fit the model this config builds: parameters " + "; ".join(mismatch) +
                          f".{was} Fix: the options the checkpoint was trained with (attention, model.net sizes; "
                          f"see its run's .hydra/config.yaml), or a variant with the same parameters.")
    step = int(ckpt.get("global_step", 0))
    if trained is None:
        log.info("%s does not record its attention variant (written before attnlab stored it)", path)
    elif trained != now:
        say = log.warning if cfg.train else log.info
        say("%s was trained with attention %s; this run %s it with %s", path, _describe(trained),
            "trains" if cfg.train else "evaluates", _describe(now))
    else:
        log.info("%s was trained with this attention (%s)", path, _describe(trained))
    info = {"from": path, "step": step, "attention_trained_with": trained}
    if cfg.train:
        max_steps = int(cfg.trainer.get("max_steps") or -1)
        if 0 <= max_steps <= step:
            raise ConfigError(f"{path} is at step {step} and trainer.max_steps={max_steps}: nothing left to train. "
                              f"Fix: raise `trainer.max_steps`, or evaluate it with `train=false`.")
        info["changed"] = resume_changes(ckpt, model)
        if info["changed"]:
            log.warning("resuming with options that differ from the checkpoint (applied from step %d): %s", step,
                        info["changed"])
    return info


# -- the run --------------------------------------------------------------------------------------------------------
def _write_results(out_dir: str, results: dict) -> None:
    atomic_write(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2))


def _optimizer_options(trainer) -> dict:
    """What the optimizer actually ran with at the end (after a resume with changed options, too)."""
    if not trainer.optimizers:
        return {}
    g = trainer.optimizers[0].param_groups[0]
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
            if k != "params" and isinstance(v, (int, float, str, bool, tuple, type(None)))}


def run(cfg: DictConfig) -> dict:
    """Train and/or test as the config says; returns (and writes) the results."""
    start = time.time()
    out_dir = cfg.paths.output_dir
    ckpt_path, trust = cfg.get("ckpt_path"), bool(cfg.get("trust_checkpoint", False))
    resume, claimed = None, False
    try:  # config mistakes: fail before training, and leave no output folder behind
        if launch_rank() == 0:
            claim_output_dir(out_dir)
            claimed = True
        check_trainer_config(cfg.trainer)
        pl.seed_everything(cfg.seed, workers=True)
        datamodule, model, trainer = build(cfg)
        roles = attention_roles(cfg, model.batch_kind)
        log.info("attention per role (as the model builds it): %s", _describe(roles))
        if ckpt_path:
            resume = check_checkpoint(cfg, load_checkpoint(ckpt_path, trust), model, ckpt_path)
    except (ConfigError, ValueError):  # build() surfaces the datamodule's and the model's config errors as these
        if claimed:  # (never the folder of the run that owns it)
            remove_failed_run_dir(out_dir)
        raise
    if resume and resume.get("changed"):
        trainer.callbacks.append(ApplyOnResume(resume["changed"]))
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, RunCheckpoint):
            cb.run_info["attention_roles"] = roles
    if ckpt_path:
        remove_stale_tmp(os.path.dirname(os.path.abspath(ckpt_path)))
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)

    results = {"status": "running", "steps": 0, "parameters": n_params, "resume": resume,
               "config": OmegaConf.to_container(cfg, resolve=True)}
    stopped = None
    try:
        if cfg.train:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not trust)
            if resume and trainer.global_step <= resume["step"]:
                raise RuntimeError(f"resumed from {ckpt_path} at step {resume['step']} but training made no "
                                   f"progress (trainer.max_steps={cfg.trainer.max_steps}, trainer.max_epochs="
                                   f"{cfg.trainer.max_epochs}). Fix: check those limits against the checkpoint.")
        elif not ckpt_path:
            log.warning("train=false and no ckpt_path: evaluating an untrained model")
    except SIGTERMException:
        stopped = getattr(trainer.checkpoint_callback, "last_model_path", "")
    except BaseException as e:
        if trainer.global_rank == 0:  # results.json says what happened; the error still ends the run
            results.update(status="failed", error=f"{type(e).__name__}: {e}", steps=int(trainer.global_step),
                           wall_time_s=time.time() - start)
            try:
                _write_results(out_dir, results)
            except OSError:
                pass
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.test and stopped is None:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if cfg.train else ""
        ckpt = best or (None if cfg.train else ckpt_path)
        for res in trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=not trust or bool(best)):
            metrics.update({k: float(v) for k, v in res.items()})

    results.update({
        "status": "finished" if stopped is None else "interrupted",
        "metrics": metrics,
        "steps": int(trainer.global_step),
        "wall_time_s": time.time() - start,
        "peak_memory": peak_memory_mb(),
        "extra": getattr(model, "extra_results", {}),  # e.g. sacreBLEU signatures (strings, not metrics)
        "device": str(trainer.strategy.root_device),
        "world_size": trainer.world_size,
        "optimizer": _optimizer_options(trainer),
    })
    if trainer.global_rank == 0:  # metrics are already reduced over ranks: one process writes
        _write_results(out_dir, results)
        log.info("results: %s", json.dumps(metrics))
        log.info("written to %s", out_dir)
    for logger in trainer.loggers:
        logger.finalize("success" if stopped is None else "interrupted")
    if "wandb" in (cfg.get("logger") or {}):
        import wandb
        wandb.finish()
        wandb.teardown()  # returns once the offline run's files are flushed and closed
    if stopped is not None:
        log.error("stopped by a signal at step %d; resume with ckpt_path=%s", trainer.global_step, stopped)
        raise SystemExit(143)
    return results
