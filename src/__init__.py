"""attnlab: efficient-attention Transformers trained and benchmarked with PyTorch Lightning + Hydra.

Importing the package registers its OmegaConf resolvers (``attnlab.direction``, ``attnlab.subdir``), which the configs
use, so any entry point that composes them (train.py, tests, notebooks) finds them."""
from . import sweeps  # noqa: F401  (registers the resolvers)
