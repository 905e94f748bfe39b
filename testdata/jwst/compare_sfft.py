#!/usr/bin/python3
"""Compare a `hilal subtract` output (DIFF, SCORR, MASK extensions) with
sfft's decorrelated SNR map of the same pair (docs/jwst.md).

usage: compare_sfft.py HILAL_OUT.fits SFFT_SNR.fits [--top N] [--edge PX]

Prints: the strongest |S_corr| extrema and the strongest |SNR| extrema of the
sfft map (with D, and the SNR map filtered with P_D and scaled to unit robust
std, "sfft filtered", at the same pixel) (local maxima and minima in a 5x5 box, 1-based FITS positions,
not within EDGE px of the border nor on a masked pixel), each matched to the
nearest extremum of the other map within 2 px (same sign or not), the
Pearson correlation of S_corr, of D and of the SNR map filtered with P_D
against S_corr over the unmasked pixels, and robust (1.4826 MAD) standard
deviations. Needs numpy, scipy and astropy.
"""
import sys
import numpy as np
from astropy.io import fits
from scipy import ndimage

args = sys.argv[1:]
top, edge = 10, 8
if '--top' in args:
    i = args.index('--top'); top = int(args[i + 1]); del args[i:i + 2]
if '--edge' in args:
    i = args.index('--edge'); edge = int(args[i + 1]); del args[i:i + 2]
ours, ref = args

with fits.open(ours) as h:
    S = h['SCORR'].data.astype(float)
    D = h['DIFF'].data.astype(float)
    M = h['MASK'].data.astype(np.int64)
    PD = h['PSF_D'].data.astype(float)
    scorrstd = h[0].header.get('SCORRSTD')
Q = fits.getdata(ref).astype(float)
ny, nx = S.shape
ok = (M == 0) & np.isfinite(S) & np.isfinite(D) & np.isfinite(Q)
ok[:edge, :] = ok[-edge:, :] = False
ok[:, :edge] = ok[:, -edge:] = False


def rstd(a):
    a = a[np.isfinite(a)]
    return 1.4826 * np.median(np.abs(a - np.median(a)))


def extrema(a, n, thresh=3.0):
    """Local maxima of a and local minima of a (5x5 box, each sign on its
    own, so the lobes of a dipole are both found) with |a| >= thresh on
    usable pixels, strongest |a| first."""
    out = []
    for sgn in (1.0, -1.0):
        b = np.where(ok, sgn * a, -np.inf)
        pk = (b == ndimage.maximum_filter(b, size=5)) & (b >= thresh)
        ys, xs = np.nonzero(pk)
        out += [(xs[k] + 1, ys[k] + 1, a[ys[k], xs[k]]) for k in range(len(xs))]
    out.sort(key=lambda t: -abs(t[2]))
    return out[:n]


def match(x, y, others):
    best = None
    for (u, v, val) in others:
        d = np.hypot(u - x, v - y)
        if d <= 2.0 and (best is None or d < best[0]):
            best = (d, u, v, val)
    return best


# The sfft map filtered with P_D and renormalised to unit robust std: the
# same matched filter S_corr applies to D (ZOGY eq. 17), for a like-for-like
# comparison of the score maps.
Qf = ndimage.convolve(np.nan_to_num(Q), PD[::-1, ::-1], mode='constant')
Qf /= rstd(Qf[ok])

ours_pk = extrema(S, top)
sfft_pk = extrema(Q, top)
ours_all = extrema(S, 100000)
sfft_all = extrema(Q, 100000)

print('# hilal: %s' % ours)
print('# sfft : %s' % ref)
print('\n## strongest |S_corr| (hilal) and the sfft SNR map there')
print('| # | x, y | S_corr | D | sfft SNR | sfft filtered | nearest sfft extremum <= 2 px | sign |')
print('|---|---|---|---|---|---|---|---|')
nm = ns = 0
for k, (x, y, v) in enumerate(ours_pk):
    m = match(x, y, sfft_all)
    q = Q[y - 1, x - 1]
    if m:
        nm += 1
        same = np.sign(m[3]) == np.sign(v)
        ns += same
        mt = '%+.1f at (%d, %d), %.1f px' % (m[3], m[1], m[2], m[0])
        sg = 'same' if same else 'opposite'
    else:
        mt, sg = 'none', '-'
    print('| %d | %d, %d | %+.1f | %+.1f | %+.1f | %+.1f | %s | %s |' % (k + 1, x, y, v, D[y - 1, x - 1], q, Qf[y - 1, x - 1], mt, sg))
print('matched %d of %d, same sign %d; sfft SNR of the same sign at the pixel: %d'
      % (nm, len(ours_pk), ns, sum(np.sign(Q[y - 1, x - 1]) == np.sign(v) for x, y, v in ours_pk)))

print('\n## strongest |SNR| (sfft) and hilal S_corr there')
print('| # | x, y | sfft SNR | sfft filtered | S_corr | D | nearest S_corr extremum <= 2 px | sign |')
print('|---|---|---|---|---|---|---|---|')
nm = ns = 0
for k, (x, y, v) in enumerate(sfft_pk):
    m = match(x, y, ours_all)
    s = S[y - 1, x - 1]
    if m:
        nm += 1
        same = np.sign(m[3]) == np.sign(v)
        ns += same
        mt = '%+.1f at (%d, %d), %.1f px' % (m[3], m[1], m[2], m[0])
        sg = 'same' if same else 'opposite'
    else:
        mt, sg = 'none', '-'
    print('| %d | %d, %d | %+.1f | %+.1f | %+.1f | %+.1f | %s | %s |' % (k + 1, x, y, v, Qf[y - 1, x - 1], s, D[y - 1, x - 1], mt, sg))
print('matched %d of %d, same sign %d; S_corr of the same sign at the pixel: %d'
      % (nm, len(sfft_pk), ns, sum(np.sign(S[y - 1, x - 1]) == np.sign(v) for x, y, v in sfft_pk)))

c_s = np.corrcoef(S[ok], Q[ok])[0, 1]
c_d = np.corrcoef(D[ok], Q[ok])[0, 1]
c_f = np.corrcoef(S[ok], Qf[ok])[0, 1]
print('\n## agreement over %d unmasked pixels (edge %d px)' % (ok.sum(), edge))
print('corr(S_corr, SNR) = %.3f' % c_s)
print('corr(D, SNR) = %.3f' % c_d)
print('corr(S_corr, SNR filtered with P_D) = %.3f' % c_f)
quiet = ok & (np.abs(Q) < 5) & (np.abs(D) < 5)
print('corr(D, SNR) where both |values| < 5: %.3f' % np.corrcoef(D[quiet], Q[quiet])[0, 1])
print('robust std: S_corr %.3f (all unmasked), SCORRSTD card %.3f (source-free), D %.3f, '
      'sfft SNR %.3f' % (rstd(S[ok]), scorrstd if scorrstd is not None else float('nan'),
                         rstd(D[ok]), rstd(Q[ok])))
print('pixels |S_corr| >= 5: %d; |SNR| >= 5: %d' % ((np.abs(S[ok]) >= 5).sum(),
                                                   (np.abs(Q[ok]) >= 5).sum()))
sx, sy, sv = ours_pk[0]
qx, qy, qv = sfft_pk[0]
print('strongest: hilal %+.1f at (%d, %d); sfft %+.1f at (%d, %d); distance %.1f px'
      % (sv, sx, sy, qv, qx, qy, np.hypot(sx - qx, sy - qy)))
