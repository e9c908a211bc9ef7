"""plot.py by its pixels: ticks where their values are, the legend clear of the data, density
regions that hold their mass, colour-bar ends at the data range, panels where they belong."""

import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageColor

import plot


def rgb(image, xy):
    return image.getpixel((int(round(xy[0])), int(round(xy[1]))))


def near(image, xy, color) -> bool:
    """color within one pixel of xy (thin diagonal lines)."""
    x, y = int(round(xy[0])), int(round(xy[1]))
    return any(image.getpixel((x + i, y + j)) == color for i in (-1, 0, 1) for j in (-1, 0, 1))


def test_import_loads_no_font_and_no_torch():
    code = ("import sys, plot; assert plot.font.cache_info().currsize == 0; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_nice_ticks_and_labels():
    assert plot.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]  # 0.6 exactly, not 0.6000001
    assert plot.nice_ticks(-2.5, 2.5) == [-2, -1, 0, 1, 2]
    assert plot.nice_ticks(0.3, 0.7) == [0.3, 0.4, 0.5, 0.6, 0.7]
    assert plot.nice_ticks(0, 1800) == [0, 500, 1000, 1500]
    assert plot.log_ticks(1e-3, 1e4) == [10.0**k for k in range(-3, 5)]
    assert plot.log_ticks(0.3, 4) == [0.5, 1, 2]  # under two decades: 2x and 5x too
    assert [plot.tick_label(v) for v in (1e-4, 0.001, 0.3, 1000, 1e4, 2.5e-5)] == [
        "1e-4", "0.001", "0.3", "1000", "1e4", "2.5e-5"]


def test_auto_limits_hold_all_data():
    assert plot.auto_limits([[2e-3, 1814.0]], log=True) == (1e-3, 1e4)
    assert plot.auto_limits([[0.0, -1.0, 5.0]], log=True) == (1.0, 10.0)  # <= 0 not drawable
    assert plot.auto_limits([[0.13, 0.87]]) == (0.0, 1.0)  # whole steps of 0.2
    lo, hi = plot.auto_limits([[-0.13, 0.33]])
    assert lo == pytest.approx(-0.2) and hi == pytest.approx(0.4)  # steps of 0.1


@pytest.mark.parametrize("log", [False, True])
def test_tick_lands_on_its_pixel(log):
    """x tick 0.4 of [0, 1] (log: 10 of [1, 1000]) a fraction 0.4 (1/3) along the axis; the
    y tick the same way from the bottom."""
    lim, value, frac = ((1, 1000), 10, 1 / 3) if log else ((0, 1), 0.4, 0.4)
    image = Image.new("RGB", (300, 200), "white")
    box = (50, 20, 250, 170)
    plot.Axes(image, box, lim, lim, logx=log, logy=log).frame()
    x, y = round(50 + frac * 200), round(170 - frac * 150)
    black, white = (0, 0, 0), (255, 255, 255)
    assert [image.getpixel((x + dx, 172)) for dx in (-2, 0, 2)] == [white, black, white]
    assert [image.getpixel((47, y + dy)) for dy in (-2, 0, 2)] == [white, black, white]


def test_line_plot_legend_hides_no_point():
    """Curves through every corner of the data area: each point drawn where the axes put it,
    none under the legend."""
    x = np.geomspace(1e-3, 10, 50)
    curves = {"rising": (x, x**2), "falling": (x, 1 / x), "flat": (x, np.full(50, 3.0))}
    image = plot.line_plot(curves, logx=True, logy=True, points={"flat": ([1e-3], [1e6])},
                           points_label="a dot")
    boxes = image.info["boxes"]
    left, top, right, bottom = boxes["data"]
    (xlo, xhi), (ylo, yhi) = (1e-3, 10), (1e-6, 1e6)  # the enclosing decades
    for color, (label, (cx, cy)) in zip(plot.COLORS, curves.items(), strict=False):
        px = left + np.log10(cx / xlo) / math.log10(xhi / xlo) * (right - left)
        py = bottom - np.log10(cy / ylo) / math.log10(yhi / ylo) * (bottom - top)
        a, b, c, d = boxes["legend"]
        assert not np.any((px >= a) & (px <= c) & (py >= b) & (py <= d)), label
        for p in zip(px[5:-5:9], py[5:-5:9], strict=True):  # inside, away from the frame
            assert near(image, p, ImageColor.getrgb(color)), (label, p)


