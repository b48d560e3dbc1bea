import pytest
import torch

from llmkit.distributed import apply_compile
from tests.model.helpers import VOCAB, tiny_model


@pytest.mark.slow
def test_compiled_model_matches_eager_forward_and_backward() -> None:
    eager = tiny_model(position={"name": "rope"}, attention={"name": "causal", "n_kv_heads": 2})
    compiled = tiny_model(position={"name": "rope"}, attention={"name": "causal", "n_kv_heads": 2})
    apply_compile(compiled)  # in place, as LitLM does with compile=true: state-dict keys are unchanged
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    idx = torch.randint(0, VOCAB, (2, 17))
    losses = [m.loss(idx[:, :-1], idx[:, 1:]).loss for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.head.weight.grad, eager.head.weight.grad, rtol=1e-4, atol=1e-6)
