"""Hybrid decode: the overlapped MoE and the static (CUDA-graph) decoder give the model's own results.

CPU tests run everywhere (the overlap's worker thread and the static decode path run eagerly);
the GPU tests place the tiny model with the one-GPU rules and skip cleanly without CUDA.
"""

import dataclasses
import threading
from functools import partial
from unittest import mock

import pytest
import torch

from ktransformers import kernels
from ktransformers.gguf import open_gguf
from ktransformers.models import gguf_names
from ktransformers.operators.cpu_quant import CpuQuantExperts
from ktransformers.operators.experts import TorchExperts
from ktransformers.operators.gpu_prefill_experts import StreamedExperts
from ktransformers.models.hybrid_moe import (STREAMED_PREFILL_CHUNK, STREAMED_PREFILL_FREE_BYTES, HostStaging,
                                             OverlappedMoE, enable_overlap, streamed_prefill_chunk,
                                             streams_prefill_experts)
from ktransformers.models.layers import MoE
from ktransformers.models import loader
from ktransformers.models.loader import load_model
from ktransformers.optimize.optimize import default_rules_path
from ktransformers.util.cuda_graph import StaticDecoder, step_devices
from ktransformers.util.sequence import DEFAULT_PREFILL_CHUNK
from ktransformers.util.utils import prefill_and_generate

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.unavailable_reason()}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

PROMPT = torch.tensor([[3, 17, 42, 5, 99, 7, 64, 12, 31]])


def load(tiny_model, cuda: bool):
    path = tiny_model(quant_mix="q4_k_m")
    return load_model(path, device="cuda" if cuda else "cpu", optimize_config_path=default_rules_path(cuda),
                      max_context=64).model


def moe_layers(model):
    return [layer for layer in model.model.layers if isinstance(layer.mlp, MoE)]  # OverlappedMoE included


def sequential(moe, x):
    """`moe` with layers.MoE's own hand-off: the routed experts run in the calling thread."""
    with mock.patch.object(moe, "start_routed", partial(MoE.start_routed, moe)):
        return moe(x)


def test_overlapped_moe_runs_routed_experts_on_a_worker_and_equals_sequential(tiny_model):
    model = load(tiny_model, cuda=False)
    moe = moe_layers(model)[0].mlp
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    threads = []
    moe.experts.register_forward_pre_hook(lambda m, a: threads.append(threading.current_thread()))
    with torch.inference_mode():
        fused = moe(x)  # the CPU rules' one native call for routed + shared experts
        moe._fused_shared = None  # the same experts as separate calls: what OverlappedMoE runs
        expected = moe(x)
        got = OverlappedMoE(moe)(x)
    assert threads[1] is threading.main_thread() and threads[2] is not threading.main_thread()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)  # float32 summation order only


def test_overlapped_moe_sends_long_chunks_to_the_prefill_experts(tiny_model):
    model = load(tiny_model, cuda=False)
    moe = moe_layers(model)[0].mlp
    overlapped = OverlappedMoE(moe, prefill_experts=StreamedExperts(moe.experts, "cpu", torch.float32),
                               prefill_min_tokens=4)
    calls = []
    moe.experts.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    moe._fused_shared = None  # separate calls, as OverlappedMoE makes them
    with torch.inference_mode():
        expected, expected_short = moe(x), moe(x[:3])
        got_long, got_short = overlapped(x), overlapped(x[:3])
    assert calls == [5, 3, 3]  # the 5-token chunk went to the streamed experts, the 3-token one to the kernels
    # streamed: dequantized float32 weights; the kernels quantize activations, hence the tolerance
    torch.testing.assert_close(got_long, expected, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got_short, expected_short, rtol=0, atol=0)


def test_cpu_model_decodes_through_its_own_forward(tiny_model):
    model = load(tiny_model, cuda=False)
    assert model.step_decoder is None and not any(isinstance(layer.mlp, OverlappedMoE) for layer in model.model.layers)


def test_static_decoder_refuses_a_step_spread_over_devices(tiny_model):
    model = load(tiny_model, cuda=False)
    moe = moe_layers(model)[0].mlp
    elsewhere = torch.device("cuda", 7)  # never touched: the check reads placements only
    for module in (moe.experts, model.model.embed_tokens):  # outside the step's segments: allowed anywhere
        module.placement = dataclasses.replace(model.lm_head.placement, device=elsewhere)
    assert step_devices(model) == {torch.device("cpu"): "model.layers.0.input_layernorm"}
    StaticDecoder(model)
    shared = moe.shared_experts.down_proj
    shared.placement = dataclasses.replace(shared.placement, device=elsewhere)
    with pytest.raises(ValueError, match=r"mlp\.shared_experts\.down_proj on cuda:7"):
        StaticDecoder(model)


