"""Hugging Face export and import: llmkit <-> `transformers` directories (config.json + safetensors + tokenizer).

    export_hf(model, tokenizer, "out/")    # LlamaForCausalLM, GPT2LMHeadModel or MixtralForCausalLM
    model, tokenizer = import_hf("out/")   # back into a llmkit Transformer

Which Hugging Face architecture a model becomes is decided from its config (`hf_architecture`):
  llama    pre_ln + rmsnorm + rope + swiglu, any n_kv_heads, no attention window
  gpt2     pre_ln + layernorm + learned positions + GELU mlp + one kv head per query head, no window
           (a model without biases exports with zero biases: GPT-2 always has them)
  mixtral  as llama, with ffn=moe of swiglu experts, softmax router, normalised top-k weights,
           MoE in every layer, no shared experts, no biases
Anything else fails with a message naming each part that has no Hugging Face equivalent.

Weights are written with safetensors and read back with safetensors (never unpickled). config.json
also carries the llmkit model config (`llmkit_model_config`), so export -> import is exact; a
directory written by `transformers` itself is imported from its own config fields.

Tokenizers: a sentencepiece tokenizer is written as `tokenizer.model` (what LlamaTokenizer reads);
a char tokenizer has no Hugging Face class, so only llmkit can read it back (`llmkit_tokenizer.json`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmkit.model import ModelConfig, Transformer
from llmkit.text.tokenizer import CharTokenizer, SentencePieceTokenizer, Tokenizer

LLMKIT_CONFIG_KEY = "llmkit_model_config"
TOKENIZER_FILE = "llmkit_tokenizer.json"  # not tokenizer.json: that name belongs to HF fast tokenizers
WEIGHTS_FILE = "model.safetensors"


class ExportError(ValueError):
    """The model has a part with no Hugging Face equivalent."""


# ---- which architecture ------------------------------------------------------------------------------
def _opt(spec: dict[str, Any], key: str, default: Any) -> Any:
    value = spec.get(key)
    return default if value is None else value


def hf_architecture(cfg: ModelConfig) -> str:
    """'llama', 'gpt2' or 'mixtral'; raises ExportError naming every part that does not fit."""
    problems: list[str] = []
    if cfg.block["name"] != "pre_ln":
        problems.append(f"block={cfg.block['name']} has no Hugging Face equivalent (llama, gpt2 and mixtral are pre_ln)")
    if _opt(cfg.attention, "window", None) is not None:
        problems.append(f"attention.window={cfg.attention['window']} (sliding window) is not exported")
    norm, position, ffn = cfg.norm["name"], cfg.position["name"], cfg.ffn["name"]
    if norm == "rmsnorm":  # the Llama family
        family = "llama"
        if position != "rope":
            problems.append(f"position={position} has no Hugging Face equivalent with rmsnorm (Llama needs rope)")
        if ffn == "moe":
            family = "mixtral"
            problems += _mixtral_problems(cfg)
        elif ffn != "swiglu":
            problems.append(f"ffn={ffn} has no Hugging Face equivalent with rmsnorm (Llama needs swiglu)")
    elif norm == "layernorm":  # the GPT-2 family
        family = "gpt2"
        if position != "learned":
            problems.append(f"position={position} has no Hugging Face equivalent with layernorm (GPT-2 needs learned)")
        if ffn != "mlp":
            problems.append(f"ffn={ffn} has no Hugging Face equivalent with layernorm (GPT-2 needs the GELU mlp)")
        n_kv = _opt(cfg.attention, "n_kv_heads", cfg.n_heads)
        if n_kv != cfg.n_heads:
            problems.append(f"attention.n_kv_heads={n_kv} (GQA/MQA) has no GPT-2 equivalent (GPT-2 is multi-head)")
    else:
        family = "?"
        problems.append(f"norm={norm} has no Hugging Face equivalent")
    if problems:
        raise ExportError("cannot export to Hugging Face: " + "; ".join(problems))
    return family


def _mixtral_problems(cfg: ModelConfig) -> list[str]:
    moe = cfg.ffn
    checks = [
        (_opt(moe, "expert", "swiglu") == "swiglu", f"ffn.expert={moe.get('expert')} (Mixtral experts are swiglu)"),
        (_opt(moe, "router", "softmax") == "softmax", f"ffn.router={moe.get('router')} (Mixtral routes by softmax)"),
        (_opt(moe, "normalize_weights", True) or _opt(moe, "top_k", 2) == 1,
         "ffn.normalize_weights=false (Mixtral normalises the top-k weights)"),
        (_opt(moe, "n_shared_experts", 0) == 0, f"ffn.n_shared_experts={moe.get('n_shared_experts')} (Mixtral has none)"),
        (_opt(moe, "every", 1) == 1, f"ffn.every={moe.get('every')} (Mixtral has MoE in every layer)"),
        (not cfg.bias, "model.bias=true (Mixtral has no biases)"),
    ]
    return [f"{what} has no Hugging Face equivalent" for ok, what in checks if not ok]


# ---- export -----------------------------------------------------------------------------------------
def hf_config(model: Transformer, tokenizer: Tokenizer | None = None) -> Any:
    """The `transformers` config object of the architecture `model` maps to."""
    import transformers

    cfg = model.cfg
    family = hf_architecture(cfg)
    eos = getattr(tokenizer, "eos_id", None)
    eos = eos if eos is not None and eos >= 0 else None
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, eos_token_id=eos, bos_token_id=None)
    if family == "gpt2":
        return transformers.GPT2Config(
            **common, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_positions=cfg.max_seq_len,
            n_inner=model.blocks[0].ffn.w_in.out_features, activation_function="gelu",
            layer_norm_epsilon=_opt(cfg.norm, "eps", 1e-5), resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, initializer_range=cfg.init_std, architectures=["GPT2LMHeadModel"],
        )
    llama_like = dict(
        **common, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=_opt(cfg.attention, "n_kv_heads", cfg.n_heads), head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=_opt(cfg.norm, "eps", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": float(_opt(cfg.position, "theta", 10000.0))},
        attention_dropout=cfg.dropout, initializer_range=cfg.init_std,
    )
    if family == "llama":
        return transformers.LlamaConfig(
            **llama_like, intermediate_size=model.blocks[0].ffn.w_gate.out_features, attention_bias=cfg.bias,
            mlp_bias=cfg.bias, architectures=["LlamaForCausalLM"],
        )
    moe = model.blocks[0].ffn
    return transformers.MixtralConfig(
        **llama_like, intermediate_size=moe.experts.w_out.size(1), num_local_experts=moe.n_experts,
        num_experts_per_tok=moe.top_k, sliding_window=None, router_jitter_noise=0.0, architectures=["MixtralForCausalLM"],
    )


# Hugging Face name -> llmkit name inside one block
GPT2_BLOCK_NAMES = {
    "ln_1": "norm_1", "ln_2": "norm_2", "attn.c_attn": "attention.wqkv", "attn.c_proj": "attention.wo",
    "mlp.c_fc": "ffn.w_in", "mlp.c_proj": "ffn.w_out",
}
LLAMA_MLP_NAMES = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_out"}


def name_pairs(cfg: ModelConfig, family: str) -> list[tuple[str, str, bool]]:
    """(llmkit name, Hugging Face name, stored transposed) of every tensor that maps one to one.
    Export reads the table left to right and import right to left; a pair whose source tensor is
    absent (biases of a bias-free model) is skipped. Fused attention and experts are not in it."""
    if family == "gpt2":
        pairs = [("tok_emb.weight", "transformer.wte.weight", False), ("position.table.weight", "transformer.wpe.weight", False),
                 ("norm.weight", "transformer.ln_f.weight", False), ("norm.bias", "transformer.ln_f.bias", False)]
        for i in range(cfg.n_layers):
            for hf, ours in GPT2_BLOCK_NAMES.items():
                conv1d = not hf.startswith("ln")  # GPT-2's Conv1D stores weights as (in, out)
                pairs.append((f"blocks.{i}.{ours}.weight", f"transformer.h.{i}.{hf}.weight", conv1d))
                pairs.append((f"blocks.{i}.{ours}.bias", f"transformer.h.{i}.{hf}.bias", False))
    else:
        pairs = [("tok_emb.weight", "model.embed_tokens.weight", False), ("norm.weight", "model.norm.weight", False)]
        for i in range(cfg.n_layers):
            p, h = f"blocks.{i}.", f"model.layers.{i}."
            pairs += [(p + "norm_1.weight", h + "input_layernorm.weight", False),
                      (p + "norm_2.weight", h + "post_attention_layernorm.weight", False)]
            for suffix in ("weight", "bias"):
                pairs.append((f"{p}attention.wo.{suffix}", f"{h}self_attn.o_proj.{suffix}", False))
                if family == "llama":
                    pairs += [(f"{p}ffn.{ours}.{suffix}", f"{h}mlp.{hf}.{suffix}", False) for hf, ours in LLAMA_MLP_NAMES.items()]
    if not cfg.tie_embeddings:
        pairs.append(("head.weight", "lm_head.weight", False))
    return pairs


def hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """llmkit weights under Hugging Face names (contiguous copies, ready for safetensors)."""
    cfg, family = model.cfg, hf_architecture(model.cfg)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {}
    for ours, hf, transposed in name_pairs(cfg, family):
        if ours in sd:
            out[hf] = sd[ours].t() if transposed else sd[ours]
        elif family == "gpt2" and ours.endswith(".bias"):  # GPT-2 always has biases
            weight = sd[ours.removesuffix("bias") + "weight"]
            out[hf] = torch.zeros(weight.size(0), dtype=weight.dtype)
    if family != "gpt2":
        for i in range(cfg.n_layers):
            export_qkv(sd, out, cfg, f"blocks.{i}.", f"model.layers.{i}.")
            if family == "mixtral":
                _export_experts(sd, out, f"blocks.{i}.", f"model.layers.{i}.")
    return {k: v.contiguous().clone() for k, v in out.items()}


def export_qkv(sd: dict[str, Tensor], out: dict[str, Tensor], cfg: ModelConfig, p: str, h: str) -> None:
    """Our fused (q | k | v) projection as Hugging Face's three."""
    C, kv = cfg.d_model, _opt(cfg.attention, "n_kv_heads", cfg.n_heads) * cfg.head_dim
    for suffix in ("weight", "bias"):
        if p + f"attention.wqkv.{suffix}" in sd:
            q, k, v = sd[p + f"attention.wqkv.{suffix}"].split([C, kv, kv], dim=0)
            for name, part in zip("qkv", (q, k, v), strict=True):
                out[h + f"self_attn.{name}_proj.{suffix}"] = part


