"""The peer single-frame chain: SExtractor → PSFEx → SCAMP on one ISR-corrected CCD.

Importable by the benchmark scripts (``benchmarks/`` is not a package: put it on ``sys.path``).
:func:`run_peer_chain` runs the three Debian tools (``source-extractor``, ``psfex``, ``scamp``)
as subprocesses, one thread each, and returns wall-clock seconds per step, each tool's peak
RSS, the number of detections and SCAMP's astrometric RMS against the reference catalog.

Configuration: each tool's defaults are dumped at run time (``-d``) into the work directory
and the options that matter are overridden on the command line (``SEXTRACTOR_OPTIONS``,
``PSFEX_OPTIONS``, ``SCAMP_OPTIONS`` below). The SExtractor parameter list and convolution
mask are in ``benchmarks/peer_config/``.

The inputs are prepared untimed (:func:`prepare_image`, :func:`write_ldac_refcat`): an
Exposure file (IMAGE / MASK / VARIANCE) is split into a single-image FITS carrying the primary
metadata and the WCS, with a variance map in which BAD / NO_DATA pixels get weight 0; a plain
TAN WCS has its tangent point moved to the CCD centre (same mapping to ~0.01 pixel; SCAMP
converges slowly from a tangent point far off the CCD); our refcat becomes an LDAC catalog.

SCAMP runs three times: pattern matching and a first solution, then two passes that start
from the previous solution (``.ahead``). From a nominal WCS that ignores the optical
distortion the first pass alone leaves 15 mas to 1.7" on corner CCDs; all passes are timed.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

PEER_CONFIG = Path(__file__).resolve().parent / "peer_config"
SEXTRACTOR_PARAMS = PEER_CONFIG / "peer.param"
SEXTRACTOR_CONV = PEER_CONFIG / "gauss_4.0_7x7.conv"

SEXTRACTOR = "source-extractor"
PSFEX = "psfex"
SCAMP = "scamp"

#: SExtractor overrides (the detection matches ours: 5 sigma, 5 connected pixels).
SEXTRACTOR_OPTIONS = {
    "CATALOG_TYPE": "FITS_LDAC",
    "DETECT_THRESH": "5.0",
    "ANALYSIS_THRESH": "5.0",
    "DETECT_MINAREA": "5",
    "FILTER": "Y",
    "DEBLEND_NTHRESH": "16",
    "DEBLEND_MINCONT": "0.005",
    "PHOT_APERTURES": "12,17,24",    # diameters [pixel]; PSFEx normalises on the first
    "BACK_SIZE": "128",
    "BACK_FILTERSIZE": "3",
    "PIXEL_SCALE": "0",              # from the WCS
    "SEEING_FWHM": "0.67",           # arcsec; only used by CLASS_STAR, not requested
    "MEMORY_PIXSTACK": "1000000",
    "CHECKIMAGE_TYPE": "NONE",
    "VERBOSE_TYPE": "NORMAL",
    "WRITE_XML": "N",
    "NTHREADS": "1",
}

#: PSFEx overrides (PSFEx 3.21: sampling 1.0; 0.5 breaks at FWHM ~4 px, see recipes/psf.md).
PSFEX_OPTIONS = {
    "BASIS_TYPE": "PIXEL_AUTO",
    "PSF_SAMPLING": "1.0",
    "PSF_SIZE": "25,25",
    "PSFVAR_KEYS": "XWIN_IMAGE,YWIN_IMAGE",
    "PSFVAR_GROUPS": "1,1",
    "PSFVAR_DEGREES": "2",
    "SAMPLE_FWHMRANGE": "2.0,10.0",
    "SAMPLE_MINSN": "20",
    "CHECKPLOT_TYPE": "NONE",
    "CHECKPLOT_DEV": "NULL",
    "CHECKIMAGE_TYPE": "NONE",
    "WRITE_XML": "Y",
    "VERBOSE_TYPE": "NORMAL",
    "NTHREADS": "1",
}

#: SCAMP overrides: a local LDAC reference catalog (ours), one CCD, 3rd-degree distortion.
SCAMP_OPTIONS = {
    "ASTREF_CATALOG": "FILE",
    "ASTREFCENT_KEYS": "X_WORLD,Y_WORLD",
    "ASTREFERR_KEYS": "ERRA_WORLD,ERRB_WORLD,ERRTHETA_WORLD",
    "ASTREFMAG_KEY": "MAG",
    "ASTREFMAGERR_KEY": "MAGERR",
    "ASTREFOBSDATE_KEY": "OBSDATE",
    "ASTREF_BAND": "DEFAULT",
    "MATCH": "Y",
    "MATCH_FLIPPED": "N",
    "MATCH_NMAX": "0",               # auto; the FFT grid, not the pair count, sets the cost
    "MATCH_RESOL": "1.0",            # arcsec; auto: 6 s, 550 MB, contrast ~1 (distortion smears a fine peak)
    "PIXSCALE_MAXERR": "1.2",
    "POSANGLE_MAXERR": "2.0",        # deg
    "POSITION_MAXERR": "1.0",        # arcmin: the nominal WCS ignores the distortion (~30" at corners)
    "CROSSID_RADIUS": "5.0",         # arcsec: after the linear match, distortion leaves up to ~6"
    "SN_THRESHOLDS": "10.0,100.0",
    "FLAGS_MASK": "0x00f0",
    "DISTORT_DEGREES": "3",
    "DISTORT_KEYS": "XWIN_IMAGE,YWIN_IMAGE",
    "CENTROID_KEYS": "XWIN_IMAGE,YWIN_IMAGE",
    "CENTROIDERR_KEYS": "ERRAWIN_IMAGE,ERRBWIN_IMAGE,ERRTHETAWIN_IMAGE",
    "STABILITY_TYPE": "EXPOSURE",
    "MOSAIC_TYPE": "UNCHANGED",
    "ASTRINSTRU_KEY": "FILTER",
    "PHOTINSTRU_KEY": "FILTER",
    "SOLVE_ASTROM": "Y",
    "SOLVE_PHOTOM": "N",
    "HEADER_TYPE": "NORMAL",
    "CHECKPLOT_TYPE": "NONE",
    "CHECKPLOT_DEV": "NULL",
    "WRITE_XML": "Y",
    "VERBOSE_TYPE": "NORMAL",
    "NTHREADS": "1",
}

#: SCAMP refinement passes: start from the previous solution (.ahead), no pattern matching.
SCAMP_REFINE_OPTIONS = {
    "MATCH": "N",
    "CROSSID_RADIUS": "1.5",
}

# Library thread pools (ATLAS/OpenBLAS/OpenMP) pinned to one thread as well.
_ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# Mask planes whose pixels carry no information (snakedrp.repo.exposure.MASK_PLANES bits).
_NO_DATA_BITS = (1 << 0) | (1 << 8)  # BAD, NO_DATA


@dataclass(frozen=True)
class StepResult:
    """One tool run: wall-clock seconds, peak RSS [MB], exit status, log path.

    ``cpu_seconds`` is user + system CPU time (less sensitive than wall clock to other jobs
    sharing the core). ``rss_source`` says how the peak RSS was read: ``"time"`` (GNU time's %M: the tool's
    own) or ``"wait4"`` (an upper bound: Linux carries the forking parent's high-water mark
    across ``exec`` into the child's ``ru_maxrss``).
    """

    seconds: float
    cpu_seconds: float
    max_rss_mb: float
    returncode: int
    log: str
    rss_source: str


# GNU time (Debian package "time"); the shell builtin of the same name has no -f/-o.
GNU_TIME = Path("/usr/bin/time") if Path("/usr/bin/time").exists() else None


def run_timed(cmd: list[str], cwd: Path, log: Path, *, cpu: int | None = None) -> StepResult:
    """Run ``cmd`` in ``cwd``; time it (wall clock) and read its peak RSS.

    The tool is started as ``/usr/bin/time -f %M [taskset -c cpu] cmd``: a fork of this
    (large) Python process would pass its own high-water RSS on to the tool's ``ru_maxrss``,
    a fork of the small ``time`` does not. Without GNU time the ``wait4`` figure is kept
    and flagged. ``cpu`` pins the tool to that core; library thread pools get one thread.
    """
    env = dict(os.environ, **_ONE_THREAD_ENV)
    prefix: list[str] = []
    rss_file = Path(str(log) + ".rss")
    if GNU_TIME is not None:
        prefix += [str(GNU_TIME), "-f", "%M", "-o", str(rss_file)]
    if cpu is not None:
        prefix += ["taskset", "-c", str(cpu)]
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(prefix + list(cmd), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    max_rss_mb, source = usage.ru_maxrss / 1024.0, "wait4"
    if GNU_TIME is not None and rss_file.exists():
        lines = [ln for ln in rss_file.read_text().split() if ln.isdigit()]
        if lines:
            max_rss_mb, source = int(lines[-1]) / 1024.0, "time"
    cpu_seconds = usage.ru_utime + usage.ru_stime  # includes the tool: time/taskset wait for it
    return StepResult(seconds, cpu_seconds, max_rss_mb, proc.returncode, str(log), source)


def tool_versions() -> dict[str, str]:
    """Version lines of the three tools (for the benchmark record)."""
    versions = {}
    for tool, flag in ((SEXTRACTOR, "-v"), (PSFEX, "-v"), (SCAMP, "-v")):
        try:
            out = subprocess.run([tool, flag], capture_output=True, text=True, timeout=30)
            versions[tool] = (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError) as exc:
            versions[tool] = f"unavailable ({exc})"
    return versions


def _options(options: dict[str, str]) -> list[str]:
    args = []
    for key, value in options.items():
        args += [f"-{key}", str(value)]
    return args


def _dump_defaults(tool: str, path: Path) -> Path:
    with open(path, "w") as out:
        subprocess.run([tool, "-d"], stdout=out, stderr=subprocess.DEVNULL, check=True)
    return path


# ------------------------------------------------------------------------------ inputs
def recenter_tan_header(header: fits.Header, shape: tuple[int, int]) -> tuple[fits.Header, float]:
    """Re-express a plain TAN WCS with its tangent point at the image centre.

    A camera's nominal WCS has its tangent point at the boresight, far outside a corner CCD
    (CRPIX ~ 4000 px away here). SCAMP then converges slowly: each run only shrinks the
    distortion residuals by ~0.4 (1.2" → 0.5" → 0.16" → ...), as its TPV polynomial about a
    distant point is ill-conditioned. A TAN projection about the CCD centre with a fitted CD
    matrix maps pixels to the sky within ~0.01 pixel of the original over the CCD (gnomonic
    projections about points 0.2 deg apart differ by ~theta^3), and from it SCAMP converges in
    one or two runs. Headers with distortion terms (PV, SIP) are returned unchanged.

    Returns
    -------
    header : Header
        A copy with CRVAL/CRPIX/CD replaced (PC/CDELT removed).
    max_change_pixel : float
        Largest pixel displacement between the two WCSs on a grid over the image.
    """
    import warnings

    from astropy.wcs import WCS, FITSFixedWarning

    if (not str(header.get("CTYPE1", "")).endswith("TAN")
            or any(k.startswith(("PV", "A_", "B_")) for k in header)):
        return header, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        old = WCS(header)
    ny, nx = shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    y, x = (v.ravel().astype(float) for v in np.mgrid[0:ny:ny // 20, 0:nx:nx // 10])
    ra, dec = old.all_pix2world(x, y, 0)
    ra0, dec0 = old.all_pix2world([[cx, cy]], 0)[0]
    new = WCS(naxis=2)
    new.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    new.wcs.crval = [ra0, dec0]
    new.wcs.crpix = [cx + 1.0, cy + 1.0]  # FITS CRPIX is one-based
    new.wcs.cd = np.eye(2)
    xi, eta = new.wcs_world2pix(ra, dec, 0)  # intermediate coordinates [deg] about the centre
    cd = np.linalg.lstsq(np.c_[x - cx, y - cy], np.c_[xi - cx, eta - cy], rcond=None)[0].T
    new.wcs.cd = cd
    px, py = new.all_world2pix(ra, dec, 0)
    change = float(np.max(np.hypot(px - x, py - y)))
    out = header.copy()
    for key in [k for k in out if re.match(r"^(CRVAL|CRPIX|CD\d_|PC\d_|CDELT|WCSAXES)", k)]:
        out.remove(key, ignore_missing=True, remove_all=True)
    for i in (1, 2):
        out[f"CRVAL{i}"] = float(new.wcs.crval[i - 1])
        out[f"CRPIX{i}"] = float(new.wcs.crpix[i - 1])
        for j in (1, 2):
            out[f"CD{i}_{j}"] = float(cd[i - 1, j - 1])
    out["HISTORY"] = f"snakedrp peers: TAN tangent point moved to the image centre (<= {change:.3f} px)"
    return out, change


def prepare_image(image_path: str | Path, workdir: str | Path, *, use_variance: bool = True,
                  recenter: bool = True, saturation_from_mask: bool = True):
    """Write the image (and its variance map) as single-HDU FITS files the tools can read.

    Parameters
    ----------
    image_path : path
        An Exposure file (``IMAGE``, ``MASK``, ``VARIANCE`` extensions; metadata in the
        primary header) or a single-image FITS (electrons, WCS in its header).
    workdir : path
    use_variance : bool
        Write the variance map (BAD/NO_DATA pixels set to 1e30 so SExtractor gives them
        weight 0) when the input has one.
    recenter : bool
        Move a plain TAN WCS's tangent point to the image centre
        (:func:`recenter_tan_header`; changes the mapping by ~0.01 pixel).
    saturation_from_mask : bool
        Set ``SATURATE`` to the lowest SAT-masked value. Not for coadds: their SAT bit marks
        pixels saturated in any input, down to the sky level of the coadd, and SExtractor would
        then flag every source as saturated (PSFEx finds no star).

    Returns
    -------
    image : Path
        ``<workdir>/image.fits`` (float32, primary metadata + WCS in one header).
    variance : Path or None
        ``<workdir>/variance.fits``.
    header : astropy.io.fits.Header
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    image_out = workdir / "image.fits"
    variance_out = None
    with fits.open(image_path) as hdul:
        names = [h.name for h in hdul]
        if "IMAGE" in names:
            header = hdul[0].header.copy()
            for card in hdul["IMAGE"].header.cards:
                if card.keyword not in ("XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "PCOUNT",
                                        "GCOUNT", "EXTNAME", "CHECKSUM", "DATASUM", ""):
                    header[card.keyword] = (card.value, card.comment)
            data = np.array(hdul["IMAGE"].data, np.float32)
            mask = np.asarray(hdul["MASK"].data) if "MASK" in names else None
            if mask is not None and saturation_from_mask and "SATURATE" not in header:
                # SExtractor flags saturation by level: take it from the SAT-masked pixels
                sat = ((mask & (1 << 1)) != 0) & np.isfinite(data)
                if sat.any():
                    header["SATURATE"] = (float(np.min(data[sat])), "lowest SAT-masked value [e-]")
            if use_variance and "VARIANCE" in names:
                variance = np.array(hdul["VARIANCE"].data, np.float32)
                if mask is not None:
                    variance[(mask & _NO_DATA_BITS) != 0] = 1e30
                variance[~np.isfinite(variance) | (variance <= 0) | ~np.isfinite(data)] = 1e30
                variance_out = workdir / "variance.fits"
                fits.PrimaryHDU(variance).writeto(variance_out, overwrite=True)
        else:
            first = next(h for h in hdul if h.data is not None)
            header = first.header.copy()
            data = np.array(first.data, np.float32)
    data[~np.isfinite(data)] = 0.0  # SExtractor has no NaN handling; the variance zeroes their weight
    for key in ("CHECKSUM", "DATASUM", "EXTEND", "BSCALE", "BZERO"):
        header.remove(key, ignore_missing=True)
    if recenter:
        header, _ = recenter_tan_header(header, data.shape)
    fits.PrimaryHDU(data, header=header).writeto(image_out, overwrite=True)
    return image_out, variance_out, header


def write_ldac_refcat(table: Table, path: str | Path, band: str, *, epoch: float = 2000.0) -> Path:
    """Write our refcat table as the FITS_LDAC reference catalog SCAMP reads (ASTREF_CATALOG FILE).

    Layout (SCAMP ``astrefcat.c``, ``load_astreffield``): a primary HDU, an ``LDAC_IMHEAD``
    table holding one header as a string column, and an ``LDAC_OBJECTS`` table with
    ``X_WORLD``, ``Y_WORLD`` [deg], ``ERRA_WORLD``, ``ERRB_WORLD``, ``ERRTHETA_WORLD`` [deg],
    ``MAG``, ``MAGERR`` [mag], ``OBSDATE`` [yr], ``FLAGS``.

    Parameters
    ----------
    table : Table
        Our refcat: ``ra``, ``dec`` [deg], ``ra_err``, ``dec_err`` [mas], ``mag_<band>``,
        ``mag_<band>_err`` [mag]; an ``epoch`` column [yr] is used if present.
    path : path
    band : str
        Which magnitude column to write as ``MAG``.
    epoch : float
        ``OBSDATE`` when the table has no epoch column.

    Notes
    -----
    SCAMP sets both axes' error of a reference star to ``sqrt(ERRA² + ERRB²)``; writing
    ``ra_err/√2`` and ``dec_err/√2`` makes that the RMS of the two per-axis errors.
    Rows without a finite position or magnitude are dropped.
    """
    ra = np.asarray(table["ra"], float)
    dec = np.asarray(table["dec"], float)
    mag = np.asarray(table[f"mag_{band}"], float)
    err_col = f"mag_{band}_err"
    magerr = np.asarray(table[err_col], float) if err_col in table.colnames else np.full(ra.size, 0.01)
    ra_err = np.asarray(table["ra_err"], float) if "ra_err" in table.colnames else np.full(ra.size, 10.0)
    dec_err = np.asarray(table["dec_err"], float) if "dec_err" in table.colnames else ra_err
    obsdate = np.asarray(table["epoch"], float) if "epoch" in table.colnames else np.full(ra.size, epoch)
    good = np.isfinite(ra) & np.isfinite(dec) & np.isfinite(mag)
    mas_to_deg = 1.0 / 3.6e6
    cols = [
        fits.Column("X_WORLD", "1D", unit="deg", array=np.mod(ra[good], 360.0)),
        fits.Column("Y_WORLD", "1D", unit="deg", array=dec[good]),
        fits.Column("ERRA_WORLD", "1E", unit="deg", array=ra_err[good] * mas_to_deg / np.sqrt(2)),
        fits.Column("ERRB_WORLD", "1E", unit="deg", array=dec_err[good] * mas_to_deg / np.sqrt(2)),
        fits.Column("ERRTHETA_WORLD", "1E", unit="deg", array=np.zeros(good.sum())),
        fits.Column("MAG", "1E", unit="mag", array=mag[good]),
        fits.Column("MAGERR", "1E", unit="mag", array=np.nan_to_num(magerr[good], nan=0.1)),
        fits.Column("OBSDATE", "1D", unit="yr", array=obsdate[good]),
        fits.Column("FLAGS", "1I", array=np.zeros(good.sum(), np.int16)),
    ]
    objects = fits.BinTableHDU.from_columns(cols, name="LDAC_OBJECTS")
    # LDAC_IMHEAD: the "image" header as one row of 80-character cards
    head = fits.Header()
    head["NAXIS"] = 0
    head["REFBAND"] = (band, "refcat band written as MAG")
    head["NREF"] = (int(good.sum()), "number of reference stars")
    text = head.tostring(sep="", endcard=True, padding=False)
    cards = np.array([[text[i:i + 80] for i in range(0, len(text), 80)]])
    imhead = fits.BinTableHDU.from_columns(
        [fits.Column("Field Header Card", f"{len(text)}A", dim=f"(80,{cards.shape[1]})", array=cards)],
        name="LDAC_IMHEAD")
    hdul = fits.HDUList([fits.PrimaryHDU(), imhead, objects])
    hdul.writeto(path, overwrite=True)
    return Path(path)


# ------------------------------------------------------------------------------ outputs
def _votable_rows(xml_path: Path, table_name: str) -> list[dict[str, str]]:
    """Rows of one TABLE of an astromatic XML VOTable, as {field name: cell text}."""
    root = ET.parse(xml_path).getroot()
    strip = lambda tag: tag.rsplit("}", 1)[-1]  # noqa: E731  (namespace-agnostic tags)
    for table in root.iter():
        if strip(table.tag) == "TABLE" and table.get("name") == table_name:
            names = [f.get("name") for f in table if strip(f.tag) == "FIELD"]
            rows = []
            for tr in table.iter():
                if strip(tr.tag) == "TR":
                    cells = [(td.text or "").strip() for td in tr if strip(td.tag) == "TD"]
                    rows.append(dict(zip(names, cells)))
            return rows
    return []


def _numbers(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", text or "")]


def parse_psfex_xml(xml_path: str | Path) -> dict:
    """PSF statistics from PSFEx's XML output (its ``PSF_Fields`` table).

    ``fwhm_pixel`` is the mean FWHM of the fitted model, ``fwhm_pixelfree`` the same with the
    pixel response removed; the .psf header's ``PSF_FWHM`` is only the FLUX_RADIUS-based
    first guess used for sample selection (it reads ~20 % high on a Moffat).
    """
    xml_path = Path(xml_path)
    rows = _votable_rows(xml_path, "PSF_Fields") if xml_path.exists() else []
    if not rows:
        return {}
    r = rows[0]
    first = lambda key: (_numbers(r.get(key, "")) or [None])[0]  # noqa: E731
    return {
        "n_loaded": int(first("NStars_Loaded_Total") or 0),
        "n_accepted": int(first("NStars_Accepted_Total") or 0),
        "fwhm_pixel": first("FWHM_Mean"),
        "fwhm_pixelfree": first("FWHM_PixelFree_Mean"),
        "moffat_beta": first("MoffatBeta_Mean"),
        "ellipticity": first("Ellipticity_Mean"),
        "chi2": first("Chi2_Mean"),
    }


def parse_scamp_xml(xml_path: str | Path) -> dict:
    """Astrometric statistics from SCAMP's XML output (its ``FGroups`` table).

    Returns
    -------
    dict
        ``n_matched`` / ``n_matched_highsn`` (detections matched to the reference: all /
        high S/N), ``rms_ref_mas`` / ``rms_ref_highsn_mas`` (per-axis RMS of the residuals
        against the reference [mas]), ``chi2_ref``, ``offset_ref_mas`` (mean residual) and
        ``rms_internal_mas`` (between overlapping exposures: 0 with one CCD).
    """
    xml_path = Path(xml_path)
    groups = _votable_rows(xml_path, "FGroups") if xml_path.exists() else []
    if not groups:
        return {}
    g = groups[0]
    mas = lambda key: [1000.0 * v for v in _numbers(g.get(key, ""))[:2]] or None  # noqa: E731
    first = lambda key: (_numbers(g.get(key, "")) or [None])[0]  # noqa: E731
    return {
        "n_matched": int(first("AstromNDets_Reference") or 0),
        "n_matched_highsn": int(first("AstromNDets_Reference_HighSN") or 0),
        "rms_ref_mas": mas("AstromSigma_Reference"),
        "rms_ref_highsn_mas": mas("AstromSigma_Reference_HighSN"),
        "offset_ref_mas": mas("AstromOffset_Reference"),
        "chi2_ref": first("AstromChi2_Reference"),
        "rms_internal_mas": mas("AstromSigma_Internal"),
    }


_MATCH_LINE = re.compile(r"([-+\d.]+) deg\s+([\d.]+)\"\s+([\d.]+)\s+([-+\d.]+)\"\s+([-+\d.]+)\"\s+([\d.]+)")


def parse_scamp_match(log_path: str | Path) -> dict:
    """The pattern-matching line of SCAMP's log: position angle, scale, shift and contrasts.

    SCAMP prints it only to stdout. A contrast near 1 means the cross-correlation peak is no
    better than noise (no real match); well-matched fields give several.
    """
    text = Path(log_path).read_text(errors="replace") if Path(log_path).exists() else ""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    found = _MATCH_LINE.findall(text)
    if not found:
        return {}
    angle, scale, contrast_angle, dx, dy, contrast_shift = (float(v) for v in found[-1])
    return {"posangle_deg": angle, "pixscale_arcsec": scale, "contrast_angle_scale": contrast_angle,
            "shift_arcsec": [dx, dy], "contrast_shift": contrast_shift}


def read_scamp_head(head_path: str | Path, image_header: fits.Header) -> fits.Header:
    """The image header with SCAMP's fitted WCS (``.head``, TPV) replacing the nominal one."""
    header = image_header.copy()
    for key in [k for k in header if re.match(r"^(CTYPE|CRVAL|CRPIX|CD|PC|CDELT|CUNIT|PV|A_|B_|AP_|BP_)", k)]:
        header.remove(key, ignore_missing=True, remove_all=True)
    text = Path(head_path).read_text(errors="replace")
    for line in text.splitlines():
        key = line[:8].strip()
        if not key or key in ("END", "COMMENT", "HISTORY") or "=" not in line[8:10]:
            continue
        card = fits.Card.fromstring(line.ljust(80)[:80])
        header[card.keyword] = (card.value, card.comment)
    return header


# ------------------------------------------------------------------------------ the chain
def run_peer_chain(image_path: str | Path, refcat_table: Table, workdir: str | Path, *, band: str,
                   use_variance: bool = True, scamp_refine: int = 2, max_rms_mas: float = 100.0,
                   cpu: int | None = None, keep: bool = True) -> dict:
    """Run SExtractor → PSFEx → SCAMP on one ISR-corrected CCD and time each step.

    Parameters
    ----------
    image_path : path
        The ISR-corrected image (electrons, nominal TAN WCS): an Exposure file or a plain
        single-image FITS; see :func:`prepare_image` (done untimed).
    refcat_table : Table
        Our reference catalog around the CCD (written untimed with :func:`write_ldac_refcat`).
    workdir : path
        Scratch directory (created); every input, output and log of the tools goes here.
    band : str
        Refcat band for SCAMP's reference magnitudes.
    use_variance : bool
        Give SExtractor the variance map (``WEIGHT_TYPE MAP_VAR``, ``GAIN 0`` since the
        variance already holds the sources' Poisson noise); else SExtractor's own background
        RMS map and ``GAIN 1`` (electrons).
    scamp_refine : int
        SCAMP runs after the first, each starting from the previous solution (``.ahead``)
        without pattern matching and with a 1.5" cross-identification radius. From a
        nominal WCS that ignores the optical distortion (~30" at a corner CCD), the first run
        leaves 15 mas to 1.7" (it depends on the pattern match); one more run reaches the
        centroid-noise floor (~10 mas) and a second makes sure (~30 ms each). Their time
        counts as SCAMP's.
    max_rms_mas : float
        ``ok`` requires SCAMP's RMS against the reference (high S/N) below this [mas].
    cpu : int, optional
        Pin every tool to this core.
    keep : bool
        Keep the large files in ``workdir`` (image, variance, catalog) afterwards.

    Returns
    -------
    dict
        ``seconds_sextractor``, ``seconds_psfex``, ``seconds_scamp`` (all passes),
        ``seconds_total`` (wall clock, sum of the tool runs), ``cpu_seconds_total`` (user +
        system CPU of the tools), ``max_rss_mb`` per tool and
        ``peak``, ``n_sources`` (SExtractor detections), ``psfex`` (stars, FWHM [pixel],
        chi2), ``scamp`` (:func:`parse_scamp_xml` of the last pass plus the pattern match of
        the first, :func:`parse_scamp_match`), ``scamp_rms_mas`` (mean of the two per-axis
        RMS against the reference, high S/N), ``ok`` (every tool exited 0 with its output,
        SCAMP matched at least 10 reference stars with an RMS below ``max_rms_mas``),
        ``errors``, ``workdir``, ``head`` (SCAMP's WCS header file), ``seconds_prepare``
        (untimed input preparation: image split, WCS re-centring, LDAC refcat, config dumps).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_prepare = time.perf_counter()
    image, variance, header = prepare_image(image_path, workdir, use_variance=use_variance)
    refcat_path = write_ldac_refcat(refcat_table, workdir / "refcat.ldac", band)
    sex_conf = _dump_defaults(SEXTRACTOR, workdir / "default.sex")
    psfex_conf = _dump_defaults(PSFEX, workdir / "default.psfex")
    scamp_conf = _dump_defaults(SCAMP, workdir / "default.scamp")
    # the tools resolve relative names against cwd: the param and conv files go beside
    shutil.copyfile(SEXTRACTOR_PARAMS, workdir / SEXTRACTOR_PARAMS.name)
    shutil.copyfile(SEXTRACTOR_CONV, workdir / SEXTRACTOR_CONV.name)
    cat = workdir / "image.ldac"
    head = workdir / "image.head"
    ahead = workdir / "image.ahead"
    for stale in (cat, head, ahead, workdir / "image.psf", workdir / "scamp.xml", workdir / "psfex.xml"):
        stale.unlink(missing_ok=True)
    errors: list[str] = []
    seconds_prepare = time.perf_counter() - t_prepare

    # 1. SExtractor
    sex_opts = dict(SEXTRACTOR_OPTIONS, CATALOG_NAME=cat.name, PARAMETERS_NAME=SEXTRACTOR_PARAMS.name,
                    FILTER_NAME=SEXTRACTOR_CONV.name, SATUR_LEVEL=str(float(header.get("SATURATE", 1e30))))
    if variance is not None:
        sex_opts.update(WEIGHT_TYPE="MAP_VAR", WEIGHT_IMAGE=variance.name, WEIGHT_GAIN="N",
                        WEIGHT_THRESH="1e29", GAIN="0.0")
    else:
        sex_opts.update(WEIGHT_TYPE="NONE", GAIN="1.0")
    sex = run_timed([SEXTRACTOR, image.name, "-c", sex_conf.name, *_options(sex_opts)], workdir,
                    workdir / "sextractor.log", cpu=cpu)
    n_sources = 0
    if sex.returncode == 0 and cat.exists():
        with fits.open(cat) as hdul:
            n_sources = int(hdul["LDAC_OBJECTS"].header["NAXIS2"])
    else:
        errors.append(f"source-extractor exited {sex.returncode}; see {sex.log}")

    # 2. PSFEx
    psfex_opts = dict(PSFEX_OPTIONS, XML_NAME="psfex.xml", PSF_DIR=".")
    psf = run_timed([PSFEX, cat.name, "-c", psfex_conf.name, *_options(psfex_opts)], workdir,
                    workdir / "psfex.log", cpu=cpu)
    psfex_info = parse_psfex_xml(workdir / "psfex.xml")
    if psf.returncode != 0 or not (workdir / "image.psf").exists():
        errors.append(f"psfex exited {psf.returncode}; see {psf.log}")

    # 3. SCAMP: pattern match + solve, then refinement passes from the previous solution
    scamp_runs = []
    for i in range(1 + scamp_refine):
        opts = dict(SCAMP_OPTIONS, ASTREFCAT_NAME=refcat_path.name, XML_NAME="scamp.xml")
        if i:
            opts.update(SCAMP_REFINE_OPTIONS)
            shutil.copyfile(head, ahead)
        run = run_timed([SCAMP, cat.name, "-c", scamp_conf.name, *_options(opts)], workdir,
                        workdir / f"scamp{i}.log", cpu=cpu)
        scamp_runs.append(run)
        if run.returncode != 0 or not head.exists():
            errors.append(f"scamp pass {i} exited {run.returncode}; see {run.log}")
            break
    ahead.unlink(missing_ok=True)
    scamp_info = parse_scamp_xml(workdir / "scamp.xml")
    scamp_info["match"] = parse_scamp_match(workdir / "scamp0.log")
    scamp_info["seconds_per_pass"] = [r.seconds for r in scamp_runs]
    matched = scamp_info.get("n_matched") or 0
    if matched < 10:
        errors.append(f"scamp matched {matched} reference stars; match: {scamp_info['match']}")
    rms = scamp_info.get("rms_ref_highsn_mas") or scamp_info.get("rms_ref_mas")
    if matched >= 10 and rms and float(np.mean(rms)) > max_rms_mas:
        errors.append(f"scamp did not converge: RMS {float(np.mean(rms)):.0f} mas > {max_rms_mas:g} mas")

    seconds_scamp = sum(r.seconds for r in scamp_runs)
    rss = {"sextractor": sex.max_rss_mb, "psfex": psf.max_rss_mb,
           "scamp": max((r.max_rss_mb for r in scamp_runs), default=0.0)}
    rss["peak"] = max(rss.values())
    if not keep:
        for name in (image.name, "variance.fits", cat.name):
            (workdir / name).unlink(missing_ok=True)
    return {
        "seconds_sextractor": sex.seconds,
        "seconds_psfex": psf.seconds,
        "seconds_scamp": seconds_scamp,
        "seconds_total": sex.seconds + psf.seconds + seconds_scamp,
        "cpu_seconds_total": sex.cpu_seconds + psf.cpu_seconds + sum(r.cpu_seconds for r in scamp_runs),
        "max_rss_mb": rss,
        "n_sources": n_sources,
        "psfex": psfex_info,
        "scamp": scamp_info,
        "scamp_rms_mas": float(np.mean(rms)) if rms else None,
        "ok": not errors,
        "errors": errors,
        "workdir": str(workdir),
        "head": str(head) if head.exists() else None,
        "seconds_prepare": seconds_prepare,
        "steps": {"sextractor": asdict(sex), "psfex": asdict(psf),
                  "scamp": [asdict(r) for r in scamp_runs]},
    }


def wcs_error_vs_truth(result: dict, truth: Table, *, min_snr: float = 50.0, match_radius: float = 1.5) -> dict:
    """Error of SCAMP's fitted WCS at true star positions (simulations only).

    Parameters
    ----------
    result : dict
        A :func:`run_peer_chain` result (its ``workdir`` holds the catalog, image and .head).
    truth : Table
        Rendered objects: ``x``, ``y`` (zero-based pixels), ``ra``, ``dec`` [deg], ``type``.
    min_snr : float
        Use isolated, unflagged stars with SExtractor ``SNR_WIN`` above this.
    match_radius : float
        Detection–truth association radius [pixel].

    Returns
    -------
    dict
        ``n`` stars, ``mean_mas`` and ``rms_mas`` per axis (RA·cos δ, Dec), ``p95_mas`` of the
        total offset; the same for the nominal header WCS under ``nominal``.
    """
    from astropy.wcs import WCS, FITSFixedWarning
    from scipy.spatial import cKDTree
    import warnings

    workdir = Path(result["workdir"])
    with fits.open(workdir / "image.ldac") as hdul:
        cat = Table(hdul["LDAC_OBJECTS"].data)
    header = fits.getheader(workdir / "image.fits")
    x = np.asarray(cat["XWIN_IMAGE"], float) - 1.0  # SExtractor pixels are one-based
    y = np.asarray(cat["YWIN_IMAGE"], float) - 1.0
    dist, idx = cKDTree(np.c_[truth["x"], truth["y"]]).query(np.c_[x, y])
    is_star = np.char.strip(np.asarray(truth["type"]).astype(str))[idx] == "star"  # FITS gives bytes
    use = is_star & (dist < match_radius) & (np.asarray(cat["SNR_WIN"]) > min_snr) & (np.asarray(cat["FLAGS"]) == 0)
    tra = np.asarray(truth["ra"], float)[idx[use]]
    tdec = np.asarray(truth["dec"], float)[idx[use]]

    def stats(h):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            ra, dec = WCS(h).all_pix2world(x[use], y[use], 0)
        dra = (ra - tra + 540.0) % 360.0 - 180.0
        dra *= np.cos(np.deg2rad(tdec)) * 3.6e6
        ddec = (dec - tdec) * 3.6e6
        return {"n": int(use.sum()), "mean_mas": [float(dra.mean()), float(ddec.mean())],
                "rms_mas": [float(dra.std()), float(ddec.std())],
                "p95_mas": float(np.percentile(np.hypot(dra, ddec), 95))}

    out = {"nominal": stats(header)}
    if result.get("head"):
        out.update(stats(read_scamp_head(result["head"], header)))
    return out