def test_loader_decodes_eagerly_when_a_step_spans_devices(tiny_model, caplog):
    model = load(tiny_model, cuda=False)
    shared = moe_layers(model)[0].mlp.shared_experts.up_proj
    shared.placement = dataclasses.replace(shared.placement, device=torch.device("cuda", 7))  # read, never used
    before = kernels.num_threads()
    try:
        with caplog.at_level("WARNING", logger="ktransformers.models.loader"):
            loader._set_up_gpu_decode(model, cuda_graphs=True, cpu_threads=3)
        # a GPU part: the native pool leaves one of the 3 threads to the thread that drives the GPU
        assert kernels.num_threads() == 2
    finally:
        kernels.set_num_threads(before)
    assert model.step_decoder is None and "shared_experts.up_proj on cuda:7" in caplog.text
    assert all(isinstance(layer.mlp, OverlappedMoE) for layer in moe_layers(model))  # a GPU part: overlap


def test_host_staging_reuses_one_buffer_per_role_and_grows_it():
    staging = HostStaging()
    big = staging.to_host("x", torch.arange(12.0).view(3, 4), torch.float32)
    small = staging.to_host("x", torch.ones(1, 4), torch.float32)
    assert small.data_ptr() == big.data_ptr() and small.shape == (1, 4) and small.sum() == 4
    grown = staging.to_host("x", torch.ones(5, 4), torch.float32)
    assert grown.shape == (5, 4) and grown.sum() == 20
    assert staging.to_host("ids", torch.ones(1, 4, dtype=torch.int64), torch.int64).data_ptr() != grown.data_ptr()


def test_enable_overlap_keeps_the_logits(tiny_model):
    model = load(tiny_model, cuda=False)
    fused = model(PROMPT, 0)
    for layer in moe_layers(model):
        layer.mlp._fused_shared = None  # overlapping keeps the shared experts apart: compare like with like
    expected = model(PROMPT, 0)
    torch.testing.assert_close(fused, expected, rtol=0, atol=0.05)  # float32 summation order, through the layers
    assert enable_overlap(model) == len(moe_layers(model)) > 0
    assert all(isinstance(layer.mlp, OverlappedMoE) for layer in moe_layers(model))
    torch.testing.assert_close(model(PROMPT, 0), expected, rtol=0, atol=0)


def decode_through(decoder, model, prompt, extra):
    """Prefill prompt[:-1] with the model, then step the last prompt token and `extra` tokens."""
    n = prompt.shape[1]
    model(prompt[:, :-1], 0)
    tokens = prompt[0, -1:].tolist() + extra
    return torch.stack([decoder.step(t, n - 1 + i) for i, t in enumerate(tokens)]).cpu()


def stepped_logits(model, prompt, extra):
    """The model's own one-token forwards after a prompt[:-1] prefill (the path StaticDecoder replaces)."""
    n = prompt.shape[1]
    model(prompt[:, :-1], 0)
    tokens = prompt[0, -1:].tolist() + extra
    return torch.stack([model(torch.tensor([[t]]), n - 1 + i)[0, 0] for i, t in enumerate(tokens)]).cpu()


def reference_logits(model, prompt, extra):
    full = torch.cat([prompt, torch.tensor([extra])], dim=1)
    return model(full, 0)[0, prompt.shape[1] - 1:].float().cpu()


def test_static_decoder_matches_the_model_on_cpu(tiny_model):
    model = load(tiny_model, cuda=False)
    enable_overlap(model)
    decoder = StaticDecoder(model, use_cuda_graph=True)
    assert not decoder.use_graphs  # no CUDA here: the same segments run eagerly
    extra = [8, 77, 21]
    got = decode_through(decoder, model, PROMPT, extra)
    # Rounding differs (the static attention scores every cache row, the CPU kernels round M=1 and M>1
    # apart) and a near-tie in the router can flip one expert, so allow ~1e-2; a wrong cache row or
    # position moves the logits by far more (checked below, so this comparison can fail).
    stepped = stepped_logits(model, PROMPT, extra)
    torch.testing.assert_close(got, stepped, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got, reference_logits(model, PROMPT, extra), rtol=5e-2, atol=5e-2)
    model(PROMPT[:, :-1], 0)
    off_by_one = torch.stack([decoder.step(t, PROMPT.shape[1] + i) for i, t in enumerate([31] + extra)])
    assert (off_by_one - stepped).abs().max() > 0.2


