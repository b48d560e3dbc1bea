"""Deprecated: use `llmkit evaluate ...` (the same key=value overrides). Kept for one release."""

import sys

from llmkit.cli import main

if __name__ == "__main__":
    print("scripts/evaluate.py is deprecated: run `llmkit evaluate ...` instead", file=sys.stderr)
    main(["evaluate", *sys.argv[1:]])
