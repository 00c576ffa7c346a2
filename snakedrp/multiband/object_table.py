"""The multi-band object catalog of a patch and of a tract (LSST's objectTable).

One row per merged object: its reference-band position and shape, the patch and tract it
belongs to, and per band (``<band>_`` prefix, as LSST's Object table) the forced fluxes in nJy
with AB magnitudes, and the pixel flags. ``detect_isPrimary`` marks the one row of each object
in a survey: patches overlap by twice their border and tracts overlap too, so an object's row
counts only in the patch whose inner box and the tract whose own region hold its position.
The tract table keeps the primary rows of all its patches.
"""
from __future__ import annotations

import numpy as np
from astropy.table import Table, vstack

#: AB magnitude of 1 nJy.
AB_NJY_ZEROPOINT = 31.4

#: forced-table column (a flux in coadd units) -> object-table column (after the ``<band>_`` prefix), what it is
FLUX_COLUMNS = {
    "psf_flux": ("psfFlux", "PSF flux, scaled to total flux by the patch's aperture correction"),
    "calib_flux": ("calibFlux", "flux in the calibration aperture (4 PSF FWHM), neighbours replaced by the PSF model"),
    "kron_flux": ("kronFlux", "Kron flux (2.5 Kron radii)"),
}


def njy_per_unit(zeropoint: float) -> float:
    """nJy of one coadd flux unit at AB ``zeropoint``."""
    return float(10 ** (0.4 * (AB_NJY_ZEROPOINT - zeropoint)))


