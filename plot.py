"""Figures with Pillow and numpy: axes with linear or log ticks, line plots, scatter plots over
density regions, bar plots, heat maps with a colour bar, and grids of image panels.

Every figure function returns a PIL.Image and writes nothing; the caller saves it (through
dmap.write_atomic, so a crash never leaves half a file). The pixel boxes (left, top, right,
bottom) of what a reader may want to find again, the data area, the legend, the colour bar, are
in image.info["boxes"]. Text uses Pillow's built-in scalable font, ImageFont.load_default(size=),
which needs Pillow >= 10.1.

Reading order: (1) font, colours and ticks; (2) Axes: the data -> pixel map and the marks drawn
in it; (3) legends; (4) the figures: line_plot, scatter_plot, bar_plot, heat_map, image_grid.
"""

import functools
import math

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

# ---------------------------------------------------------------------------------------------
# (1) Font, colours, ticks
# ---------------------------------------------------------------------------------------------

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#17becf", "#7f7f7f", "#bcbd22", "#000000"]  # matplotlib's tab10 order, then black
SHADES = [(255, 255, 255), (222, 235, 247), (158, 202, 225), (107, 174, 214)]  # outside .. 50%
EDGE = "#08458f"  # the edges of filled density regions
# matplotlib's viridis at 0, 1/8, .., 1 (interpolated linearly in between)
VIRIDIS = np.array([(68, 1, 84), (72, 40, 120), (62, 73, 137), (49, 104, 142), (38, 130, 142),
                    (31, 158, 137), (53, 183, 121), (110, 206, 88), (253, 231, 37)], float)


@functools.cache
def font(size: int = 13) -> ImageFont.FreeTypeFont:
    """Pillow's built-in font at `size` pixels, loaded on first use, not at import."""
    return ImageFont.load_default(size=size)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list:
    """At most n + 1 round values inside [lo, hi], 1, 2 or 5 times a power of ten apart."""
    assert hi > lo, f"empty range [{lo}, {hi}]"
    e = math.floor(math.log10((hi - lo) / n))
    m = next(m for m in (1, 2, 5, 10) if (hi - lo) / (m * 10.0**e) <= n)
    step = m * 10.0**e
    ks = range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)
    return [k * m * 10**e if e >= 0 else k * m / 10**-e for k in ks]  # 3 / 10, not 3 * 0.1


def log_ticks(lo: float, hi: float) -> list:
    """The powers of ten inside [lo, hi]; with fewer than two, also their 2x and 5x."""
    decades = [10.0**k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    for factors in ((1,), (1, 2, 5)):
        ticks = [v * f for v in decades for f in factors if lo * 0.999 <= v * f <= hi * 1.001]
        if len(ticks) >= 2:
            break
    return ticks


def tick_label(v: float) -> str:
    """0.001 .. 9999 written out (0.01, 250), the rest as 1e-5, 2e4."""
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:g}"
    mantissa, exponent = f"{v:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def auto_limits(values, log: bool = False) -> tuple:
    """Limits that hold every drawable value: whole decades on a log axis, whole tick steps on
    a linear one."""
    v = np.concatenate([np.ravel(np.asarray(a, float)) for a in values])
    v = v[np.isfinite(v) & ((v > 0) if log else True)]
    if v.size == 0:
        raise ValueError("nothing to plot: no finite values" + (" > 0 on a log axis" * log))
    lo, hi = float(v.min()), float(v.max())
    if log:
        lo, hi = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        return 10.0**lo, 10.0 ** max(hi, lo + 1)
    if lo == hi:
        lo, hi = lo - 0.5 * abs(lo) - 1, hi + 0.5 * abs(hi) + 1
    ticks = nice_ticks(lo, hi)
    step = ticks[1] - ticks[0]
    return math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step


