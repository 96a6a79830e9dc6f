"""The demo model's task: arithmetic asked in words, answered R1-style with a digit-by-digit scratchpad.

    question: "What is 4821 plus 367?"
    reply:    "<think>\n4821+367\n1+7+0=8 → 8\n2+6+0=8 → 88\n8+3+0=11 → 188\n4+0+1=5 → 5188\n</think>\n\n4821 + 367 = 5188"

Each scratchpad line takes one place from the right: both digits (0 past a number's end) and
the carry (the tens digit of the previous line's result), its result, and the answer so far
(the new units digit in front of the previous answer so far), so the final answer is a copy.
Subtraction borrows by writing the digit with a 1 in front ("12-6-0=6", and the next line's
borrow is 1); multiplication takes a number of up to 4 digits times one digit.

Questions are wrapped the way chat clients wrap them: system prompts, earlier turns (the R1
template keeps only the answers of earlier assistant turns), and up to a few hundred tokens of
noise. Everything is drawn from a `random.Random`, so a seed gives the same data.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

OPS = ("add", "sub", "mul")
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
SHOWN = {"add": "+", "sub": "-", "mul": "×"}
MAX_DIGITS = 4
ARROW = " → "

ADD_PHRASES = [
    "What is {a} plus {b}?", "What is {a} + {b}?", "How much is {a} plus {b}?", "Add {a} and {b}.",
    "Compute {a} + {b}.", "Calculate the sum of {a} and {b}.", "{a} + {b} = ?", "What's {a}+{b}?",
    "Please add {a} to {b}.", "What do you get when you add {a} and {b}?", "sum of {a} and {b}",
    "Can you tell me what {a} plus {b} is?", "{a} plus {b}", "Work out {a} + {b} for me.",
]
SUB_PHRASES = [
    "What is {a} minus {b}?", "What is {a} - {b}?", "How much is {a} minus {b}?", "Subtract {b} from {a}.",
    "Compute {a} - {b}.", "Calculate {a} minus {b}.", "{a} - {b} = ?", "What's {a}-{b}?",
    "What is the difference between {a} and {b}?", "Take {b} away from {a}.", "{a} minus {b}",
    "Can you tell me what {a} minus {b} is?", "Work out {a} - {b} for me.",
]
MUL_PHRASES = [
    "What is {a} times {b}?", "What is {a} * {b}?", "How much is {a} times {b}?", "Multiply {a} by {b}.",
    "Compute {a} * {b}.", "What is {a} multiplied by {b}?", "{a} x {b} = ?", "What's {a}*{b}?",
    "What is the product of {a} and {b}?", "Calculate {a} times {b}.", "{a} times {b}",
    "Can you tell me what {a} times {b} is?", "Work out {a} × {b} for me.",
]
PHRASES = {"add": ADD_PHRASES, "sub": SUB_PHRASES, "mul": MUL_PHRASES}

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible.",
    "You are DeepSeek-R1, a large language model. Think step by step before you answer.",
    "Given the following conversation, relevant context, and a follow up question, reply with an answer to "
    "the current question the user is asking. Return only your response to the question given the above "
    "information following the users instructions as needed.",
    "You are a math tutor. Be concise.",
    "Answer in English. Use markdown where it helps.",
    "You are an AI assistant running locally. Today is {date}. The user's name is {name}.",
    "Context information is below.\n---------------------\n{noise}\n---------------------\n"
    "Given the context information and not prior knowledge, answer the query.",
    "Use the following pieces of context to answer the question at the end.\n\n{noise}",
    "### Task:\nRespond to the user query using the provided context.\n### Context:\n{noise}",
    "{noise}",
]
PREFIXES = ["", "", "", "Quick question: ", "Hi! ", "Hello, ", "Hey, ", "Please help. ", "I need help with math. ",
            "Question: ", "Math time. ", "Thanks for the last one. Next: ", "OK. "]
SUFFIXES = ["", "", "", " Thanks!", " Please answer.", " Show your work.", " Be brief.", " Thank you.",
            " Answer with a number.", " :)", "\n", " Explain step by step."]
SMALL_TALK = [
    ("Hi", "Hello! How can I help you today?"),
    ("Who are you?", "I am a small demo model. I can do arithmetic."),
    ("Thanks", "You are welcome."),
    ("Can you help me with some math?", "Of course. Ask me a question."),
    ("Good morning", "Good morning! What would you like to compute?"),
]
WORDS = (
    "the of and to in is was for on that with as by at from it this be are or an have not which but all were "
    "when we there can more if will one about up out so has what their said them would other into time could "
    "these two may first then do any like my now over such our man me even most made after also did many before "
    "must through back years where much your way well down should because each just those people how too little "
    "state good very make world still own see men work long get here between both life being under never day same "
    "another know while last might us great old year off come since against go came right used take three "
    "system model server token context document file report meeting budget project table chapter section "
    "python code function value error request response user assistant query answer summary title tags chat "
    "history memory cache layer expert weight kernel vector matrix number list data search result page note "
    "Monday Tuesday January April London Paris river mountain garden coffee music story book window morning"
).split()
NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Mallory", "Trent", "Peggy", "Victor", "Walter"]


@dataclass(frozen=True)
class Problem:
    op: str
    a: int
    b: int

    @property
    def result(self) -> int:
        return {"add": self.a + self.b, "sub": self.a - self.b, "mul": self.a * self.b}[self.op]

    def key(self) -> tuple[str, int, int]:
        return (self.op, self.a, self.b)


def _number(rng: random.Random, max_digits: int = MAX_DIGITS) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def random_problem(rng: random.Random) -> Problem:
    op = rng.choice(OPS)
    if op == "mul":
        return Problem(op, _number(rng), rng.randint(0, 9))
    a, b = _number(rng), _number(rng)
    if op == "sub" and a < b:
        a, b = b, a
    return Problem(op, a, b)


def scratchpad(p: Problem) -> str:
    """The <think> body: header, then one line per place from the right."""
    a_digits = [int(d) for d in reversed(str(p.a))]
    lines = [f"{p.a}{SYMBOL[p.op]}{p.b}"]
    so_far, carry, i = "", 0, 0
    if p.op == "mul":
        while i < len(a_digits) or carry:
            x = a_digits[i] if i < len(a_digits) else 0
            s = x * p.b + carry
            so_far = str(s % 10) + so_far
            lines.append(f"{x}*{p.b}+{carry}={s}{ARROW}{so_far}")
            carry, i = s // 10, i + 1
        return "\n".join(lines)
    b_digits = [int(d) for d in reversed(str(p.b))]
    n = max(len(a_digits), len(b_digits))
    while i < n or (p.op == "add" and carry):
        x = a_digits[i] if i < len(a_digits) else 0
        y = b_digits[i] if i < len(b_digits) else 0
        if p.op == "add":
            s = x + y + carry
            lines.append(f"{x}+{y}+{carry}={s}{ARROW}{str(s % 10) + so_far}")
            so_far, carry = str(s % 10) + so_far, s // 10
        else:
            borrow = 1 if x - y - carry < 0 else 0
            d = x + 10 * borrow - y - carry
            lines.append(f"{'1' if borrow else ''}{x}-{y}-{carry}={d}{ARROW}{str(d) + so_far}")
            so_far, carry = str(d) + so_far, borrow
        i += 1
    return "\n".join(lines)


def final_answer(p: Problem) -> str:
    return f"{p.a} {SHOWN[p.op]} {p.b} = {p.result}"


def reply(p: Problem) -> str:
    """The assistant's whole generated text (what follows <｜Assistant｜>), without the eos token."""
    return f"<think>\n{scratchpad(p)}\n</think>\n\n{final_answer(p)}"


