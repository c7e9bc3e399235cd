"""Decode-time kernels: a model prepared for decoding gives the logits of the plain model for every family
(float: to rounding; int8: within the quantisation error, and a row's result never depends on the other
rows of the batch), the fused projections cost no copy in float, and load_for_decoding holds each format."""

import copy

import pytest
import torch
from helpers import random_checkpoint

from slmforge.config import load_config
from slmforge.infer import SamplingParams, generate_ids
from slmforge.infer.kernels import Int8Linear, FloatLinear, prepare_for_decoding
from slmforge.infer.load import load_for_decoding
from slmforge.infer.speculative import speculative_greedy
from slmforge.model import build_model

FAMILIES = ["tiny", "nekomind-tiny", "axion1-tiny", "codemind-tiny", "axl-code-tiny", "quickstart"]


def cached_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a 12-token prefill then one token at a time, through the cache."""
    with torch.inference_mode():
        cache = model.new_cache(tokens.shape[0], tokens.shape[1])
        out = [model(tokens[:, :12], cache=cache)[0]]
        for i in range(12, tokens.shape[1]):
            out.append(model(tokens[:, i:i + 1], cache=cache)[0])
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("preset", FAMILIES)
def test_prepared_models_give_the_plain_logits(preset):
    cfg = load_config(preset).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 18), generator=torch.Generator().manual_seed(1))
    plain = cached_logits(model, tokens)
    fast = cached_logits(prepare_for_decoding(copy.deepcopy(model)), tokens)
    torch.testing.assert_close(fast, plain, atol=2e-5, rtol=0)
    batched = cached_logits(prepare_for_decoding(copy.deepcopy(model), batch_rows=16), tokens)  # packed copies
    torch.testing.assert_close(batched, plain, atol=2e-5, rtol=0)
    int8 = cached_logits(prepare_for_decoding(copy.deepcopy(model), "int8"), tokens)
    error = (int8 - plain).abs().max().item()
    assert 0 < error < 0.05 * plain.abs().max().item()  # quantised, and close


def test_float_fusion_shares_the_weights():
    model = build_model(load_config("tiny").model).eval()
    before = sum(p.numel() for p in model.parameters())
    prepare_for_decoding(model)
    attn, ffn = model.layers[0].attn, model.layers[0].ffn
    qkv = attn.qkv_proj.weight
    assert attn.q_proj.weight.data_ptr() == qkv.data_ptr()  # views of the fused rows, not copies
    assert attn.v_proj.weight.data_ptr() == qkv[-attn.v_proj.weight.shape[0]:].data_ptr()
    assert ffn.up_proj.weight.data_ptr() == ffn.gate_up_proj.weight[ffn.gate_proj.weight.shape[0]:].data_ptr()
    # the weights take the memory they took: the fused matrices own the storage their views read
    distinct = {}
    for p in model.parameters():
        distinct[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    assert sum(distinct.values()) == before * 4


def test_every_float_kernel_equals_linear():
    torch.manual_seed(0)
    weight, bias = torch.randn(64, 48), torch.randn(64)
    layer = FloatLinear(weight, bias, packed=True)
    assert layer.packed is not None  # oneDNN is in every CPU build of torch this project installs
    threads = torch.get_num_threads()
    try:
        for shape in [(1, 1, 48), (3, 1, 48), (2, 5, 48), (40, 48)]:
            x = torch.randn(shape)
            expected = torch.nn.functional.linear(x, weight, bias)
            for n in (1, 2, 4):
                torch.set_num_threads(n)
                torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)  # whichever path was faster
                torch.testing.assert_close(layer._split(x, n) + bias, expected, atol=1e-5, rtol=0)
                torch.testing.assert_close(layer._packed(x), expected, atol=1e-5, rtol=0)
    finally:
        torch.set_num_threads(threads)


def test_int8_rows_do_not_depend_on_each_other():
    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(96, 64), torch.randn(96))
    x = torch.randn(8, 64)
    x[3] *= 100  # a row with large activations must not change the others' quantisation
    together = layer(x)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(8)])
    assert torch.equal(together, alone)
    exact = torch.nn.functional.linear(x, layer.qweight.float() * layer.scale[:, None], layer.bias)
    assert (together - exact).abs().max() < 0.02 * exact.abs().max()


def test_load_for_decoding_holds_each_format(tmp_path):
    checkpoint = random_checkpoint(tmp_path / "run", [])
    prompt = [1, 2, 3, 4]
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    outputs = {}
    for weights, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16),
                           ("int8", torch.float32)]:
        loaded = load_for_decoding(checkpoint, device="cpu", weights=weights)
        assert loaded.model.embed.weight.dtype == dtype
        assert isinstance(loaded.model.layers[0].ffn.down_proj, Int8Linear if weights == "int8" else FloatLinear)
        outputs[weights] = generate_ids(loaded.model, [prompt], greedy)[0].token_ids
        assert len(outputs[weights]) == 8
    with pytest.raises(ValueError, match="weights must be one of"):
        load_for_decoding(checkpoint, device="cpu", weights="int4")


def test_mtp_speculation_runs_on_a_prepared_model():
    cfg = load_config("codemind-tiny", ["model.init_std=0.2"]).model
    torch.manual_seed(0)
    model = prepare_for_decoding(build_model(cfg).eval())
    prompt = [5, 9, 2, 7]
    plain = generate_ids(model, [prompt], SamplingParams(max_new_tokens=20, temperature=0))[0].token_ids
    assert speculative_greedy(model, prompt, 20).token_ids == plain
