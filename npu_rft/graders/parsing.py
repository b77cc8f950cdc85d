"""Finding the ``possible_diseases`` ranking in a free-text completion.

Rules, in order:

1. Thinking is ignored: when the text contains ``</think>``, only what follows
   the last one is read (a chat template may open ``<think>`` in the prompt,
   so an opening tag is not required). A ``<think>`` that is never closed
   leaves no answer.
2. The ranking is the value of the last key ``possible_diseases`` (bare, or in
   double or single quotes) that is followed by ``:`` or ``=``. So when several
   objects appear (a fenced ```json block, an echo of the prompt's example,
   a final answer) the last one counts; fences and surrounding prose do not
   matter, nor does the object's closing brace.
3. The value must be a flat list of at most ``MAX_ITEMS`` (1024) string
   literals: JSON ``"..."`` or Python ``'...'``, with their escapes. A trailing
   comma is accepted. A longer list is a format failure: a ranking of a few
   candidates that long can only be padding, and the bound keeps a hostile
   list cheap to reject.

Cost is linear in the text: one backwards scan for the key, one regular
expression over the list whose alternatives cannot overlap, and no retry from
every ``{``. Nothing here raises on any input, and model text is never
evaluated: string literals are decoded by ``json.loads`` and the
``unicode_escape`` codec, never by ``eval``.
"""
from __future__ import annotations

import json
import re
from typing import List, Optional, Tuple

KEY = "possible_diseases"

# Failure reasons, as Grade.reason reports them (evaluation counts format failures).
UNCLOSED_THINK = "unterminated <think> block"
NO_JSON = "no JSON: no possible_diseases key"
NO_LIST = "no list: possible_diseases is not followed by a list"
WRONG_TYPES = "wrong types: possible_diseases is not a closed list of at most 1024 strings"

_KEY_TAIL = re.compile(r"""["']?[ \t]*[:=]\s*""")
# String literals as "unrolled loops": a run of plain characters, then escape + run, repeated.
_STRING = r""""[^"\\]*(?:\\.[^"\\]*)*"|'[^'\\]*(?:\\.[^'\\]*)*'"""
_STRING_RE = re.compile(_STRING, re.DOTALL)
# A ranking holds at most MAX_ITEMS strings; a longer list is a format failure
# (it can only be padding), and the bound keeps hostile lists cheap to reject.
MAX_ITEMS = 1024
_LIST_RE = re.compile(rf"\[\s*(?:(?:{_STRING})(?:\s*,\s*(?:{_STRING})){{0,{MAX_ITEMS - 1}}}\s*,?\s*)?\]", re.DOTALL)


def strip_thinking(text: str) -> Optional[str]:
    """The text after the last ``</think>``; the whole text when there is no think block;
    None when a ``<think>`` is never closed."""
    end = text.rfind("</think>")
    if end >= 0:
        return text[end + len("</think>"):]
    return None if "<think>" in text else text


def _decode(token: str) -> str:
    """One string literal -> its value; the raw content when its escapes are invalid.

    A Python literal's escapes are decoded by the ``unicode_escape`` codec
    (what ``ast.literal_eval`` would give for one quoted string, without
    building a syntax tree); characters beyond Latin-1 are first written as
    ``\\uXXXX`` escapes so that the codec passes them through unchanged.
    """
    content = token[1:-1]
    if "\\" not in content:
        return content
    try:
        if token[0] == '"':
            return json.loads(token, strict=False)
        return content.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except (ValueError, UnicodeError):
        return content


def parse_ranking(completion: str) -> Tuple[Optional[List[str]], Optional[str]]:
    """``(items, None)`` for the ranking found in ``completion``, else ``(None, reason)``.

    ``items`` are the list's strings as written (not normalised or de-duplicated).
    """
    items, _, reason = find_ranking(completion)
    return items, reason


def text_after_ranking(completion: str) -> Tuple[Optional[str], Optional[str]]:
    """``(rest, None)``: what follows the ranking's closing ``]`` in ``completion``;
    ``(None, reason)`` when there is no ranking (``parse_ranking``'s reasons)."""
    items, rest, reason = find_ranking(completion)
    return (None, reason) if items is None else (rest, None)


def find_ranking(completion: str) -> Tuple[Optional[List[str]], Optional[str], Optional[str]]:
    """``(items, text after the list, None)``, or ``(None, None, reason)``: ``parse_ranking``
    and ``text_after_ranking`` in one pass."""
    text = strip_thinking(completion)
    if text is None:
        return None, None, UNCLOSED_THINK
    pos = len(text)
    while True:
        pos = text.rfind(KEY, 0, pos)
        if pos < 0:
            return None, None, NO_JSON
        tail = _KEY_TAIL.match(text, pos + len(KEY))
        if tail is not None:
            break
    start = tail.end()
    if not text.startswith("[", start):
        return None, None, NO_LIST
    match = _LIST_RE.match(text, start)
    if match is None:
        return None, None, WRONG_TYPES
    return [_decode(token) for token in _STRING_RE.findall(match.group())], text[match.end():], None
