"""QA plots of single-frame and coadd products (matplotlib, PNG, no display needed).

Every function takes in-memory tables or arrays and returns a :class:`matplotlib.figure.Figure`
made without pyplot (so no GUI backend is ever chosen: Figure.savefig renders with Agg);
:func:`save` writes it. Readers of the products (:func:`psf_grid`, :func:`read_matches`, ...)
are here too, so the script stays an adapter. Image arrays are indexed ``(ny, nx)``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.visualization import AsinhStretch, ImageNormalize, ZScaleInterval, make_lupton_rgb
from matplotlib.figure import Figure
from scipy.spatial import cKDTree

from snakedrp.meas.columns import flagged
from snakedrp.repo.camera import Camera
from snakedrp.repo.psf_model import psf_from_hdu
from snakedrp.stamps import kernel_moments

GAUSSIAN_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
DPI = 100


def save(fig: Figure, path: str | Path) -> None:
    """Write ``fig`` as PNG (parent directories made)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")


def _figure(ncols: int = 1, nrows: int = 1, size=(6.0, 4.5), **kwargs):
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([]), ax.set_yticks([])


# ------------------------------------------------------------------ readers
def read_calexp_summary(path: str | Path, grid=(4, 8)) -> dict:
    """Header values and the PSF model's shape on a grid of one calexp, without reading its pixels.

    Parameters
    ----------
    path : str or Path
        calexp file.
    grid : (int, int)
        PSF evaluation points along x and y.

    Returns
    -------
    dict
        ``visit, ccd, filter, zeropoint`` [mag], ``zeropoint_err``, and ``x, y`` [pixel],
        ``fwhm`` [pixel], ``e1, e2`` of the PSF model at the grid points (1-D arrays).
    """
    with fits.open(path, memmap=True) as hdul:
        header = hdul[0].header
        ny, nx = hdul["IMAGE"].shape
        psf = psf_from_hdu(hdul["PSF"]) if "PSF" in hdul else None
        out = dict(visit=int(header["VISIT"]), ccd=int(header["CCD"]), filter=str(header["FILTER"]).strip(),
                   zeropoint=float(header.get("ZEROPT", np.nan)), zeropoint_err=float(header.get("ZEROPTER", np.nan)))
    gx = (np.arange(grid[0]) + 0.5) * nx / grid[0]
    gy = (np.arange(grid[1]) + 0.5) * ny / grid[1]
    x, y = (a.ravel() for a in np.meshgrid(gx, gy))
    shapes = np.array([kernel_moments(psf.kernel(float(xi), float(yi))) for xi, yi in zip(x, y)]) if psf else \
        np.full((len(x), 3), np.nan)
    out.update(x=x, y=y, fwhm=shapes[:, 0] * GAUSSIAN_FWHM_PER_SIGMA, e1=shapes[:, 1], e2=shapes[:, 2])
    return out


def read_table(path: str | Path, columns=None) -> Table:
    """A FITS table, only ``columns`` (all when None); through the record array, which is fast."""
    with fits.open(path, memmap=True) as hdul:
        data = hdul[1].data
        names = [n for n in data.columns.names if columns is None or n in columns]
        return Table({n: np.array(data[n]) for n in names})


