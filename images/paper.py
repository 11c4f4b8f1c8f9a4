"""
images/paper.py — ECGs on ECG paper: the standard 12-lead printout as an image (the input of GEM's image modality),
an SVG of any record for people to look at. Numpy only. Most ECGs in clinicians' hands exist only on paper or as a PDF:
this file draws a signal as a cart prints it, roughens it as a scan or phone photo does, and reads users' images.

Read top to bottom:
  1. Layout       the standard printout: 25 mm/s, 10 mm/mV, a 3 x 4 grid of 2.5 s lead segments (I aVR V1 V4 /
                  II aVL V2 V5 / III aVF V3 V6), a 10 s lead II rhythm strip, a pink mm grid, a 1 mV calibration pulse.
  2. Rendering    `render_ecg` -> uint8 image (H, W, 3): traces rasterised column by column, a tiny bitmap font.
  3. Degradation  `degrade(image, rng)`: rotation, blur, noise, crop, colour shift.
  4. Files        `write_png` (zlib, no dependency), `read_image` (PNG/JPEG through Pillow, an optional dependency).
  5. SVG          `plot_ecg_svg`: any record, any length, one row per lead, intervals shaded (`generate.py --plot`).
`python -m synthetic.draw --printout out.png [--degrade]` draws a synthetic record with this file.
"""
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np


# --------------------------------------------------------------------------- 1. layout (millimetres)
MM_PER_S, MM_PER_MV = 25.0, 10.0
GRID = [["I", "aVR", "V1", "V4"], ["II", "aVL", "V2", "V5"], ["III", "aVF", "V3", "V6"]]
RHYTHM_LEAD = "II"
SEGMENT_S = 2.5                       # each grid cell shows 2.5 s; four cells make the 10 s
LEFT, RIGHT, TOP, BOTTOM = 12.0, 4.0, 6.0, 4.0   # margins; the calibration pulse sits in LEFT
ROW_MM = 32.0                         # row pitch: +-1.6 mV around each baseline before rows overlap
WIDTH_MM, HEIGHT_MM = LEFT + 4 * SEGMENT_S * MM_PER_S + RIGHT, TOP + 4 * ROW_MM + BOTTOM
PINK_MINOR, PINK_MAJOR, INK = (250, 218, 218), (238, 150, 150), (20, 20, 30)
GRID_LINES = [(1.0, PINK_MINOR), (5.0, PINK_MAJOR)]   # (every so many mm, colour): 1 mm = 0.04 s or 0.1 mV


def grid_positions(length_mm, step_mm):
    """Where the grid lines of one kind cross a side of length_mm, in mm: 0, step, 2 step, ... (both drawings)."""
    return np.arange(0, length_mm + 1e-6, step_mm)


def baseline_mm(row):
    """Vertical position of row `row`'s 0 mV line (rows 0-2: the grid, 3: the rhythm strip)."""
    return TOP + (row + 0.5) * ROW_MM


def panels():
    """[(lead, row, t0 s, t1 s, x0 mm)]: what each part of the page shows."""
    out = [(lead, r, c * SEGMENT_S, (c + 1) * SEGMENT_S, LEFT + c * SEGMENT_S * MM_PER_S)
           for r, row in enumerate(GRID) for c, lead in enumerate(row)]
    return out + [(RHYTHM_LEAD, 3, 0.0, 4 * SEGMENT_S, LEFT)]


# --------------------------------------------------------------------------- 2. rendering
def render_ecg(signal, fs, leads, px_per_mm=2.0, seconds=10.0):
    """Signal (leads, samples) in mV -> a printout image (H, W, 3) uint8. The first `seconds` (10) are drawn; a shorter
    record leaves the rest of its cells blank, and so does a lead the record lacks (reduced-lead records). A sample at
    time t of lead L lands in L's cell for [t0, t1) at x = x0 + (t - t0) * 25 mm/s, y = baseline - v * 10 mm/mV."""
    signal = np.asarray(signal, dtype=np.float64)
    img = paper(int(round(HEIGHT_MM * px_per_mm)), int(round(WIDTH_MM * px_per_mm)), px_per_mm)
    thick = max(1, int(round(px_per_mm * 0.4)))
    for lead, row, t0, t1, x0 in panels():
        y0 = baseline_mm(row) * px_per_mm
        if lead in leads:
            a, b = int(round(t0 * fs)), min(int(round(min(t1, seconds) * fs)), signal.shape[1])
            if b > a:
                x = (x0 + (np.arange(a, b) / fs - t0) * MM_PER_S) * px_per_mm
                y = y0 - signal[leads.index(lead), a:b] * MM_PER_MV * px_per_mm
                draw_trace(img, x, y, thick)
        draw_text(img, lead, int((x0 + 1.5) * px_per_mm), int(y0 - 0.55 * ROW_MM * px_per_mm + 2 * px_per_mm),
                  scale=max(1, int(round(px_per_mm * 0.6))))
    t = np.array([0, 2, 2, 7, 7, 9]) * px_per_mm + 1.5 * px_per_mm   # 1 mV x 0.2 s calibration pulse,
    v = np.array([0, 0, 10, 10, 0, 0]) * px_per_mm                    # in the left margin of every row
    for row in range(4):
        draw_polyline(img, t, baseline_mm(row) * px_per_mm - v, thick)
    return img


