"""The engine's generate_fn for a real model: prompt ids, context check, prefill_and_generate.

Runs on the engine worker thread, which alone touches the model and the tokenizer.
Clients never see control tokens (<｜Assistant｜>, <｜end▁of▁sentence｜>...): generation decodes
through `DisplayTokenizer`, which drops them.
"""

from __future__ import annotations

from ktransformers.models.loader import LoadedModel
from ktransformers.server.engine import GenerateFn, GenerationRequest, PromptAccepted
from ktransformers.util.chat import build_prompt_ids
from ktransformers.util.events import ContextLengthError
from ktransformers.util.reasoning import THINK_CLOSE, THINK_OPEN
from ktransformers.util.sampling import SamplingParams
from ktransformers.util.utils import prefill_and_generate


class DisplayTokenizer:
    """The tokenizer, but `decode` leaves out special (control) tokens, as skip_special_tokens does.

    <think> and </think> stay even where a tokenizer marks them special: the reasoning split
    needs them. prefill_and_generate has no skip_special_tokens option, hence this view.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        think_ids = {vocab[tag] for tag in (THINK_OPEN, THINK_CLOSE) if tag in vocab}
        self.hidden_ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special} - think_ids

    def decode(self, ids, **kwargs) -> str:
        return self._tokenizer.decode([i for i in ids if int(i) not in self.hidden_ids], **kwargs)

    def __getattr__(self, name):   # everything else (eos_token_id, encode...) is the tokenizer's own
        return getattr(self._tokenizer, name)


def prompt_ids_for(loaded: LoadedModel, request: GenerationRequest) -> list[int]:
    if request.messages is not None:
        return build_prompt_ids(loaded.tokenizer, request.messages, request.force_think)
    return loaded.tokenizer.encode(request.prompt, add_special_tokens=True)


def model_generate_fn(loaded: LoadedModel) -> GenerateFn:
    display_tokenizer = DisplayTokenizer(loaded.tokenizer)

    def generate(request: GenerationRequest):
        ids = prompt_ids_for(loaded, request)
        max_context = int(loaded.model.max_context)
        if len(ids) >= max_context:
            raise ContextLengthError(len(ids), max_context)
        yield PromptAccepted(len(ids))   # lets the HTTP headers go out before the (long) prefill
        sampling = SamplingParams.from_generation_config(loaded.generation_config, **request.sampling)
        yield from prefill_and_generate(loaded.model, display_tokenizer, ids, request.max_new_tokens,
                                        sampling=sampling, stop=request.stop or None,
                                        force_think=request.force_think,
                                        generation_config=loaded.generation_config)
    return generate
