"""Output formats: each is a pure function of a Report; none re-runs a check."""

from bncheck.render.github import render_github
from bncheck.render.json import render_diff_json, render_json
from bncheck.render.sarif import render_sarif
from bncheck.render.text import render_diff_text, render_text

__all__ = ["render_diff_json", "render_diff_text", "render_github", "render_json", "render_sarif", "render_text"]
