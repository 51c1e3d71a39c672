"""The chat template our GGUF carries (`tokenizer.chat_template`): what llama.cpp, llama-cpp-python
and LM Studio render an OpenAI-style conversation with. It writes Mistral v0.3's prompt as
mistral-common encodes it, which is how training encoded every example:

- the system prompt goes on the LAST user message (`[INST] {system}\\n\\n{user}[/INST]`), where
  the stock Hugging Face template drops it from any conversation that ends with an assistant turn;
- the tool list, `[AVAILABLE_TOOLS] [...][/AVAILABLE_TOOLS]`, goes right before that message;
- tool calls are `[TOOL_CALLS] [{"name", "arguments", "id"}]</s>` and tool results
  `[TOOL_RESULTS] {"content", "call_id"}[/TOOL_RESULTS]`, with the history kept (v3 keeps it).

A space follows each control token as SentencePiece's dummy prefix puts one there; the GGUF says
`tokenizer.ggml.add_space_prefix = false` so that llama.cpp does not add a second one.

JSON is written by the template itself, not by the engine's `tojson`: Jinja2's sorts keys and
escapes non-ASCII, other engines do neither, and mistral-common keeps the keys' order and the text
as it is (`json.dumps(..., ensure_ascii=False)`). Where the template cannot follow mistral-common
(it has no JSON parser): arguments and tool results given as text are inserted as they are when
they look like JSON (`{...}`, `[...]`), else quoted as a string, so a result of "22" stays the
string "22" where mistral-common would write the number 22.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = r"""
{%- macro json_string(text) -%}
"{{ text|replace('\\', '\\\\')|replace('"', '\\"')|replace('\n', '\\n')|replace('\r', '\\r')|replace('\t', '\\t') }}"
{%- endmacro -%}
{%- macro json(value) -%}
{%- if value is none -%}null
{%- elif value is boolean -%}{{ 'true' if value else 'false' }}
{%- elif value is string -%}{{ json_string(value) }}
{%- elif value is mapping -%}{
{%- for key in value -%}{{ json_string(key) }}: {{ json(value[key]) }}{% if not loop.last %}, {% endif %}{%- endfor -%}
}
{%- elif value is iterable -%}[
{%- for item in value -%}{{ json(item) }}{% if not loop.last %}, {% endif %}{%- endfor -%}
]
{%- else -%}{{ value }}
{%- endif -%}
{%- endmacro -%}
{%- macro json_text(value) -%}
{%- if value is string and (value.startswith('{') or value.startswith('[')) -%}{{ value }}
{%- else -%}{{ json(value) }}
{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(system='', last_user=-1) -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{%- set ns.system = message['content'] if not ns.system else ns.system + '\n\n' + message['content'] -%}
{%- elif message['role'] == 'user' -%}
{%- set ns.last_user = loop.index0 -%}
{%- endif -%}
{%- endfor -%}
{{- bos_token -}}
{%- for message in messages -%}
{%- if message['role'] == 'user' -%}
{%- if loop.index0 == ns.last_user and tools -%}
[AVAILABLE_TOOLS] [
{%- for tool in tools -%}
{%- set function = tool['function'] if tool['function'] is defined else tool -%}
{"type": "function", "function": {"name": {{ json_string(function['name']) }}, "description": {{ json_string(function['description'] or '') }}, "parameters": {{ json(function['parameters'] or {}) }}}}{% if not loop.last %}, {% endif %}
{%- endfor -%}
][/AVAILABLE_TOOLS]
{%- endif -%}
[INST] {% if loop.index0 == ns.last_user and ns.system %}{{ ns.system }}{{ '\n\n' }}{% endif %}{{ message['content'] }}[/INST]
{%- elif message['role'] == 'assistant' -%}
{%- if message['tool_calls'] -%}
[TOOL_CALLS] [
{%- for call in message['tool_calls'] -%}
{%- set function = call['function'] if call['function'] is defined else call -%}
{"name": {{ json_string(function['name']) }}, "arguments": {{ json_text(function['arguments']) }}{% if call['id'] %}, "id": {{ json_string(call['id']) }}{% endif %}}{% if not loop.last %}, {% endif %}
{%- endfor -%}
]{{ eos_token }}
{%- else -%}
{{ ' ' }}{{ message['content'] }}{{ eos_token }}
{%- endif -%}
{%- elif message['role'] == 'tool' -%}
[TOOL_RESULTS] {"content": {{ json_text(message['content']) }}, "call_id": {{ json_string(message['tool_call_id']) }}}[/TOOL_RESULTS]
{%- elif message['role'] != 'system' -%}
{{ raise_exception('Mistral v0.3 knows the roles system, user, assistant and tool, not ' + message['role']) }}
{%- endif -%}
{%- endfor -%}
"""


def render(messages: list[dict], tools: list[dict] | None = None, *, bos: str = "<s>", eos: str = "</s>",
           template: str = CHAT_TEMPLATE, **jinja_options) -> str:
    """The template rendered as Jinja2 renders it (llama-cpp-python's and transformers' engine)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(**jinja_options)
    return env.from_string(template).render(messages=messages, tools=tools, bos_token=bos, eos_token=eos,
                                            raise_exception=raise_exception, add_generation_prompt=True)


def write_into(folder: Path) -> None:
    """Give a merged model folder's tokenizer this template in place of the one the base came with (Hugging
    Face's drops the system prompt): in tokenizer_config.json, and in chat_template.jinja, which transformers 5
    writes and reads first, so that no copy of the base's template is left to win."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    config["chat_template"] = CHAT_TEMPLATE
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
