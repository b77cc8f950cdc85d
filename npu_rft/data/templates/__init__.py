"""Prompt templates with named placeholders.

A template is plain text in which ``{name}`` is replaced by the value of the
field ``name``. Literal braces are written doubled: ``{{`` gives ``{`` and
``}}`` gives ``}`` (so the JSON example in the built-in templates reads
``{{ "possible_diseases": [...] }}`` in the file). Placeholders are bare names:
no format specs (``{x:>5}``), conversions (``{x!r}``), attributes or indexing.
A single newline at the very end of a template file is dropped, because most
editors add one; the published prompt ends without it.

The built-in DxBench templates (``dxbench_zh.txt``, ``dxbench_en.txt`` in this
folder) take ``{explicit_symptoms}``, ``{implicit_symptoms}``, ``{candidates}``,
``{department}`` and ``{id}``. The Chinese one, with the default system prompt,
reproduces the published training row character for character.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import FrozenSet, Mapping, Union

from npu_rft.data.schema import DataError

HERE = Path(__file__).resolve().parent

LANGUAGES = ("zh", "en")

# The published general-assistant persona (zh) and its English version.
DEFAULT_SYSTEM = {
    "zh": "你是一个擅长于文章写作、文本分析、代码编写、数学运算、逻辑推理的AI助手,专注于针对用户的问题给出高质量解答。",
    "en": (
        "You are an AI assistant skilled at writing, text analysis, coding, mathematics and logical "
        "reasoning, focused on giving high-quality answers to the user's questions."
    ),
}


class TemplateError(DataError):
    """A template that cannot be used; the message names the template and the fix."""


class Template:
    """``Template(text, name).render(values)``: ``text.format_map(values)`` with checked placeholders."""

    def __init__(self, text: str, name: str = "<template>") -> None:
        self.text = text
        self.name = name
        names = set()
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise TemplateError(f"{name}: {exc}; write a literal brace as {{{{ or }}}}") from None
        for _, field, spec, conversion in parsed:
            if field is None:
                continue
            if not field.isidentifier() or spec or conversion:
                raw = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
                raise TemplateError(
                    f"{name}: placeholder {raw} is not a bare name like {{candidates}}; "
                    "write a literal brace as {{ or }}"
                )
            names.add(field)
        self.placeholders: FrozenSet[str] = frozenset(names)

    def render(self, values: Mapping[str, str]) -> str:
        """Fill every placeholder; ``values`` must cover ``self.placeholders``."""
        return self.text.format_map(values)


def load_template(path: Union[str, Path]) -> Template:
    """Read a UTF-8 template file (one trailing newline dropped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TemplateError(f"{path}: template file not found") from None
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{path}: not valid UTF-8 ({exc.reason}); save the template as UTF-8") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    return Template(text, str(path))


def builtin_template(lang: str) -> Template:
    """The built-in DxBench diagnosis-ranking template for ``lang`` (``zh`` or ``en``)."""
    if lang not in LANGUAGES:
        raise TemplateError(f"no built-in template for language {lang!r}; choose one of {', '.join(LANGUAGES)}")
    return load_template(HERE / f"dxbench_{lang}.txt")
