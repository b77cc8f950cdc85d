"""docs/configs.md is generated from the config dataclasses and must match them."""
import dataclasses
from pathlib import Path

from npu_rft.config_doc import field_comments, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "configs.md"


def test_configs_md_matches_the_dataclasses():
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/configs.md is out of date; regenerate it with `python tools/gen_config_doc.py`"
    )


def test_field_comments_reads_the_comment_beside_or_above_a_field():
    @dataclasses.dataclass
    class Example:
        a: int = 1  # beside a
        # above b,
        # on two lines
        b: str = "x"
        c: float = 0.5

    assert field_comments(Example) == {"a": "beside a", "b": "above b, on two lines", "c": ""}


def test_every_key_is_documented():
    undocumented = [line.split("|")[1].strip() for line in render().splitlines()
                    if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not undocumented, f"config keys without a comment in the source: {undocumented}"
