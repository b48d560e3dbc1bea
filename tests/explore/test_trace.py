"""The explorer's instrumented forward: correct attention, unchanged logits, honest statistics, a stable schema."""

from __future__ import annotations

import base64
import itertools
import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

from llmkit.explore.page import SCHEMA_VERSION, payload, render
from llmkit.explore.server import make_server
from llmkit.explore.trace import head_statistics, logit_lens, top_predictions, trace
from llmkit.model import ModelConfig, Transformer
from llmkit.text.tokenizer import CharTokenizer

TEXT = "the quick brown fox jumps over the lazy dog. " * 4
TOK = CharTokenizer.train([TEXT])
VARIANTS = {
    "gpt": {},
    "post_ln_alibi_gqa": {"block": {"name": "post_ln"}, "position": {"name": "alibi"},
                          "attention": {"name": "causal", "n_kv_heads": 2}},
    "t5_window": {"position": {"name": "t5"}, "attention": {"name": "causal", "window": 8}},
    "rope_mqa_moe": {"position": {"name": "rope"}, "attention": {"name": "causal", "n_kv_heads": 1},
                     "ffn": {"name": "moe", "n_experts": 4, "top_k": 2}},
}


def model(**overrides: object) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **overrides)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # make every path matter (init leaves biases and tables near zero)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("name", list(VARIANTS))
def test_attention_rows_sum_to_1_are_causal_and_respect_the_window(name: str) -> None:
    m = model(**VARIANTS[name])
    t = trace(m, TOK.encode(TEXT[:40]))
    L, H, T, _ = t.attention.shape
    assert (L, H, T) == (2, 4, 40)
    torch.testing.assert_close(t.attention.sum(-1), torch.ones(L, H, T))
    q, k = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    hidden = k > q
    window = m.cfg.attention.get("window")
    if window:
        hidden |= q - k >= window
    assert t.attention[..., hidden].abs().max() == 0


@pytest.mark.parametrize("name", list(VARIANTS))
def test_instrumented_logits_equal_the_plain_sdpa_forward(name: str) -> None:
    m = model(**VARIANTS[name])
    ids = TOK.encode(TEXT[:40])
    with torch.no_grad():
        plain = m(torch.tensor([ids]))[0]
    t = trace(m, ids)
    torch.testing.assert_close(t.logits, plain, rtol=1e-5, atol=1e-5)  # fp32: eager and sdpa sum in other orders
    assert all(b.attention.kernel.__name__ == "sdpa_attention" for b in m.blocks), "the recorder is taken away after"
    if "moe" in name:
        assert set(t.routing) == {0, 1} and t.routing[0]["experts"].shape == (40, 2)


def test_top_k_is_the_softmax_of_the_logits_and_the_lens_last_layer_is_the_prediction() -> None:
    m = model()
    ids = TOK.encode(TEXT[:30])
    t = trace(m, ids)
    preds = top_predictions(t.logits, ids, k=5)
    probs = t.logits.softmax(-1)
    expected_p, expected_i = probs.topk(5, dim=-1)
    torch.testing.assert_close(preds["top_probs"], expected_p)
    assert torch.equal(preds["top_ids"], expected_i)
    for i in range(len(ids) - 1):
        assert preds["next_prob"][i] == pytest.approx(probs[i, ids[i + 1]].item())
        assert preds["next_rank"][i] == (probs[i] > probs[i, ids[i + 1]]).sum()
    lens = logit_lens(t.lens, t.logits)
    assert torch.equal(lens["top_ids"][-1], t.logits.argmax(-1))  # the last block through norm + head is the model
    torch.testing.assert_close(lens["final_prob"][-1], probs.max(-1).values)


def test_previous_token_and_entropy_statistics_on_known_patterns() -> None:
    T = 24
    attention = torch.full((2, 4, T, T), 1 / T)  # uniform rows (not causal: only the statistics matter here)
    exact = torch.zeros(T, T)
    exact[torch.arange(1, T), torch.arange(T - 1)] = 1.0
    exact[0, 0] = 1.0
    attention[0, 0] = exact
    stats = head_statistics(attention)
    assert stats["previous_token"][0, 0] == pytest.approx(1.0)
    assert stats["previous_token"][1, 3] == pytest.approx(1 / T)
    assert stats["entropy"][0, 0] == pytest.approx(0.0, abs=1e-6)
    assert stats["entropy"][1, 3] == pytest.approx(torch.log(torch.tensor(float(T))).item(), rel=1e-5)


