#!/usr/bin/python3
"""Makes the files of testdata/jwst/ from the sfft JWST NIRCam test data
(thomasvrussell/sfft @ fa820e8b05, test/subtract_test_nircam/; names as in
the data collection this project uses, see testdata/README.md).

usage: cut_region.py SRC_DIR [OUT_DIR]

Cuts the 300x300 px region x 131..430, y 494..793 (FITS 1-based; centred on
sfft's strongest residual at (281, 644)) from the two F200W images and sfft's
SNR map, keeping every header card and shifting CRPIX1/2 so that the TAN WCS
still holds; copies the two WebbPSF PSFs unchanged. Needs astropy.
"""
import os
import shutil
import sys

from astropy.io import fits

src = sys.argv[1]
out = sys.argv[2] if len(sys.argv) > 2 else '.'
x0, y0, n = 130, 493, 300  # 0-based corner and side
for name, cut in [('sci_jw02561_f200w_2022nov.fits', 'sci_f200w_2022nov_cut300.fits'),
                  ('ref_jw01324_f200w_2022jun.fits', 'ref_f200w_2022jun_cut300.fits'),
                  ('expected_sfft_diff_snr.fits', 'expected_sfft_diff_snr_cut300.fits')]:
    with fits.open(os.path.join(src, name)) as h:
        hdr = h[0].header.copy()
        data = h[0].data[y0:y0 + n, x0:x0 + n].copy()
    hdr['CRPIX1'] -= x0
    hdr['CRPIX2'] -= y0
    hdr.add_history('Hilal testdata: pixels x %d..%d, y %d..%d (1-based) of %s'
                    % (x0 + 1, x0 + n, y0 + 1, y0 + n, name))
    fits.PrimaryHDU(data, hdr).writeto(os.path.join(out, cut), overwrite=True,
                                       output_verify='silentfix')
for name in ['sci_psf_webbpsf.fits', 'ref_psf_webbpsf.fits']:
    shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
