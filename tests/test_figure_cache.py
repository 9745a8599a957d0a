"""Report figures keyed by their inputs (``mergesec.report.figure_cache``)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mergesec.plots import plot_scale_curves
from mergesec.report.figure_cache import cached_figure, figure_key, png_tag, tag_png

CURVES = {"release": [{"s": s, "loss": 1 + s, "accuracy": 0.5} for s in (0.0, 0.5, 1.0)]}


def counting_draw():
    """``plot_scale_curves`` that counts its calls in ``calls`` (same module and name)."""

    def draw(inputs):
        draw.calls += 1
        return plot_scale_curves(inputs)

    draw.calls = 0
    draw.__module__ = plot_scale_curves.__module__
    draw.__qualname__ = plot_scale_curves.__qualname__
    return draw


def test_a_tagged_png_still_decodes_and_carries_its_key():
    png = plot_scale_curves(CURVES)
    assert png_tag(png) is None
    tagged = tag_png(png, "abc123")
    assert png_tag(tagged) == "abc123"
    image = Image.open(io.BytesIO(tagged))
    image.load()  # checks every chunk's CRC
    assert image.text.get("mergesec-inputs") == "abc123"
    assert image.size == Image.open(io.BytesIO(png)).size
    with pytest.raises(ValueError, match="not a PNG"):
        tag_png(b"GIF89a...", "x")
    assert png_tag(b"not a png") is None and png_tag(tagged[:40]) is None


def test_a_figure_is_drawn_once_for_the_same_inputs_and_again_when_they_change():
    draw = counting_draw()
    first = cached_figure(None, draw, CURVES)
    assert draw.calls == 1 and png_tag(first) == figure_key(draw, CURVES)
    assert cached_figure(first, draw, CURVES) is first and draw.calls == 1
    changed = {"release": [dict(p, accuracy=0.9) for p in CURVES["release"]]}
    second = cached_figure(first, draw, changed)
    assert draw.calls == 2 and second != first and png_tag(second) == figure_key(draw, changed)
    # a stored file that is not one of ours (or is damaged) is drawn over
    assert cached_figure(b"\x89PNG\r\n\x1a\n broken", draw, CURVES) is not None
    assert draw.calls == 3


def test_the_key_depends_on_the_drawing_function():
    def other(inputs):
        return None

    assert figure_key(other, CURVES) != figure_key(plot_scale_curves, CURVES)
    assert cached_figure(None, other, CURVES) is None
