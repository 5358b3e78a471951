"""Generated product drawings: every label of the Kaggle attributes visible in the picture.

The demo catalog (:mod:`tagger.demo.drawn`) draws its products with :func:`render_product`; the int8
calibration (:mod:`tagger.model.int8`) draws its generated set with it too. Both sit above this module, so the
pictures live in the data layer, where the model layer may read them without importing the demo.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# articleType -> (masterCategory, subCategory, share of the catalog,
#                 gender choices with weights, usage choices with weights)
ARTICLES: dict[str, tuple[str, str, float, dict[str, float], dict[str, float]]] = {
    "Tshirts": ("Apparel", "Topwear", 0.16, {"Men": 0.6, "Women": 0.4}, {"Casual": 0.6, "Sports": 0.4}),
    "Shirts": ("Apparel", "Topwear", 0.13, {"Men": 0.65, "Women": 0.35}, {"Casual": 0.5, "Formal": 0.5}),
    "Jeans": ("Apparel", "Bottomwear", 0.10, {"Men": 0.55, "Women": 0.45}, {"Casual": 1.0}),
    "Dresses": ("Apparel", "Dress", 0.09, {"Women": 1.0}, {"Casual": 0.6, "Formal": 0.4}),
    "Casual Shoes": ("Footwear", "Shoes", 0.12, {"Men": 0.6, "Women": 0.4}, {"Casual": 1.0}),
    "Sports Shoes": ("Footwear", "Shoes", 0.10, {"Men": 0.6, "Women": 0.4}, {"Sports": 1.0}),
    "Handbags": ("Accessories", "Bags", 0.09, {"Women": 1.0}, {"Casual": 0.5, "Formal": 0.5}),
    "Watches": ("Accessories", "Watches", 0.11, {"Men": 0.55, "Women": 0.45},
                {"Casual": 0.34, "Formal": 0.33, "Sports": 0.33}),
    "Caps": ("Accessories", "Headwear", 0.10, {"Unisex": 1.0}, {"Casual": 0.6, "Sports": 0.4}),
}

# Kaggle colour names, with RGB values far enough apart to stay nameable after noise and shading.
COLOURS: dict[str, tuple[int, int, int]] = {
    "Black": (28, 28, 30),
    "White": (246, 246, 244),
    "Grey": (128, 128, 130),
    "Navy Blue": (28, 40, 100),
    "Blue": (40, 105, 215),
    "Red": (205, 30, 35),
    "Pink": (240, 130, 180),
    "Yellow": (242, 205, 40),
    "Green": (40, 145, 60),
    "Brown": (120, 72, 36),
}
COLOUR_WEIGHTS: dict[str, float] = {
    "Black": 0.16, "White": 0.12, "Grey": 0.10, "Navy Blue": 0.08, "Blue": 0.14,
    "Red": 0.10, "Pink": 0.07, "Yellow": 0.07, "Green": 0.08, "Brown": 0.08,
}
SEASON_WEIGHTS: dict[str, float] = {"Summer": 0.34, "Fall": 0.26, "Winter": 0.20, "Spring": 0.20}

CLASSES: dict[str, tuple[str, ...]] = {
    "gender": ("Men", "Women", "Unisex"),
    "masterCategory": ("Apparel", "Footwear", "Accessories"),
    "subCategory": ("Topwear", "Bottomwear", "Dress", "Shoes", "Bags", "Watches", "Headwear"),
    "articleType": tuple(ARTICLES),
    "baseColour": tuple(COLOURS),
    "season": tuple(SEASON_WEIGHTS),
    "usage": ("Casual", "Formal", "Sports"),
}
"""Every value each attribute can take in the demo data."""

_SS = 2  # draw at twice the size and downsample, for anti-aliased edges
_BG = (255, 255, 255)


# --------------------------------------------------------------------------- drawing

_ASPECT = {  # bounding-box width / height of each article as drawn
    "Tshirts": 1.0, "Shirts": 0.95, "Jeans": 0.58, "Dresses": 0.66, "Casual Shoes": 2.3,
    "Sports Shoes": 2.1, "Handbags": 1.05, "Watches": 0.42, "Caps": 1.45,
}


def _lum(c) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _mix(c, other, t: float) -> tuple[int, int, int]:
    return tuple(int(round(a + (b - a) * t)) for a, b in zip(c, other))


def _detail(c) -> tuple[int, int, int]:
    """A shade of ``c`` that stays visible on ``c`` (seams, pockets, patterns)."""
    return _mix(c, (0, 0, 0), 0.3) if _lum(c) > 85 else _mix(c, (255, 255, 255), 0.3)


def _contrast(c) -> tuple[int, int, int]:
    """A logo / tie colour that stands out from ``c`` without looking like another base colour."""
    return (250, 250, 250) if _lum(c) < 150 else (30, 30, 34)


class _Box:
    """Maps unit coordinates (u, v) in the product's bounding box to canvas pixels."""

    def __init__(self, x0: float, y0: float, w: float, h: float):
        self.x0, self.y0, self.w, self.h = x0, y0, w, h

    def p(self, u: float, v: float) -> tuple[float, float]:
        return (self.x0 + u * self.w, self.y0 + v * self.h)

    def pts(self, uv) -> list[tuple[float, float]]:
        return [self.p(u, v) for u, v in uv]

    def rect(self, u0, v0, u1, v1) -> list[float]:
        return [*self.p(u0, v0), *self.p(u1, v1)]

    def lw(self, t: float) -> int:
        """A line width proportional to the box, at least 2 canvas pixels."""
        return max(2, int(round(t * min(self.w, self.h * 1.5))))


