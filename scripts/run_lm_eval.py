"""lm-evaluation-harness with the llmkit model registered (`pip install lm_eval` first).

  python scripts/run_lm_eval.py --model llmkit --model_args ckpt=runs/x/checkpoints/last.ckpt \\
      --tasks hellaswag --batch_size 8
  python scripts/run_lm_eval.py --model llmkit --model_args hf=hf_model/ --tasks my_task --include_path my_tasks/

Every argument is lm_eval's own (see `lm_eval --help`); this only imports llmkit.lm_eval_adapter,
which registers `--model llmkit`, before running lm_eval's command line. (Not named lm_eval.py, and
scripts/ is taken off sys.path, so neither `lm_eval` nor Hugging Face's `evaluate` is shadowed.)
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != _HERE]

if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    import llmkit.lm_eval_adapter  # noqa: F401  (registers the model "llmkit")

    cli_evaluate()