def patch_object_table(reference: Table, forced: dict[str, Table], *, tract: int, patch: str, inner_bbox,
                       tract_inner=None) -> Table:
    """The object table of one patch.

    Parameters
    ----------
    reference : Table
        ``deepCoadd_ref`` (``ref_band``, ``x_centroid``, ``y_centroid``, ``coord_ra``,
        ``coord_dec``, shapes, blend columns).
    forced : dict of str to Table
        Each band's ``deepCoadd_forced_src``, rows in the order of ``reference`` (``meta['ZEROPT']``).
    tract : int
    patch : str
        ``"x,y"``.
    inner_bbox : (int, int, int, int)
        ``(x0, y0, nx, ny)`` of the patch's inner box on the patch grid [pixel].
    tract_inner : callable, optional
        ``tract_inner(ra, dec) -> bool array``: the positions the tract owns (all when not given).

    Returns
    -------
    Table
    """
    n = len(reference)
    out = Table()

    def add(name, values, unit, description):
        out[name] = values
        out[name].unit = unit
        out[name].description = description

    add("objectId", np.asarray(reference["id"], np.int64) + (np.int64(tract) << np.int64(42))
        + (np.int64(_patch_number(patch)) << np.int64(26)), None,
        "Object id, unique in the sky map: tract << 42 | patch (x * 1000 + y) << 26 | id in the patch")
    add("id", np.asarray(reference["id"], np.int64), None, "Object id in the patch (deepCoadd_mergeDet)")
    add("parent", np.asarray(reference["parent"], np.int64), None, "Id of the merged footprint holding several objects, 0 if alone")
    add("tract", np.full(n, int(tract), np.int32), None, "Tract")
    add("patch", np.full(n, patch, dtype="U16"), None, "Patch, \"x,y\"")
    add("refBand", np.asarray(reference["ref_band"], "U16"), None, "Reference band: position and shape of the forced photometry")
    for src, dst, unit, description in [
            ("coord_ra", "coord_ra", "deg", "Right ascension (reference band)"),
            ("coord_dec", "coord_dec", "deg", "Declination (reference band)"),
            ("x_centroid", "x", "pix", "x centroid (reference band), zero-based on the patch grid"),
            ("y_centroid", "y", "pix", "y centroid (reference band), zero-based on the patch grid"),
            ("x_centroid_err", "xErr", "pix", "1-sigma error of x"),
            ("y_centroid_err", "yErr", "pix", "1-sigma error of y"),
            ("shape_xx", "shape_xx", "pix2", "Adaptive second moment xx (reference band; includes the PSF)"),
            ("shape_yy", "shape_yy", "pix2", "Adaptive second moment yy (reference band)"),
            ("shape_xy", "shape_xy", "pix2", "Adaptive second moment xy (reference band)"),
            ("shape_sigma", "shape_sigma", "pix", "Adaptive-moment size det(M)**(1/4) (reference band)"),
            ("psf_sigma", "psf_sigma", "pix", "Adaptive-moment sigma of the coadd PSF at the object (reference band)")]:
        add(dst, np.asarray(reference[src], float), unit, description)
    add("centroid_flag", np.asarray(reference["centroid_flag"], bool), None,
        "The reference band's windowed centroid failed or ran away (e.g. masked pixels in its window): x, y are the peak's")
    add("blend_nchild", np.asarray(reference["blend_nchild"], np.int32), None, "Objects in the parent footprint (0 if alone)")
    add("is_blended", np.asarray(reference["is_blended"], bool), None, "The object shares its merged footprint with others")
    x0, y0, nx, ny = (int(v) for v in inner_bbox)
    x, y = np.asarray(out["x"], float), np.asarray(out["y"], float)
    inner = (x >= x0 - 0.5) & (x < x0 + nx - 0.5) & (y >= y0 - 0.5) & (y < y0 + ny - 0.5)
    add("detect_isPatchInner", inner, None, "The position lies in the patch's inner box")
    owned = np.ones(n, bool) if tract_inner is None else np.asarray(tract_inner(out["coord_ra"], out["coord_dec"]), bool)
    add("detect_isTractInner", owned, None, "The position lies in the tract's own region")
    add("detect_isPrimary", inner & owned, None, "The object's one row in the survey (patch and tract inner)")
    for band, table in forced.items():
        if len(table) != n or (np.asarray(table["id"]) != np.asarray(reference["id"])).any():
            raise ValueError(f"the {band}-band forced photometry must hold the reference table's objects, in order")
        scale = njy_per_unit(float(table.meta["ZEROPT"]))
        for src, (dst, what) in FLUX_COLUMNS.items():
            add(f"{band}_{dst}", np.asarray(table[src], float) * scale, "nJy", f"{band}-band forced {what}, at the reference position")
            add(f"{band}_{dst}Err", np.asarray(table[src + '_err'], float) * scale, "nJy", f"1-sigma error of {band}_{dst}")
        with np.errstate(invalid="ignore", divide="ignore"):
            flux = np.asarray(out[f"{band}_psfFlux"], float)
            add(f"{band}_psfMag", AB_NJY_ZEROPOINT - 2.5 * np.log10(np.where(flux > 0, flux, np.nan)), "mag",
                f"{band}-band AB magnitude of the total PSF flux (NaN for non-positive fluxes)")
            add(f"{band}_psfMagErr", 2.5 / np.log(10) * np.asarray(out[f"{band}_psfFluxErr"], float) / flux, "mag",
                f"1-sigma error of {band}_psfMag")
        add(f"{band}_psfFlux_flag", np.asarray(table["psf_flux_flag"], bool) | np.asarray(table["psf_apcorr_flag"], bool),
            None, f"{band}-band PSF flux unusable (fit failed, or the patch had no aperture correction)")
        add(f"{band}_kronRad", np.asarray(table["kron_radius"], float), "pix", f"{band}-band Kron radius")
        add(f"{band}_kronFlux_flag", np.asarray(table["kron_flag"], bool), None, f"{band}-band Kron flux unusable")
        for name in table.colnames:
            if name.startswith("flag_"):
                add(f"{band}_pixelFlags_{name[5:]}", np.asarray(table[name], bool), None,
                    f"{band} band: {table[name].description or name}")
    out.meta["BANDS"] = ",".join(forced)
    return out


def _patch_number(patch: str) -> int:
    px, py = (int(v) for v in str(patch).split(","))
    return px * 1000 + py


def tract_object_table(patch_tables: list[Table]) -> Table:
    """The primary rows of a tract's patch object tables, in patch order (``detect_isPrimary``)."""
    if not patch_tables:
        raise ValueError("a tract object table needs at least one patch table")
    rows = [t[np.asarray(t["detect_isPrimary"], bool)] for t in patch_tables]
    filled = [t for t in rows if len(t)]
    return vstack(filled, metadata_conflicts="silent") if filled else rows[0]