class _Painter:
    """Draws the product's silhouette into both the image and its mask."""

    def __init__(self, img: Image.Image, mask: Image.Image, colour):
        self.d = ImageDraw.Draw(img)
        self.m = ImageDraw.Draw(mask)
        self.c = colour

    def polygon(self, pts, colour=None):
        self.d.polygon(pts, fill=colour or self.c)
        self.m.polygon(pts, fill=255)

    def ellipse(self, box, colour=None):
        self.d.ellipse(box, fill=colour or self.c)
        self.m.ellipse(box, fill=255)

    def rounded(self, box, r, colour=None):
        self.d.rounded_rectangle(box, r, fill=colour or self.c)
        self.m.rounded_rectangle(box, r, fill=255)

    def chord(self, box, start, end):
        self.d.chord(box, start, end, fill=self.c)
        self.m.chord(box, start, end, fill=255)

    def arc(self, box, start, end, width):
        self.d.arc(box, start, end, fill=self.c, width=width)
        self.m.arc(box, start, end, fill=255, width=width)

    def cut_ellipse(self, box):
        self.d.ellipse(box, fill=_BG)
        self.m.ellipse(box, fill=0)

    def cut_polygon(self, pts):
        self.d.polygon(pts, fill=_BG)
        self.m.polygon(pts, fill=0)


def render_product(labels: dict[str, str], size: tuple[int, int] = (120, 160), seed=0) -> Image.Image:
    """Draw one product with the given labels on a white background; returns an RGB image.

    ``size`` is (width, height); ``seed`` is anything numpy's default_rng accepts.
    """
    rng = np.random.default_rng(seed)
    article, gender, season, usage = labels["articleType"], labels["gender"], labels["season"], labels["usage"]
    W, H = size[0] * _SS, size[1] * _SS
    # Mostly brightness noise: independent channel noise would tint Grey/White/Black into other names.
    base = np.array(COLOURS[labels["baseColour"]]) + rng.integers(-10, 11) + rng.integers(-4, 5, 3)
    colour = tuple(int(v) for v in np.clip(base, 0, 255))

    aspect = _ASPECT[article]
    if article == "Dresses" and usage == "Formal":
        aspect = 0.58
    if article.endswith("Shoes") and gender == "Women":
        aspect *= 1.15
    margin = 0.04
    fit_w = min(W * (1 - 2 * margin), H * (1 - 2 * margin) * aspect)
    bw = fit_w * rng.uniform(0.62, 0.95)
    bh = bw / aspect
    x0 = rng.uniform(W * margin, W * (1 - margin) - bw)
    y0 = rng.uniform(H * margin, H * (1 - margin) - bh)
    box = _Box(x0, y0, bw, bh)

    img = Image.new("RGB", (W, H), _BG)
    mask = Image.new("L", (W, H), 0)
    paint = _Painter(img, mask, colour)
    draw_silhouette, draw_details = _DRAWERS[article]
    draw_silhouette(paint, box, gender, season, usage)

    _fill_fabric(img, mask, box, colour, season, rng)
    draw_details(ImageDraw.Draw(img), box, colour, gender, season, usage)
    return img.reduce(_SS)