def read_matches(match_paths, src_paths, data_ids, band_of) -> Table:
    """srcMatch rows with the src's calibrated PSF magnitude, the filter's reference magnitude and data IDs.

    Parameters
    ----------
    match_paths, src_paths : list of str
        srcMatch and src catalogs of the same exposures, in the same order.
    data_ids : list of dict
        ``visit, ccd, filter`` of each exposure.
    band_of : dict
        Filter name → band letter (the refcat's ``mag_<band>`` column).

    Returns
    -------
    Table
        ``visit, ccd, filter, x, y`` [pixel], ``dra, ddec`` [mas] (measured - reference, dra
        times cos dec), ``psf_mag``, ``psf_mag_err``, ``ref_mag`` [mag], ``used``.
    """
    parts = []
    for mpath, spath, data_id in zip(match_paths, src_paths, data_ids):
        m = read_table(mpath)
        # positions from the src (the final WCS's); a srcMatch's own coord_* columns may predate the fit
        src = read_table(spath, ("psf_mag", "psf_mag_err", "coord_ra", "coord_dec"))
        band = band_of[data_id["filter"]]
        rows = np.asarray(m["source_row"], int)
        dec = np.deg2rad(np.asarray(m["dec"], float))
        dra = ((np.asarray(src["coord_ra"])[rows] - np.asarray(m["ra"]) + 180.0) % 360.0 - 180.0) * np.cos(dec) * 3.6e6
        ddec = (np.asarray(src["coord_dec"])[rows] - np.asarray(m["dec"])) * 3.6e6
        parts.append(Table(dict(
            visit=np.full(len(m), int(data_id["visit"])), ccd=np.full(len(m), int(data_id["ccd"])),
            filter=np.full(len(m), str(data_id["filter"])), x=np.asarray(m["x"], float), y=np.asarray(m["y"], float),
            dra=dra, ddec=ddec, psf_mag=np.asarray(src["psf_mag"], float)[rows],
            psf_mag_err=np.asarray(src["psf_mag_err"], float)[rows],
            ref_mag=np.asarray(m[f"mag_{band}"], float), used=np.asarray(m["used"], bool))))
    return vstack(parts, metadata_conflicts="silent") if parts else Table()


def read_sources(src_paths, data_ids, snr_min: float = 10.0) -> Table:
    """Unflagged src rows above ``snr_min`` with their data IDs (for colour diagrams)."""
    cols = ("coord_ra", "coord_dec", "psf_mag", "psf_snr", "kron_mag", "extendedness", "x_centroid", "y_centroid")
    parts = []
    for path, data_id in zip(src_paths, data_ids):
        with fits.open(path, memmap=True) as hdul:
            data = hdul[1].data
            flags = {n: np.array(data[n]) for n in data.columns.names if n.startswith("flag_")}
            t = Table({n: np.array(data[n], float) for n in cols})
        bad = flagged(Table(flags)) if flags else np.zeros(len(t), bool)
        keep = ~bad & np.isfinite(t["psf_mag"]) & (np.nan_to_num(t["psf_snr"]) >= snr_min)
        t = t[keep]
        t["visit"], t["ccd"] = int(data_id["visit"]), int(data_id["ccd"])
        t["filter"] = str(data_id["filter"])
        parts.append(t)
    return vstack(parts, metadata_conflicts="silent") if parts else Table()


# ------------------------------------------------------------------ single-frame plots
def psf_focal_plane(summaries: list[dict], camera: Camera, visit: int) -> Figure:
    """Focal-plane map of one visit: PSF-model FWHM (colour) and ellipticity whiskers.

    A whisker's length is proportional to ``|e|`` (the key gives the scale), its direction is the
    major axis (position angle ``0.5 atan2(e2, e1)`` in CCD pixels, rotated with the CCD).
    """
    fig, axes = _figure(size=(7.5, 7.5))
    ax = axes[0, 0]
    rows = [s for s in summaries if s["visit"] == visit]
    if not rows:
        _no_data(ax, f"no calexp of visit {visit}")
        return fig
    scale = camera.pixel_scale
    xs, ys, fwhm, ex, ey = [], [], [], [], []
    for s in rows:
        fx, fy = camera.pixel_to_focal_plane(s["ccd"], s["x"], s["y"])
        e = np.hypot(s["e1"], s["e2"])
        angle = 0.5 * np.arctan2(s["e2"], s["e1"]) + np.deg2rad(camera.ccds[s["ccd"]].rotation)
        xs.append(fx), ys.append(fy), fwhm.append(s["fwhm"] * scale)
        ex.append(e * np.cos(angle)), ey.append(e * np.sin(angle))
        _ccd_outline(ax, camera, s["ccd"])
    xs, ys, fwhm, ex, ey = (np.concatenate(a) for a in (xs, ys, fwhm, ex, ey))
    sc = ax.scatter(xs, ys, c=fwhm, s=140, cmap="viridis", marker="s")
    fig.colorbar(sc, ax=ax, label="PSF model FWHM [arcsec]", shrink=0.8)
    emax = np.nanmax(np.hypot(ex, ey)) if np.isfinite(ex).any() else 0.01
    key = float(f"{max(emax, 1e-3):.1g}")
    q = ax.quiver(xs, ys, ex, ey, angles="xy", pivot="middle", headwidth=0, headlength=0, headaxislength=0,
                  scale=key / 1.5, scale_units="xy", width=0.006, color="k")  # whisker of |e| = key is 1.5 mm
    ax.quiverkey(q, 0.82, 0.03, key, f"whisker |e| = {key:g}", labelpos="E", coordinates="figure")
    ax.set_aspect("equal")
    ax.set_xlabel("focal plane x [mm]"), ax.set_ylabel("focal plane y [mm]")
    ax.set_title(f"visit {visit} ({rows[0]['filter']}): PSF model FWHM and ellipticity\n"
                 f"median FWHM {np.nanmedian(fwhm):.3f}\", median |e| {np.nanmedian(np.hypot(ex, ey)):.3f}",
                 loc="left", fontsize=10)
    return fig


