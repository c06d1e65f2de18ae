"""Output formats: each is a pure function of a Report."""

from bncheck.render.json import render_json
from bncheck.render.text import render_text

__all__ = ["render_json", "render_text"]
