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
from omegaconf import DictConfig, OmegaConf

from .attention import ConfigError

log = logging.getLogger("attnlab")
# Our datamodules resume by themselves (the train sampler starts at trainer.global_step), so Lightning's warning
# that a mid-epoch resume replays the epoch from its start does not apply.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


def _instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a mapping of ``_target_`` configs (callbacks, loggers)."""
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


def build(cfg: DictConfig):
    """Datamodule, LightningModule, Trainer. Any config error (unknown option, invalid combination of an
    attention variant with a role) is raised here, before training starts."""
    datamodule = hydra.utils.instantiate(cfg.task)
    try:
        model = hydra.utils.instantiate(
            cfg.model, net={"vocab_size": datamodule.vocab_size, "max_len": datamodule.max_len})
    except InstantiationException as e:  # show our message (it names the fix), not Hydra's wrapper
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise
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
        # weights_only=False: our checkpoints hold the optimizer/scheduler factories (functools.partial)
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=False)
    elif not cfg.get("ckpt_path"):
        log.warning("train=false and no ckpt_path: evaluating an untrained model")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.test:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if cfg.train else ""
        ckpt = best or (None if cfg.train else cfg.get("ckpt_path"))
        for res in trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=False):
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