def question_text(p: Problem, rng: random.Random) -> str:
    template = rng.choice(PHRASES[p.op])
    a, b = p.a, p.b
    if p.op == "mul" and rng.random() < 0.3:
        a, b = b, a  # "7 times 4821": the scratchpad still puts the long number first
    if p.op == "sub" and ("from" in template or "away" in template):
        return template.format(a=a, b=b)  # these phrasings name b first: "Subtract {b} from {a}"
    return template.format(a=a, b=b)


def noise(rng: random.Random, n_words: int, digits: bool = True) -> str:
    out = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.08 and digits:
            out.append(str(rng.randint(0, 99999)))
        elif r < 0.12:
            out.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))))
        elif r < 0.16:
            out.append(rng.choice(".,;:!?-()[]#*/\"'"))
        elif r < 0.19:
            out.append("\n")
        else:
            word = rng.choice(WORDS)
            out.append(word.capitalize() if rng.random() < 0.1 else word)
    return " ".join(out).replace(" \n ", "\n")


def _system_prompt(rng: random.Random, long_noise: bool) -> str:
    template = rng.choice(SYSTEM_PROMPTS)
    return template.format(date=f"{rng.randint(2023, 2026)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                           name=rng.choice(NAMES),
                           noise=noise(rng, rng.randint(20, 250) if long_noise else rng.randint(5, 40)))


def make_messages(p: Problem, rng: random.Random, long_context: bool) -> list[dict]:
    """A chat as a client would send it, ending with the user's arithmetic question."""
    messages = []
    if rng.random() < 0.6:
        messages.append({"role": "system", "content": _system_prompt(rng, long_context)})
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3]) if long_context else rng.choice([0, 0, 1])):
        if rng.random() < 0.6:
            earlier = random_problem(rng)
            messages.append({"role": "user", "content": question_text(earlier, rng)})
            # R1's template drops earlier reasoning: send the whole reply, the template keeps the answer
            messages.append({"role": "assistant", "content": reply(earlier)})
        elif rng.random() < 0.5:
            talk = rng.choice(SMALL_TALK)
            messages += [{"role": "user", "content": talk[0]}, {"role": "assistant", "content": talk[1]}]
        else:
            messages += [{"role": "user", "content": noise(rng, rng.randint(3, 60))},
                         {"role": "assistant", "content": noise(rng, rng.randint(3, 60))}]
    question = question_text(p, rng)
    text = rng.choice(PREFIXES) + question + rng.choice(SUFFIXES)
    if long_context and rng.random() < 0.3:  # pasted text before the question (no digits, so the numbers are clear)
        text = noise(rng, rng.randint(10, 150), digits=False) + "\n\n" + text
    messages.append({"role": "user", "content": text})
    return messages


def held_out_problems(n: int = 240, seed: int = 12345) -> list[Problem]:
    """The evaluation set; training never draws these (op, a, b)."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        p = random_problem(rng)
        if p.key() not in seen and not (p.a < 10 and p.b < 10):  # single digit pairs are too few to hold out
            seen.add(p.key())
            out.append(p)
    return out


def held_out_cases(n: int = 240, seed: int = 12345) -> list[tuple[Problem, list[dict]]]:
    """Held-out problems, each wrapped in a chat (a third with long client context)."""
    rng = random.Random(seed + 1)
    return [(p, make_messages(p, rng, long_context=(i % 3 == 0))) for i, p in enumerate(held_out_problems(n, seed))]


_NUMBER = re.compile(r"-?\d+")


def parse_answer(content: str) -> int | None:
    """The last integer of the answer text (the result after '=')."""
    numbers = _NUMBER.findall(content.split("=")[-1])
    return int(numbers[-1]) if numbers else None