def paper(h, w, px_per_mm):
    """White paper with a 1 mm pink grid, every 5th line darker."""
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    for step, colour in GRID_LINES:
        xs = np.round(grid_positions(w / px_per_mm, step) * px_per_mm).astype(int)
        ys = np.round(grid_positions(h / px_per_mm, step) * px_per_mm).astype(int)
        img[:, xs[xs < w]] = colour
        img[ys[ys < h], :] = colour
    return img


def draw_trace(img, x, y, thick=1):
    """Rasterise a trace sampled at (x, y) px: every pixel column it crosses is inked from the lowest to the highest
    value of the trace within it (plus the lines joining neighbours), so a steep QRS stays solid at any resolution."""
    h, w, _ = img.shape
    cols = np.floor(x).astype(int)
    lo, hi = np.minimum(y[:-1], y[1:]), np.maximum(y[:-1], y[1:])    # each segment's vertical extent
    for c in range(max(cols.min(), 0), min(cols.max(), w - 1) + 1):
        seg = (cols[:-1] <= c) & (cols[1:] >= c)
        if not seg.any():
            continue
        top, bottom = int(np.floor(lo[seg].min())), int(np.ceil(hi[seg].max()))
        r0, r1 = max(top - thick // 2, 0), min(bottom + (thick - 1) // 2 + 1, h)
        c0, c1 = max(c - thick // 2, 0), min(c + (thick - 1) // 2 + 1, w)
        if r0 < r1:
            img[r0:r1, c0:c1] = INK


def draw_polyline(img, x, y, thick=1):
    """A few straight segments (the calibration pulse): each one densely sampled."""
    for k in range(len(x) - 1):
        n = int(max(abs(x[k + 1] - x[k]), abs(y[k + 1] - y[k]))) + 2
        draw_trace(img, np.linspace(x[k], x[k + 1], n) + 1e-6 * np.arange(n), np.linspace(y[k], y[k + 1], n), thick)


# a 3x5 bitmap font for lead labels: only the characters lead names use
FONT = {
    "I": ["111", "010", "010", "010", "111"], "V": ["101", "101", "101", "101", "010"],
    "a": ["000", "110", "011", "101", "111"], "R": ["110", "101", "110", "101", "101"],
    "L": ["100", "100", "100", "100", "111"], "F": ["111", "100", "110", "100", "100"],
    "1": ["010", "110", "010", "010", "111"], "2": ["110", "001", "010", "100", "111"],
    "3": ["110", "001", "010", "001", "110"], "4": ["101", "101", "111", "001", "001"],
    "5": ["111", "100", "110", "001", "110"], "6": ["011", "100", "110", "101", "010"],
}


def draw_text(img, text, x, y, scale=1):
    """Draw `text` with its top-left corner at pixel (x, y)."""
    for ch in text:
        for r, bits in enumerate(FONT.get(ch, ["000"] * 5)):
            for c, bit in enumerate(bits):
                if bit == "1":
                    img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = INK
        x += 4 * scale


# --------------------------------------------------------------------------- 3. degradation
def degrade(img, rng, rotate_deg=3.0, blur=1.0, noise=8.0, crop=0.03, colour=0.08):
    """A printout as a scan or a phone photo sees it, for training: a small rotation, blur, pixel noise, a random crop
    of the margins (resized back) and a colour cast. Each strength is the largest value drawn; 0 turns it off."""
    x = img.astype(np.float32)
    if rotate_deg:
        x = rotate(x, rng.uniform(-rotate_deg, rotate_deg))
    if blur:
        x = gaussian_blur(x, rng.uniform(0, blur))
    if crop:
        h, w = x.shape[:2]
        t, b, l, r = (int(rng.uniform(0, crop) * n) for n in (h, h, w, w))
        x = resize(x[t:h - b, l:w - r], h, w)
    if colour:
        x = x * rng.uniform(1 - colour, 1 + colour, 3) + rng.uniform(-colour, colour, 3) * 255
    if noise:
        x = x + rng.normal(0, rng.uniform(0, noise), x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def rotate(x, degrees):
    """Rotate about the centre (bilinear), corners filled with white paper."""
    h, w = x.shape[:2]
    a = np.deg2rad(degrees)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    sy = cy + (yy - cy) * np.cos(a) - (xx - cx) * np.sin(a)
    sx = cx + (yy - cy) * np.sin(a) + (xx - cx) * np.cos(a)
    out = bilinear(x, sy, sx)
    out[(sy < 0) | (sy > h - 1) | (sx < 0) | (sx > w - 1)] = 255
    return out


def bilinear(x, sy, sx):
    h, w = x.shape[:2]
    y0, x0 = np.clip(np.floor(sy).astype(int), 0, h - 2), np.clip(np.floor(sx).astype(int), 0, w - 2)
    fy, fx = np.clip(sy - y0, 0, 1)[..., None], np.clip(sx - x0, 0, 1)[..., None]
    return ((x[y0, x0] * (1 - fx) + x[y0, x0 + 1] * fx) * (1 - fy)
            + (x[y0 + 1, x0] * (1 - fx) + x[y0 + 1, x0 + 1] * fx) * fy)


def resize(x, h, w):
    sy = np.linspace(0, x.shape[0] - 1, h)[:, None].repeat(w, 1)
    sx = np.linspace(0, x.shape[1] - 1, w)[None, :].repeat(h, 0)
    return bilinear(x, sy, sx)


def gaussian_blur(x, sigma):
    if sigma < 0.3:
        return x
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):   # separable: rows, then columns; edges repeat
        xp = np.pad(x, [(r, r) if a == axis else (0, 0) for a in range(3)], mode="edge")
        x = sum(k[i] * np.take(xp, np.arange(i, i + x.shape[axis]), axis=axis) for i in range(len(k)))
    return x


# --------------------------------------------------------------------------- 4. files
def write_png(img, path):
    """An RGB uint8 image (H, W, 3) -> PNG, with zlib only."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))     # filter type 0 on every row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def read_image(path):
    """A PNG or JPEG photo / scan of a printout -> RGB uint8 (H, W, 3). Needs Pillow, which the project does not
    require: `pip install pillow`. A PDF: convert the page first (e.g. `pdftoppm -png -r 150 ecg.pdf page`)."""
    if str(path).lower().endswith(".pdf"):
        raise ValueError(f"{path}: a PDF; convert the page to PNG first (pdftoppm -png -r 150 {path} page)")
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(f"{path}: reading images needs Pillow, an optional dependency: pip install pillow") from None
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))     # writable: torch warns on read-only arrays
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- 5. SVG
# The same paper for people to look at: small squares 1 mm (0.04 s, 0.1 mV), large ones 5 mm.
_PX_PER_MM = 4.0


def plot_ecg_svg(signal, fs, leads, path, intervals=None, title=None):
    """Write an SVG of `signal` (leads, samples) in mV: one row per lead on ECG paper, time in seconds below, optional
    shaded `intervals` [(start_s, end_s), ...]. Records longer than 20 s are compressed in time to stay ~2000 px wide,
    and each pixel column is drawn as its min-max so QRS peaks never vanish."""
    signal = np.asarray(signal, dtype=np.float64)
    n_leads, n = signal.shape
    duration = n / fs
    mm_per_s = 25.0 if duration <= 20 else 500.0 / duration
    baseline = np.nanmedian(signal, axis=1, keepdims=True)
    above, below = _extent(signal - baseline)                              # mV, over all leads
    row_mm = min(45.0, 10 * (above + below) + 4)
    left = max(14.0, 2.6 * max(len(str(x)) for x in leads) + 4)             # room for the labels, mm
    top, bottom = 8.0 if title else 2.0, 8.0
    width_mm, height_mm = left + duration * mm_per_s + 6, top + n_leads * row_mm + bottom
    px = _PX_PER_MM
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width_mm * px:.0f}" height="{height_mm * px:.0f}" '
           f'viewBox="0 0 {width_mm * px:.0f} {height_mm * px:.0f}" font-family="sans-serif">',
           '<rect width="100%" height="100%" fill="#fffafa"/>']
    x0, y0, y1 = left * px, top * px, (top + n_leads * row_mm) * px
    out += _paper_grid(x0, y0, duration * mm_per_s * px, y1 - y0, mm_per_s)
    for a, b in intervals or []:
        out.append(f'<rect x="{x0 + a * mm_per_s * px:.1f}" y="{y0:.1f}" width="{(b - a) * mm_per_s * px:.1f}" '
                   f'height="{y1 - y0:.1f}" fill="#ff9900" fill-opacity="0.25"/>')
    for i, lead in enumerate(leads):
        zero = y0 + (i * row_mm + 2 + 10 * above) * px                     # this lead's baseline
        out.append(f'<text x="{2 * px:.1f}" y="{zero + 4:.1f}" font-size="14" font-weight="bold">{lead}</text>')
        out.append(_trace(signal[i] - baseline[i], fs, x0, zero, mm_per_s * px, 10 * px))
    step = 1 if duration <= 20 else 10 ** math.floor(math.log10(duration / 4))
    for s in np.arange(0, duration + 1e-9, step):
        out.append(f'<text x="{x0 + s * mm_per_s * px:.1f}" y="{y1 + 5 * px:.1f}" font-size="12" '
                   f'text-anchor="middle">{s:g} s</text>')
    if title:
        out.append(f'<text x="{x0:.1f}" y="{5.5 * px:.1f}" font-size="15">{_xml(title)}</text>')
    out.append("</svg>")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(out))
    return str(path)


def _extent(x):
    """How far the leads reach above and below their baselines (robust: 0.1 % clipped), mV."""
    x = np.nan_to_num(x)
    return (max(0.3, float(np.percentile(x, 99.9, axis=1).max())),
            max(0.3, float(-np.percentile(x, 0.1, axis=1).min())))


def _paper_grid(x0, y0, w, h, mm_per_s):
    """The printout's grid (GRID_LINES) as SVG paths over w x h px; the 1 mm lines only when wide enough to see.
    A record compressed in time (mm_per_s < 25) keeps its vertical lines at 0.04 s and 0.2 s."""
    px, lines = _PX_PER_MM, []
    for (mm, colour), width in zip(GRID_LINES, (0.5, 1.0)):
        if mm == 1 and mm_per_s < 10:
            continue
        xs = grid_positions(w / px * min(1.0, 25 / mm_per_s), mm) * px * min(1.0, mm_per_s / 25)
        ys = grid_positions(h / px, mm) * px
        d = "".join(f"M{x0 + x:.1f} {y0:.1f}v{h:.1f}" for x in xs) + \
            "".join(f"M{x0:.1f} {y0 + y:.1f}h{w:.1f}" for y in ys)
        lines.append(f'<path d="{d}" stroke="#{bytes(colour).hex()}" stroke-width="{width}" fill="none"/>')
    return lines


def _trace(x, fs, x0, mid, px_per_s, px_per_mv):
    """One lead as a polyline around y = mid; min-max per pixel when dense."""
    x = np.nan_to_num(x)
    t = np.arange(len(x)) / fs
    if len(x) / (t[-1] * px_per_s + 1) > 2:                                 # > 2 samples per pixel
        col = (t * px_per_s).astype(np.int64)
        starts = np.r_[0, np.nonzero(np.diff(col))[0] + 1]
        lo, hi = np.minimum.reduceat(x, starts), np.maximum.reduceat(x, starts)
        t, x = np.repeat(col[starts] / px_per_s, 2), np.stack([lo, hi], axis=1).ravel()
    pts = " ".join(f"{x0 + a * px_per_s:.1f},{mid - b * px_per_mv:.1f}" for a, b in zip(t, x))
    return f'<polyline points="{pts}" fill="none" stroke="#111" stroke-width="1.1" stroke-linejoin="round"/>'


def _xml(text):
    # escape markup, and drop the control characters XML 1.0 forbids (a model's answer, used as a title, may hold them)
    text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "", str(text))
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
