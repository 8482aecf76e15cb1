"""Suite-wide setup."""

# pytest rewrites the asserts of every module of a plugin's distribution, schemathesis included.
# Rewriting its modules the first time deep inside a fixture's stack trips a CPython 3.11 bug
# ("AST constructor recursion depth mismatch"), so import them here, at a shallow stack.
try:
    import schemathesis.specs.openapi.schemas  # noqa: F401
except ImportError:  # the test extra is not installed: the fuzz test skips itself
    pass

import os  # noqa: E402
import tempfile  # noqa: E402

# Converted models (OpenVINO, ONNX) are cached on disk: the suite uses its own cache, shared by the
# subprocesses it starts, so it neither reads nor fills the user's ~/.cache/clipsearch.
if "CLIPSEARCH_TEST_KEEP_CACHE" not in os.environ:
    import atexit  # noqa: E402
    import shutil  # noqa: E402

    os.environ["CLIPSEARCH_CACHE_DIR"] = _cache = tempfile.mkdtemp(prefix="clipsearch-test-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