def _export_experts(sd: dict[str, Tensor], out: dict[str, Tensor], p: str, h: str) -> None:
    """Mixtral's on-disk layout (transformers 4 and 5): one w1 (gate), w3 (up), w2 (down) per expert."""
    out[h + "block_sparse_moe.gate.weight"] = sd[p + "ffn.router.proj.weight"]
    w_in, w_out = sd[p + "ffn.experts.w_in"], sd[p + "ffn.experts.w_out"]  # (E, C, 2H) [gate | up], (E, H, C)
    for e in range(w_in.size(0)):
        gate, up = w_in[e].t().chunk(2, dim=0)
        x = f"{h}block_sparse_moe.experts.{e}."
        out[x + "w1.weight"], out[x + "w3.weight"], out[x + "w2.weight"] = gate, up, w_out[e].t()


def export_hf(model: Transformer, tokenizer: Tokenizer | None, out_dir: str | Path) -> Path:
    """Write config.json, model.safetensors and the tokenizer files into out_dir; returns out_dir."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    config = hf_config(model, tokenizer)  # fails before anything is written
    setattr(config, LLMKIT_CONFIG_KEY, model.cfg.to_dict())
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file(hf_state_dict(model), str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir)
    return out_dir


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    if isinstance(tokenizer, SentencePieceTokenizer):
        (out_dir / "tokenizer.model").write_bytes(tokenizer.proto)
        sp = tokenizer.sp
        special = {"unk_token": sp.unk_id(), "bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "pad_token": sp.pad_id()}
        tok_config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                      "legacy": True, "add_prefix_space": False, "model_max_length": 1 << 30}
        tok_config.update({k: sp.id_to_piece(i) for k, i in special.items() if i >= 0})
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        (out_dir / TOKENIZER_FILE).write_text(json.dumps({"kind": "sentencepiece", "file": "tokenizer.model"}))
    elif isinstance(tokenizer, CharTokenizer):
        (out_dir / TOKENIZER_FILE).write_text(json.dumps({"kind": "char", "chars": tokenizer.chars}))
    else:
        raise ExportError(f"tokenizer kind '{tokenizer.kind}' cannot be exported")


# ---- import -----------------------------------------------------------------------------------------
def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """llmkit config from a config.json dict: the stored llmkit config if present, else from HF fields."""
    if LLMKIT_CONFIG_KEY in hf:
        return ModelConfig.from_dict(hf[LLMKIT_CONFIG_KEY])
    kind = hf.get("model_type")
    tie = hf.get("tie_word_embeddings", True)
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        unsupported = {"activation_function": (act, act == "gelu"),
                       "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx"),
                                                           not hf.get("scale_attn_by_inverse_layer_idx")),
                       "scale_attn_weights": (hf.get("scale_attn_weights"), hf.get("scale_attn_weights", True))}
        _check_import(kind, unsupported)
        d, inner = hf["n_embd"], hf.get("n_inner") or 4 * hf["n_embd"]
        return ModelConfig(
            vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
            max_seq_len=hf["n_positions"], bias=True, tie_embeddings=tie, init_std=hf.get("initializer_range", 0.02),
            norm={"name": "layernorm", "eps": hf.get("layer_norm_epsilon", 1e-5)},
            attention={"name": "causal", "n_kv_heads": None, "window": None, "kernel": "sdpa"},
            position={"name": "learned"}, ffn={"name": "mlp", "hidden_mult": _mult(inner, d), "multiple_of": 1},
        )
    if kind not in ("llama", "mixtral"):
        raise ValueError(f"cannot import model_type={kind!r}: llmkit imports llama, gpt2 and mixtral")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    head_dim = hf.get("head_dim") or d // heads
    unsupported = {
        "hidden_act": (hf.get("hidden_act"), hf.get("hidden_act", "silu") == "silu"),
        "rope_type": (rope.get("rope_type"), rope.get("rope_type", "default") == "default"),
        "head_dim": (head_dim, head_dim * heads == d),
        "sliding_window": (hf.get("sliding_window"), hf.get("sliding_window") is None),
        "attention_bias/mlp_bias": ((hf.get("attention_bias"), hf.get("mlp_bias")),
                                    bool(hf.get("attention_bias")) == bool(hf.get("mlp_bias"))),
    }
    _check_import(kind, unsupported)
    common = dict(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
        max_seq_len=hf["max_position_embeddings"], bias=bool(hf.get("attention_bias")), tie_embeddings=tie,
        init_std=hf.get("initializer_range", 0.02), norm={"name": "rmsnorm", "eps": hf.get("rms_norm_eps", 1e-6)},
        attention={"name": "causal", "n_kv_heads": hf.get("num_key_value_heads") or heads, "window": None, "kernel": "sdpa"},
        position={"name": "rope", "theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))},
    )
    inter = hf["intermediate_size"]
    if kind == "llama":
        return ModelConfig(**common, ffn={"name": "swiglu", "hidden_mult": _mult(inter, d), "multiple_of": 1})
    k = hf.get("num_experts_per_tok", 2)
    return ModelConfig(**common, ffn={
        "name": "moe", "n_experts": hf["num_local_experts"], "top_k": k, "expert": "swiglu", "hidden_mult": _mult(inter, d),
        "multiple_of": 1, "router": "softmax", "normalize_weights": True, "capacity_factor": None,
        "n_shared_experts": 0, "every": 1, "balance_coef": hf.get("router_aux_loss_coef", 0.001), "z_coef": 0.0,
    })


def _mult(hidden: int, d_model: int) -> float:
    """hidden_mult with multiple_of=1 that gives exactly `hidden` units: llmkit rounds ceil(mult * d_model) up,
    and hidden / d_model * d_model can land a rounding error above `hidden`."""
    return (hidden - 0.5) / d_model


def _check_import(kind: str, fields: dict[str, tuple[Any, bool]]) -> None:
    bad = [f"{name}={value}" for name, (value, ok) in fields.items() if not ok]
    if bad:
        raise ValueError(f"cannot import this {kind} model: {', '.join(bad)} has no llmkit equivalent")


def llmkit_state_dict(hf_sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Hugging Face weights under llmkit names (inverse of hf_state_dict)."""
    family = hf_architecture(cfg)
    sd: dict[str, Tensor] = {}
    for ours, hf, transposed in name_pairs(cfg, family):
        if hf in hf_sd:
            sd[ours] = hf_sd[hf].t() if transposed else hf_sd[hf]
    if family != "gpt2":
        for i in range(cfg.n_layers):
            _import_qkv(hf_sd, sd, f"blocks.{i}.", f"model.layers.{i}.")
            if family == "mixtral":
                _import_experts(hf_sd, sd, f"blocks.{i}.", f"model.layers.{i}.")
    if cfg.tie_embeddings:
        sd["head.weight"] = sd["tok_emb.weight"]
    return {k: v.contiguous() for k, v in sd.items()}


