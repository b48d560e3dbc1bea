"""Train a language model: python train.py [group=option ...] [key=value ...]"""

import hydra
from omegaconf import DictConfig

import llmkit  # noqa: F401  (registers the config resolvers)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from llmkit.train import run  # imported here so --help and --cfg stay fast

    run(cfg)


if __name__ == "__main__":
    main()
