"""Merge a sharded (FSDP) checkpoint directory into one file for inference and export.

  python scripts/consolidate_checkpoint.py runs/<run>/checkpoints/last.ckpt model.ckpt
"""

import argparse
from pathlib import Path

from llmkit.checkpoint import consolidate, load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sharded_dir", type=Path)
    parser.add_argument("out_file", type=Path)
    args = parser.parse_args()
    out = consolidate(args.sharded_dir, args.out_file)
    loaded = load_checkpoint(out)  # proves the file loads (weights_only) before reporting success
    print(f"wrote {out}: step {loaded.step}, {loaded.model.num_params():,} parameters")


if __name__ == "__main__":
    main()