def test_static_decoder_profile_splits_the_step(tiny_model):
    model = load(tiny_model, cuda=False)
    decoder = StaticDecoder(model)
    model(PROMPT, 0)
    profile = {}
    decoder.step(5, PROMPT.shape[1], profile)
    n_moe = len(moe_layers(model))
    assert set(profile) == {"embed", "dense", "moe_gpu", "experts", "combine", "head"} if n_moe < len(
        model.model.layers) else {"embed", "moe_gpu", "experts", "combine", "head"}
    assert all(seconds > 0 for seconds in profile.values())


def expert_stacks(tiny_model, layer):
    model = open_gguf(tiny_model(quant_mix="q4_k_m"))
    return [model[name] for name in gguf_names.experts_names(f"model.layers.{layer}.mlp.experts")]


def routing(n_tokens, hidden, n_experts, k, device="cpu"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_tokens, hidden, generator=g)
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, k, generator=g)
    return x.to(device), ids.to(device), weights.to(device)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30])  # one expert per chunk / all experts in one
def test_streamed_experts_equal_the_dequantized_reference(tiny_model, device, chunk_bytes):
    stacks = expert_stacks(tiny_model, 1)
    reference = TorchExperts(*stacks, "cpu", torch.float32)
    dtype, tol, n_tokens = (torch.float32, 1e-5, 6) if device == "cpu" else (torch.bfloat16, 3e-2, 40)
    streamed = StreamedExperts(CpuQuantExperts(*stacks), device, dtype, chunk_bytes=chunk_bytes)
    n_experts, _, hidden = stacks[0].shape
    x, ids, weights = routing(n_tokens, hidden, n_experts, 3)
    for _ in range(2):  # the second call reuses the staging buffers
        got = streamed(x.to(device), ids.to(device), weights.to(device))
        assert got.device.type == device
        torch.testing.assert_close(got.cpu(), reference(x, ids, weights), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="expert id out of range"):
        streamed(x.to(device), (ids + n_experts).to(device), weights.to(device))


def test_step_outside_the_context_window_is_refused(tiny_model):
    model = load(tiny_model, cuda=False)
    decoder = StaticDecoder(model)
    with pytest.raises(ValueError, match="context window of 64"):
        decoder.step(1, 64)
    with pytest.raises(ValueError, match="position -1"):
        decoder.step(1, -1)