def _import_qkv(hf_sd: dict[str, Tensor], sd: dict[str, Tensor], p: str, h: str) -> None:
    for suffix in ("weight", "bias"):
        if h + f"self_attn.q_proj.{suffix}" in hf_sd:
            sd[p + f"attention.wqkv.{suffix}"] = torch.cat([hf_sd[h + f"self_attn.{x}_proj.{suffix}"] for x in "qkv"], dim=0)


def _import_experts(hf_sd: dict[str, Tensor], sd: dict[str, Tensor], p: str, h: str) -> None:
    if h + "mlp.gate.weight" in hf_sd:  # fused in-memory layout of transformers 5
        sd[p + "ffn.router.proj.weight"] = hf_sd[h + "mlp.gate.weight"]
        sd[p + "ffn.experts.w_in"] = hf_sd[h + "mlp.experts.gate_up_proj"].transpose(1, 2)
        sd[p + "ffn.experts.w_out"] = hf_sd[h + "mlp.experts.down_proj"].transpose(1, 2)
        return
    sd[p + "ffn.router.proj.weight"] = hf_sd[h + "block_sparse_moe.gate.weight"]  # per-expert on-disk layout
    experts = [f"{h}block_sparse_moe.experts.{e}." for e in range(sd[p + "ffn.router.proj.weight"].size(0))]
    sd[p + "ffn.experts.w_in"] = torch.stack(
        [torch.cat([hf_sd[e + "w1.weight"], hf_sd[e + "w3.weight"]], dim=0).t() for e in experts])
    sd[p + "ffn.experts.w_out"] = torch.stack([hf_sd[e + "w2.weight"].t() for e in experts])