def _ccd_outline(ax, camera: Camera, ccd: int) -> None:
    ny, nx = camera.ccd_shape
    cx = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5, -0.5])
    cy = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5, -0.5])
    fx, fy = camera.pixel_to_focal_plane(ccd, cx, cy)
    ax.plot(fx, fy, color="0.6", lw=0.8)
    ax.text(np.mean(fx[:4]), np.mean(fy[:4]), str(ccd), color="0.6", ha="center", va="center", fontsize=14)


def astrometric_quiver(matches: Table, camera: Camera, bin_mm: float = 1.5) -> Figure:
    """Mean astrometric residual (src - reference) in focal-plane cells, one panel per visit.

    Arrows are mean residuals of the matches used by the fit in ``bin_mm`` cells (single
    residuals are noise); the key gives the scale in mas.
    """
    visits = sorted(set(np.asarray(matches["visit"]).tolist())) if len(matches) else []
    ncols = min(3, max(1, len(visits)))
    nrows = max(1, int(np.ceil(len(visits) / ncols)))
    fig, axes = _figure(ncols, nrows, size=(4.2, 6.0))
    if not visits:
        _no_data(axes[0, 0], "no srcMatch catalogs")
        return fig
    used = matches[np.asarray(matches["used"], bool)]
    fx, fy = np.empty(len(used)), np.empty(len(used))
    for ccd in set(np.asarray(used["ccd"]).tolist()):
        sel = np.asarray(used["ccd"]) == ccd
        fx[sel], fy[sel] = camera.pixel_to_focal_plane(ccd, used["x"][sel], used["y"][sel])
    cells = []
    for visit in visits:
        sel = np.asarray(used["visit"]) == visit
        ix, iy = np.floor(fx[sel] / bin_mm).astype(int), np.floor(fy[sel] / bin_mm).astype(int)
        keys = ix * 100003 + iy
        for k in np.unique(keys):
            c = keys == k
            if c.sum() >= 3:
                cells.append((visit, (ix[c][0] + 0.5) * bin_mm, (iy[c][0] + 0.5) * bin_mm,
                              np.mean(used["dra"][sel][c]), np.mean(used["ddec"][sel][c])))
    cells = np.array(cells, float).reshape(-1, 5)
    amax = np.nanmax(np.hypot(cells[:, 3], cells[:, 4])) if len(cells) else 1.0
    key = float(f"{max(amax, 0.1):.1g}")
    for k, visit in enumerate(visits):
        ax = axes[k // ncols, k % ncols]
        for ccd in camera.ccd_ids:
            _ccd_outline(ax, camera, ccd)
        c = cells[cells[:, 0] == visit]
        q = ax.quiver(c[:, 1], c[:, 2], c[:, 3], c[:, 4], angles="xy", scale_units="xy", scale=key / bin_mm,
                      pivot="middle", width=0.008, color="C3")
        ax.quiverkey(q, 0.75, 1.02, key, f"{key:g} mas", labelpos="E", coordinates="axes")
        n = int((np.asarray(used["visit"]) == visit).sum())
        ax.set_title(f"visit {visit} (n={n})", loc="left")
        ax.set_aspect("equal")
        ax.set_xlabel("focal plane x [mm]"), ax.set_ylabel("y [mm]")
    for k in range(len(visits), nrows * ncols):
        axes[k // ncols, k % ncols].set_axis_off()
    fig.suptitle(f"mean astrometric residual (src - refcat, RA cos Dec and Dec) in {bin_mm:g} mm cells")
    return fig


def residuals_vs_magnitude(matches: Table) -> Figure:
    """Astrometric (left) and photometric (right) residuals vs reference magnitude, per filter.

    Binned medians and 16-84 % ranges are drawn over the points of the matches used by the fits.
    """
    fig, axes = _figure(2, 1, size=(6.0, 4.5))
    ax_a, ax_p = axes[0]
    if not len(matches):
        _no_data(ax_a, "no srcMatch catalogs"), _no_data(ax_p, "no srcMatch catalogs")
        return fig
    used = matches[np.asarray(matches["used"], bool) & np.isfinite(matches["ref_mag"]) & np.isfinite(matches["psf_mag"])]
    for k, f in enumerate(sorted(set(np.asarray(used["filter"]).tolist()))):
        part = used[np.asarray(used["filter"]) == f]
        mag = np.asarray(part["ref_mag"])
        ares = np.hypot(part["dra"], part["ddec"])
        pres = (np.asarray(part["psf_mag"]) - mag) * 1000.0
        pres -= np.median(pres)  # the refcat's colour terms make an offset per band: show scatter and trends
        for ax, res in ((ax_a, ares), (ax_p, pres)):
            ax.scatter(mag, res, s=2, alpha=0.25, color=f"C{k}", rasterized=True)
            centres, med, lo, hi = _binned(mag, res)
            ax.plot(centres, med, color=f"C{k}", lw=2, label=f"{f} (n={len(part)})")
            ax.fill_between(centres, lo, hi, color=f"C{k}", alpha=0.2)
    ax_a.set_yscale("log")
    ax_a.set_xlabel("reference magnitude"), ax_a.set_ylabel("|src - refcat| position [mas]")
    ax_a.set_title("astrometric residual vs magnitude", loc="left")
    ax_p.axhline(0, color="0.5", lw=0.8)
    ax_p.set_ylim(-100, 100)
    ax_p.set_xlabel("reference magnitude"), ax_p.set_ylabel("psf_mag - refcat mag - median [mmag]")
    ax_p.set_title("photometric residual vs magnitude", loc="left")
    for ax in (ax_a, ax_p):
        ax.legend(loc="upper left", fontsize=8)
    return fig


def _binned(x, y, width: float = 0.5, min_count: int = 5):
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if not x.size:
        return (np.array([]),) * 4
    edges = np.arange(np.floor(x.min()), np.ceil(x.max()) + width, width)
    idx = np.digitize(x, edges)
    rows = []
    for i in np.unique(idx):
        v = y[idx == i]
        if v.size >= min_count:
            rows.append((edges[i - 1] + width / 2, *np.percentile(v, [50, 16, 84])))
    rows = np.array(rows).reshape(-1, 4)
    return rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]


def zeropoints(summaries: list[dict], true_zeropoints: dict | None = None) -> Figure:
    """Fitted calexp zeropoint per visit and CCD; with truth, also the error (fitted - true) in mmag."""
    ncols = 2 if true_zeropoints else 1
    fig, axes = _figure(ncols, 1, size=(6.0, 4.0))
    visits = sorted({s["visit"] for s in summaries})
    pos = {v: i for i, v in enumerate(visits)}
    ccds = sorted({s["ccd"] for s in summaries})
    for k, ccd in enumerate(ccds):
        rows = [s for s in summaries if s["ccd"] == ccd]
        x = np.array([pos[s["visit"]] for s in rows]) + (k - (len(ccds) - 1) / 2) * 0.08
        zp = np.array([s["zeropoint"] for s in rows])
        err = np.array([s["zeropoint_err"] for s in rows])
        axes[0, 0].errorbar(x, zp, yerr=err, fmt="o", ms=4, label=f"ccd {ccd}", color=f"C{k}")
        if true_zeropoints:
            dz = np.array([(s["zeropoint"] - true_zeropoints.get((s["visit"], s["ccd"]), np.nan)) * 1000 for s in rows])
            axes[0, 1].errorbar(x, dz, yerr=err * 1000, fmt="o", ms=4, color=f"C{k}")
    labels = [f"{v}\n{next(s['filter'] for s in summaries if s['visit'] == v)}" for v in visits]
    for ax in axes[0]:
        ax.set_xticks(range(len(visits)), labels, fontsize=8)
        ax.set_xlabel("visit")
    axes[0, 0].set_ylabel("calexp zeropoint [AB mag of 1 e-]")
    axes[0, 0].set_title("zeropoint per visit and CCD", loc="left")
    axes[0, 0].legend(fontsize=8)
    if true_zeropoints:
        axes[0, 1].axhline(0, color="0.5", lw=0.8)
        axes[0, 1].set_ylabel("fitted - true zeropoint [mmag]")
        axes[0, 1].set_title("zeropoint error vs the simulator's truth", loc="left")
    return fig


# ------------------------------------------------------------------ colours
def match_bands(sources: Table, radius_arcsec: float = 1.0) -> Table:
    """Mean PSF and Kron magnitudes per object and filter, objects matched across filters within ``radius_arcsec``.

    Objects are taken from the filter with most sources; the others' per-visit sources are
    matched to them by nearest neighbour on the tangent plane.

    Returns
    -------
    Table
        ``ra, dec`` [deg], ``extendedness`` (median) and ``psf_mag_<filter>``, ``n_<filter>`` per filter.
    """
    if not len(sources):
        return Table()
    filters = sorted(set(np.asarray(sources["filter"]).tolist()))
    ra0, dec0 = np.median(sources["coord_ra"]), np.median(sources["coord_dec"])
    xy = _tangent(sources["coord_ra"], sources["coord_dec"], ra0, dec0)
    base_filter = max(filters, key=lambda f: np.sum(np.asarray(sources["filter"]) == f))
    base = np.asarray(sources["filter"]) == base_filter
    # objects: the base filter's sources merged across its visits (friends within the radius)
    tree = cKDTree(xy[base])
    pairs = tree.query_pairs(radius_arcsec / 3600.0, output_type="ndarray")
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nb = int(base.sum())
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(nb, nb)) if len(pairs) else \
        coo_matrix((nb, nb))
    n_obj, label = connected_components(graph, directed=False)
    centre = np.column_stack([np.bincount(label, xy[base][:, i], n_obj) / np.bincount(label, None, n_obj)
                              for i in (0, 1)])
    out = Table()
    lab_all = np.full(len(sources), -1)
    lab_all[base] = label
    others = ~base
    if others.any():
        d, idx = cKDTree(centre).query(xy[others], distance_upper_bound=radius_arcsec / 3600.0)
        lab_all[np.flatnonzero(others)[np.isfinite(d)]] = idx[np.isfinite(d)]
    ok = lab_all >= 0
    out["ra"], out["dec"] = _untangent(centre[:, 0], centre[:, 1], ra0, dec0)
    ext = np.full(n_obj, np.nan)
    for f in filters:
        sel = ok & (np.asarray(sources["filter"]) == f)
        n = np.bincount(lab_all[sel], None, n_obj)
        with np.errstate(all="ignore"):
            out[f"psf_mag_{f}"] = np.bincount(lab_all[sel], sources["psf_mag"][sel], n_obj) / n
        out[f"n_{f}"] = n.astype(int)
    sel = ok & np.isfinite(sources["extendedness"])
    with np.errstate(all="ignore"):
        ext = np.bincount(lab_all[sel], sources["extendedness"][sel], n_obj) / np.bincount(lab_all[sel], None, n_obj)
    out["extendedness"] = ext
    return out


