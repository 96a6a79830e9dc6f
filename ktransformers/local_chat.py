"""Console chat with a local model:

    python -m ktransformers.local_chat --model_path DIR --gguf_path PATH --max_new_tokens 1000 \\
        --force_think true

Streams each answer, keeps the conversation (earlier answers without their reasoning, as
DeepSeek-R1 expects), prints prompt/eval statistics after each answer. 'exit' or EOF
(Ctrl-D) quits; Ctrl-C during an answer cancels it and returns to the prompt.
"""

import argparse
import signal
import sys

from ktransformers.util.chat import build_prompt_ids
from ktransformers.util.events import FinishEvent
from ktransformers.util.reasoning import THINK_OPEN
from ktransformers.util.sampling import SamplingParams
from ktransformers.util.prefix_cache import PrefixCache
from ktransformers.util.utils import prefill_and_generate, prompt_ends_in_reasoning

PROMPT = "Chat: "


def str2bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def format_stats(finish: FinishEvent) -> str:
    return "\n".join([
        f"prompt eval count:    {finish.prompt_tokens - finish.cached_tokens} token(s)"
        f" ({finish.cached_tokens} more reused from the cache)",
        f"prompt eval duration: {finish.prefill_seconds:.3f}s",
        f"prompt eval rate:     {finish.prefill_tokens_per_s:.2f} tokens/s",
        f"eval count:           {finish.completion_tokens} token(s)",
        f"eval duration:        {finish.decode_seconds:.3f}s",
        f"eval rate:            {finish.decode_tokens_per_s:.2f} tokens/s",
    ])


def answer_one(model, tokenizer, messages, out, *, force_think, **generate_args) -> str:
    """Stream one answer to `out`; return its content (reasoning removed)."""
    prompt_ids = build_prompt_ids(tokenizer, messages, force_think=force_think)
    if prompt_ends_in_reasoning(tokenizer, prompt_ids):
        out.write(THINK_OPEN + "\n")  # the tag is in the prompt; show where reasoning starts
    content = []
    events = prefill_and_generate(model, tokenizer, prompt_ids, force_think=force_think,
                                  **generate_args)
    try:
        for event in events:
            if isinstance(event, FinishEvent):
                out.write("\n" + format_stats(event) + "\n")
            else:
                out.write(event.text)
                content.append(event.content)
            out.flush()
    finally:
        events.close()
    return "".join(content)


def chat_loop(model, tokenizer, *, input_fn=input, out=sys.stdout, force_think=False,
              system_prompt=None, **generate_args) -> None:
    """Read user turns until 'exit' or EOF; `generate_args` go to prefill_and_generate."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    while True:
        try:
            line = input_fn(PROMPT)
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if line.strip() == "exit":
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            answer = answer_one(model, tokenizer, messages, out, force_think=force_think,
                                **generate_args)
        except KeyboardInterrupt:
            messages.pop()  # a cancelled turn leaves no trace in the history
            out.write("\n[answer cancelled]\n")
            out.flush()
            continue
        except ValueError as err:  # e.g. the conversation no longer fits the context
            messages.pop()
            out.write(f"\nerror: {err}\n")
            continue
        messages.append({"role": "assistant", "content": answer})


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ktransformers.local_chat",
                                     description="Chat with a DeepSeek GGUF model in the console.")
    parser.add_argument("--model_path", default=None,
                        help="directory with config.json, tokenizer and generation_config.json")
    parser.add_argument("--gguf_path", required=True, help="GGUF file, split part or directory")
    parser.add_argument("--optimize_config_path", default=None, help="optimize rules YAML")
    parser.add_argument("--cpu_infer", type=int, default=None, help="CPU threads for the experts")
    parser.add_argument("--device", default=None, help="device for the non-expert layers")
    parser.add_argument("--max_context", type=int, default=4096)
    parser.add_argument("--max_new_tokens", type=int, default=1000)
    parser.add_argument("--chunk_size", type=int, default=None,
                        help="prefill chunk length (default: the model's, 512, or 4096 where experts stream to the GPU)")
    parser.add_argument("--force_think", type=str2bool, default=False)
    parser.add_argument("--system_prompt", default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--min_p", type=float, default=None)
    parser.add_argument("--repetition_penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(argv)


SAMPLING_ARGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {name: getattr(args, name) for name in SAMPLING_ARGS
                 if getattr(args, name) is not None}
    try:
        SamplingParams(**overrides)  # fail on bad values before the slow model load
        from ktransformers.models.loader import load_model

        loaded = load_model(args.gguf_path, model_path=args.model_path,
                            optimize_config_path=args.optimize_config_path, device=args.device,
                            max_context=args.max_context, cpu_infer=args.cpu_infer)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # the model's generation_config (R1: temperature 0.6, top_p 0.95) unless overridden
    sampling = SamplingParams.from_generation_config(loaded.generation_config, **overrides)
    # Ctrl-C cancels an answer even when this process inherited SIGINT ignored (started from a
    # background job or a script), where Python would not install its KeyboardInterrupt handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    chat_loop(loaded.model, loaded.tokenizer, force_think=args.force_think,
              system_prompt=args.system_prompt, max_new_tokens=args.max_new_tokens,
              chunk_size=args.chunk_size, sampling=sampling,
              generation_config=loaded.generation_config,
              prefix_cache=PrefixCache(loaded.model, capacity_tokens=0))  # one conversation: the live one
    return 0


if __name__ == "__main__":
    sys.exit(main())
