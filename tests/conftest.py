"""Suite-wide setup."""

# pytest rewrites the asserts of every module of a plugin's distribution, schemathesis included.
# Rewriting its modules the first time deep inside a fixture's stack trips a CPython 3.11 bug
# ("AST constructor recursion depth mismatch"), so import them here, at a shallow stack.
try:
    import schemathesis.specs.openapi.schemas  # noqa: F401
except ImportError:  # the test extra is not installed: the fuzz test skips itself
    pass