def _tangent(ra, dec, ra0, dec0):
    """Gnomonic projection [deg] about (ra0, dec0): positions to match on (small fields)."""
    ra, dec, ra0, dec0 = (np.deg2rad(np.asarray(a, float)) for a in (ra, dec, ra0, dec0))
    cosc = np.sin(dec0) * np.sin(dec) + np.cos(dec0) * np.cos(dec) * np.cos(ra - ra0)
    xi = np.cos(dec) * np.sin(ra - ra0) / cosc
    eta = (np.cos(dec0) * np.sin(dec) - np.sin(dec0) * np.cos(dec) * np.cos(ra - ra0)) / cosc
    return np.rad2deg(np.column_stack([xi, eta]))


def _untangent(xi, eta, ra0, dec0):
    """Inverse of :func:`_tangent`: ``(ra, dec)`` [deg]."""
    xi, eta = np.deg2rad(np.asarray(xi, float)), np.deg2rad(np.asarray(eta, float))
    ra0, dec0 = np.deg2rad(ra0), np.deg2rad(dec0)
    rho = np.hypot(xi, eta)
    c = np.arctan(rho)
    with np.errstate(all="ignore"):
        dec = np.arcsin(np.cos(c) * np.sin(dec0) + np.where(rho > 0, eta * np.sin(c) * np.cos(dec0) / rho, 0.0))
    ra = ra0 + np.arctan2(xi * np.sin(c), rho * np.cos(dec0) * np.cos(c) - eta * np.sin(dec0) * np.sin(c))
    return np.rad2deg(ra) % 360.0, np.rad2deg(dec)


