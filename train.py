"""Train a language model: python train.py [group=option ...] [key=value ...] (the same as `llmkit train ...`)."""

from llmkit.commands.train import main

if __name__ == "__main__":
    main()