@needs_cuda
def test_overlapped_moe_on_gpu_equals_sequential(tiny_model):
    model = load(tiny_model, cuda=True)
    moe = moe_layers(model)[0].mlp
    assert moe.experts.placement.device.type == "cpu" and moe.gate.placement.device.type == "cuda"
    x = torch.randn(3, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = sequential(moe, x)  # the loader already overlapped it
        got = moe(x)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@needs_cuda
def test_cuda_graph_decoder_matches_eager_and_the_model(tiny_model):
    model = load(tiny_model, cuda=True)
    assert isinstance(model.step_decoder, StaticDecoder) and model.step_decoder.use_graphs  # the loader's choice
    enable_overlap(model)
    extra = [8, 77, 21, 4]
    graphed = StaticDecoder(model, use_cuda_graph=True)
    got = decode_through(graphed, model, PROMPT, extra)
    assert graphed.use_graphs and graphed.graphs_captured
    model(PROMPT[:, :-1], 0)  # one-token forwards go through the loader's StaticDecoder
    torch.testing.assert_close(model(PROMPT[:, -1:], PROMPT.shape[1] - 1)[0, 0].cpu(), got[0], rtol=1e-3, atol=1e-3)
    eager = decode_through(StaticDecoder(model, use_cuda_graph=False), model, PROMPT, extra)
    torch.testing.assert_close(got, eager, rtol=1e-3, atol=1e-3)

    # the model's own eager one-token forward (MLAttention.forward, overlapped MoE), no static buffers
    decoder, model.step_decoder = model.step_decoder, None
    stepped = stepped_logits(model, PROMPT, extra)
    reference = reference_logits(model, PROMPT, extra)  # bf16 prefill path: looser
    model.step_decoder = decoder
    for other in (stepped, reference):
        torch.testing.assert_close(got, other, rtol=5e-2, atol=5e-2)
        assert (got.argmax(-1) == other.argmax(-1)).float().mean() >= 0.75
    model(PROMPT[:, :-1], 0)
    off_by_one = torch.stack([graphed.step(t, PROMPT.shape[1] + i) for i, t in enumerate([31] + extra)]).cpu()
    assert (off_by_one - stepped).abs().max() > 0.2  # so the comparisons above can fail


@needs_cuda
def test_graphs_of_each_context_window_match_the_model_across_window_edges(tiny_model):
    """Each window of cache rows (512, 1024, ..., max_context) has its own graphs; steps on both sides
    of an edge give the model's eager one-token forwards (which read only the live rows)."""
    path = tiny_model(quant_mix="q4_k_m")
    model = load_model(path, device="cuda", optimize_config_path=default_rules_path(True), max_context=1100).model
    enable_overlap(model)
    graphed = StaticDecoder(model, use_cuda_graph=True)
    generator = torch.Generator().manual_seed(0)
    for length in (510, 1022):  # steps at positions 509..513 and 1021..1025
        prompt = torch.randint(3, model.config.vocab_size, (1, length), generator=generator)
        extra = [8, 77, 21, 4]
        got = decode_through(graphed, model, prompt, extra)
        decoder, model.step_decoder = model.step_decoder, None
        stepped = stepped_logits(model, prompt, extra)
        model.step_decoder = decoder
        torch.testing.assert_close(got, stepped, rtol=5e-2, atol=5e-2)
        assert (got.argmax(-1) == stepped.argmax(-1)).float().mean() >= 0.75
    assert set(graphed.plans) == {(1, 512), (1, 1024), (1, 1100)}


@needs_cuda
def test_loader_without_cuda_graphs_steps_the_same_segments_eagerly(tiny_model):
    path = tiny_model(quant_mix="q4_k_m")
    model = load_model(path, device="cuda", optimize_config_path=default_rules_path(True), max_context=64,
                       cuda_graphs=False).model
    assert isinstance(model.step_decoder, StaticDecoder) and not model.step_decoder.use_graphs
    assert all(isinstance(layer.mlp, OverlappedMoE) for layer in moe_layers(model))
    graphed = decode_through(StaticDecoder(model, use_cuda_graph=True), model, PROMPT, [8, 77])
    stepped = stepped_logits(model, PROMPT, [8, 77])  # through the loader's eager StaticDecoder
    torch.testing.assert_close(stepped, graphed, rtol=1e-3, atol=1e-3)


@needs_cuda
def test_gpu_prefill_route_keeps_the_logits(tiny_model):
    model = load(tiny_model, cuda=True)
    expected = model(PROMPT, 0)
    enable_overlap(model, prefill_min_tokens=4)
    assert all(layer.mlp.prefill_experts is not None for layer in moe_layers(model))
    got = model(PROMPT, 0)
    torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75


def test_streamed_experts_ask_for_long_prefill_chunks_where_the_gpu_has_room(tiny_model):
    """Each prefill chunk streams every routed expert to the GPU again, so a model that streams them
    takes long chunks, given the GPU memory for their activations."""
    model = load(tiny_model, cuda=False)
    assert model.prefill_chunk == DEFAULT_PREFILL_CHUNK and not streams_prefill_experts(model)
    enable_overlap(model, prefill_min_tokens=None)
    assert not streams_prefill_experts(model)  # overlap without streaming (a CPU gate)
    moe_layers(model)[0].mlp.prefill_experts = object()
    assert streams_prefill_experts(model)
    assert streamed_prefill_chunk(STREAMED_PREFILL_FREE_BYTES, 512) == STREAMED_PREFILL_CHUNK
    assert streamed_prefill_chunk(STREAMED_PREFILL_FREE_BYTES - 1, 512) == 512
    assert streamed_prefill_chunk(STREAMED_PREFILL_FREE_BYTES, 2 * STREAMED_PREFILL_CHUNK) == 2 * STREAMED_PREFILL_CHUNK


def test_generation_prefills_in_the_models_chunks_unless_told(tiny_model, monkeypatch):
    model = load(tiny_model, cuda=False)
    tokenizer = load_model(tiny_model(quant_mix="q4_k_m"), device="cpu", max_context=64).tokenizer
    chunks = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda ids, *a, **k: chunks.append(ids.shape[1]) or forward(ids, *a, **k))
    model.prefill_chunk = 4
    list(prefill_and_generate(model, tokenizer, list(range(3, 13)), max_new_tokens=1, eos_token_ids=[]))
    assert chunks == [4, 4, 2]
    chunks.clear()
    list(prefill_and_generate(model, tokenizer, list(range(3, 13)), max_new_tokens=1, eos_token_ids=[], chunk_size=6))
    assert chunks == [6, 4]
