"""Hugging Face export/import: transformers gives the same logits and greedy continuation; the
round trip is exact; parts without a Hugging Face equivalent fail naming the part. Nothing is
downloaded: every Hugging Face model is built from a local config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmkit.generation import generate
from llmkit.hf import ExportError, export_hf, hf_architecture, import_hf
from llmkit.model import Transformer
from tests.model.helpers import VOCAB, tiny_config, tiny_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

LLAMA = dict(
    norm={"name": "rmsnorm", "eps": 1e-6}, position={"name": "rope", "theta": 500.0},
    ffn={"name": "swiglu", "hidden_mult": 8 / 3, "multiple_of": 16}, attention={"name": "causal", "n_kv_heads": 2},
    tie_embeddings=False,
)
GPT2 = dict(norm={"name": "layernorm", "eps": 1e-5}, position={"name": "learned"}, ffn={"name": "mlp"}, bias=True)
MIXTRAL = dict(LLAMA, ffn={"name": "moe", "n_experts": 4, "top_k": 2, "expert": "swiglu"})
CASES = {
    "llama": (LLAMA, "LlamaForCausalLM"),
    "llama_tied_bias": (dict(LLAMA, tie_embeddings=True, bias=True), "LlamaForCausalLM"),
    "gpt2": (GPT2, "GPT2LMHeadModel"),
    "gpt2_nobias_untied": (dict(GPT2, bias=False, tie_embeddings=False), "GPT2LMHeadModel"),
    "mixtral": (MIXTRAL, "MixtralForCausalLM"),
}


def _ids(n: int = 2, t: int = 20) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(1))


def _hf_load(directory: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", CASES)
def test_exported_model_matches_in_transformers(case: str, tmp_path: Path) -> None:
    overrides, arch = CASES[case]
    model = tiny_model(**overrides)
    export_hf(model, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [arch]
    hf = _hf_load(tmp_path)
    assert type(hf).__name__ == arch
    ids = _ids()
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    prompt = ids[:1, :6]
    greedy = generate(model, prompt, 10, temperature=0.0)[0]
    hf_out = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert hf_out[0, 6:].tolist() == greedy


@pytest.mark.parametrize("case", CASES)
def test_round_trip_is_exact(case: str, tmp_path: Path) -> None:
    model = tiny_model(**CASES[case][0])
    export_hf(model, None, tmp_path)
    back, _ = import_hf(tmp_path)
    assert back.cfg == model.cfg
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    ids = _ids()
    assert torch.equal(back(ids), model(ids))


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_import_of_a_directory_written_by_transformers(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, tie_word_embeddings=False)
    if family == "gpt2":
        config = transformers.GPT2Config(**dict(common, tie_word_embeddings=True), n_embd=56, n_layer=2, n_head=4,
                                         n_positions=24, n_inner=225, activation_function="gelu")
    else:
        # 58 / 56 * 56 rounds above 58: the imported hidden size must still be exactly 58
        llama = dict(common, hidden_size=56, intermediate_size=58, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=24, rope_theta=1000.0)
        if family == "llama":
            config = transformers.LlamaConfig(**llama)
        else:  # transformers' CPU grouped_mm needs 16-byte strides: 116 (116 / 56 * 56 rounds above 116 too)
            config = transformers.MixtralConfig(**dict(llama, intermediate_size=116), num_local_experts=4, num_experts_per_tok=2)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path)
    model, tokenizer = import_hf(tmp_path)
    assert tokenizer is None and hf_architecture(model.cfg) == family
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "part"),
    [
        (dict(GPT2, block={"name": "post_ln"}), "block=post_ln"),
        (dict(GPT2, position={"name": "t5"}), "position=t5"),
        (dict(GPT2, position={"name": "alibi"}), "position=alibi"),
        (dict(LLAMA, position={"name": "sinusoidal"}), "position=sinusoidal"),
        (dict(LLAMA, ffn={"name": "mlp"}), "ffn=mlp"),
        (dict(LLAMA, attention={"name": "causal", "window": 8}), "attention.window=8"),
        (dict(GPT2, attention={"name": "causal", "n_kv_heads": 2}), "attention.n_kv_heads=2"),
        (dict(MIXTRAL, ffn={"name": "moe", "router": "sigmoid"}), "ffn.router=sigmoid"),
        (dict(MIXTRAL, ffn={"name": "moe", "n_shared_experts": 1}), "ffn.n_shared_experts=1"),
    ],
)
def test_parts_without_equivalent_fail_naming_the_part(overrides: dict, part: str, tmp_path: Path) -> None:
    model = Transformer(tiny_config(**overrides))
    with pytest.raises(ExportError, match=part.replace(".", r"\.")):
        export_hf(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizers_travel(tmp_path: Path) -> None:
    from llmkit.text.tokenizer import CharTokenizer

    tok = CharTokenizer("abcdefghij")
    model = tiny_model(**GPT2, vocab_size=tok.vocab_size)
    export_hf(model, tok, tmp_path)
    _, back = import_hf(tmp_path)
    assert isinstance(back, CharTokenizer) and back.chars == tok.chars


def test_import_refuses_what_llmkit_cannot_compute(tmp_path: Path) -> None:
    transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4).save_pretrained(tmp_path)  # gelu_new
    with pytest.raises(ValueError, match="activation_function=gelu_new has no llmkit equivalent"):
        import_hf(tmp_path)
