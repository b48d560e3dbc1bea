"""llmkit train [group=option ...] [key=value ...]: one run, or a sweep with -m (also `python train.py`)."""

import hydra
from omegaconf import DictConfig

import llmkit  # noqa: F401  (registers the config resolvers)
from llmkit.commands import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    from llmkit.hardware import HardwareError
    from llmkit.plan import PlanError
    from llmkit.train import run  # imported here so --help and --cfg stay fast

    try:
        run(cfg)
    except (HardwareError, PlanError) as refusal:  # said before any work: the message is the whole story
        raise SystemExit(f"llmkit train: {refusal}") from None