def colour_diagrams(objects: Table, filters: list[str], reference: Table | None = None,
                    band_of: dict[str, str] | None = None) -> Figure:
    """Colour–magnitude diagram and colour–colour diagram from src matched across bands.

    With three or more bands the right panel is the colour–colour diagram of the first three;
    with two, a colour–colour diagram is impossible and the right panel compares our colour of
    stars with that of ``reference`` (``ra, dec`` [deg] and ``mag_<band>`` columns: the
    simulator's truth or a reference catalog; ``band_of`` maps filters to bands), if given.
    Stars (extendedness < 0.5) and galaxies are drawn in different colours.
    """
    fig, axes = _figure(2, 1, size=(5.5, 5.0))
    ax_cmd, ax_cc = axes[0]
    if len(filters) < 2 or not len(objects):
        _no_data(ax_cmd, "colour diagrams need two bands"), _no_data(ax_cc, "colour diagrams need two bands")
        return fig
    b1, b2 = filters[0], filters[1]
    ok = (objects[f"n_{b1}"] > 0) & (objects[f"n_{b2}"] > 0)
    star = np.nan_to_num(np.asarray(objects["extendedness"], float), nan=1.0) < 0.5
    colour = np.asarray(objects[f"psf_mag_{b1}"] - objects[f"psf_mag_{b2}"])
    for sel, name, c in ((ok & ~star, "galaxies", "C0"), (ok & star, "stars", "C3")):
        ax_cmd.scatter(colour[sel], objects[f"psf_mag_{b2}"][sel], s=3, alpha=0.5, color=c,
                       label=f"{name} (n={int(sel.sum())})", rasterized=True)
    ax_cmd.invert_yaxis()
    ax_cmd.set_xlim(-1.0, 2.5)
    ax_cmd.set_xlabel(f"{b1} - {b2} [PSF mag]"), ax_cmd.set_ylabel(f"{b2} [PSF mag]")
    ax_cmd.set_title("colour-magnitude diagram (src matched across bands)", loc="left", fontsize=10)
    ax_cmd.legend(fontsize=8, markerscale=3)
    bands = (band_of or {}).get(b1), (band_of or {}).get(b2)
    if len(filters) >= 3:
        b3 = filters[2]
        ok3 = ok & (objects[f"n_{b3}"] > 0)
        c2 = objects[f"psf_mag_{b2}"] - objects[f"psf_mag_{b3}"]
        for sel, name, c in ((ok3 & ~star, "galaxies", "C0"), (ok3 & star, "stars", "C3")):
            ax_cc.scatter(colour[sel], c2[sel], s=3, alpha=0.5, color=c, label=name, rasterized=True)
        ax_cc.set_xlabel(f"{b1} - {b2}"), ax_cc.set_ylabel(f"{b2} - {b3}")
        ax_cc.set_title("colour-colour diagram", loc="left", fontsize=10)
    elif reference is not None and len(reference) and all(f"mag_{b}" in reference.colnames for b in bands if b):
        ra0, dec0 = np.median(objects["ra"]), np.median(objects["dec"])
        d, idx = cKDTree(_tangent(reference["ra"], reference["dec"], ra0, dec0)).query(
            _tangent(objects["ra"], objects["dec"], ra0, dec0), distance_upper_bound=1.0 / 3600.0)
        m = ok & star & np.isfinite(d)
        ref_colour = np.asarray(reference[f"mag_{bands[0]}"] - reference[f"mag_{bands[1]}"])[idx[m]]
        ax_cc.scatter(ref_colour, (colour[m] - ref_colour) * 1000.0, s=4, alpha=0.5, color="C3",
                      label=f"stars (n={int(m.sum())}); median {np.median(colour[m] - ref_colour) * 1000:.1f} mmag",
                      rasterized=True)
        ax_cc.axhline(0, color="0.5", lw=0.8)
        ax_cc.set_ylim(-150, 150)
        ax_cc.set_xlabel(f"reference {bands[0]} - {bands[1]} [mag]")
        ax_cc.set_ylabel(f"ours - reference ({b1} - {b2}) [mmag]")
        ax_cc.set_title(f"star colours vs {reference.meta.get('label', 'reference')} (2 bands: no colour-colour)",
                        loc="left", fontsize=10)
        ax_cc.legend(fontsize=8, markerscale=3)
    else:
        _no_data(ax_cc, "a colour-colour diagram needs three bands")
    return fig


