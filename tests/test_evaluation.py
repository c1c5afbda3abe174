"""evaluation.py: windows, perplexity and accuracy against a hand computation, router choices."""

import math

import numpy as np

import pytest
import torch

from moeoffload import evaluation


def test_windows_prefix_bos_and_drop_the_ragged_tail():
    x = evaluation.windows(list(range(10)), seq=4, bos=99)
    assert x.tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    assert evaluation.windows(list(range(9)), seq=3, bos=None).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="at least 3 tokens"):
        evaluation.windows([1, 2], seq=4, bos=0)


def test_encode_without_a_tokenizer_is_bytes(tmp_path):
    assert evaluation.encode(tmp_path, None, b"ab\xff") == [97, 98, 255]


class _Fixed(torch.nn.Module):
    """A language model whose next-token distribution is always the same."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.logits.expand(*input_ids.shape, -1)})()


def test_perplexity_and_accuracy_by_hand():
    model = _Fixed([0.0, math.log(3.0)])  # p(1) = 3/4, p(0) = 1/4
    batches = torch.tensor([[0, 1, 1, 0]])  # targets 1, 1, 0
    got = evaluation.evaluate(model, batches)
    nll = -(2 * math.log(0.75) + math.log(0.25)) / 3
    assert got["nll"] == pytest.approx(nll) and got["ppl"] == pytest.approx(math.exp(nll))
    assert got["acc"] == pytest.approx(2 / 3) and got["tokens"] == 3


def test_router_choices_shape_and_range():
    from conftest import E, L, mixtral_model

    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    ch = evaluation.router_choices(mixtral_model(), ids)
    assert ch.shape == (3, 5, L, 2) and ch.max() < E
    assert (ch[..., 0] != ch[..., 1]).all()  # top-2 picks two different experts


def test_more_than_256_experts_are_not_wrapped_and_batches_are_checked():
    # router_choices returned uint8: expert 298 came back as 42, and the study's usage counts with it.
    import transformers

    from moeoffload.errors import InvalidArgumentError
    from moeoffload.prefetch import hidden_predictions

    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=300,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    ch = evaluation.router_choices(model, ids)
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits[0]
    want = logits.view(4, 16, -1).topk(2, dim=-1).indices.numpy()
    assert ch.dtype != np.uint8 and (ch[:, :, 0] == want).all() and ch.max() >= 256
    for call in (lambda: evaluation.router_choices(model, ids, batch_size=0),
                 lambda: hidden_predictions(model, ids, batch=-1),  # all zeros, silently
                 lambda: evaluation.evaluate(model, ids, batch_size=-1),
                 lambda: evaluation.evaluate(model, ids[:, :1])):  # ZeroDivisionError
        with pytest.raises(InvalidArgumentError):
            call()
