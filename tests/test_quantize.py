"""Weight-only int8 (llmkit/quantize.py): what is replaced, file size, quality against fp32, exact save/load."""

from __future__ import annotations

import inspect
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmkit import quantize as q
from llmkit.cli import main as llmkit
from llmkit.evaluate import perplexity
from llmkit.generation import generate
from llmkit.model import ModelConfig, Transformer
from llmkit.text.tokenizer import CharTokenizer
from tests.model.helpers import tiny_model


@pytest.fixture(scope="module")
def trained() -> tuple[Transformer, CharTokenizer, torch.Tensor]:
    """A char-level model trained for two seconds on Python's own source (shipped with every Python),
    so its predictions are sharp enough for greedy agreement to mean something; and held-out ids."""
    import argparse
    import inspect as inspect_module

    text = inspect.getsource(argparse) + inspect.getsource(inspect_module)
    tokenizer = CharTokenizer.train([text])
    ids = torch.tensor(tokenizer.encode(text))
    train_ids, held_out = ids[: int(0.9 * len(ids))], ids[int(0.9 * len(ids)) :]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):  # ~2.5 s on one thread; held-out ppl ~10 of a ~90-character vocabulary
        starts = torch.randint(0, len(train_ids) - 65, (16,), generator=g)
        batch = torch.stack([train_ids[s : s + 65] for s in starts])  # (16, 65)
        loss = model.loss(batch[:, :-1], batch[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer, held_out[:6000]


def _int8_copy(model: Transformer, backend: str) -> Transformer:
    copy = Transformer(model.cfg)
    copy.load_state_dict(model.state_dict())
    return q.quantize_model(copy, backend)


def test_only_the_block_linears_are_replaced_routers_and_the_rest_stay_float() -> None:
    model = tiny_model(ffn={"name": "moe", "n_experts": 4, "top_k": 2}, tie_embeddings=False)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    q.quantize_model(model, "reference")
    replaced = q.int8_names(model)
    assert replaced == [n for n in linears if n.startswith("blocks.") and "router" not in n]
    assert "blocks.0.attention.wqkv" in replaced and "blocks.0.attention.wo" in replaced
    assert isinstance(model.head, torch.nn.Linear) and isinstance(model.blocks[0].ffn.router.proj, torch.nn.Linear)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # what is left is float
    dense = tiny_model(tie_embeddings=False)
    q.quantize_model(dense, "reference", include_head=True)
    assert "head" in q.int8_names(dense) and "blocks.0.ffn.w_in" in q.int8_names(dense)


def test_int8_file_is_under_0_3x_the_fp32_weights_for_a_linear_dominated_model(tmp_path: Path) -> None:
    model = Transformer(ModelConfig(vocab_size=64, d_model=256, n_layers=4, n_heads=4, max_seq_len=128))
    fp32 = tmp_path / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}, str(fp32))
    out = q.save_quantized(q.quantize_model(model, "reference"), CharTokenizer("abc"), tmp_path / "int8")
    ratio = (out / q.WEIGHTS_FILE).stat().st_size / fp32.stat().st_size
    assert ratio <= 0.3, ratio  # 1 byte instead of 4 per weight, plus a float scale per row and the float rest


def test_int8_perplexity_within_3_percent_and_greedy_agreement_over_90_percent(trained) -> None:
    model, tokenizer, held_out = trained
    base = perplexity(model, held_out).ppl
    for backend in ("reference", "dynamic"):
        int8 = _int8_copy(model, backend)
        ppl = perplexity(int8, held_out).ppl
        assert abs(ppl / base - 1) <= 0.03, (backend, ppl, base)
        prompts = [held_out[i : i + 16].tolist() for i in range(0, 1600, 200)]
        expected = generate(model, prompts, 32, temperature=0.0)
        got = generate(int8, prompts, 32, temperature=0.0)
        agree = sum(a == b for e, g in zip(expected, got, strict=True) for a, b in zip(e, g, strict=True))
        assert agree / (32 * len(prompts)) >= 0.9, (backend, agree)
    assert base < 0.5 * tokenizer.vocab_size  # trained: the comparison is not between two uniform models


def test_dynamic_backend_stays_close_to_the_reference_it_is_built_from() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80)
    x = torch.randn(3, 7, 96)
    reference = q.Int8Linear.from_float(linear, "reference")(x)
    dynamic = q.Int8Linear.from_float(linear, "dynamic")(x)
    # activations are quantized per call to 7 bits (reduce_range): about 2^-6 of their range per element
    assert ((dynamic - reference).norm() / reference.norm()) < 0.03
    dequantized = torch.nn.functional.linear(x, q.Int8Linear.from_float(linear).weight.float() *
                                             q.quantize_weight(linear.weight)[1][:, None], linear.bias)
    torch.testing.assert_close(reference, dequantized, rtol=1e-5, atol=1e-5)  # fp32: the same products, reordered


def test_save_then_load_gives_identical_outputs_without_unpickling(trained, tmp_path: Path, monkeypatch) -> None:
    model, tokenizer, held_out = trained
    int8 = _int8_copy(model, "reference")
    out = q.save_quantized(int8, tokenizer, tmp_path / "int8", {"step": 150})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]

    def refuse(*args, **kwargs):
        raise AssertionError("loading an int8 directory unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    loaded, loaded_tokenizer, config = q.load_quantized(out, backend="reference")
    ids = held_out[:64][None]
    assert torch.equal(loaded(ids), int8(ids))
    assert loaded_tokenizer.encode("def f") == tokenizer.encode("def f") and config["step"] == 150
    with pytest.raises(FileExistsError, match="nothing was overwritten"):
        q.save_quantized(int8, tokenizer, out)


def test_llmkit_quantize_then_generate_and_evaluate_the_int8_directory(tiny_checkpoint: Path, tmp_path: Path,
                                                                       capsys) -> None:
    out = tmp_path / "tiny-int8"
    llmkit(["quantize", f"ckpt={tiny_checkpoint}", f"out={out}"])
    assert "Linear layers in int8" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["source"] == str(tiny_checkpoint) and config["int8_modules"]
    llmkit(["generate", f"ckpt={out}", "prompt=def", "max_new_tokens=5", "temperature=0"])
    assert capsys.readouterr().out.startswith("def")
    text = tmp_path / "held_out.txt"
    text.write_text("def main():\n    return 0\n" * 20)
    llmkit(["evaluate", f"ckpt={out}", f"text={text}", f"out={tmp_path / 'eval.json'}"])
    assert json.loads((tmp_path / "eval.json").read_text())["ppl"] > 1
    llmkit(["evaluate", f"ckpt={tiny_checkpoint}", f"text={text}", "quantize=int8", f"out={tmp_path / 'q.json'}"])
    assert json.loads((tmp_path / "q.json").read_text())["quantize"] == "int8"
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(tiny_checkpoint.read_bytes())
    llmkit(["evaluate", "-m", f"ckpt={out},{copy}", f"text={text}"])  # a sweep: one report per checkpoint
    reports = [json.loads(Path(f"{c}.eval.json").read_text()) for c in (out, copy)]
    assert [r["ckpt"] for r in reports] == [str(out), str(copy)] and all(r["ppl"] > 1 for r in reports)
    with pytest.raises(SystemExit, match="nothing was overwritten"):
        llmkit(["quantize", f"ckpt={tiny_checkpoint}", f"out={out}"])