# ------------------------------------------------------------------ completeness
def completeness_table(src: Table, truth: Table, radius: float = 1.5) -> Table:
    """Truth rows of one exposure with ``detected`` (a src within ``radius`` pixels) and ``is_star``."""
    d, _ = cKDTree(np.column_stack([src["x_centroid"], src["y_centroid"]])).query(
        np.column_stack([truth["x"], truth["y"]]), distance_upper_bound=radius) if len(src) else \
        (np.full(len(truth), np.inf), None)
    return Table(dict(mag=np.asarray(truth["mag"], float), detected=np.isfinite(d),
                      is_star=np.char.strip(np.asarray(truth["type"]).astype(str)) == "star"))


def completeness_curves(tables: dict[str, Table], width: float = 0.5) -> Figure:
    """Detected fraction of true objects vs true magnitude, per filter, stars and galaxies."""
    fig, axes = _figure(size=(7.0, 4.5))
    ax = axes[0, 0]
    if not tables:
        _no_data(ax, "no truth in this repository: completeness needs the simulator's truth")
        return fig
    for k, (f, t) in enumerate(sorted(tables.items())):
        for sel, style, name in ((np.asarray(t["is_star"]), "-", "stars"), (~np.asarray(t["is_star"]), "--", "galaxies")):
            mag, det = np.asarray(t["mag"])[sel], np.asarray(t["detected"])[sel]
            ok = np.isfinite(mag)
            if not ok.any():
                continue
            edges = np.arange(np.floor(mag[ok].min()), np.ceil(mag[ok].max()) + width, width)
            n, _ = np.histogram(mag[ok], edges)
            nd, _ = np.histogram(mag[ok][det[ok]], edges)
            good = n >= 5
            frac = np.where(good, nd / np.maximum(n, 1), np.nan)
            centres = 0.5 * (edges[1:] + edges[:-1])
            ax.plot(centres[good], frac[good], style, color=f"C{k}", label=f"{f} {name}")
            m50 = _fraction_mag(centres[good], frac[good], 0.5)
            if style == "-" and np.isfinite(m50):
                ax.axvline(m50, color=f"C{k}", lw=0.6, ls=":")
                ax.text(m50, 0.05 + 0.07 * k, f" 50 %: {m50:.2f}", color=f"C{k}", fontsize=8)
    ax.axhline(0.9, color="0.6", lw=0.6, ls=":")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("true magnitude"), ax.set_ylabel("fraction detected in src")
    ax.set_title("completeness against the simulator's truth (all visits, CCDs)", loc="left")
    ax.legend(fontsize=8)
    return fig


