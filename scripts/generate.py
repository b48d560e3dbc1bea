"""Deprecated: use `llmkit generate ...` (the same key=value overrides). Kept for one release."""

import sys

from llmkit.cli import main

if __name__ == "__main__":
    print("scripts/generate.py is deprecated: run `llmkit generate ...` instead", file=sys.stderr)
    main(["generate", *sys.argv[1:]])
