"""Deep coadds: the sky map and overlaps (skymap, overlaps), warps (warp), the coadd PSF
(coadd_psf), assembly with artifact rejection (assemble) and detection on the coadd
(detect_coadd); their options in config (SkyMapConfig, WarpConfig, AssembleConfig,
DetectCoaddConfig).
"""