def import_hf(directory: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """A llmkit model (eval mode) and tokenizer from a Hugging Face directory (llama, gpt2 or mixtral)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {directory}")
    cfg = model_config_from_hf(json.loads(config_file.read_text()))
    weight_files = sorted(directory.glob("*.safetensors"))
    if not weight_files:
        raise FileNotFoundError(f"no .safetensors weights in {directory} (pickled .bin weights are not loaded)")
    hf_sd: dict[str, Tensor] = {}
    for file in weight_files:
        hf_sd.update(load_file(str(file)))
    model = Transformer(cfg)
    sd = llmkit_state_dict(hf_sd, cfg)
    own = model.state_dict()
    for key, value in own.items():  # biases llmkit's config has but the HF weights lack: none expected
        if key not in sd:
            raise ValueError(f"{directory}: no weight for llmkit parameter {key}")
        sd[key] = sd[key].to(value.dtype)
    model.load_state_dict({k: sd[k] for k in own}, strict=True)
    return model.eval(), load_tokenizer_hf(directory)


def load_tokenizer_hf(directory: Path) -> Tokenizer | None:
    meta = directory / TOKENIZER_FILE
    if meta.exists():
        state = json.loads(meta.read_text())
        if state["kind"] == "char":
            return CharTokenizer(state["chars"])
        return SentencePieceTokenizer((directory / state["file"]).read_bytes())
    if (directory / "tokenizer.model").exists():
        return SentencePieceTokenizer((directory / "tokenizer.model").read_bytes())
    return None