def _erode(m: np.ndarray, r: int) -> np.ndarray:
    """Binary erosion by a (2r+1)-square, separably; pixels beyond the edge count as outside."""
    out = m.copy()
    for _ in range(r):
        out[:, 1:] &= m[:, :-1]
        out[:, :-1] &= m[:, 1:]
        out[:, 0] = out[:, -1] = False
        m = out.copy()
    for _ in range(r):
        out[1:, :] &= m[:-1, :]
        out[:-1, :] &= m[1:, :]
        out[0, :] = out[-1, :] = False
        m = out.copy()
    return out


def _fill_fabric(img, mask, box: _Box, colour, season: str, rng: np.random.Generator) -> None:
    """Season pattern, soft side lighting and an outline, all inside the silhouette."""
    bbox = mask.getbbox()
    if bbox is None:
        return
    bx0, by0, bx1, by1 = bbox
    a = np.asarray(img.crop(bbox), dtype=np.float32)
    m = np.asarray(mask.crop(bbox)) > 127
    inner = _erode(m, 2)
    yy = np.arange(by0, by1)[:, None]
    xx = np.arange(bx0, bx1)[None, :]

    period = 9 * _SS
    ox, oy = rng.integers(0, period, 2)
    if season == "Winter":
        pat = ((yy + oy) % period) < 3 * _SS
    elif season == "Fall":
        # Offset rows of dots read as a print, not as a grid.
        row = (yy + oy) // period
        dx = (xx + ox + (row % 2) * period // 2) % period - period / 2
        dy = (yy + oy) % period - period / 2
        pat = dx * dx + dy * dy < (2.0 * _SS) ** 2
    elif season == "Spring":
        pat = (((yy + oy) % period) < 2 * _SS) | (((xx + ox) % period) < 2 * _SS)
    else:
        pat = None
    if pat is not None:
        a[inner & pat] = _detail(colour)

    # Light from one side, so colours keep their name but the product does not look flat.
    t = np.clip((xx - box.x0) / max(box.w, 1.0), 0.0, 1.0)
    if rng.random() < 0.5:
        t = 1.0 - t
    shade = (1.06 - 0.16 * t)[..., None]
    a = np.where(m[..., None], np.minimum(a * shade, 255.0), a)

    outline = (95, 95, 98) if _lum(colour) > 200 else _mix(colour, (0, 0, 0), 0.45)
    a[m & ~inner] = outline
    img.paste(Image.fromarray(a.astype(np.uint8), "RGB"), (bx0, by0))


def _tick(d: ImageDraw.ImageDraw, box: _Box, u: float, v: float, size: float, colour) -> None:
    """The sports brand logo: a bold tick ``size`` box-widths wide, top-left corner at (u, v)."""
    h = 0.55 * size * box.w / box.h
    pts = [box.p(u, v + 0.45 * h), box.p(u + 0.32 * size, v + h), box.p(u + size, v)]
    d.line(pts, fill=_contrast(colour), width=box.lw(0.05 * size / 0.3), joint="curve")


# Tops --------------------------------------------------------------------------

def _top_outline(gender: str, long_sleeves: bool) -> list[tuple[float, float]]:
    if gender == "Women":
        sh, arm, waist, hem = 0.25, 0.29, 0.34, 0.24
    else:
        sh, arm, waist, hem = 0.19, 0.23, 0.23, 0.23
    if long_sleeves:
        sleeve = [(sh - 0.17, 0.78), (sh - 0.06, 0.80)]
    else:
        sleeve = [(sh - 0.19, 0.32), (sh - 0.06, 0.42)]
    left = [(0.38, 0.0), (sh, 0.04), *sleeve, (arm, 0.30), (waist, 0.62), (hem, 1.0)]
    right = [(1 - u, v) for u, v in reversed(left)]
    return left + right


def _tshirt(p: _Painter, box: _Box, gender, season, usage):
    p.polygon(box.pts(_top_outline(gender, season == "Winter")))
    depth = 0.11 if gender == "Women" else 0.07
    p.cut_ellipse(box.rect(0.38, -depth, 0.62, depth))


def _tshirt_details(d, box: _Box, colour, gender, season, usage):
    depth = 0.11 if gender == "Women" else 0.07
    d.arc(box.rect(0.37, -depth - 0.015, 0.63, depth + 0.015), 0, 180, fill=_detail(colour), width=box.lw(0.025))
    if usage == "Sports":
        _tick(d, box, 0.42, 0.3, 0.22, colour)


def _shirt(p: _Painter, box: _Box, gender, season, usage):
    p.polygon(box.pts(_top_outline(gender, season == "Winter")))
    p.cut_polygon(box.pts([(0.40, -0.01), (0.60, -0.01), (0.5, 0.16)]))


def _shirt_details(d, box: _Box, colour, gender, season, usage):
    dark = _detail(colour)
    d.polygon(box.pts([(0.36, 0.0), (0.5, 0.16), (0.41, 0.19)]), fill=colour, outline=dark, width=box.lw(0.012))
    d.polygon(box.pts([(0.64, 0.0), (0.5, 0.16), (0.59, 0.19)]), fill=colour, outline=dark, width=box.lw(0.012))
    d.line([box.p(0.5, 0.17), box.p(0.5, 0.98)], fill=dark, width=box.lw(0.012))
    r = 0.018
    for v in (0.3, 0.45, 0.6, 0.75, 0.9):
        d.ellipse(box.rect(0.53 - r, v - r, 0.53 + r, v + r), fill=dark)
    if usage == "Formal":
        tie = _contrast(colour)
        d.polygon(box.pts([(0.46, 0.15), (0.54, 0.15), (0.52, 0.22), (0.48, 0.22)]), fill=tie)
        d.polygon(box.pts([(0.48, 0.22), (0.52, 0.22), (0.57, 0.62), (0.5, 0.7), (0.43, 0.62)]), fill=tie)
    else:
        d.rectangle(box.rect(0.6, 0.28, 0.74, 0.42), outline=dark, width=box.lw(0.012))


# Jeans -------------------------------------------------------------------------

def _jeans(p: _Painter, box: _Box, gender, season, usage):
    if gender == "Women":
        p.polygon(box.pts([(0.06, 0.0), (0.94, 0.0), (0.98, 0.32), (0.80, 1.0), (0.58, 1.0), (0.5, 0.3),
                           (0.42, 1.0), (0.20, 1.0), (0.02, 0.32)]))
    else:
        p.polygon(box.pts([(0.04, 0.0), (0.96, 0.0), (0.99, 1.0), (0.55, 1.0), (0.5, 0.3), (0.45, 1.0),
                           (0.01, 1.0)]))


def _jeans_details(d, box: _Box, colour, gender, season, usage):
    dark = _detail(colour)
    w = box.lw(0.02)
    d.line([box.p(0.05, 0.07), box.p(0.95, 0.07)], fill=dark, width=w)
    d.line([box.p(0.5, 0.07), box.p(0.5, 0.27)], fill=dark, width=w)
    d.arc(box.rect(-0.05, -0.05, 0.32, 0.2), 0, 90, fill=dark, width=w)
    d.arc(box.rect(0.68, -0.05, 1.05, 0.2), 90, 180, fill=dark, width=w)
    for u in (0.2, 0.8):
        d.line([box.p(u, 0.0), box.p(u, 0.07)], fill=dark, width=w)


# Dresses -----------------------------------------------------------------------

def _dress(p: _Painter, box: _Box, gender, season, usage):
    waist = 0.30 if usage == "Formal" else 0.40
    flare = 0.0 if usage == "Formal" else 0.06
    p.polygon(box.pts([(0.29, 0.07), (0.71, 0.07), (0.66, waist), (0.34, waist)]))
    p.polygon(box.pts([(0.34, waist - 0.01), (0.66, waist - 0.01), (1 - flare, 1.0), (flare, 1.0)]))
    p.polygon(box.pts([(0.30, 0.0), (0.36, 0.0), (0.36, 0.09), (0.30, 0.09)]))
    p.polygon(box.pts([(0.64, 0.0), (0.70, 0.0), (0.70, 0.09), (0.64, 0.09)]))


def _dress_details(d, box: _Box, colour, gender, season, usage):
    if usage == "Formal":
        d.rectangle(box.rect(0.335, 0.27, 0.665, 0.32), fill=_contrast(colour))
    else:
        d.line([box.p(0.34, 0.40), box.p(0.66, 0.40)], fill=_detail(colour), width=box.lw(0.02))


# Shoes -------------------------------------------------------------------------

def _shoe_upper(gender: str, sole_top: float) -> list[tuple[float, float]]:
    if gender == "Women":
        return [(0.02, sole_top - 0.12), (0.03, 0.22), (0.28, 0.30), (0.40, 0.26), (0.62, 0.48),
                (0.90, 0.56), (0.99, 0.68), (0.99, sole_top + 0.02), (0.02, sole_top + 0.02)]
    return [(0.02, sole_top), (0.04, 0.10), (0.30, 0.14), (0.42, 0.0), (0.50, 0.06), (0.80, 0.38),
            (0.95, 0.46), (1.0, 0.62), (1.0, sole_top + 0.02), (0.02, sole_top + 0.02)]


def _shoe_sole(gender: str, usage: str) -> tuple[float, float]:
    top = 0.7 if usage == "Sports" else 0.78
    return (top + 0.06, top) if gender == "Women" else (top, top)


def _shoe(p: _Painter, box: _Box, gender, season, usage):
    _, top = _shoe_sole(gender, usage)
    p.polygon(box.pts(_shoe_upper(gender, top)))


def _shoe_details(d, box: _Box, colour, gender, season, usage):
    heel_top, toe_top = _shoe_sole(gender, usage)
    sole = (236, 232, 222) if _lum(colour) < 200 else (188, 186, 182)
    edge = (120, 118, 114)
    if gender == "Women":
        # A raised heel under the back, so slim shoes read as women's.
        pts = [(0.0, heel_top - 0.14), (0.28, heel_top - 0.1), (0.5, toe_top), (1.0, toe_top), (1.0, 1.0),
               (0.68, 1.0), (0.34, 0.90), (0.2, 0.92), (0.2, 1.0), (0.03, 1.0)]
    else:
        pts = [(0.0, heel_top), (1.0, toe_top), (1.0, 0.92), (0.96, 1.0), (0.03, 1.0), (0.0, 0.92)]
    d.polygon(box.pts(pts), fill=sole, outline=edge, width=box.lw(0.008))
    if usage == "Sports":
        for u in np.linspace(0.08, 0.92, 8):
            d.line([box.p(u, 0.9), box.p(u + 0.03, 0.9)], fill=edge, width=box.lw(0.01))
        _tick(d, box, 0.24, 0.24, 0.36, colour)
    dark = _detail(colour)
    lace_a, lace_b = ((0.42, 0.3), (0.6, 0.47)) if gender == "Women" else ((0.47, 0.08), (0.76, 0.38))
    for t in np.linspace(0.1, 0.9, 4):
        x = lace_a[0] + (lace_b[0] - lace_a[0]) * t
        y = lace_a[1] + (lace_b[1] - lace_a[1]) * t
        d.line([box.p(x - 0.03, y + 0.04), box.p(x + 0.03, y - 0.04)], fill=dark, width=box.lw(0.012))


# Handbags ----------------------------------------------------------------------

def _bag(p: _Painter, box: _Box, gender, season, usage):
    w = box.lw(0.05)
    if usage == "Formal":
        p.rounded(box.rect(0.04, 0.34, 0.96, 1.0), box.lw(0.06))
        p.arc(box.rect(0.32, 0.06, 0.68, 0.62), 180, 360, w)
    else:
        p.polygon(box.pts([(0.14, 0.36), (0.86, 0.36), (1.0, 1.0), (0.0, 1.0)]))
        p.arc(box.rect(0.18, 0.0, 0.82, 0.72), 180, 360, w)


def _bag_details(d, box: _Box, colour, gender, season, usage):
    dark = _detail(colour)
    if usage == "Formal":
        d.polygon(box.pts([(0.04, 0.36), (0.96, 0.36), (0.96, 0.56), (0.5, 0.72), (0.04, 0.56)]),
                  fill=colour, outline=dark, width=box.lw(0.015))
        d.rectangle(box.rect(0.45, 0.66, 0.55, 0.76), fill=(212, 175, 55), outline=(150, 120, 30))
    else:
        d.line([box.p(0.1, 0.45), box.p(0.9, 0.45)], fill=dark, width=box.lw(0.015))


# Watches -----------------------------------------------------------------------

def _watch_geometry(gender: str) -> tuple[float, float]:
    """(strap width, dial radius) as fractions of the box width."""
    return (0.62, 0.5) if gender == "Men" else (0.34, 0.33)


def _watch(p: _Painter, box: _Box, gender, season, usage):
    strap, _ = _watch_geometry(gender)
    p.rounded(box.rect(0.5 - strap / 2, 0.0, 0.5 + strap / 2, 1.0), box.lw(0.06))


def _watch_details(d, box: _Box, colour, gender, season, usage):
    _, r = _watch_geometry(gender)
    rv = r * box.w / box.h
    if usage == "Sports":
        d.rounded_rectangle(box.rect(0.5 - r, 0.5 - rv, 0.5 + r, 0.5 + rv), box.lw(0.08),
                            fill=(45, 45, 48), outline=(20, 20, 20), width=box.lw(0.03))
        d.rectangle(box.rect(0.5 - 0.7 * r, 0.5 - 0.45 * rv, 0.5 + 0.7 * r, 0.5 + 0.45 * rv), fill=(150, 172, 140))
        for k in range(3):
            u = 0.5 - 0.5 * r + k * 0.5 * r
            d.line([box.p(u - 0.08 * r, 0.5), box.p(u + 0.12 * r, 0.5)], fill=(30, 40, 30), width=box.lw(0.03))
        return
    case = (212, 175, 55) if usage == "Formal" else (186, 188, 194)
    d.ellipse(box.rect(0.5 - r, 0.5 - rv, 0.5 + r, 0.5 + rv), fill=case, outline=(90, 90, 90), width=box.lw(0.02))
    d.ellipse(box.rect(0.5 - 0.8 * r, 0.5 - 0.8 * rv, 0.5 + 0.8 * r, 0.5 + 0.8 * rv), fill=(250, 250, 248))
    hand = (30, 30, 34)
    d.line([box.p(0.5, 0.5), box.p(0.5, 0.5 - 0.6 * rv)], fill=hand, width=box.lw(0.04))
    d.line([box.p(0.5, 0.5), box.p(0.5 + 0.45 * r, 0.5 + 0.1 * rv)], fill=hand, width=box.lw(0.04))


# Caps --------------------------------------------------------------------------

def _cap(p: _Painter, box: _Box, gender, season, usage):
    p.chord(box.rect(0.0, 0.06, 0.72, 1.34), 180, 360)
    p.ellipse(box.rect(0.52, 0.60, 1.0, 0.82))
    p.rounded(box.rect(0.0, 0.62, 0.72, 0.76), box.lw(0.02))
    p.ellipse(box.rect(0.33, 0.0, 0.39, 0.08))


def _cap_details(d, box: _Box, colour, gender, season, usage):
    dark = _detail(colour)
    w = box.lw(0.015)
    d.arc(box.rect(0.2, 0.06, 0.52, 1.34), 180, 360, fill=dark, width=w)
    d.line([box.p(0.01, 0.66), box.p(0.68, 0.66)], fill=dark, width=w)
    if usage == "Sports":
        _tick(d, box, 0.38, 0.3, 0.2, colour)


_DRAWERS = {
    "Tshirts": (_tshirt, _tshirt_details),
    "Shirts": (_shirt, _shirt_details),
    "Jeans": (_jeans, _jeans_details),
    "Dresses": (_dress, _dress_details),
    "Casual Shoes": (_shoe, _shoe_details),
    "Sports Shoes": (_shoe, _shoe_details),
    "Handbags": (_bag, _bag_details),
    "Watches": (_watch, _watch_details),
    "Caps": (_cap, _cap_details),
}
