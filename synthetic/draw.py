"""
synthetic/draw.py — a look at the generator: a gallery of synthetic ECGs (SVG, the picture in the README), or one
12-lead record as a paper printout (PNG), optionally as a scan or phone photo would see it.

    python -m synthetic.draw [docs/synthetic_ecgs.svg]
    python -m synthetic.draw --printout ecg_paper.png [--px-per-mm 3] [--degrade]
"""
import argparse
from dataclasses import replace

import numpy as np

from images.paper import degrade, plot_ecg_svg, render_ecg, write_png
from synthetic.generator import make_patient, synth_ecg


def gallery(path="docs/synthetic_ecgs.svg"):
    """One sheet: a normal 12-lead record, then rhythm strips of AF, PVCs, LBBB, RBBB and flutter."""
    rec, truth = synth_ecg(replace(make_patient(1, findings=set()), axis_deg=45), 10, 500, noise=0.4, seed=1)
    rows, labels = list(rec.signal), list(rec.leads)
    strips = [({"af"}, "II", "AF"), ({"pvc"}, "II", "PVC"), ({"lbbb"}, "V1", "LBBB"), ({"lbbb"}, "I", "LBBB"),
              ({"rbbb"}, "V1", "RBBB"), ({"flutter"}, "II", "flutter")]
    for k, (findings, lead, name) in enumerate(strips):
        p = make_patient(10 + k % 4 if name != "LBBB" else 12, findings=findings)
        if name == "PVC":
            p = replace(p, pvc_per_min=12.0)
        strip, _ = synth_ecg(p, 10, 500, leads=[lead], noise=0.4, seed=k)
        rows.append(strip.signal[0])
        labels.append(f"{name} {lead}")
    title = (f"Synthetic ECGs from synthetic/generator.py: a 12-lead record ({', '.join(truth.statements)}), "
             "then rhythm strips")
    return plot_ecg_svg(np.stack(rows), 500, labels, path, title=title)


def printout(path="ecg_paper.png", px_per_mm=3.0, degraded=False):
    """Patient 11 (PACs, PVCs, RBBB, right axis) as a paper printout PNG (images.paper.render_ecg),
    optionally as a scan or a phone photo would see it (images.paper.degrade)."""
    rec, truth = synth_ecg(make_patient(11), 10.0, 500.0, seed=11)
    img = render_ecg(rec.signal, rec.fs, list(rec.leads), px_per_mm=px_per_mm)
    write_png(degrade(img, np.random.default_rng(0)) if degraded else img, path)
    return f"{path}: {', '.join(truth.statements)}"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m synthetic.draw", description="Draw synthetic ECGs: a gallery (SVG), "
                                "or with --printout one 12-lead record as a paper printout (PNG).")
    p.add_argument("out", nargs="?", help="output file (default docs/synthetic_ecgs.svg, or ecg_paper.png)")
    p.add_argument("--printout", action="store_true", help="a 12-lead paper printout PNG instead of the gallery")
    p.add_argument("--px-per-mm", type=float, default=3.0, help="printout resolution (3 px/mm: 800 x 414 px)")
    p.add_argument("--degrade", action="store_true", help="the printout as a scan or phone photo would see it")
    args = p.parse_args(argv)
    print(printout(args.out or "ecg_paper.png", args.px_per_mm, args.degrade) if args.printout
          else gallery(args.out or "docs/synthetic_ecgs.svg"))


if __name__ == "__main__":
    main()
