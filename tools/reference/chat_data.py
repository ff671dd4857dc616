"""Chat-formatted examples mined from the corpus, so the chat template means something.

Every top-level function with a docstring in a training file becomes one exchange: the user asks
for a function doing what the docstring's first paragraph says, the assistant answers with the
function's source in a fenced block. Held-out files give held-out exchanges.
"""
from __future__ import annotations

import ast

from corpus import SourceFile, read_text

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The same text CHAT_TEMPLATE renders (kept in Python so the data needs no jinja)."""
    s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def exchanges(f: SourceFile, max_lines: int = 40) -> list[str]:
    text = read_text(f)
    if text is None:
        return []
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    out = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.end_lineno - node.lineno + 1 > max_lines:
            continue
        first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
        if len(first) < 20:
            continue
        src = "\n".join(lines[node.lineno - 1:node.end_lineno])
        msgs = [{"role": "user", "content": f"Write a Python function `{node.name}`: {first}"},
                {"role": "assistant", "content": f"```python\n{src}\n```"}]
        out.append(render(msgs))
    return out