def test_clipped_values_are_marked():
    """y = 100 beyond ylim = (1, 10): triangles below the top edge, absent when it fits."""
    x = np.linspace(1, 2, 30)
    for ylim, marked in (((1, 10), True), ((1, 1000), False)):
        image = plot.line_plot({"a": (x, np.full(30, 100.0))}, ylim=ylim, logy=True)
        left, top, right, _ = image.info["boxes"]["data"]
        band = np.asarray(image)[top + 4:top + 9, left + 1:right]
        hits = (band == ImageColor.getrgb(plot.COLORS[0])).all(-1).sum()
        assert (hits > 0) == marked, (ylim, hits)


def test_density_regions_hold_their_mass():
    """N(0, 0.5^2 I): the 50% region is the disc of radius 0.5 sqrt(2 ln 2)."""
    pts = plot.cell_centres((-2, 2), (-2, 2), (400, 400))
    p = np.exp(-(pts**2).sum(-1) / (2 * 0.25))
    image = plot.scatter_plot([], [], xlim=(-2, 2), ylim=(-2, 2), density=p, size=240)
    inner = (np.asarray(image) == plot.SHADES[3]).all(-1).sum()
    r = 0.5 * math.sqrt(2 * math.log(2)) * 240 / 4  # in pixels
    assert abs(inner / (math.pi * r**2) - 1) < 0.1, inner / (math.pi * r**2)


def test_scatter_points_land_on_their_pixels():
    image = plot.scatter_plot([-1.0, 1.5], [0.5, -2.0], xlim=(-2, 2), ylim=(-3, 1),
                              color="#ff0000", alpha=1.0)
    left, top, right, bottom = image.info["boxes"]["data"]
    for x, y in ((-1.0, 0.5), (1.5, -2.0)):
        p = (left + (x + 2) / 4 * (right - left), bottom - (y + 3) / 4 * (bottom - top))
        assert rgb(image, p) == (255, 0, 0)


def test_heat_map_colour_bar_ends_are_the_data_range():
    v = np.linspace(-3.0, 5.0, 8 * 12).reshape(8, 12)  # min top-left, max bottom-right
    image = plot.heat_map(v, size=120)
    (l0, t0, r0, b0), (l1, t1, r1, b1) = (image.info["boxes"][k] for k in ("data", "colorbar"))
    cell = (r0 - l0 + 1) / 12
    assert cell == 10
    at = {(i, j): rgb(image, (l0 + (j + 0.5) * cell, t0 + (i + 0.5) * cell))
          for i, j in ((0, 0), (7, 11), (3, 5))}
    assert image.getpixel((l1 + 8, b1)) == at[0, 0]  # vmin's colour at the bottom end
    assert image.getpixel((l1 + 8, t1)) == at[7, 11]  # vmax's at the top
    frac = (v[3, 5] - v.min()) / (v.max() - v.min())
    bar = image.getpixel((l1 + 8, round(b1 - frac * (b1 - t1))))
    assert max(abs(a - b) for a, b in zip(bar, at[3, 5], strict=True)) <= 3
    assert at[0, 0] == tuple(plot.colormap(0.0)) and at[7, 11] == tuple(plot.colormap(1.0))


def test_bar_plot_bars_end_at_their_values():
    image = plot.bar_plot({"a": [0.001], "b": [0.5]}, series=["s"], logx=True)
    left, top, right, bottom = image.info["boxes"]["data"]
    lo, hi = 1e-4, 1.0  # a decade below the smallest bar, the decade above the largest
    for row, value in ((0, 0.001), (1, 0.5)):
        end = left + math.log10(value / lo) / math.log10(hi / lo) * (right - left)
        yc = top + (row + 0.5) * (bottom - top) / 2
        assert rgb(image, (end - 2, yc)) == ImageColor.getrgb(plot.COLORS[0])
        assert rgb(image, (end + 2, yc)) != ImageColor.getrgb(plot.COLORS[0])


def test_image_grid_places_every_panel():
    colors = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(9, 9, 9), (200, 100, 0)]]
    sizes = [[(40, 30), (50, 30), (20, 10)], [(40, 20), (30, 25)]]  # (w, h)
    rows = [[np.full((h, w, 3), c, np.uint8) for (w, h), c in zip(sz, cs, strict=True)]
            for sz, cs in zip(sizes, colors, strict=True)]
    rows[1][1] = Image.fromarray(rows[1][1])  # PIL images too
    titles = [["measurement", "restored", "reference"], ["", ""]]
    image = plot.image_grid(rows, titles=titles, gap=4, min_width=1)
    widths, heights, strips = [40, 50, 20], [30, 25], [20, 0]
    assert image.size == (sum(widths) + 2 * 4, sum(heights) + sum(strips) + 4)
    y = 0
    for i, row in enumerate(sizes):
        for j, (w, h) in enumerate(row):
            x0 = sum(widths[:j]) + 4 * j + (widths[j] - w) // 2
            y0 = y + strips[i] + (heights[i] - h) // 2
            for p in ((x0, y0), (x0 + w - 1, y0 + h - 1)):  # the panel's corners
                assert image.getpixel(p) == colors[i][j], (i, j, p)
            assert image.getpixel((x0 - 1, y0)) == (255, 255, 255) or j == 0  # separator
        y += strips[i] + heights[i] + 4
    title = np.asarray(image)[:strips[0], :40]
    assert (title < 128).all(-1).any(), "the title is drawn above its panel"


