"""
paper.py — 12-lead ECGs as paper printouts: the image modality of GEM.

Most ECGs in clinicians' hands exist only on paper or as a PDF. This file draws a signal the
way a cart prints it, roughens the picture the way a scan or a phone photo does, and reads
the user's own images.

Read top to bottom:
  1. Layout       the standard printout: 25 mm/s, 10 mm/mV, a 3 x 4 grid of 2.5 s lead
                  segments (I aVR V1 V4 / II aVL V2 V5 / III aVF V3 V6) and a 10 s lead II
                  rhythm strip, on a pink millimetre grid with a 1 mV calibration pulse.
  2. Rendering    `render_ecg(signal, fs, leads, px_per_mm)` -> uint8 image (H, W, 3): numpy
                  only, the trace rasterised column by column, labels from a tiny bitmap font.
  3. Degradation  `degrade(image, rng)`: rotation, blur, noise, crop, colour shift.
  4. Files        `write_png` (zlib, no dependency) and `read_image` (PNG/JPEG through Pillow,
                  an optional dependency; PDFs: convert a page to PNG first, see README).
Run `python paper.py out.png [--degrade]` to draw a synthetic 12-lead record.
"""
import struct
import zlib

import numpy as np

# --------------------------------------------------------------------------- 1. layout (millimetres)

MM_PER_S, MM_PER_MV = 25.0, 10.0
GRID = [["I", "aVR", "V1", "V4"], ["II", "aVL", "V2", "V5"], ["III", "aVF", "V3", "V6"]]
RHYTHM_LEAD = "II"
SEGMENT_S = 2.5                       # each grid cell shows 2.5 s; four cells make the 10 s
LEFT, RIGHT, TOP, BOTTOM = 12.0, 4.0, 6.0, 4.0   # margins; the calibration pulse sits in LEFT
ROW_MM = 32.0                         # row pitch: +-1.6 mV around each baseline before rows overlap
WIDTH_MM = LEFT + 4 * SEGMENT_S * MM_PER_S + RIGHT
HEIGHT_MM = TOP + 4 * ROW_MM + BOTTOM
PINK_MINOR, PINK_MAJOR, INK = (250, 218, 218), (238, 150, 150), (20, 20, 30)


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
    """Signal (leads, samples) in mV -> a printout image (H, W, 3) uint8.

    The first `seconds` (10) are drawn; a shorter record leaves the rest of its cells blank,
    and so does a lead the record lacks (reduced-lead records). Every trace starts at t = 0
    of its cell's time window, so a sample at time t of lead L lands at
    x = x0 + (t - t0) * 25 mm/s, y = baseline - v * 10 mm/mV."""
    signal = np.asarray(signal, dtype=np.float64)
    h, w = int(round(HEIGHT_MM * px_per_mm)), int(round(WIDTH_MM * px_per_mm))
    img = paper(h, w, px_per_mm)
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
    for row in range(4):   # 1 mV x 0.2 s calibration pulse in the left margin of every row
        y0 = baseline_mm(row) * px_per_mm
        t = np.array([0, 2, 2, 7, 7, 9]) * px_per_mm + 1.5 * px_per_mm
        v = np.array([0, 0, 10, 10, 0, 0]) * px_per_mm
        draw_polyline(img, t, y0 - v, thick)
    return img


def paper(h, w, px_per_mm):
    """White paper with a 1 mm pink grid, every 5th line darker."""
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    for step, colour in [(1.0, PINK_MINOR), (5.0, PINK_MAJOR)]:
        xs = np.round(np.arange(0, w / px_per_mm, step) * px_per_mm).astype(int)
        ys = np.round(np.arange(0, h / px_per_mm, step) * px_per_mm).astype(int)
        img[:, xs[xs < w]] = colour
        img[ys[ys < h], :] = colour
    return img


def draw_trace(img, x, y, thick=1):
    """Rasterise a trace sampled at (x, y) px: for every pixel column it crosses, ink from
    the lowest to the highest value of the trace within that column (plus the line joining
    neighbours), so a steep QRS stays a solid stroke at any resolution."""
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
    """A printout as a scan or a phone photo sees it, for training: a small rotation, blur,
    pixel noise, a random crop of the margins (resized back) and a colour cast. Each
    strength is the largest value drawn; 0 turns that degradation off."""
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
    outside = (sy < 0) | (sy > h - 1) | (sx < 0) | (sx > w - 1)
    out[outside] = 255
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
        pad = [(r, r) if a == axis else (0, 0) for a in range(3)]
        xp = np.pad(x, pad, mode="edge")
        x = sum(k[i] * np.take(xp, np.arange(i, i + x.shape[axis]), axis=axis) for i in range(len(k)))
    return x

# --------------------------------------------------------------------------- 4. files


def write_png(img, path):
    """An RGB uint8 image (H, W, 3) -> PNG, with zlib only."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))     # filter type 0 on every row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


def read_image(path):
    """A PNG or JPEG photo / scan of a printout -> RGB uint8 (H, W, 3). Needs Pillow, which
    the project does not require: `pip install pillow`. A PDF: convert the page first
    (e.g. `pdftoppm -png -r 150 ecg.pdf page`)."""
    if str(path).lower().endswith(".pdf"):
        raise ValueError(f"{path}: a PDF; convert the page to PNG first (pdftoppm -png -r 150 {path} page)")
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(f"{path}: reading images needs Pillow, an optional dependency: pip install pillow") from None
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


if __name__ == "__main__":
    import argparse

    from synth import make_patient, synth_ecg
    p = argparse.ArgumentParser(description="Draw a synthetic 12-lead record as a paper printout (PNG).")
    p.add_argument("out", nargs="?", default="ecg_paper.png")
    p.add_argument("--px-per-mm", type=float, default=3.0, help="resolution (3 px/mm: 800 x 414 px)")
    p.add_argument("--degrade", action="store_true", help="as a scan or phone photo would see it")
    args = p.parse_args()
    rec, truth = synth_ecg(make_patient(11), 10.0, 500.0, seed=11)   # PACs, PVCs, RBBB, right axis
    img = render_ecg(rec.signal, rec.fs, list(rec.leads), px_per_mm=args.px_per_mm)
    write_png(degrade(img, np.random.default_rng(0)) if args.degrade else img, args.out)
    print(f"wrote {args.out}: {', '.join(truth.statements)}")
