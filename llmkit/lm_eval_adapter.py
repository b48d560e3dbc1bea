"""lm-evaluation-harness model adapter, used by `llmkit lm-eval` (and lm_eval's own API as model "llmkit").

    llmkit lm-eval ckpt=runs/x/checkpoints/last.ckpt tasks=hellaswag batch_size=8 [include_path=my_tasks/]

Importing this module registers the model under the name "llmkit" (lm_eval has no plugin discovery).
Model args: ckpt (a llmkit checkpoint) or hf (a directory written by `llmkit export`),
device, batch_size, max_length (default: the model's max_seq_len).

Requests are scored as lm_eval's Hugging Face model does: the continuation's tokens are those of
encode(context + continuation) after encode(context); an empty context starts from the end-of-document
token (a char tokenizer has none: "\\n\\n", the document separator of its training data); contexts
longer than max_length keep their last tokens. Rolling loglikelihoods score every token once in
non-overlapping windows (llmkit.evaluate.nll_sum). generate_until decodes greedily (or samples when
do_sample=True) with the KV cache and cuts the text at the first `until` string.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llmkit.checkpoint import load_checkpoint
from llmkit.evaluate import nll_sum
from llmkit.generation import generate
from llmkit.model import Transformer
from llmkit.text.tokenizer import Tokenizer


@register_model("llmkit")
class LLMKitLM(LM):
    def __init__(
        self, ckpt: str | None = None, hf: str | None = None, device: str | None = None, batch_size: int | str = 8,
        max_length: int | None = None, model: Transformer | None = None, tokenizer: Tokenizer | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):  # lm_eval's default is cuda
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if model is None:
            if bool(ckpt) == bool(hf):
                raise ValueError("give exactly one of ckpt=<llmkit checkpoint> or hf=<exported directory>")
            if ckpt:
                loaded = load_checkpoint(ckpt, map_location=device)
                model, tokenizer = loaded.model, loaded.tokenizer
            else:
                from llmkit.hf import import_hf

                model, tokenizer = import_hf(hf)
        if tokenizer is None:
            raise ValueError("the model has no tokenizer; lm_eval requests are text")
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self._device = torch.device(device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" is not supported: 8
        self.max_length = int(max_length or model.cfg.max_seq_len)
        eos = tokenizer.eos_id
        self.prefix = [eos] if eos is not None and eos >= 0 else tokenizer.encode("\n\n")

    # ---- helpers ----
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())  # trailing spaces belong to the continuation, as in HFLM
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return list(self.prefix), self.tokenizer.encode(continuation)
        whole, ctx = self.tokenizer.encode(context + continuation), self.tokenizer.encode(context)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding would produce it."""
        results: list[tuple[float, bool]] = []
        for i in range(0, len(pairs), self.batch_size):
            rows = []
            for ctx, cont in pairs[i : i + self.batch_size]:
                if not cont or len(cont) > self.max_length:
                    raise ValueError(f"a continuation of {len(cont)} tokens cannot be scored (1 to max_length={self.max_length})")
                full = (ctx + cont)[-(self.max_length + 1):]
                rows.append((full[:-1], full[-len(cont):]))
            width = max(len(inp) for inp, _ in rows)
            batch = torch.zeros(len(rows), width, dtype=torch.long)  # right padding: causal, so harmless
            for r, (inp, _) in enumerate(rows):
                batch[r, : len(inp)] = torch.tensor(inp)
            logprobs = F.log_softmax(self.model(batch.to(self._device)).double(), dim=-1)
            for r, (inp, cont) in enumerate(rows):
                lp = logprobs[r, len(inp) - len(cont) : len(inp)]  # (len(cont), V)
                target = torch.tensor(cont, device=lp.device)
                total = lp.gather(-1, target[:, None]).sum().item()
                results.append((total, bool((lp.argmax(-1) == target).all())))
        self.model.pop_aux_losses()
        self.model.pop_metrics()
        return results

    # ---- the lm_eval interface ----
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._score([self._encode_pair(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            ids = torch.tensor(self.prefix + self.tokenizer.encode(req.args[0]))
            total, _, _ = nll_sum(self.model, ids, self.max_length, self.max_length, self.batch_size)
            out.append(-total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            sample = bool(kwargs.pop("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
            temperature = float(kwargs.get("temperature", 1.0)) if sample else 0.0
            ids = (self.tokenizer.encode(context) if context else list(self.prefix))[-self.max_length:]
            stop = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None and self.tokenizer.eos_id >= 0 else []
            new = generate(self.model, [ids], max_new, temperature=temperature, stop_ids=stop)[0]
            text = self.tokenizer.decode(new)
            cut = min((text.find(s) for s in until if s and s in text), default=len(text))
            out.append(text[:cut])
        return out
