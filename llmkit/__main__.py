"""python -m llmkit <subcommand> ...: the same as the `llmkit` console script."""

from llmkit.cli import main

main()
