"""Tests for paper.py: a known square pulse lands on the pixels the 25 mm/s, 10 mm/mV layout
says, the PNG writer round-trips, degradations keep the picture's size and type, and the SVG
plot is valid XML with a trace per lead."""

import struct
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest

from images import paper
from synthetic import generator as synth
from images.paper import INK, LEFT, MM_PER_MV, MM_PER_S, SEGMENT_S, baseline_mm, degrade, plot_ecg_svg, render_ecg, write_png

TWELVE = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
PX = 4.0   # px per mm


def pulse_record(fs=500):
    """Zeros, with +1 mV in lead I and II from 1.0 to 1.4 s, -1 mV in aVR from 3.0 to 3.4 s
    and +0.5 mV in V4 from 8.0 to 8.4 s."""
    x = np.zeros((12, int(10 * fs)))
    for lead, t0, mv in [("I", 1.0, 1.0), ("II", 1.0, 1.0), ("aVR", 3.0, -1.0), ("V4", 8.0, 0.5)]:
        x[TWELVE.index(lead), int(t0 * fs):int((t0 + 0.4) * fs)] = mv
    return x


def is_ink(img, x_mm, y_mm):
    return bool((img[int(round(y_mm * PX)), int(round(x_mm * PX))] == INK).all())


@pytest.mark.parametrize("lead, row, col, t0, mv", [("I", 0, 0, 1.0, 1.0), ("II", 1, 0, 1.0, 1.0),
                                                    ("aVR", 0, 1, 3.0, -1.0), ("V4", 0, 3, 8.0, 0.5),
                                                    ("II", 3, 0, 1.0, 1.0)])   # row 3: the rhythm strip
def test_square_pulse_lands_where_the_layout_says(lead, row, col, t0, mv):
    img = render_ecg(pulse_record(), 500, TWELVE, px_per_mm=PX)
    cell_t0 = 0.0 if row == 3 else col * SEGMENT_S
    x0 = LEFT + col * SEGMENT_S * MM_PER_S + (t0 - cell_t0) * MM_PER_S     # pulse start, mm
    y0 = baseline_mm(row)
    top = y0 - mv * MM_PER_MV                                             # 10 mm per mV, up is positive
    for frac in (0.2, 0.5, 0.8):                                          # along the plateau: ink at the level
        assert is_ink(img, x0 + frac * 0.4 * MM_PER_S, top)
        assert not is_ink(img, x0 + frac * 0.4 * MM_PER_S, y0 + (2.0 if mv > 0 else -2.0))  # nothing 2 mm beyond
    for dx in (-3.0, 0.4 * MM_PER_S + 3.0):                               # before and after: back at baseline
        assert is_ink(img, x0 + dx, y0) and not is_ink(img, x0 + dx, top)
    assert is_ink(img, x0, (y0 + top) / 2)                                # the rising edge is a solid stroke


def test_missing_leads_leave_their_cells_blank_and_short_records_stop_early():
    sig = pulse_record()[[0, 1], :2500]                                   # leads I, II; 5 s
    img = render_ecg(sig, 500, ["I", "II"], px_per_mm=PX)
    y, x = int(baseline_mm(0) * PX), int((LEFT + 1.5 * SEGMENT_S * MM_PER_S) * PX)   # aVR's cell centre
    assert not (img[y - 8:y + 8, x - 8:x + 8] == INK).all(-1).any()
    strip = baseline_mm(3)
    assert is_ink(img, LEFT + 4.5 * MM_PER_S, strip) and not is_ink(img, LEFT + 6 * MM_PER_S, strip)


def test_png_round_trip(tmp_path):
    img = render_ecg(pulse_record(), 500, TWELVE, px_per_mm=1.0)
    write_png(img, tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    idat = data.index(b"IDAT")
    n = struct.unpack(">I", data[idat - 4:idat])[0]
    raw = zlib.decompress(data[idat + 4:idat + 4 + n])
    back = np.frombuffer(raw, np.uint8).reshape(h, 1 + 3 * w)[:, 1:].reshape(h, w, 3)
    assert (h, w) == img.shape[:2] and np.array_equal(back, img)


def test_degrade_keeps_size_changes_pixels_and_is_seeded():
    img = render_ecg(pulse_record(), 500, TWELVE, px_per_mm=1.0)
    a, b = degrade(img, np.random.default_rng(1)), degrade(img, np.random.default_rng(1))
    assert a.shape == img.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    assert np.abs(a.astype(int) - img).mean() > 1
    assert np.array_equal(degrade(img, np.random.default_rng(1), 0, 0, 0, 0, 0), img)


def test_read_image_needs_pillow_or_reads_the_png(tmp_path):
    img = render_ecg(pulse_record(), 500, TWELVE, px_per_mm=1.0)
    write_png(img, tmp_path / "a.png")
    with pytest.raises(ValueError, match="convert the page"):
        paper.read_image(tmp_path / "a.pdf")
    try:
        import PIL  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pillow"):
            paper.read_image(tmp_path / "a.png")
        return
    assert np.array_equal(paper.read_image(tmp_path / "a.png"), img)


def test_plot_ecg_svg(tmp_path):
    rec, truth = synth.synth_ecg(synth.make_patient(1, findings={"pvc"}), 10, 500, seed=1)
    path = plot_ecg_svg(rec.signal, rec.fs, rec.leads, tmp_path / "p.svg", intervals=[(1.0, 2.5)], title="a < b")
    root = ET.parse(path).getroot()
    polylines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(polylines) == 12
    assert any(r.get("fill") == "#ff9900" for r in root.iter("{http://www.w3.org/2000/svg}rect"))
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "V6" in texts and "10 s" in texts and "a < b" in texts
    # control characters (an untrained model's answer as a title) must not break the XML
    odd = plot_ecg_svg(rec.signal, rec.fs, rec.leads, tmp_path / "odd.svg", title="ST\x01 up\x1b & <down>")
    assert "ST up & <down>" in [t.text for t in ET.parse(odd).getroot().iter("{http://www.w3.org/2000/svg}text")]
    long, _ = synth.synth_ecg(synth.make_patient(2), 3600, 250, leads=["II"], seed=1)
    big = Path(plot_ecg_svg(long.signal, long.fs, long.leads, tmp_path / "long.svg"))
    assert big.stat().st_size < 1_000_000, "an hour is drawn min-max per pixel, not sample by sample"
