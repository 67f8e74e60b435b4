"""Train / evaluate one attention variant on one task: `python train.py attention=memsizer task=copy`.

Configs live in conf/ (see conf/config.yaml); the run itself is src/train.py."""
import hydra
from omegaconf import DictConfig

from attnlab.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    results = run(cfg)
    return results["metrics"].get("val/loss")  # for sweepers that optimise a number


if __name__ == "__main__":
    main()