def ink_columns(strip) -> np.ndarray:
    """The x of every column of a strip of an image that holds dark (text) pixels."""
    return np.flatnonzero((np.asarray(strip) < 128).all(-1).any(0))


def test_image_grid_enlarges_small_images_so_titles_fit():
    """32 px panels, as dmap.py's measurement | restored | reference: drawn 4x (128 px), each
    source pixel a 4 x 4 block, each title whole (its ink as wide as the text) over its own
    panel. A 200 px panel keeps its size."""
    src = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
    titles = ["measurement", "restored", "reference"]
    image = plot.image_grid([[src] * 3], [titles], gap=4)
    assert image.size == (3 * 128 + 2 * 4, 20 + 128)
    for j, label in enumerate(titles):
        x0 = j * (128 + 4)
        panel = np.asarray(image)[20:, x0:x0 + 128]
        assert (panel == src.repeat(4, 0).repeat(4, 1)).all(), j
        ink = ink_columns(image.crop((0, 0, image.width, 20)))
        ink = ink[(ink >= x0) & (ink < x0 + 128)]
        assert ink[-1] - ink[0] + 1 >= plot.font().getlength(label) - 2, (label, ink)
    assert plot.image_grid([[np.zeros((50, 200, 3), np.uint8)]], [["x"]]).size == (200, 70)


def test_image_grid_title_is_whole():
    title = "a title much wider than the one small panel under it"
    image = plot.image_grid([[np.zeros((8, 8, 3), np.uint8)]], title=title, min_width=1)
    ink = ink_columns(image.crop((0, 0, image.width, 22)))
    assert image.width >= 6 + plot.font().getlength(title) and ink[-1] < image.width - 1


def runs(pixels, color) -> int:
    """How many separate runs of `color` a row of pixels holds."""
    hit = np.concatenate([[False], (np.asarray(pixels) == color).all(-1), [False]])
    return int(np.diff(hit.astype(int)).clip(0).sum())


def test_legend_draws_dashed_lines_dashed():
    """bar_plot's reference lines are dashed in the plot and in its key: the swatch of a
    reference is broken into dashes, a series' swatch is one block of its colour."""
    red = ImageColor.getrgb(plot.COLORS[1])
    image = plot.bar_plot({"a": [0.5]}, series=["s"], reference=[(0.3, "ref", plot.COLORS[1])])
    x0, y0, _, _ = image.info["boxes"]["legend"]
    swatch = np.asarray(image)[y0 + 13 + 18 - 2:y0 + 13 + 18 + 3, x0 + 2:x0 + 28]
    assert max(runs(row, red) for row in swatch) >= 3
    series = np.asarray(image)[y0 + 13, x0 + 2:x0 + 28]
    assert runs(series, ImageColor.getrgb(plot.COLORS[0])) == 1


def test_bar_value_labels_leave_the_reference_lines_visible():
    """Bars that end just left of a dashed reference line, or of the frame: their value labels
    move right of it, so every dash of every line is drawn where the bars leave it room and no
    label's box holds a line."""
    refs = [(0.9, "ref x1", plot.COLORS[0]), (1.0, "ref x2", plot.COLORS[1])]
    groups = {"a": [0.88, 0.97], "b": [0.85, 0.99], "c": [0.1, 9.5]}
    image = plot.bar_plot(groups, series=["x1", "x2"], reference=refs, logx=True, xlim=(1e-2, 10))
    boxes, pixels = image.info["boxes"], np.asarray(image)
    left, top, right, bottom = boxes["data"]
    bars = {ImageColor.getrgb(c) for c in plot.COLORS[:2]}
    for value, _, color in refs:
        x = left + math.log10(value / 1e-2) / 3 * (right - left)
        for y in range(top + 1, bottom):
            if (y - top) % 12 < 6:  # a dash of Axes.vline
                near_x = {tuple(p) for p in pixels[y, round(x) - 1:round(x) + 2]}
                assert near_x & (bars | {ImageColor.getrgb(color)}), (value, y, near_x)
        assert all(not b[0] - 1 <= x <= b[2] + 1 for b in boxes["values"]), (value, boxes)
    assert all(b[2] < right or b[0] > right for b in boxes["values"])  # none on the frame


def test_image_grid_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        plot.image_grid([[np.zeros((4, 4, 3))]])