def test_a_built_previous_token_head_is_found_by_the_trace() -> None:
    """One layer, one head, built so that it attends to the previous position: tokens embed as zero,
    position i as the unit vector e_i, the query of position i points along e_(i-1) and keys along
    their own position (after the layer norm, e_i is about 8 e_i minus a constant)."""
    cfg = ModelConfig(vocab_size=TOK.vocab_size, d_model=64, n_layers=1, n_heads=1, max_seq_len=32)
    m = Transformer(cfg).eval()
    d = cfg.d_model
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.position.table.weight.copy_(torch.eye(d)[: cfg.max_seq_len])
        block = m.blocks[0]
        block.norm_1.weight.fill_(1.0)
        rows = torch.arange(cfg.max_seq_len - 1)
        block.attention.wqkv.weight[rows, rows + 1] = 30.0  # query row i - 1 reads position i
        block.attention.wqkv.weight[d + rows, rows] = 1.0  # key row j reads position j
    stats = head_statistics(trace(m, TOK.encode(TEXT[:20])).attention)
    assert stats["previous_token"][0, 0] > 0.95


def test_payload_matches_its_schema_and_the_page_inlines_it() -> None:
    m = model(**VARIANTS["rope_mqa_moe"])
    data = payload(m, TOK, TEXT[:33], top_k=3, induction_length=8)
    assert data["version"] == SCHEMA_VERSION
    assert set(data) == {"version", "model", "prompt", "tokens", "ids", "layers", "heads", "length", "attention", "stats",
                         "predictions", "lens", "residual_norms", "routing"}
    L, H, T = data["layers"], data["heads"], data["length"]
    assert (L, H, T) == (2, 4, 33) and "".join(data["tokens"]) == TEXT[:33]
    raw = base64.b64decode(data["attention"])
    assert len(raw) == L * H * T * T
    rows = torch.tensor(list(raw), dtype=torch.float32).view(L, H, T, T).sum(-1) / 255
    assert (rows - 1).abs().max() < T * 0.5 / 255  # each byte rounds by at most half a step
    for stat in ("entropy", "previous_token", "first_token", "induction"):
        assert torch.tensor(data["stats"][stat]).shape == (L, H)
    assert len(data["predictions"]) == T and all(len(p["top"]) == 3 for p in data["predictions"])
    assert data["predictions"][-1]["next_rank"] == -1 and data["predictions"][-1]["next_prob"] is None
    assert torch.tensor(data["lens"]["final_prob"]).shape == (L, T) and len(data["lens"]["top"]) == L
    assert torch.tensor(data["residual_norms"]).shape == (L + 1, T)
    assert set(data["routing"]) == {"0", "1"} and len(data["routing"]["0"]["experts"]) == T
    assert data["model"]["params"] == m.num_params() and data["model"]["components"]["ffn"]["name"] == "moe"
    html = render(data)
    assert "__LLMKIT_DATA__" not in html and "http://" not in html and "https://" not in html  # nothing to fetch
    inlined = html.split('<script id="data" type="application/json">')[1].split("</script>")[0]
    assert json.loads(inlined.replace("<\\/", "</"))["ids"] == data["ids"]


def test_an_empty_prompt_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="prompt encodes to no tokens"):
        payload(model(), TOK, "")


def test_every_registry_combination_traces() -> None:
    from tests.test_plan import GROUPS, OPTIONS

    ids = TOK.encode(TEXT[:20])
    for combo in itertools.product(*(OPTIONS[g] for g in GROUPS)):
        m = model(**dict(zip(GROUPS, combo, strict=True)))
        t = trace(m, ids)
        with torch.no_grad():
            torch.testing.assert_close(t.logits, m(torch.tensor([ids]))[0], rtol=1e-5, atol=1e-5)


def test_the_server_answers_the_page_and_new_prompts() -> None:
    server = make_server(model(), TOK, TEXT[:20], port=0, top_k=3, induction_length=8)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        page = urllib.request.urlopen(f"{base}/", timeout=30).read().decode()
        assert '"serve":true' in page
        reply = json.loads(urllib.request.urlopen(f"{base}/trace?prompt=lazy%20dog", timeout=30).read())
        assert "".join(reply["tokens"]) == "lazy dog"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/trace?prompt=", timeout=30)
        assert err.value.code == 400 and "no tokens" in json.loads(err.value.read())["error"]
    finally:
        server.shutdown()
        server.server_close()