def _fraction_mag(centres, frac, level):
    """Faintest magnitude bin edge where ``frac`` first falls below ``level`` (linear interpolation)."""
    below = np.flatnonzero(frac < level)
    bright = centres < (centres[below[0]] if below.size else np.inf)
    if not below.size or below[0] == 0 or not bright.any():
        return float("nan")
    i = below[0]
    return float(np.interp(level, [frac[i], frac[i - 1]], [centres[i], centres[i - 1]]))


# ------------------------------------------------------------------ coadds
def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` pixel blocks (NaN-aware), shape ``(ny // f, nx // f)``."""
    ny, nx = (s // factor * factor for s in image.shape)
    blocks = np.asarray(image[:ny, :nx], float).reshape(ny // factor, factor, nx // factor, factor)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(blocks, axis=(1, 3))


def coadd_thumbnails(images: dict[tuple[str, str], np.ndarray], max_side: int = 400) -> Figure:
    """Thumbnails of coadds, one row per patch and one column per band, asinh stretch.

    Parameters
    ----------
    images : dict
        ``(patch, filter)`` → coadd image ``(ny, nx)`` (background-subtracted), e.g. deepCoadd_calexp.
    """
    patches = sorted({p for p, _ in images})
    filters = sorted({f for _, f in images})
    fig, axes = _figure(max(1, len(filters)), max(1, len(patches)), size=(3.2, 3.2))
    if not images:
        _no_data(axes[0, 0], "no coadds")
        return fig
    for i, patch in enumerate(patches):
        for j, f in enumerate(filters):
            ax = axes[i, j]
            image = images.get((patch, f))
            ax.set_xticks([]), ax.set_yticks([])
            if image is None:
                ax.set_axis_off()
                continue
            thumb = block_mean(image, max(1, int(np.ceil(max(image.shape) / max_side))))
            finite = thumb[np.isfinite(thumb)]
            norm = ImageNormalize(finite if finite.size else np.zeros(1), interval=ZScaleInterval(contrast=0.1),
                                  stretch=AsinhStretch(0.1))
            ax.imshow(np.nan_to_num(thumb), origin="lower", cmap="gray", norm=norm, interpolation="nearest")
            ax.set_title(f"patch {patch} {f}", fontsize=9)
    return fig


def colour_composite(images: dict[str, np.ndarray], filters: list[str], *, stretch: float | None = None,
                     q: float = 8.0) -> np.ndarray:
    """An RGB image ``(ny, nx, 3)`` uint8 of one patch with astropy's ``make_lupton_rgb``.

    ``filters`` are ordered blue to red; with two bands green is their mean. ``stretch`` defaults
    to 20 times the robust noise of the reddest band.
    """
    arrays = [np.nan_to_num(np.asarray(images[f], float)) for f in filters]
    if len(arrays) == 2:
        arrays = [arrays[0], 0.5 * (arrays[0] + arrays[1]), arrays[1]]
    blue, green, red = arrays[0], arrays[len(arrays) // 2], arrays[-1]
    if stretch is None:
        med = np.median(red)
        stretch = 20.0 * 1.4826 * np.median(np.abs(red - med)) or 1.0
    return make_lupton_rgb(red, green, blue, stretch=stretch, Q=q)


def colour_composites(per_patch: dict[str, dict[str, np.ndarray]], filters: list[str], max_side: int = 600) -> Figure:
    """One colour composite (:func:`colour_composite`) per patch."""
    patches = sorted(per_patch)
    ncols = min(3, max(1, len(patches)))
    nrows = max(1, int(np.ceil(len(patches) / ncols)))
    fig, axes = _figure(ncols, nrows, size=(4.5, 4.5))
    if not patches or len(filters) < 2:
        _no_data(axes[0, 0], "a colour composite needs coadds in two bands")
        return fig
    for k, patch in enumerate(patches):
        ax = axes[k // ncols, k % ncols]
        first = per_patch[patch][filters[0]]
        factor = max(1, int(np.ceil(max(first.shape) / max_side)))
        thumbs = {f: block_mean(per_patch[patch][f], factor) for f in filters}
        ax.imshow(colour_composite(thumbs, filters), origin="lower", interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"patch {patch} ({', '.join(filters)} as blue to red)", fontsize=9)
    for k in range(len(patches), nrows * ncols):
        axes[k // ncols, k % ncols].set_axis_off()
    return fig
