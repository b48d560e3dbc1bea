"""The explorer page: a trace as JSON, inlined into one self-contained HTML file (no CDN, no build).

Attention probabilities travel as one base64 string of bytes (p x 255, rounded): a 4-layer, 4-head
model at 256 tokens is 1 MB of bytes instead of ~10 MB of JSON numbers; the page decodes them.
"""

from __future__ import annotations

import base64
import json
from importlib import resources
from typing import Any

import torch

from llmkit.explore.trace import finite, head_statistics, induction_scores, logit_lens, top_predictions, trace
from llmkit.model import Transformer

SCHEMA_VERSION = 1


def payload(model: Transformer, tokenizer: Any, prompt: str, top_k: int = 5, induction_length: int = 32) -> dict[str, Any]:
    """Everything the page shows for `prompt`, as JSON-ready data."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens: give some text with prompt=...")
    ids = ids[-model.cfg.max_seq_len :]  # the model sees at most max_seq_len tokens
    t = trace(model, ids, tokenizer.decode)
    preds = top_predictions(t.logits, ids, top_k)
    lens = logit_lens(t.lens, t.logits)
    stats = {k: _rounded(v) for k, v in head_statistics(t.attention).items()}
    stats["induction"] = _rounded(induction_scores(model, induction_length))
    quantized = (t.attention * 255).round().to(torch.uint8).contiguous()  # (L, H, T, T)
    return {
        "version": SCHEMA_VERSION,
        "model": model_card(model),
        "prompt": prompt,
        "tokens": t.tokens,
        "ids": ids,
        "layers": t.attention.size(0),
        "heads": t.attention.size(1),
        "length": len(ids),
        "attention": base64.b64encode(quantized.numpy().tobytes()).decode("ascii"),
        "stats": stats,
        "predictions": [_prediction(preds, i, tokenizer) for i in range(len(ids))],
        "lens": {"top": [[tokenizer.decode([j]) for j in row.tolist()] for row in lens["top_ids"]],
                 "final_prob": _rounded(lens["final_prob"])},
        "residual_norms": _rounded(t.residual_norms),
        "routing": {str(layer): {"experts": r["experts"].tolist(), "weights": _rounded(r["weights"])}
                    for layer, r in t.routing.items()},
    }


def _prediction(preds: dict[str, torch.Tensor], i: int, tokenizer: Any) -> dict[str, Any]:
    top = [[tokenizer.decode([j]), round(p, 4)] for j, p in zip(preds["top_ids"][i].tolist(), preds["top_probs"][i].tolist(),
                                                                  strict=True)]
    next_prob = finite(preds["next_prob"][i].item())
    return {"top": top, "next_prob": None if next_prob is None else round(next_prob, 4),
            "next_rank": int(preds["next_rank"][i]), "entropy": round(preds["entropy"][i].item(), 4)}


def _rounded(x: torch.Tensor, digits: int = 4) -> Any:
    return torch.round(x.float(), decimals=digits).tolist()


def model_card(model: Transformer) -> dict[str, Any]:
    cfg = model.cfg
    return {
        "components": {name: dict(getattr(cfg, name)) for name in ("block", "norm", "position", "attention", "ffn")},
        "sizes": {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                  "max_seq_len": cfg.max_seq_len, "tie_embeddings": cfg.tie_embeddings},
        "params": model.num_params(),
    }


def render(data: dict[str, Any], serve: bool = False) -> str:
    """The page with `data` inlined; `serve` adds the prompt box that asks the local server again."""
    template = resources.files("llmkit.explore").joinpath("template.html").read_text()
    inlined = json.dumps({**data, "serve": serve}, separators=(",", ":")).replace("</", "<\\/")  # stays inside <script>
    return template.replace("__LLMKIT_DATA__", inlined)
