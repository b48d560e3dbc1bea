"""The lm-eval-harness adapter: its loglikelihoods equal llmkit's own, and `--model llmkit` runs a task
defined in local files (no hub download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmkit.cli import main as llmkit
from llmkit.evaluate import perplexity
from llmkit.generation import generate
from llmkit.model import Transformer
from llmkit.text.tokenizer import CharTokenizer
from tests.model.helpers import tiny_model

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from llmkit.lm_eval_adapter import LLMKitLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOK = CharTokenizer("abcdefghijklmnopqrstuvwxyz ?.\n")
DOCS = [
    {"question": "is the sky blue?", "choices": ["yes", "no", "maybe"], "answer": 0},
    {"question": "what comes after a b c?", "choices": ["d", "z"], "answer": 0},
    {"question": "pick one", "choices": ["apple", "pear", "plum"], "answer": 2},
    {"question": "cats or dogs?", "choices": ["cats", "dogs"], "answer": 1},
]


def _model() -> Transformer:
    return tiny_model(vocab_size=TOK.vocab_size, position={"name": "rope"}, norm={"name": "rmsnorm"})


def _request(kind: str, *args: object) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def direct_loglikelihood(model: Transformer, context: str, continuation: str) -> tuple[float, bool]:
    stripped = context.rstrip()  # as lm_eval's HF model: trailing whitespace of the context is scored with the continuation
    context, continuation = stripped, context[len(stripped) :] + continuation
    ctx = TOK.encode(context) if context else TOK.encode("\n\n")  # char tokenizer: no eos, "\n\n" separates documents
    cont = TOK.encode(continuation)
    full = (ctx + cont)[-(model.cfg.max_seq_len + 1) :]
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([full[:-1]]))[0].double(), dim=-1)[-len(cont) :]
    target = torch.tensor(cont)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def test_loglikelihoods_equal_llmkit_own() -> None:
    model = _model()
    lm = LLMKitLM(model=model, tokenizer=TOK, batch_size=3)
    pairs = [("is the sky blue?", " yes"), ("", "abc"), ("ab ", "c"), ("x" * 40, " long context is cut"), ("a", "b")]
    got = lm.loglikelihood([_request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (ll, greedy) in zip(pairs, got, strict=True):
        want, want_greedy = direct_loglikelihood(model, context, continuation)
        assert ll == pytest.approx(want, rel=1e-6) and greedy == want_greedy  # batched vs alone: fp32 rounding
    # a greedy continuation is recognised as such
    prompt = "the sky"
    new = TOK.decode(generate(model, [TOK.encode(prompt)], 5, temperature=0.0)[0])
    assert lm.loglikelihood([_request("loglikelihood", prompt, new)])[0][1] is True


def test_rolling_loglikelihood_and_generate_until() -> None:
    model = _model()
    lm = LLMKitLM(model=model, tokenizer=TOK, batch_size=2)
    text = "the quick brown fox jumps over the lazy dog. " * 2
    (rolling,) = lm.loglikelihood_rolling([_request("loglikelihood_rolling", text)])
    ids = torch.tensor(TOK.encode("\n\n") + TOK.encode(text))
    ppl = perplexity(model, ids, context=model.cfg.max_seq_len, stride=model.cfg.max_seq_len)
    assert ppl.tokens == len(TOK.encode(text)) + 1  # the prefix's second "\n" is scored too
    assert rolling == pytest.approx(-ppl.nll * ppl.tokens, rel=1e-6)

    (out,) = lm.generate_until([_request("generate_until", "the sky", {"until": ["z"], "max_gen_toks": 12})])
    full = TOK.decode(generate(model, [TOK.encode("the sky")], 12, temperature=0.0)[0])
    assert out == full.split("z")[0]


@pytest.mark.slow
def test_lm_eval_command_with_a_local_task(tmp_path: Path, monkeypatch, capsys) -> None:
    model = _model()
    ckpt = tmp_path / "model.ckpt"
    torch.save({"model_config": model.cfg.to_dict(), "global_step": 1,
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "LMDataModule": {"tokenizer": TOK.to_state()}}, ckpt)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "local_mc.yaml").write_text(
        "task: llmkit_local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_target: answer\n"
        "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n"
    )
    # in this process (lm_eval is imported already: a subprocess would spend most of its time importing it)
    for key, value in {"HF_HOME": str(tmp_path / "hf_home"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    llmkit(["lm-eval", f"ckpt={ckpt}", "tasks=llmkit_local_mc", "device=cpu", f"include_path={tasks}", "builtin_tasks=false",
            "out=results.json"])
    assert "llmkit_local_mc" in capsys.readouterr().out  # lm_eval's table
    acc = json.loads((tmp_path / "results.json").read_text())["results"]["llmkit_local_mc"]["acc,none"]
    correct = 0
    for doc in DOCS:
        scores = [direct_loglikelihood(model, doc["question"], " " + c)[0] for c in doc["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    assert acc == pytest.approx(correct / len(DOCS))
