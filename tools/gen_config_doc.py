"""Regenerate docs/configs.md from the config dataclasses."""
from pathlib import Path

from npu_rft.config_doc import render

if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "docs" / "configs.md"
    path.write_text(render(), encoding="utf-8")
    print(f"wrote {path}")
