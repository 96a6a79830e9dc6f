"""The engine's scheduler with a recording stand-in model: several jobs decode in one pass, a new
job's prefill runs in chunks between the others' decode steps, a client that leaves frees its slot
at once, a failing pass fails only its own jobs, and every stream gets exactly its own tokens."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ktransformers.demo import demo_paths
from ktransformers.server.engine import Engine, GenerationRequest, is_finish
from ktransformers.server.testing import wait_for
from ktransformers.util.events import TokenEvent
from ktransformers.util.utils import generation_steps

VOCAB = 600


class CountingModel:
    """Next token = (token + step) % VOCAB per slot, from the last token's id: whose token is whose is
    visible. Records every pass: ("prefill", slot, n_tokens) or ("decode", slots)."""

    def __init__(self, n_slots: int, max_context: int = 4096):
        self.n_slots, self.max_context = n_slots, max_context
        self.passes: list[tuple] = []
        self.decodes_before_failing: int | None = None  # None: never fail
        self.lock = threading.Lock()

    def _logits(self, last_token: int, slot: int) -> torch.Tensor:
        logits = torch.zeros(VOCAB)
        logits[(last_token + 1 + slot) % VOCAB] = 10.0
        return logits

    def __call__(self, input_ids, start_pos, slot=0):
        self.passes.append(("prefill", slot, input_ids.shape[1]))
        return self._logits(int(input_ids[0, -1]), slot)[None, None]

    def decode(self, token_ids, positions, slots):
        self.passes.append(("decode", tuple(slots)))
        if self.decodes_before_failing is not None:
            if self.decodes_before_failing == 0:
                raise RuntimeError("the decode pass broke")
            self.decodes_before_failing -= 1
        return torch.stack([self._logits(t, s) for t, s in zip(token_ids, slots)])


class Backend:
    """A generate_fn over CountingModel: real sequence steps (sampling, detokenizing, events)."""

    def __init__(self, model, chunk_size: int = 8):
        self.model, self.chunk_size = model, chunk_size
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(demo_paths()[0])
        self.gate: threading.Event | None = None

    def __call__(self, request: GenerationRequest):
        if self.gate is not None:
            self.gate.wait(5)
        return generation_steps(self.model, self.tokenizer, request.prompt_ids, request.max_new_tokens,
                                chunk_size=self.chunk_size, eos_token_ids=[], slot=request.slot)


def request(prompt_len: int, first: int, max_new_tokens: int = 6) -> GenerationRequest:
    return GenerationRequest(max_new_tokens=max_new_tokens, prompt="", prompt_ids=[first + i for i in range(prompt_len)])


def tokens_of(job) -> list[int]:
    return [e.token_id for e in job.events(poll_s=0.01) if isinstance(e, TokenEvent)]


def expected_tokens(prompt_ids, slot, n):
    out, last = [], prompt_ids[-1]
    for _ in range(n):
        last = (last + 1 + slot) % VOCAB
        out.append(last)
    return out


def test_jobs_decode_together_and_each_gets_its_own_tokens():
    model = CountingModel(n_slots=3)
    backend = Backend(model)
    backend.gate = threading.Event()  # hold the worker until all three are queued: they start together
    engine = Engine(backend, queue_size=4, max_batch=3)
    reqs = [request(3, 10), request(5, 100), request(4, 200)]
    jobs = [engine.submit(r) for r in reqs]
    backend.gate.set()
    got = [tokens_of(job) for job in jobs]
    for r, tokens in zip(reqs, got):
        assert tokens == expected_tokens(r.prompt_ids, r.slot, 6)
    assert sorted(r.slot for r in reqs) == [0, 1, 2]
    decodes = [p for p in model.passes if p[0] == "decode"]
    assert max(len(p[1]) for p in decodes) == 3  # one pass served all three streams
    assert len(decodes) <= 7  # 5 decode steps each (the 6th token needs no pass), mostly shared
    engine.stop()


def test_a_new_prompt_prefills_in_chunks_between_the_running_streams_decode_steps():
    model = CountingModel(n_slots=2)
    backend = Backend(model, chunk_size=8)
    engine = Engine(backend, queue_size=4, max_batch=2)
    first = engine.submit(request(3, 10, max_new_tokens=100000))
    events = first.events(poll_s=0.01)
    next(e for e in events if isinstance(e, TokenEvent))  # the first stream is decoding
    second = engine.submit(request(30, 300, max_new_tokens=3))  # 4 chunks of 8
    assert tokens_of(second) == expected_tokens(second.request.prompt_ids, second.request.slot, 3)
    first.cancel()
    mine = [e.token_id for e in events if isinstance(e, TokenEvent)]  # what it had queued: its own tokens
    assert mine == expected_tokens(first.request.prompt_ids, first.request.slot, len(mine) + 1)[1:]
    chunks = [i for i, p in enumerate(model.passes) if p[0] == "prefill" and p[1] == second.request.slot]
    assert len(chunks) == 4
    for a, b in zip(chunks, chunks[1:]):  # the running stream decoded between consecutive chunks
        assert any(p[0] == "decode" and first.request.slot in p[1] for p in model.passes[a + 1:b])
    engine.stop()


def test_a_client_that_leaves_frees_its_slot_for_the_next_request_at_once():
    model = CountingModel(n_slots=1)
    engine = Engine(Backend(model), queue_size=4, max_batch=1)
    long = engine.submit(request(3, 10, max_new_tokens=100000))
    events = long.events(poll_s=0.01)
    next(e for e in events if isinstance(e, TokenEvent))
    waiting = engine.submit(request(3, 50, max_new_tokens=4))
    long.cancel()
    assert tokens_of(waiting) == expected_tokens(waiting.request.prompt_ids, 0, 4)
    assert long.finished.is_set() and not engine.busy
    engine.stop()


def test_a_failing_decode_pass_fails_its_jobs_and_the_engine_goes_on():
    model = CountingModel(n_slots=2)
    model.decodes_before_failing = 2
    engine = Engine(Backend(model), queue_size=4, max_batch=2)
    job = engine.submit(request(3, 10, max_new_tokens=50))
    got = []
    with pytest.raises(RuntimeError, match="decode pass broke"):
        for event in job.events(poll_s=0.01):
            got.append(event)
    assert len([e for e in got if isinstance(e, TokenEvent)]) == 3  # the prefill's token and two decoded
    model.decodes_before_failing = None
    after = engine.submit(request(3, 70, max_new_tokens=3))
    events = list(after.events(poll_s=0.01))
    assert is_finish(events[-1]) and [e.token_id for e in events if isinstance(e, TokenEvent)] == \
        expected_tokens(after.request.prompt_ids, after.request.slot, 3)
    engine.stop()


class SlowModel(CountingModel):
    def decode(self, token_ids, positions, slots):
        time.sleep(0.05)
        return super().decode(token_ids, positions, slots)


def test_stop_gives_every_running_job_the_whole_grace():
    """The grace is one deadline for all running jobs, not a wait on the first one only."""
    model = SlowModel(n_slots=2)
    engine = Engine(Backend(model), queue_size=4, max_batch=2)
    short, long = engine.submit(request(3, 10, max_new_tokens=3)), engine.submit(request(3, 40, max_new_tokens=12))
    wait_for(lambda: len(engine.running) == 2)
    engine.stop(grace_s=5.0)
    for job in (short, long):
        events = list(job.events(poll_s=0.01))  # an EngineStopped here would raise
        assert is_finish(events[-1]) and events[-1].completion_tokens == job.request.max_new_tokens


class PrefillRecordingModel(CountingModel):
    """Also records each prefill pass's (slot, start_pos, ids); may fail its n-th prefill pass."""

    def __init__(self, n_slots: int):
        super().__init__(n_slots)
        self.prefills: list[tuple[int, int, list[int]]] = []
        self.fail_prefill_at: int | None = None

    def __call__(self, input_ids, start_pos, slot=0):
        if self.fail_prefill_at is not None and len(self.prefills) == self.fail_prefill_at:
            self.prefills.append((slot, start_pos, []))
            raise RuntimeError("the prefill pass broke")
        self.prefills.append((slot, start_pos, input_ids[0].tolist()))
        return super().__call__(input_ids, start_pos, slot)


