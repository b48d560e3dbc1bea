"""llmkit train [group=option ...] [key=value ...]: one run, or a sweep with -m (also `python train.py`)."""

import hydra
from omegaconf import DictConfig

import llmkit  # noqa: F401  (registers the config resolvers)
from llmkit.commands import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    from llmkit.train import run  # imported here so --help and --cfg stay fast

    run(cfg)
