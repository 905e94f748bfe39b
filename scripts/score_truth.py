#!/usr/bin/env python3
"""Compare the candidates of a Hilal archive with a simulator truth table.

Usage: score_truth.py ARCHIVE.h5 TRUTH.csv [--radius PX]

Prints completeness in bins of ideal S/N for transients and variable stars
(matched within RADIUS px with the right sign), what became of the cosmic
rays, and the candidates that match no injected event.
"""
import argparse
import csv
import math
import sys

import h5py
import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive")
    ap.add_argument("truth")
    ap.add_argument("--radius", type=float, default=2.0)
    a = ap.parse_args()

    with h5py.File(a.archive, "r") as f:
        c = f["candidates"][...]
    if "valid" in c.dtype.names:
        c = c[c["valid"] == 1]
    events = list(csv.DictReader(open(a.truth)))
    cx, cy, csnr = c["x"], c["y"], c["snr"]
    used = np.zeros(len(c), bool)

    def nearest(x, y):
        if len(c) == 0:
            return -1, math.inf
        d = np.hypot(cx - x, cy - y)
        i = int(np.argmin(d))
        return i, float(d[i])

    bins = [(3, 5), (5, 8), (8, 20), (20, 1e9)]
    found = {b: [0, 0] for b in bins}
    flux_err = []
    cosmics = [0, 0, 0]  # total, detected, detected with rb >= 0.5
    for e in events:
        x, y = float(e["x"]), float(e["y"])
        if e["type"] in ("transient", "variable"):
            snr = abs(float(e["ideal_snr"]))
            sign = math.copysign(1, float(e["diff_flux_adu"]))
            i, d = nearest(x, y)
            ok = i >= 0 and d <= a.radius and math.copysign(1, csnr[i]) == sign
            for b in bins:
                if b[0] <= snr < b[1]:
                    found[b][0] += 1
                    found[b][1] += ok
            if ok:
                used[i] = True
                if snr >= 20:
                    flux_err.append(abs(c["flux"][i] / float(e["diff_flux_adu"]) - 1))
        elif e["type"] == "cosmic":
            i, d = nearest(x, y)
            cosmics[0] += 1
            if i >= 0 and d <= 3:
                used[i] = True
                cosmics[1] += 1
                cosmics[2] += c["rb"][i] >= 0.5
        elif e["type"] == "bad_column":
            if len(c):
                near = np.abs(cx - x) <= 2
                used |= near
    print(f"{len(c)} candidates in the archive, {len(events)} injected events")
    for b in bins:
        n, k = found[b]
        hi = "+" if b[1] > 1e8 else f"-{b[1]}"
        if n:
            print(f"  ideal S/N {b[0]}{hi}: {k}/{n} recovered within {a.radius:g} px ({100.0 * k / n:.0f}%)")
    if flux_err:
        print(f"  median |flux error| at S/N >= 20: {100 * float(np.median(flux_err)):.1f}%")
    print(f"  cosmic rays: {cosmics[0]} injected, {cosmics[1]} detected, {cosmics[2]} of those with rb >= 0.5")
    spurious = ~used
    print(f"  candidates matching no injected event: {int(spurious.sum())} "
          f"({int((spurious & (c['rb'] >= 0.5)).sum()) if len(c) else 0} with rb >= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
