"""Train / evaluate one attention variant on one task: `python train.py attention=memsizer task=copy`.

Configs live in conf/ (see conf/config.yaml); the run itself is src/train.py. Sweeps: `python train.py -m ...`,
an Optuna search with `hparams_search=copy_optuna` (conf/hparams_search/)."""
import hydra
from omegaconf import DictConfig

from attnlab import sweeps  # registers the resolvers the sweep configs use (attnlab.direction, attnlab.subdir)
from attnlab.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # A sweeper (Optuna) optimises the returned number: the task's optimized_metric, in its monitor.mode direction.
    return sweeps.objective(run(cfg), cfg)


if __name__ == "__main__":
    main()