def colormap(t) -> np.ndarray:
    """Viridis colours (..., 3) uint8 of t in [0, 1] (clipped)."""
    t = np.clip(np.asarray(t, float), 0, 1) * (len(VIRIDIS) - 1)
    grid = np.arange(len(VIRIDIS))
    rgb = [np.interp(t, grid, VIRIDIS[:, c]) for c in range(3)]
    return np.stack(rgb, -1).round().astype(np.uint8)


def cell_centres(xlim, ylim, shape) -> np.ndarray:
    """(H, W, 2) data coordinates (x, y) of the cell centres of an H x W grid over xlim x ylim,
    row 0 at ylim[0]: where to evaluate a density for Axes.density and scatter_plot."""
    h, w = shape
    xs = xlim[0] + (np.arange(w) + 0.5) * (xlim[1] - xlim[0]) / w
    ys = ylim[0] + (np.arange(h) + 0.5) * (ylim[1] - ylim[0]) / h
    return np.stack(np.meshgrid(xs, ys), -1)


def _text_width(texts, size=13) -> int:
    return int(max((font(size).getlength(t) for t in texts), default=0))


# ---------------------------------------------------------------------------------------------
# (2) Axes: a data area, its ticks, and the marks drawn in it
# ---------------------------------------------------------------------------------------------