def start_streaming(engine):
    """A long-running stream, decoding by the time this returns."""
    first = engine.submit(request(3, 10, max_new_tokens=100000))
    events = first.events(poll_s=0.01)
    next(e for e in events if isinstance(e, TokenEvent))
    return first


def test_while_others_stream_a_prefill_chunk_runs_in_slices_between_their_decode_steps():
    model = PrefillRecordingModel(n_slots=2)
    engine = Engine(Backend(model, chunk_size=8), queue_size=4, max_batch=2, prefill_slice=3)
    first = start_streaming(engine)
    second = engine.submit(request(20, 300, max_new_tokens=3))  # chunks of 8, 8, 4
    assert tokens_of(second) == expected_tokens(second.request.prompt_ids, second.request.slot, 3)
    first.cancel()
    slices = [(start, ids) for slot, start, ids in model.prefills if slot == second.request.slot]
    assert [len(ids) for _, ids in slices] == [3, 3, 2, 3, 3, 2, 3, 1]  # no slice crosses a chunk's end
    assert [start for start, _ in slices] == [0, 3, 6, 8, 11, 14, 16, 19]  # each at its own positions
    assert sum((ids for _, ids in slices), []) == second.request.prompt_ids
    runs = [i for i, p in enumerate(model.passes) if p[0] == "prefill" and p[1] == second.request.slot]
    for a, b in zip(runs, runs[1:]):  # the running stream decoded between consecutive slices
        assert any(p[0] == "decode" and first.request.slot in p[1] for p in model.passes[a + 1:b])
    engine.stop()


