"""Reads a Hilal archive with h5py and astropy and checks it against the
values the C side wrote (a JSON file of expectations made from the source
frames, not from the archive). Run by tests/pipeline/test_archive_interop.c:

    python3 test_archive_interop.py ARCHIVE EXPECTED.json

Prints "interop OK: <n> checks" and exits 0 when everything holds.
"""
import hashlib
import json
import math
import sys

import h5py
import numpy as np
from astropy.table import Table
import astropy.units as u

checks = 0
failures = []


def check(cond, what):
    global checks
    checks += 1
    if not cond:
        failures.append(what)


def same(a, b):
    """Exact equality of doubles (None stands for NaN)."""
    if b is None:
        return math.isnan(a)
    return float(a) == float(b)


path, expected_path = sys.argv[1], sys.argv[2]
with open(expected_path) as fp:
    exp = json.load(fp)

# ---------------------------------------------------------------- h5py
with h5py.File(path, "r") as f:
    check(int(f.attrs["hilal_archive_schema"]) == exp["schema_version"], "schema version attribute")
    check(int(f.attrs["cutout_size"]) == 63, "cutout_size attribute")
    cand = f["candidates"][:]
    frames = f["frames"][:]
    runs = f["runs"][:]
    contract = ["cand_id", "frame_id", "x", "y", "ra", "dec", "snr", "flux", "flux_err", "mag",
                "mag_err", "fwhm", "elongation", "rb", "flags", "mjd"]
    for name in contract + ["run_id", "valid", "sharpness", "neg_frac", "dipole", "dist_sat_px",
                            "dist_mask_px", "masked_frac"]:
        check(name in cand.dtype.names, "candidates field " + name)
    for name in ["frame_id", "path", "sha256", "mjd", "filter", "n_candidates", "run_id",
                 "status", "psf_fwhm_sci_px", "flux_ratio", "limflux5_adu", "ref_path",
                 "ref_sha256"]:
        check(name in frames.dtype.names, "frames field " + name)
    check(len(cand) == exp["rows"], "candidate rows %d == %d" % (len(cand), exp["rows"]))
    valid = cand[cand["valid"] == 1]
    check(len(valid) == len(exp["current"]), "current rows %d == %d" % (len(valid), len(exp["current"])))

    # Every expected current candidate, field by field.
    by_id = {int(r["cand_id"]): r for r in cand}
    for e in exp["current"]:
        r = by_id.get(e["cand_id"])
        check(r is not None, "candidate %d present" % e["cand_id"])
        if r is None:
            continue
        check(int(r["valid"]) == 1, "candidate %d valid" % e["cand_id"])
        check(int(r["frame_id"]) == e["frame_id"], "candidate %d frame_id" % e["cand_id"])
        check(int(r["run_id"]) == e["run_id"], "candidate %d run_id" % e["cand_id"])
        check(int(r["flags"]) == e["flags"], "candidate %d flags" % e["cand_id"])
        for k in ["x", "y", "ra", "dec", "snr", "flux", "flux_err", "mag", "rb", "mjd"]:
            check(same(r[k], e[k]), "candidate %d %s: %r != %r" % (e["cand_id"], k, r[k], e[k]))
    # Superseded rows are kept but flagged.
    for cid in exp["superseded_ids"]:
        check(int(by_id[cid]["valid"]) == 0, "superseded candidate %d has valid 0" % cid)

    # Frames: status, provenance, the documented frame_id formula.
    names = [n.decode() for n in frames["frame_name"]]
    for fe in exp["frames"]:
        i = fe["row"]
        check(names[i] == fe["name"], "frame row %d name %s" % (i, names[i]))
        check(int(frames["status"][i]) == fe["status"], "frame %s status" % fe["name"])
        sha = frames["sha256"][i].decode()
        check(sha == fe["sha256"], "frame %s sha256" % fe["name"])
        fid = int(hashlib.sha256(("%s:%d" % (sha, int(frames["hdu"][i]))).encode()).hexdigest()[:15], 16)
        check(int(frames["frame_id"][i]) == fid, "frame %s id from the documented formula" % fe["name"])
        check(same(frames["limflux5_adu"][i], 10.0), "frame %s limiting flux" % fe["name"])
        check(frames["filter"][i].decode() == "r", "frame %s filter" % fe["name"])

    # Cutouts: row-aligned with /candidates.
    sci = f["cutouts/science"]
    check(sci.shape == (exp["rows"], 63, 63) and sci.dtype == np.float32, "science cutouts shape")
    check(f["cutouts/mask"].dtype == np.uint16, "mask dtype")
    for e in exp["current"][:5] + exp["current"][-3:]:
        stamp = sci[e["cand_id"] - 1]
        check(float(stamp[31, 31]) == e["sci_center"], "stamp centre of %d" % e["cand_id"])
        check(float(f["cutouts/difference"][e["cand_id"] - 1][31, 31]) == e["diff_center"],
              "difference stamp centre of %d" % e["cand_id"])
    edge = exp["edge_id"]
    check(np.isnan(sci[edge - 1][0, 0]) and int(f["cutouts/mask"][edge - 1][0, 0]) & 4,
          "edge stamp padded with NaN and flagged NODATA")
    check(f["psf/science"].shape[1:] == (51, 51), "PSF boxes")
    check(abs(float(np.nansum(f["psf/science"][0])) - 1.0) < 1e-5, "PSF sums to 1")

    # Provenance: the configuration text of each run.
    text = f["text"]
    for re_ in exp["runs"]:
        r = runs[runs["run_id"] == re_["run_id"]][0]
        conf = bytes(text[int(r["config_offset"]):int(r["config_offset"]) + int(r["config_length"])]).decode()
        check(conf == re_["config"], "run %d configuration text" % re_["run_id"])
        check(r["config_hash"].decode() == re_["hash"], "run %d hash" % re_["run_id"])
        check(len(r["software_version"]) > 0, "run %d software version" % re_["run_id"])

