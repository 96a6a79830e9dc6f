"""The engine's generate_fn for a real model: prompt ids, context check, prefill_and_generate.

Runs on the engine worker thread, which alone touches the model and the tokenizer.
Clients never see control tokens (<｜Assistant｜>, <｜end▁of▁sentence｜>...): prefill_and_generate
hides them (hide_control_tokens, on by default).
"""

from __future__ import annotations

from ktransformers.models.loader import LoadedModel
from ktransformers.server.engine import GenerateFn, GenerationRequest, PromptAccepted
from ktransformers.util.chat import build_prompt_ids
from ktransformers.util.events import ContextLengthError
from ktransformers.util.sampling import SamplingParams
from ktransformers.util.utils import prefill_and_generate


def prompt_ids_for(loaded: LoadedModel, request: GenerationRequest) -> list[int]:
    if request.messages is not None:
        return build_prompt_ids(loaded.tokenizer, request.messages, request.force_think)
    return loaded.tokenizer.encode(request.prompt, add_special_tokens=True)


def model_generate_fn(loaded: LoadedModel) -> GenerateFn:
    def generate(request: GenerationRequest):
        ids = prompt_ids_for(loaded, request)
        max_context = int(loaded.model.max_context)
        if len(ids) >= max_context:
            raise ContextLengthError(len(ids), max_context)
        yield PromptAccepted(len(ids))   # lets the HTTP headers go out before the (long) prefill
        sampling = SamplingParams.from_generation_config(loaded.generation_config, **request.sampling)
        yield from prefill_and_generate(loaded.model, loaded.tokenizer, ids, request.max_new_tokens,
                                        sampling=sampling, stop=request.stop or None,
                                        force_think=request.force_think,
                                        generation_config=loaded.generation_config)
    return generate