def test_a_lone_request_prefills_whole_chunks():
    model = PrefillRecordingModel(n_slots=2)
    engine = Engine(Backend(model, chunk_size=8), queue_size=4, max_batch=2, prefill_slice=3)
    job = engine.submit(request(20, 300, max_new_tokens=3))
    assert tokens_of(job) == expected_tokens(job.request.prompt_ids, job.request.slot, 3)
    assert [(start, len(ids)) for _, start, ids in model.prefills] == [(0, 8), (8, 8), (16, 4)]
    engine.stop()


def test_a_failing_prefill_slice_fails_its_job_only():
    model = PrefillRecordingModel(n_slots=2)
    engine = Engine(Backend(model, chunk_size=8), queue_size=4, max_batch=2, prefill_slice=3)
    first = start_streaming(engine)
    model.fail_prefill_at = len(model.prefills) + 2  # the newcomer's third slice
    second = engine.submit(request(20, 300, max_new_tokens=3))
    with pytest.raises(RuntimeError, match="prefill pass broke"):
        list(second.events(poll_s=0.01))
    first_events = first.events(poll_s=0.01)
    more = [next(e for e in first_events if isinstance(e, TokenEvent)) for _ in range(3)]  # still streaming
    assert all(e.token_id is not None for e in more)
    first.cancel()
    wait_for(lambda: not engine.busy)
    assert engine.running == []
    engine.stop()


def test_prefill_slice_must_be_positive():
    with pytest.raises(ValueError, match="prefill_slice must be >= 1"):
        Engine(Backend(CountingModel(n_slots=1)), max_batch=1, prefill_slice=0)


def test_default_slice_is_whole_chunks_only_where_long_chunks_stream_the_experts():
    from types import SimpleNamespace

    from ktransformers.server.model_backend import default_prefill_slice
    from ktransformers.server.scheduler import DEFAULT_PREFILL_SLICE

    def model(*prefill_experts):
        layers = [SimpleNamespace(mlp=SimpleNamespace(prefill_experts=p)) for p in prefill_experts]
        return SimpleNamespace(model=SimpleNamespace(layers=layers))

    assert default_prefill_slice(model(None, None)) == DEFAULT_PREFILL_SLICE  # CPU experts (or no streaming)
    assert default_prefill_slice(model(None, object())) is None  # a layer streams its experts to the GPU