# ---------------------------------------------------------------- astropy
t = Table.read(path, path="candidates")
check(len(t) == exp["rows"], "astropy rows")
units = {"x": u.pix, "y": u.pix, "ra": u.deg, "dec": u.deg, "flux": u.adu, "flux_err": u.adu,
         "mag": u.mag, "mjd": u.d, "fwhm": u.pix, "dist_sat_px": u.pix}
for k, unit in units.items():
    check(t[k].unit == unit, "astropy unit of %s: %s" % (k, t[k].unit))
check(t["snr"].unit is None, "snr has no unit")
check("S_corr" in (t["snr"].description or ""), "snr description")
check("1-based" in (t["x"].description or ""), "x description")
cur = t[t["valid"] == 1]
check(len(cur) == len(exp["current"]), "astropy current rows")
e0 = exp["current"][0]
row = t[t["cand_id"] == e0["cand_id"]][0]
check(same(row["flux"], e0["flux"]) and same(row["ra"], e0["ra"]), "astropy values")
q = t["ra"].quantity.to(u.arcsec)
check(q.unit == u.arcsec, "astropy unit arithmetic")
fr = Table.read(path, path="frames")
check(fr["mjd"].unit == u.d and fr["limflux5_adu"].unit == u.adu, "frames units")
check(fr["psf_fwhm_sci_px"].unit == u.pix, "frames PSF unit")
rt = Table.read(path, path="runs")
check(len(rt) == len(exp["runs"]), "runs table")
# The way to read an archive that is being written: SWMR, no file lock.
with h5py.File(path, "r", swmr=True, locking=False) as f:
    live = Table.read(f, path="candidates")
    check(len(live) == exp["rows"] and live["x"].unit == u.pix, "astropy through an h5py SWMR handle")

if failures:
    for w in failures[:50]:
        print("FAIL:", w)
    print("interop: %d of %d checks failed" % (len(failures), checks))
    sys.exit(1)
print("interop OK: %d checks" % checks)
