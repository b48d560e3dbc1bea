"""`llmkit generate` end to end, on a checkpoint trained here: it streams and exits 0."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkit.checkpoint import load_checkpoint
from llmkit.cli import main as llmkit
from llmkit.generation import IncrementalDetokenizer, generate, stream_text

LLMKIT = str(Path(sys.executable).parent / "llmkit")  # the console script installed with the package
PROMPT = "def main():\n    "

pytestmark = pytest.mark.slow


@pytest.fixture
def ckpt(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


def _cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([LLMKIT, "generate", *args], capture_output=True, timeout=300)
    # decoded here: text mode would turn a sampled "\r" into "\n"
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode(errors="replace")
    return result


def _expected(ckpt: Path, max_new_tokens: int, **options: object) -> str:
    loaded = load_checkpoint(ckpt)
    generator = torch.Generator().manual_seed(5)
    return PROMPT + "".join(stream_text(loaded.model, loaded.tokenizer, PROMPT, max_new_tokens, generator=generator, **options))


def test_cli_prints_prompt_and_continuation_and_exits_0(ckpt: Path) -> None:
    # the prompt reaches the CLI with \n escapes, quoted for Hydra, as typed in a shell ('prompt="..."')
    result = _cli(f"ckpt={ckpt}", 'prompt="def main():\\n    "', "max_new_tokens=40", "seed=5", "device=cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    expected = _expected(ckpt, 40, temperature=0.8, top_k=50, top_p=1.0)
    assert result.stdout == expected + "\n"
    assert len(expected) > len(PROMPT)


def test_cli_stops_at_a_stop_string(ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    free = _expected(ckpt, 40, temperature=0)[len(PROMPT) :]
    # two characters from the middle that need no escaping inside Hydra's single quotes
    start = next(i for i in range(len(free) // 2, len(free) - 1) if not set(free[i : i + 2]) & set("\\'"))
    stop = free[start : start + 2]
    capsys.readouterr()  # in this process: the console script's own run is the test above
    llmkit(["generate", f"ckpt={ckpt}", 'prompt="def main():\\n    "', "max_new_tokens=40", "temperature=0", f"stop='{stop}'"])
    assert capsys.readouterr().out == PROMPT + free[: free.index(stop)] + "\n"


def test_cli_writes_each_piece_as_it_arrives(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Recorder(io.StringIO):
        flushed: list[str] = []

        def flush(self) -> None:
            self.flushed.append(self.getvalue())

    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    llmkit(["generate", f"ckpt={ckpt}", 'prompt="def main():\\n    "', "max_new_tokens=20", "temperature=0", "device=cpu"])
    snapshots = out.flushed
    assert len(snapshots) >= 5, "one flush per printed piece"
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(snapshots, snapshots[1:], strict=False))
    assert out.getvalue() == _expected(ckpt, 20, temperature=0) + "\n"


def test_streamed_text_is_the_decoded_tokens_and_multibyte_characters_print_whole(ckpt: Path) -> None:
    loaded = load_checkpoint(ckpt)
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode(PROMPT)
    new = generate(loaded.model, [ids], 30, temperature=0, stop_ids=[tokenizer.eos_id])[0]
    streamed = "".join(stream_text(loaded.model, tokenizer, PROMPT, 30, temperature=0))
    assert streamed == tokenizer.decode(ids + new)[len(PROMPT) :]

    text = "naïve € 🙂"  # not in the training text: byte-fallback pieces, several per character
    pieces = IncrementalDetokenizer(tokenizer, ids)
    out = [pieces.push(t) for t in tokenizer.encode(text)] + [pieces.flush()]
    assert "".join(out) == text and not any("\ufffd" in p for p in out)


def test_cli_rejects_unknown_and_missing_arguments(ckpt: Path) -> None:
    result = _cli(f"ckpt={ckpt}", "temprature=0.5")
    assert result.returncode != 0 and "temperature" in result.stderr
    result = _cli("prompt=hi")
    assert result.returncode != 0 and "ckpt=" in result.stderr
