"""One run: build the datamodule, the model and the trainer from the config, fit, test, write results.json."""
from __future__ import annotations

import json
import logging
import os
import resource
import time
import warnings

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .attention import ConfigError

log = logging.getLogger("attnlab")
# Our datamodules resume by themselves (the train sampler starts at trainer.global_step), so Lightning's warning
# that a mid-epoch resume replays the epoch from its start does not apply.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


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
        datamodule = hydra.utils.instantiate(cfg.task)
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


def run(cfg: DictConfig) -> dict:
    """Train and/or test as the config says; returns (and writes) the results."""
    start = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)

    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    elif not cfg.get("ckpt_path"):
        log.warning("train=false and no ckpt_path: evaluating an untrained model")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.test:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if cfg.train else ""
        ckpt = best or (None if cfg.train else cfg.get("ckpt_path"))
        for res in trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True):
            metrics.update({k: float(v) for k, v in res.items()})

    out_dir = cfg.paths.output_dir
    results = {
        "metrics": metrics,
        "steps": int(trainer.global_step),
        "wall_time_s": time.time() - start,
        "parameters": n_params,
        "peak_memory": peak_memory_mb(),
        "device": str(trainer.strategy.root_device),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    log.info("results: %s", json.dumps(metrics))
    log.info("written to %s", out_dir)
    for logger in trainer.loggers:
        logger.finalize("success")
    if "wandb" in (cfg.get("logger") or {}):
        import wandb
        wandb.finish()
    return results
