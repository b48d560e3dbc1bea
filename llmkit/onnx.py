"""ONNX export of a llmkit model as a decoder with a KV cache, and an ONNX Runtime decoder over it.

The graph takes the inputs Optimum and onnxruntime-genai use for decoder-only models:

    input_ids (B, T)  attention_mask (B, P + T)  position_ids (B, T)  past_key_values.{i}.key / .value (B, Hkv, P, D)
    -> logits (B, T, V)  present.{i}.key / .value (B, Hkv, P + T, D)

attention_mask covers the past and the new tokens (1 = a token, 0 = padding); position_ids are
attention_mask.cumsum(-1) - 1 over the new tokens, as Optimum computes them. A key's position comes from the
mask, so left-padded rows of a batch each count their own positions; padding gets a position no query reaches
and is never attended to. P = 0 (empty past tensors) is the prefill.

The graph is the model's own forward (its blocks, norms, position scheme and FFN), with each block's attention
swapped for the duration of one call for a stand-in that appends the new keys and values to the past ones and
runs the eager kernel: the same math as every kernel, written in ops every ONNX runtime has. Components with
no ONNX equivalent here (MoE routing's data-dependent dispatch) stop the export naming the part, as the
Hugging Face exporter does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from llmkit.model import ModelConfig, Transformer
from llmkit.model.kernels import eager_attention
from llmkit.model.positions import PositionContext
from llmkit.text.tokenizer import Tokenizer, load_tokenizer

MODEL_FILE = "model.onnx"
CONFIG_FILE = "llmkit_onnx.json"
FORMAT = 1
# what the export has been checked with (tests/export/test_onnx.py); MoE's expert dispatch is data-dependent
EXPORTABLE = {"block": {"pre_ln", "post_ln"}, "norm": {"layernorm", "rmsnorm"}, "ffn": {"mlp", "swiglu"},
              "position": {"none", "learned", "sinusoidal", "rope", "alibi", "t5"}, "attention": {"causal"}}


class OnnxExportError(ValueError):
    pass


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, naming it, a component the ONNX graph cannot express."""
    for group, names in EXPORTABLE.items():
        name = getattr(cfg, group)["name"]
        if name not in names:
            raise OnnxExportError(f"model.{group}={name} has no ONNX export in llmkit (supported: {sorted(names)}); "
                                  "export it to Hugging Face instead (llmkit export format=hf)")


class _PastAttention(nn.Module):
    """Stands in for a block's attention: the new tokens' keys and values appended to the past ones."""

    def __init__(self, attention: nn.Module, past_k: Tensor, past_v: Tensor, ctx: PositionContext,
                 presents: list[Tensor]) -> None:
        super().__init__()
        self.attention, self.past_k, self.past_v, self.ctx, self.presents = attention, past_k, past_v, ctx, presents

    def forward(self, x: Tensor, rotate: PositionContext) -> Tensor:
        attention = self.attention
        q, k, v = attention.project(x, rotate)  # rotated at the new tokens' own positions
        k = torch.cat([self.past_k, k], dim=2)  # (B, Hkv, P + T, D)
        v = torch.cat([self.past_v, v], dim=2)
        self.presents += [k, v]
        return attention.output(eager_attention(q, k, v, self.ctx, attention.window, 0.0))  # (B, T, C)


