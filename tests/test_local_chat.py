"""local_chat: the chat loop with a scripted model, prompts with a chat template, and the CLI."""

import io
import re
import subprocess
import signal
import sys
import threading
import time

import pytest
import torch

from test_generation import byte_level_tokenizer
from ktransformers.local_chat import chat_loop, main, parse_args
from ktransformers.util.chat import build_prompt_ids, build_prompt_text

# A minimal R1-style template that does NOT drop reasoning itself: build_prompt_ids must.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
            "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
            "{% else %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    tok = byte_level_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


class TurnModel:
    """Answers the i-th conversation turn with answers[i], then EOS.

    The answer starts right after the prompt, i.e. after the last '<｜Assistant｜>' token
    (and the forced '<think>\\n', when present). Keeps the token sequence it was shown.
    """

    def __init__(self, tokenizer, answers, max_context=4096, interrupt_at=None):
        self.tok = tokenizer
        self.answers = [tokenizer.encode(a, add_special_tokens=False) + [tokenizer.eos_token_id]
                        for a in answers]
        self.assistant = tokenizer.convert_tokens_to_ids("<｜Assistant｜>")
        self.forced = tokenizer.encode("<think>\n", add_special_tokens=False)
        self.max_context, self.interrupt_at = max_context, interrupt_at
        self.sequence, self.prompts, self.calls = [], [], 0

    def __call__(self, input_ids, start_pos):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt  # as if Ctrl-C arrived during this forward pass
        if start_pos == 0:
            self.prompts.append(None)
        assert start_pos == len(self.sequence) or start_pos == 0
        self.sequence[start_pos:] = input_ids[0].tolist()
        prompt_end = len(self.sequence) - self.sequence[::-1].index(self.assistant)
        if self.sequence[prompt_end:prompt_end + len(self.forced)] == self.forced:
            prompt_end += len(self.forced)
        if self.prompts[-1] is None and len(self.sequence) == prompt_end:
            self.prompts[-1] = self.tok.decode(self.sequence)
        answer = self.answers[len(self.prompts) - 1]
        logits = torch.zeros(1, input_ids.shape[1], len(self.tok))
        logits[0, -1, answer[len(self.sequence) - prompt_end]] = 30.0
        return logits


def run_chat(model, tokenizer, lines, **kw):
    inputs, out = iter(lines), io.StringIO()

    def input_fn(prompt):
        out.write(prompt)
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError from None

    chat_loop(model, tokenizer, input_fn=input_fn, out=out, **kw)
    return out.getvalue()


