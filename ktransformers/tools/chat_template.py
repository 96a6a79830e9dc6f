"""The DeepSeek-R1 prompt format as a Jinja chat template (our own wording of the format).

bos, then the system prompt(s) as plain text; each user turn is `<｜User｜>text`; each assistant
turn is `<｜Assistant｜>answer<｜end▁of▁sentence｜>` where any reasoning up to `</think>` is dropped
from history; tool calls and tool results use the R1 tool markers; `add_generation_prompt`
appends `<｜Assistant｜>`.
"""

CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if not loop.first else '') + message['content'] -%}"
    "{%- endfor -%}"
    "{{- bos_token + ns.system -}}"
    "{%- for message in messages -%}"
    "{%- set previous_role = loop.previtem['role'] if not loop.first else '' -%}"
    "{%- set next_role = loop.nextitem['role'] if not loop.last else '' -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<｜User｜>' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set answer = (message['content'] or '').split('</think>')[-1] -%}"
    "{{- '<｜Assistant｜>' + answer -}}"
    "{%- if message.get('tool_calls') -%}"
    "{{- '<｜tool▁calls▁begin｜>' -}}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set function = call['function'] if 'function' in call else call -%}"
    "{%- set arguments = function['arguments'] if function['arguments'] is string else function['arguments'] | tojson -%}"
    "{{- '<｜tool▁call▁begin｜>function<｜tool▁sep｜>' + function['name'] + '\\n```json\\n' + arguments"
    " + '\\n```<｜tool▁call▁end｜>' -}}"
    "{%- endfor -%}"
    "{{- '<｜tool▁calls▁end｜>' -}}"
    "{%- endif -%}"
    "{{- '<｜end▁of▁sentence｜>' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if previous_role != 'tool' -%}{{- '<｜tool▁outputs▁begin｜>' -}}{%- endif -%}"
    "{{- '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' -}}"
    "{%- if next_role != 'tool' -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜>' -}}{%- endif -%}"
)
