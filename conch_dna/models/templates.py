"""Chat templates are code that a model file brings: a model is used only when its template's work is bounded.

A template is Jinja, rendered (in transformers' sandbox) for every prompt; the sandbox stops file access but
not work: `{% for i in range(100000) %}{% for j in range(100000) %}` renders for hours. Before a model is
used, `check_chat_template` renders its template on a probe conversation of realistic size under a budget
of traced template lines and a bound on string and list repetition; a template that spends more is refused.
Ordinary templates spend a few hundred lines there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Template lines one render of the probe conversation may run, and the longest string or list `*` may build.
LINE_BUDGET = 1_000_000
REPEAT_LIMIT = 1 << 20

PROBE = [
    {"role": "system", "content": "You are a careful assistant. " * 20},
    {"role": "user", "content": "Explain, step by step, how a hash table finds a value. " * 70},
    {"role": "assistant", "content": "It hashes the key, picks a bucket, then compares keys. " * 20},
    {"role": "user", "content": "And when two keys share a bucket?"},
]


class ChatTemplateError(ValueError):
    """A model's chat template does unbounded work; the message names the model and what to do."""


class _OverBudget(Exception):
    pass


def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > REPEAT_LIMIT:
                        raise _OverBudget(f"builds a sequence of {len(seq) * n:,} items")
            if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
                raise _OverBudget(f"raises to the power {right}")
            return super().call_binop(context, operator, left, right)

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    try:  # what transformers renders templates with (its filters, globals and {% generation %} tag), bounded
        from transformers.utils.chat_template_utils import _compile_jinja_template

        theirs = _compile_jinja_template("").environment
        env.filters.update(theirs.filters)
        env.globals.update(theirs.globals)
        for extension in theirs.extensions.values():
            env.add_extension(type(extension))
    except Exception:  # another transformers: the plain sandbox still bounds the work
        pass
    return env


def check_chat_template(template: str | None, where: str) -> None:
    """Refuse (`ChatTemplateError`) a chat template that spends more than LINE_BUDGET template lines, or builds a
    longer sequence than REPEAT_LIMIT, rendering the probe conversation. Errors a template raises on purpose
    (an unsupported role) are its own business: only unbounded work is refused."""
    if not template:
        return
    try:
        compiled = _environment().from_string(template)
    except Exception:  # a template that does not even compile is refused by whoever renders it, with its error
        return
    spent = 0

    def trace(frame, event, arg):
        nonlocal spent
        if frame.f_code.co_filename != "<template>":
            return None
        if event == "line":
            spent += 1
            if spent > LINE_BUDGET:
                raise _OverBudget(f"runs over {LINE_BUDGET:,} template lines")
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        compiled.render(messages=PROBE, add_generation_prompt=True, bos_token="<s>", eos_token="</s>",
                        tools=None, documents=None)
    except _OverBudget as e:
        raise ChatTemplateError(f"the chat template of {where} does unbounded work: rendering a four-message "
                                f"conversation it {e}. Replace `chat_template` (tokenizer_config.json) with the "
                                "model's published one") from None
    except Exception:
        pass
    finally:
        sys.settrace(previous)


def folder_chat_templates(folder: Path) -> list[str]:
    """The chat templates a model folder's tokenizer may use (tokenizer_config.json, chat_template.jinja)."""
    out = []
    if (folder / "chat_template.jinja").is_file():
        out.append((folder / "chat_template.jinja").read_text(errors="replace"))
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        template = None
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        out += [t["template"] for t in template if isinstance(t, dict) and isinstance(t.get("template"), str)]
    elif isinstance(template, str):
        out.append(template)
    return out


def check_folder_chat_templates(folder: Path) -> None:
    """`check_chat_template` for every template of a model folder."""
    for template in folder_chat_templates(folder):
        check_chat_template(template, str(folder))