def test_build_prompt_ids_uses_the_template_and_drops_old_reasoning(tokenizer):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi 你好"},
                {"role": "assistant", "content": "<think>secret</think>\n\nhello"},
                {"role": "user", "content": [{"type": "text", "text": "again"}]}]
    text = build_prompt_text(tokenizer, messages, force_think=True)
    assert text == ("<｜begin▁of▁sentence｜>be brief<｜User｜>hi 你好<｜Assistant｜>\n\nhello"
                    "<｜end▁of▁sentence｜><｜User｜>again<｜Assistant｜><think>\n")
    ids = build_prompt_ids(tokenizer, messages, force_think=True)
    assert tokenizer.decode(ids) == text and ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("messages,match", [
    ([], "non-empty"), ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role"),
    ([{"role": "user"}], r"messages\[0\]\.content is missing"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], r"messages\[0\]\.content\[0\]"),
])
def test_bad_messages_are_named(tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        build_prompt_ids(tokenizer, messages)


def test_tokenizer_without_template_is_a_clear_error():
    with pytest.raises(ValueError, match="chat_template"):
        build_prompt_ids(byte_level_tokenizer(), [{"role": "user", "content": "x"}])


def test_multi_turn_history_stats_and_exit(tokenizer):
    model = TurnModel(tokenizer, ["deep thought</think>\n\nfirst 答案", "second 🙂"])
    out = run_chat(model, tokenizer, ["hello", "", "and now?", "exit", "never read"],
                   force_think=True, max_new_tokens=100)
    assert "<think>\ndeep thought</think>\n\nfirst 答案\n" in out and "second 🙂\n" in out
    assert out.count("prompt eval count:") == 2 and out.count("\neval rate:") == 2
    assert len(model.prompts) == 2
    # the second prompt carries the first answer without its reasoning
    assert model.prompts[1] == ("<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜>\n\nfirst 答案"
                                "<｜end▁of▁sentence｜><｜User｜>and now?<｜Assistant｜><think>\n")
    assert out.endswith("Chat: ")  # stopped at 'exit', never read the next line


def test_ctrl_c_cancels_the_answer_and_returns_to_the_prompt(tokenizer):
    model = TurnModel(tokenizer, ["the quick brown fox", "after"], interrupt_at=4)
    out = run_chat(model, tokenizer, ["first", "second"], max_new_tokens=100)
    assert "[answer cancelled]" in out and "after" in out
    # the cancelled turn is not in the history of the next prompt
    assert model.prompts[-1] == "<｜begin▁of▁sentence｜><｜User｜>second<｜Assistant｜>"
    assert out.count("prompt eval count:") == 1


def test_context_overflow_is_reported_and_the_loop_goes_on(tokenizer):
    model = TurnModel(tokenizer, ["ok"], max_context=16)
    out = run_chat(model, tokenizer, ["the quick brown fox jumps over the lazy dog " * 3, "hi"],
                   max_new_tokens=4)
    assert "error: prompt has" in out and "context window is 16" in out
    assert out.count("prompt eval count:") == 1


def test_cli_arguments():
    args = parse_args(["--gguf_path", "m.gguf", "--force_think", "true", "--temperature", "0.3"])
    assert args.force_think is True and args.temperature == 0.3 and args.max_new_tokens == 1000
    with pytest.raises(SystemExit):
        parse_args(["--gguf_path", "m.gguf", "--force_think", "maybe"])


def test_cli_rejects_bad_sampling_before_loading(capsys):
    assert main(["--gguf_path", "missing.gguf", "--top_p", "2"]) == 2
    assert "SamplingParams.top_p=2.0" in capsys.readouterr().err


def test_cli_chats_with_the_tiny_model(tiny_model_dir):
    """The real command on the real tiny model: two turns from stdin, then EOF."""
    command = [sys.executable, "-m", "ktransformers.local_chat", "--model_path", str(tiny_model_dir),
               "--gguf_path", str(tiny_model_dir / "model.gguf"), "--max_new_tokens", "4",
               "--max_context", "64", "--force_think", "true", "--temperature", "0"]
    result = subprocess.run(command, input="hello\n你好\n", capture_output=True, text=True,
                            timeout=240, encoding="utf-8")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("Chat: <think>\n") == 2 and out.rstrip().endswith("Chat:")
    assert out.count("prompt eval count:") == 2
    counts = [int(n) for n in re.findall(r"^eval count:\s+(\d+) token", out, re.M)]
    assert len(counts) == 2 and all(1 <= n <= 4 for n in counts)
    prompts = [(int(run), int(reused)) for run, reused in
               re.findall(r"prompt eval count:\s+(\d+) token\(s\) \((\d+) more reused", out)]
    assert len(prompts) == 2 and prompts[0][1] == 0
    assert sum(prompts[1]) > sum(prompts[0])  # the second prompt carries the first turn
    assert prompts[1][1] > 0 and prompts[1][0] < sum(prompts[0])  # ... whose rows are reused, not run again


def test_sigint_during_an_answer_cancels_it_and_the_chat_goes_on(tiny_model_dir):
    command = [sys.executable, "-u", "-m", "ktransformers.local_chat", "--model_path",
               str(tiny_model_dir), "--gguf_path", str(tiny_model_dir / "model.gguf"),
               "--max_new_tokens", "8000", "--max_context", "8192", "--temperature", "0"]
    # an answer of ~20 s on the tiny model: a busy CI box must not finish it before the SIGINT lands
    # started with SIGINT ignored, as a background job's children are (CI ran it so): local_chat
    # must install its own handler, or Python raises no KeyboardInterrupt and the answer runs on
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, encoding="utf-8",
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    output = []
    reader = threading.Thread(target=lambda: output.extend(iter(lambda: proc.stdout.read(1), "")))
    reader.start()

    def wait_for(predicate, what):
        deadline = time.monotonic() + 180
        while not predicate("".join(output)):
            assert time.monotonic() < deadline and proc.poll() is None, f"no {what}: {output}"
            time.sleep(0.05)

    try:
        proc.stdin.write("hello\n")
        proc.stdin.flush()
        wait_for(lambda out: len(out.split("Chat: ", 1)[-1]) >= 3, "answer text")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda out: "[answer cancelled]" in out and out.endswith("Chat: "), "prompt")
        proc.stdin.close()  # EOF: quit
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        reader.join(timeout=10)
    out = "".join(output)
    assert "prompt eval count" not in out  # the answer never finished


def test_cli_reports_a_missing_model_file(tmp_path, capsys):
    assert main(["--gguf_path", str(tmp_path / "nope.gguf")]) == 2
    assert "nope.gguf" in capsys.readouterr().err
