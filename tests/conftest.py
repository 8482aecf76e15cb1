"""Suite-wide setup."""

# pytest rewrites the asserts of every module of a plugin's distribution, schemathesis included.
# Rewriting its modules the first time deep inside a fixture's stack trips a CPython 3.11 bug
# ("AST constructor recursion depth mismatch"), so import them here, at a shallow stack.
import os  # noqa: E402
import tempfile  # noqa: E402

import schemathesis.specs.openapi.schemas  # noqa: F401  (the test extra is required)

# Converted models (OpenVINO, ONNX) are cached on disk: the suite uses its own cache, shared by the
# subprocesses it starts, so it neither reads nor fills the user's ~/.cache/clipsearch.
if "CLIPSEARCH_TEST_KEEP_CACHE" not in os.environ:
    import atexit  # noqa: E402
    import shutil  # noqa: E402

    os.environ["CLIPSEARCH_CACHE_DIR"] = _cache = tempfile.mkdtemp(prefix="clipsearch-test-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

# ------------------------------------------------------------------------------------------ skips
# A skip is allowed for one reason only: hardware that can be missing (a GPU). Everything else the
# tests need (Java, chromium, the test extra, the shipped tiny model) is installed by the project's
# own files, so a skip for it would hide a broken set-up: the session fails instead, naming the test.
import pytest  # noqa: E402

GPU_SKIP_REASON = "no CUDA GPU on this machine"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_runtest_setup(item) -> None:
    """@pytest.mark.gpu: the test needs a CUDA GPU, the one thing a machine may lack."""
    if item.get_closest_marker("gpu") is not None and not _cuda_available():
        pytest.skip(GPU_SKIP_REASON)


_bad_skips: list[str] = []


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if GPU_SKIP_REASON not in reason:
            _bad_skips.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report) -> None:
    _note_skip(report)


def pytest_collectreport(report) -> None:
    _note_skip(report)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _bad_skips and os.environ.get("CLIPSEARCH_ALLOW_SKIPS") != "1":
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if _bad_skips:
        terminalreporter.section("skips that are not for missing hardware", sep="=", red=True, bold=True)
        for line in _bad_skips:
            terminalreporter.line(line)
        terminalreporter.line(
            "only a missing GPU may skip a test: install what is missing (make system-deps, "
            "make install-test) or fix the import; CLIPSEARCH_ALLOW_SKIPS=1 tolerates them locally"
        )