class DecoderGraph(nn.Module):
    """What is exported: (input_ids, attention_mask, position_ids, *past) -> (logits, *presents)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past: list[Tensor]) -> tuple[Tensor, ...]:
        model, T = self.model, input_ids.size(1)
        valid = attention_mask > 0
        # a key's position counts the real tokens before it in its row; padding sits where no query reaches
        k_pos = torch.where(valid, attention_mask.cumsum(-1) - 1, model.cfg.max_seq_len)  # (B, P + T)
        pos = position_ids.clamp(min=0)  # (B, T): padding embeds as position 0, masked anyway
        rotate = model.position.context(pos, pos)
        attend = model.position.attention_context(k_pos[:, -T:], k_pos)
        presents: list[Tensor] = []
        blocks, originals = model.blocks, [block.attention for block in model.blocks]
        try:
            for i, block in enumerate(blocks):
                block.attention = _PastAttention(originals[i], past[2 * i], past[2 * i + 1], attend, presents)
            x = model.dropout(model.position.embed(model.tok_emb(input_ids), pos))  # (B, T, C)
            for block in blocks:
                x = block(x, rotate)
        finally:
            for block, original in zip(blocks, originals, strict=True):
                block.attention = original
        return (model.head(model.norm(x)), *presents)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def _kv_shape(cfg: ModelConfig) -> tuple[int, int]:
    n_kv = cfg.attention.get("n_kv_heads") or cfg.n_heads
    return n_kv, cfg.head_dim


def export_onnx(model: Transformer, tokenizer: Tokenizer | None, out: str | Path, quantize: str | None = None,
                chat_template: str | None = None) -> Path:
    """Write out/model.onnx (+ llmkit_onnx.json, the tokenizer); quantize=int8 for int8 MatMul weights.
    chat_template: the one the model was post-trained with, recorded for `llmkit serve`."""
    cfg = model.cfg
    check_exportable(cfg)
    if quantize not in (None, "none", *QUANTIZERS):
        raise OnnxExportError(f"quantize={quantize}: use one of {', '.join(QUANTIZERS)}, or null")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inputs, outputs = io_names(cfg.n_layers)
    n_kv, head_dim = _kv_shape(cfg)
    # sizes >= 2 and all different, so that no dimension is specialised to the example's value
    B, T, P = 2, 3, 5
    past = [torch.zeros(B, n_kv, P, head_dim) for _ in range(2 * cfg.n_layers)]
    example = (torch.zeros(B, T, dtype=torch.long), torch.ones(B, P + T, dtype=torch.long),
               torch.arange(P, P + T).repeat(B, 1), past)
    # DYNAMIC, not named Dims: the mask's length is the past's plus the new tokens', a relation export infers
    dynamic = torch.export.Dim.DYNAMIC
    token_axes = {0: dynamic, 1: dynamic}
    shapes = (token_axes, token_axes, token_axes, [{0: dynamic, 2: dynamic} for _ in past])
    target = out / MODEL_FILE
    with torch.no_grad():
        torch.onnx.export(DecoderGraph(model.eval().float()), example, target, input_names=inputs, output_names=outputs,
                          dynamic_shapes=shapes, dynamo=True, opset_version=18, external_data=False, verbose=False)
    if quantize in QUANTIZERS:
        QUANTIZERS[quantize](target)
    if tokenizer is not None:
        tokenizer.save(out)
    meta = {"format": FORMAT, "model_config": cfg.to_dict(), "n_kv_heads": n_kv, "head_dim": head_dim,
            "quantize": quantize if quantize != "none" else None, "chat_template": chat_template,
            "inputs": inputs, "outputs": outputs}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out


def _quantize_int8(path: Path) -> None:
    """int8 weights of every MatMul (onnxruntime's dynamic quantization: activations quantized per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name(path.name + ".int8")
    quantize_dynamic(path, tmp, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    tmp.replace(path)


def _blockwise(bits: int, block_size: int = 32) -> Callable[[Path], None]:
    """MatMulNBits: every MatMul's weight as `bits`-bit integers with a scale per block of `block_size` input
    rows (symmetric), dequantized inside onnxruntime's kernel; activations stay fp32."""

    def quantize(path: Path) -> None:
        import logging

        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line a node
        quantizer = MatMulNBitsQuantizer(onnx.load(path), bits=bits, block_size=block_size, is_symmetric=True)
        quantizer.process()
        tmp = path.with_name(path.name + f".q{bits}")
        quantizer.model.save_model_to_file(str(tmp), use_external_data_format=False)
        tmp.replace(path)

    return quantize


# quantize= choices: int8 dynamic (per-channel weights, activations quantized per call); q4 / q8 blockwise weights
QUANTIZERS: dict[str, Callable[[Path], None]] = {"int8": _quantize_int8, "q4": _blockwise(4), "q8": _blockwise(8)}


# ---- running it ------------------------------------------------------------------------------------


@dataclass
class OnnxModel:
    session: Any  # onnxruntime.InferenceSession
    cfg: ModelConfig
    tokenizer: Tokenizer | None
    n_kv_heads: int
    head_dim: int
    quantize: str | None
    chat_template: str | None = None


def is_onnx_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def load_onnx(directory: str | Path, threads: int | None = None) -> OnnxModel:
    """An exported directory, checked file by file before onnxruntime opens it."""
    import onnxruntime as ort

    directory = Path(directory)
    for name in (MODEL_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a llmkit ONNX export: {name} is missing "
                                    f"(write one with llmkit export format=onnx ckpt=... out={directory})")
    meta = json.loads((directory / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / CONFIG_FILE}: format {meta.get('format')}, this llmkit reads {FORMAT}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(directory / MODEL_FILE), options, providers=["CPUExecutionProvider"])
    tokenizer = load_tokenizer(directory) if any(directory.glob("llmkit_tokenizer.json")) else None
    return OnnxModel(session, ModelConfig.from_dict(meta["model_config"]), tokenizer, meta["n_kv_heads"],
                     meta["head_dim"], meta.get("quantize"), meta.get("chat_template"))


class OnnxDecoder:
    """The CachedDecoder interface (prefill, step -> (B, V) float logits) over an ONNX Runtime session, so
    llmkit's sampling loop (llmkit/generation/sampling.py) and its tests drive either one."""

    def __init__(self, onnx: OnnxModel) -> None:
        self.onnx = onnx
        self.inputs, self.outputs = io_names(onnx.cfg.n_layers)
        self.past: list[np.ndarray] = []
        self.mask = np.zeros((0, 0), dtype=np.int64)

    def prefill(self, contexts: list[list[int]]) -> Tensor:
        longest = max(len(c) for c in contexts)
        ids = np.array([[0] * (longest - len(c)) + list(c) for c in contexts], dtype=np.int64)  # (B, P) left-padded
        self.mask = np.array([[0] * (longest - len(c)) + [1] * len(c) for c in contexts], dtype=np.int64)
        shape = (len(contexts), self.onnx.n_kv_heads, 0, self.onnx.head_dim)
        self.past = [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.onnx.cfg.n_layers)]
        return self._run(ids)

    def step(self, tokens: list[int]) -> Tensor:
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
        return self._run(np.array(tokens, dtype=np.int64)[:, None])

    def _run(self, ids: np.ndarray) -> Tensor:
        T = ids.shape[1]
        positions = (self.mask.cumsum(-1) - 1)[:, -T:].clip(min=0)  # Optimum's position_ids
        feed = dict(zip(self.inputs, [ids, self.mask, positions, *self.past], strict=True))
        logits, *self.past = self.onnx.session.run(self.outputs, feed)
        return torch.from_numpy(logits[:, -1]).float()  # (B, V)