def _fraction(v, lim, log):
    """Where v lies from lim[0] (0) to lim[1] (1), in log10 on a log axis (nan for v <= 0)."""
    v = np.asarray(v, float)
    if not log:
        return (v - lim[0]) / (lim[1] - lim[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(v / lim[0]) / math.log10(lim[1] / lim[0])


class Axes:
    """A data area in an RGB image: box = (left, top, right, bottom) in pixels, the frame's
    pixels; xlim and ylim the data values at its edges, linear or log10."""

    def __init__(self, image, box, xlim, ylim, *, logx=False, logy=False):
        for name, lim, log in (("x", xlim, logx), ("y", ylim, logy)):
            if not lim[0] < lim[1] or (log and lim[0] <= 0):
                raise ValueError(f"{name} limits {tuple(lim)} must increase"
                                 + (" and be > 0 on a log axis" if log else ""))
        self.image, self.draw, self.box = image, ImageDraw.Draw(image), tuple(map(int, box))
        self.xlim, self.ylim, self.logx, self.logy = xlim, ylim, logx, logy

    def px(self, x, y):
        """Data -> pixel coordinates (floats or arrays); pixel rows grow downwards."""
        left, top, right, bottom = self.box
        return (left + _fraction(x, self.xlim, self.logx) * (right - left),
                bottom - _fraction(y, self.ylim, self.logy) * (bottom - top))

    def ticks(self, axis):
        lim, log = (self.xlim, self.logx) if axis == "x" else (self.ylim, self.logy)
        return log_ticks(*lim) if log else nice_ticks(*lim)

    def frame(self, *, title="", xlabel="", ylabel="", yticks=None):
        """The box, the ticks and their labels, title and axis labels, drawn over the marks.
        yticks: values, or (label, value) pairs that name rows."""
        left, top, right, bottom = self.box
        d, f = self.draw, font()
        d.rectangle(self.box, outline="black")
        for v in self.ticks("x"):
            x = round(float(self.px(v, self.ylim[0])[0]))
            d.line([(x, bottom), (x, bottom + 4)], fill="black")
            d.text((x, bottom + 6), tick_label(v), font=f, fill="black", anchor="mt")
        labels = [v if isinstance(v, tuple) else (tick_label(v), v)
                  for v in yticks or self.ticks("y")]
        for label, v in labels:
            y = round(float(self.px(self.xlim[0], v)[1]))
            d.line([(left - 4, y), (left, y)], fill="black")
            d.text((left - 6, y), label, font=f, fill="black", anchor="rm")
        d.multiline_text(((left + right) / 2, top - 8), title, font=f, fill="black", anchor="md",
                         align="center")
        d.text(((left + right) / 2, bottom + 24), xlabel, font=f, fill="black", anchor="mt")
        if ylabel:  # rotated text: drawn on its own image, turned, pasted left of the tick labels
            w = _text_width([ylabel]) + 4
            label = Image.new("RGBA", (w, 16), (255, 255, 255, 0))
            ImageDraw.Draw(label).text((2, 1), ylabel, font=f, fill="black")
            x = left - 26 - _text_width([lb for lb, _ in labels])
            self.image.paste(label.rotate(90, expand=True), (x, (top + bottom - w) // 2),
                             label.rotate(90, expand=True))

    def _clip(self, x, y):
        """Pixel coordinates clipped to the box, and how far each point was moved (not finite
        for a value that has no pixel: nan, or <= 0 on a log axis)."""
        px, py = self.px(x, y)
        left, top, right, bottom = self.box
        cx, cy = np.clip(px, left, right), np.clip(py, top, bottom)
        return cx, cy, px - cx, py - cy

    def _mark_clipped(self, cx, cy, dx, dy, color):
        """Open triangles at the edge, pointing where the clipped values went (one per 12 px)."""
        last = (-99.0, -99.0)
        for a, b, u, v in zip(cx, cy, np.sign(dx), np.sign(dy), strict=True):
            if (u or v) and math.hypot(a - last[0], b - last[1]) >= 12:
                u, v, last = u / math.hypot(u, v), v / math.hypot(u, v), (a, b)
                self.draw.polygon([(a, b), (a - 9 * u - 5 * v, b - 9 * v + 5 * u),
                                   (a - 9 * u + 5 * v, b - 9 * v - 5 * u)], outline=color)

    def line(self, x, y, color, width=2):
        """A polyline, broken where a value cannot be drawn (nan, or <= 0 on a log axis); where
        it leaves the limits it runs along the edge, each clipped point marked by a triangle."""
        cx, cy, dx, dy = self._clip(x, y)
        ok = np.isfinite(dx) & np.isfinite(dy)
        runs = np.split(np.arange(len(cx)), np.flatnonzero(np.diff(ok)) + 1)
        for run in (r for r in runs if ok[r[0]]):
            xy = list(zip(cx[run].tolist(), cy[run].tolist(), strict=True))
            if len(xy) > 1:
                self.draw.line(xy, fill=color, width=width)
            else:  # a lone drawable value: a dot of the line's width
                (a, b), = xy
                self.draw.ellipse([a - width, b - width, a + width, b + width], fill=color)
        self._mark_clipped(cx[ok], cy[ok], dx[ok], dy[ok], color)

    def scatter(self, x, y, color, *, r=1.5, alpha=1.0):
        """Dots of radius r px; where n dots overlap the opacity is 1 - (1 - alpha)^n, so dense
        regions read darker. Points beyond the limits sit on the edge, marked by triangles."""
        cx, cy, dx, dy = self._clip(x, y)
        ok = np.isfinite(dx) & np.isfinite(dy)
        left, top, right, bottom = self.box
        h, w, p = bottom - top + 1, right - left + 1, math.ceil(r)
        count = np.zeros((h + 2 * p, w + 2 * p))
        np.add.at(count, (np.rint(cy[ok] - top).astype(int) + p,
                          np.rint(cx[ok] - left).astype(int) + p), 1)
        hits = sum(count[p + i:p + i + h, p + j:p + j + w] for i in range(-p, p + 1)
                   for j in range(-p, p + 1) if i * i + j * j <= r * r)  # (h, w) dots per pixel
        opacity = (1 - (1 - alpha) ** hits)[..., None]
        region = np.asarray(self.image.crop((left, top, right + 1, bottom + 1)), float)
        region = region * (1 - opacity) + np.array(ImageColor.getrgb(color)) * opacity
        self.image.paste(Image.fromarray(region.round().astype(np.uint8)), (left, top))
        self._mark_clipped(cx[ok], cy[ok], dx[ok], dy[ok], color)

    def hbar(self, y, x0, x1, color, height=0.6):
        """A horizontal bar from x0 to x1 (clipped to the limits) centred on row y."""
        a, top = self._clip(x0, y + height / 2)[:2]
        b, bottom = self._clip(x1, y - height / 2)[:2]
        self.draw.rectangle([float(a), float(top), float(b), float(bottom)], fill=color)

    def vline(self, x, color, dash=6):
        """A dashed vertical line across the data area at x."""
        px, (_, top, _, bottom) = float(self.px(x, self.ylim[0])[0]), self.box
        for y in range(top, bottom, 2 * dash):
            self.draw.line([(px, y), (px, min(y + dash, bottom))], fill=color, width=2)

    def density(self, p, *, masses=(0.5, 0.9, 0.99), fill=True, color=EDGE):
        """The highest-density regions of a 2-D density grid p (H, W) that hold the given
        probability masses; p at cell_centres(xlim, ylim, (H, W)). fill: blue shades, darker
        inside, with edges in `color`; otherwise only the edges."""
        p = np.asarray(p, float)
        order = np.sort(p.ravel())[::-1]
        mass = np.cumsum(order) / order.sum()
        levels = [order[min(np.searchsorted(mass, m), order.size - 1)] for m in masses]
        band = sum((p >= lv).astype(np.uint8) for lv in levels)[::-1]  # 0 outside; row 0 on top
        left, top, right, bottom = self.box
        size = (right - left - 1, bottom - top - 1)  # inside the frame
        band = np.asarray(Image.fromarray(band).resize(size, Image.NEAREST))
        edge = np.zeros(band.shape, bool)
        edge[:, 1:] |= band[:, 1:] != band[:, :-1]
        edge[1:, :] |= band[1:, :] != band[:-1, :]
        region = np.array(self.image.crop((left + 1, top + 1, right, bottom)))
        if fill:
            region = np.array(SHADES, np.uint8)[np.minimum(band, len(SHADES) - 1)]
        region[edge] = ImageColor.getrgb(color)
        self.image.paste(Image.fromarray(region), (left + 1, top + 1))


# ---------------------------------------------------------------------------------------------
# (3) Legends
# ---------------------------------------------------------------------------------------------


def legend_size(items) -> tuple:
    """(width, height) in pixels of draw_legend's box for these items."""
    return _text_width([item[0] for item in items]) + 36, 18 * len(items) + 8


def draw_legend(draw: ImageDraw.ImageDraw, xy, items) -> tuple:
    """A framed key with its top-left corner at xy; items (label, color) or (label, color,
    kind), kind "line" (default), "dashed" (a line as Axes.vline draws it), "dot", "fill" (a
    swatch) or "outline" (an open square). Returns its box."""
    w, h = legend_size(items)
    x0, y0 = xy
    draw.rectangle([x0, y0, x0 + w, y0 + h], fill="white", outline="#888888")
    for j, (label, color, *kind) in enumerate(items):
        yc, kind = y0 + 13 + 18 * j, (kind or ["line"])[0]
        if kind == "line":
            draw.line([(x0 + 6, yc), (x0 + 24, yc)], fill=color, width=4)
        elif kind == "dashed":
            for x in (x0 + 6, x0 + 13, x0 + 20):
                draw.line([(x, yc), (x + 3, yc)], fill=color, width=2)
        elif kind == "dot":
            draw.ellipse([x0 + 11, yc - 4, x0 + 19, yc + 4], fill=color)
        else:
            draw.rectangle([x0 + 8, yc - 6, x0 + 22, yc + 6], fill=color if kind == "fill"
                           else None, outline="#555555" if kind == "fill" else color, width=2)
        draw.text((x0 + 30, yc), label, font=font(), fill="black", anchor="lm")
    return (x0, y0, x0 + w, y0 + h)


def legend(items) -> Image.Image:
    """draw_legend's key on its own, to place in an image_grid cell."""
    w, h = legend_size(items)
    image = Image.new("RGB", (w + 1, h + 1), "white")
    draw_legend(ImageDraw.Draw(image), (0, 0), items)
    return image


# ---------------------------------------------------------------------------------------------
# (4) The figures
# ---------------------------------------------------------------------------------------------


def _figure(w, h, xlim, ylim, *, title, logx=False, logy=False, yticks=None, right=0, bottom=56):
    """A white image with an Axes of w x h pixels, room for the tick labels, the title above and
    `right` pixels right of the data area."""
    values = yticks or (log_ticks(*ylim) if logy else nice_ticks(*ylim))
    left = _text_width([v[0] if isinstance(v, tuple) else tick_label(v) for v in values]) + 40
    top = 18 * (title.count("\n") + 1) + 14
    image = Image.new("RGB", (left + w + right + 12, top + h + bottom), "white")
    return image, Axes(image, (left, top, left + w, top + h), xlim, ylim, logx=logx, logy=logy)


def line_plot(curves: dict, *, title="", xlabel="", ylabel="", xlim=None, ylim=None,
              logx=False, logy=False, points=None, points_label="", size=(460, 400)):
    """Curves {label: (x, y)} as lines in COLORS order, the legend right of the data area, where
    it hides nothing. Limits default to the data's (whole decades on log axes), so nothing is
    clipped; values beyond explicit limits are marked by triangles at the edge. points {label:
    (x, y)}: dots in the colour of the curve with that label, one legend entry points_label."""
    colors = {label: COLORS[j % len(COLORS)] for j, label in enumerate(curves)}
    data = list(curves.values()) + list((points or {}).values())
    xlim = xlim or auto_limits([x for x, _ in data], logx)
    ylim = ylim or auto_limits([y for _, y in data], logy)
    items = list(colors.items()) + ([(points_label, "black", "dot")] if points else [])
    image, ax = _figure(*size, xlim, ylim, title=title, logx=logx, logy=logy,
                        right=16 + legend_size(items)[0])
    for label, (x, y) in curves.items():
        ax.line(x, y, colors[label])
    for label, (x, y) in (points or {}).items():
        ax.scatter(x, y, colors[label], r=3.5)
    ax.frame(title=title, xlabel=xlabel, ylabel=ylabel)
    box = draw_legend(ax.draw, (ax.box[2] + 16, ax.box[1]), items)
    image.info["boxes"] = dict(data=ax.box, legend=box)
    return image


def scatter_plot(x, y, *, xlim, ylim, density=None, outline=None, title="", xlabel="",
                 ylabel="", color=COLORS[1], alpha=0.3, r=1.5, size=240,
                 masses=(0.5, 0.9, 0.99)):
    """Points (x, y) over the highest-density regions (masses) of a density grid, filled, and
    of a second grid, outlined in orange; grids laid out as cell_centres(xlim, ylim, shape)."""
    image, ax = _figure(size, size, xlim, ylim, title=title)
    if density is not None:
        ax.density(density, masses=masses)
    if outline is not None:
        ax.density(outline, masses=masses, fill=False, color=COLORS[3])
    ax.scatter(x, y, color, r=r, alpha=alpha)
    ax.frame(title=title, xlabel=xlabel, ylabel=ylabel)
    image.info["boxes"] = dict(data=ax.box)
    return image


def bar_plot(groups: dict, *, series=(), title="", xlabel="", xlim=None, logx=False,
             reference=(), width=460):
    """Horizontal bars: groups {row label: [value per series]}, series coloured in COLORS order
    and named in the legend by `series`; each bar labelled with its value right of its end,
    moved further right past any reference line or the frame it would cover (bars beyond xlim
    end at the edge, their label still says the value). reference: (value, label, color) dashed
    lines. On a log axis the bars start at xlim[0]. image.info["boxes"]["values"]: the value
    labels' boxes, row by row."""
    labels, n = list(groups), max(len(v) for v in groups.values())
    values = [v for vs in groups.values() for v in vs] + [r[0] for r in reference]
    if xlim is None:
        lo, hi = auto_limits([values], logx)
        xlim = (lo / 10, hi) if logx else (min(lo, 0), hi)  # log: the shortest bar a decade long
    rows = [(lb, len(labels) - 1 - j) for j, lb in enumerate(labels)]  # the first row on top
    items = ([(s, COLORS[k], "fill") for k, s in enumerate(series)]
             + [(lb, c, "dashed") for _, lb, c in reference])
    image, ax = _figure(width, 30 * len(labels), xlim, (-0.5, len(labels) - 0.5), title=title,
                        logx=logx, yticks=rows, right=56 + legend_size(items)[0] * bool(items))
    for value, _, color in reference:
        ax.vline(value, color)
    lines = sorted([float(ax.px(value, 0)[0]) for value, _, _ in reference] + [ax.box[2]])
    boxes = dict(data=ax.box, values=[])
    for label, yc in rows:
        for k, value in enumerate(groups[label]):
            yk = yc + (n - 1 - 2 * k) / (2 * n) * 0.8  # series 0 on top within the row
            ax.hbar(yk, xlim[0], value, COLORS[k], height=0.75 / n)
            text = f"{value:.3g}"
            x, y = float(ax._clip(value, yk)[0]) + 3, float(ax.px(xlim[0], yk)[1])
            for line in lines:  # in increasing x, so a move never lands on a line passed
                box = ax.draw.textbbox((x, y), text, font(11), "lm")
                if box[0] - 2 <= line <= box[2] + 2:
                    x = line + 4
            ax.draw.text((x, y), text, font=font(11), fill="black", anchor="lm")
            boxes["values"].append(ax.draw.textbbox((x, y), text, font(11), "lm"))
    ax.frame(title=title, xlabel=xlabel, yticks=rows)
    if items:
        boxes["legend"] = draw_legend(ax.draw, (ax.box[2] + 56, ax.box[1]), items)
    image.info["boxes"] = boxes
    return image


def heat_map(values, *, title="", label="", vmin=None, vmax=None, size=256):
    """A 2-D array (H, W), row 0 on top as in an image, in viridis over [vmin, vmax] (default
    the data's range), scaled by whole pixels to about `size` on its longer side; a colour bar
    whose ends are vmin and vmax, labelled with their values (">=" / "<=" where values beyond
    explicit limits take the end colour)."""
    v = np.asarray(values, float)
    if v.ndim != 2 or not np.isfinite(v).all():
        raise ValueError(f"heat_map needs a finite 2-D array, got shape {v.shape}")
    lo, hi = v.min() if vmin is None else vmin, v.max() if vmax is None else vmax
    scale = max(1, size // max(v.shape))
    panel = Image.fromarray(colormap((v - lo) / (hi - lo) if hi > lo else 0 * v))
    panel = panel.resize((v.shape[1] * scale, v.shape[0] * scale), Image.NEAREST)
    ends = [(lo, ("<= " if v.min() < lo else "") + f"{lo:.3g}"),
            (hi, (">= " if v.max() > hi else "") + f"{hi:.3g}")]
    top, (w, h) = 18 * (title.count("\n") + 1) + 14, panel.size
    bar = (w + 26, top, w + 41, top + h - 1)  # 16 px wide, as tall as the panel
    image = Image.new("RGB", (bar[2] + _text_width([t for _, t in ends]) + 24, top + h + 20),
                      "white")
    image.paste(panel, (6, top))
    d = ImageDraw.Draw(image)
    d.multiline_text((6 + w / 2, top - 8), title, font=font(), fill="black", anchor="md")
    ramp = colormap(np.linspace(1, 0, h)[:, None].repeat(16, 1))  # top row: hi's colour
    image.paste(Image.fromarray(ramp), bar[:2])
    inner = [(t, tick_label(t)) for t in (nice_ticks(lo, hi) if hi > lo else [])]
    for j, (t, text) in enumerate(ends + inner):
        y = bar[3] - (t - lo) / (hi - lo) * (h - 1) if hi > lo else bar[3]
        if j < 2 or min(y - bar[1], bar[3] - y) > 14:  # the ends, and ticks clear of them
            d.line([(bar[2] + 1, y), (bar[2] + 5, y)], fill="black")
            d.text((bar[2] + 8, y), text, font=font(), fill="black", anchor="lm")
    d.text(((bar[0] + bar[2]) / 2, bar[3] + 5), label, font=font(11), fill="black", anchor="mt")
    image.info["boxes"] = dict(data=(6, top, w + 5, top + h - 1), colorbar=bar)
    return image


def _as_image(panel) -> Image.Image:
    if isinstance(panel, Image.Image):
        return panel.convert("RGB")
    a = np.asarray(panel)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"image_grid panels are PIL images or uint8 H x W (x 3) arrays, got "
                         f"{a.dtype} {a.shape}; convert floats with (255 * x).round()")
    return Image.fromarray(a).convert("RGB")


def _fit(text, width) -> str:
    """text, shortened with '...' until it fits in width pixels."""
    while text and font().getlength(text) > width:
        text = text[:-4] + "..." if len(text) > 4 else ""
    return text


def image_grid(rows, titles=None, *, gap=4, title="", min_width=128):
    """Panels in a grid: rows[i][j] a PIL image or a uint8 H x W x 3 (or H x W) array, None for
    an empty cell; titles[i][j] the text above it; `gap` white pixels between panels; `title`
    lines over the whole grid. A column is as wide as its widest panel, a row as tall as its
    tallest; panels sit centred in their cells. Rows may differ in length. When the widest
    panel is narrower than min_width, every panel is enlarged by the least whole factor that
    makes the widest at least that wide, each pixel a square block, so that small images show
    their pixels and the titles above them fit (min_width=1: sizes as given)."""
    rows = [[None if p is None else _as_image(p) for p in row] for row in rows]
    widest = max((p.width for row in rows for p in row if p), default=min_width)
    scale = max(1, math.ceil(min_width / widest))
    rows = [[None if p is None else p.resize((p.width * scale, p.height * scale), Image.NEAREST)
             for p in row] for row in rows]
    titles = titles or [[""] * len(row) for row in rows]
    cols = max(len(row) for row in rows)
    widths = [max((r[j].width for r in rows if j < len(r) and r[j]), default=0)
              for j in range(cols)]
    strip = [20 if any(t for t in ts) else 0 for ts in titles]
    heights = [max((p.height for p in row if p), default=0) for row in rows]
    head = 18 * (title.count("\n") + 1) + 8 if title else 0
    width = max(sum(widths) + gap * (cols - 1), _text_width(title.split("\n")) + 12 if title else 0)
    image = Image.new("RGB", (width, head + sum(heights) + sum(strip) + gap * (len(rows) - 1)),
                      "white")
    d, y = ImageDraw.Draw(image), head
    if title:
        d.multiline_text((6, 4), title, font=font(), fill="black")
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            x = sum(widths[:j]) + gap * j
            if panel is not None:
                image.paste(panel, (x + (widths[j] - panel.width) // 2,
                                    y + strip[i] + (heights[i] - panel.height) // 2))
            text = titles[i][j] if j < len(titles[i]) else ""
            d.text((x + widths[j] / 2, y + strip[i] - 4), _fit(text, widths[j]), font=font(),
                   fill="black", anchor="md")
        y += strip[i] + heights[i] + gap
    return image
