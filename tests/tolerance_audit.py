"""Opt-in pytest plugin that tightens every numeric tolerance of the suite, to find the ones with thin margins.

    PADREC_TOL_SCALE=0.1 .venv/bin/python -m pytest -p tolerance_audit

multiplies the tolerances given to torch.allclose, torch.testing.assert_close, pytest.approx, math.isclose and
numpy.allclose by PADREC_TOL_SCALE (default 0.1). A test that fails so has less than a 10x margin over the error it
saw on this machine; run it under other kernels too (ATEN_CPU_CAPABILITY=avx2 or default, PADREC_TEST_THREADS=2),
since the error it measures is what moves between machines. Plain `<` comparisons are not covered.

With PADREC_TOL_REPORT=<file.json> it also writes, per call site of torch.allclose / assert_close in a test file,
the largest error seen as a fraction of the allowed one (max |a - b| / (atol + rtol |b|)): the margin of each
tolerance on this machine, to compare between kernels and thread counts.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCALE = float(os.environ.get("PADREC_TOL_SCALE", "0.1"))
TESTS = str(Path(__file__).resolve().parent)
REPORT = os.environ.get("PADREC_TOL_REPORT")
_worst: dict[str, float] = {}

_allclose, _assert_close, _approx = torch.allclose, torch.testing.assert_close, pytest.approx
_isclose, _np_allclose = math.isclose, np.allclose


def _factor() -> float:
    """SCALE for a call made from a test file; 1 for the package's own checks (drafts/train.py uses allclose)."""
    return SCALE if sys._getframe(2).f_code.co_filename.startswith(TESTS) else 1.0


def _record(a, b, rtol, atol) -> None:
    """The fraction of the tolerance that this call used, kept per call site (the worst one)."""
    if not REPORT or not isinstance(a, torch.Tensor) or a.numel() == 0 or not a.is_floating_point():
        return
    frame = sys._getframe(2)
    if not frame.f_code.co_filename.startswith(TESTS):
        return
    a, b = a.detach().double(), torch.as_tensor(b).detach().double().expand_as(a)
    finite = torch.isfinite(a) & torch.isfinite(b)
    used = ((a - b).abs() / (atol + rtol * b.abs()))[finite]
    site = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
    _worst[site] = max(_worst.get(site, 0.0), float(used.max()) if used.numel() else 0.0)


@atexit.register
def _write_report() -> None:
    if REPORT and _worst:
        Path(REPORT).write_text(json.dumps(dict(sorted(_worst.items())), indent=1) + "\n")


def allclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False):
    _record(a, b, rtol, atol)
    f = _factor()
    return _allclose(a, b, rtol=rtol * f, atol=atol * f, equal_nan=equal_nan)


def assert_close(actual, expected, *args, rtol=None, atol=None, **kw):
    if rtol is not None and atol is not None:
        _record(actual, expected, rtol, atol)
        f = _factor()
        rtol, atol = rtol * f, atol * f
    return _assert_close(actual, expected, *args, rtol=rtol, atol=atol, **kw)


def approx(expected, rel=None, abs=None, nan_ok=False):  # noqa: A002 - pytest's own names
    if rel is None and abs is None:
        rel, abs = 1e-6, 1e-12
    f = _factor()
    return _approx(expected, rel=None if rel is None else rel * f, abs=None if abs is None else abs * f, nan_ok=nan_ok)


def isclose(a, b, *, rel_tol=1e-09, abs_tol=0.0):
    f = _factor()
    return _isclose(a, b, rel_tol=rel_tol * f, abs_tol=abs_tol * f)


def np_allclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False):
    f = _factor()
    return _np_allclose(a, b, rtol=rtol * f, atol=atol * f, equal_nan=equal_nan)


def pytest_configure(config):
    torch.allclose, torch.testing.assert_close, pytest.approx = allclose, assert_close, approx
    math.isclose, np.allclose = isclose, np_allclose
