#!/usr/bin/env bash
# Debian packages the test suite needs, installed only when missing:
#   chromium (browser test of the web page), Java 17 (Spark's JVM).
# Exits non-zero, naming what is missing, when it cannot install them: the tests need them, and a
# missing one must stop `make test` here rather than turn into skipped tests.
set -euo pipefail
missing() {
  need=()
  [ -x /usr/bin/chromium ] || need+=(chromium)
  command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
}
missing
[ ${#need[@]} -eq 0 ] && exit 0
fail() {
  echo "install-system-deps: error: ${need[*]} missing and $1; the tests need them." >&2
  echo "install-system-deps: install them as root: apt-get install -y --no-install-recommends ${need[*]}" >&2
  exit 1
}
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || fail "this is not root (and no password-less sudo)"
  SUDO="sudo -n"
fi
command -v apt-get >/dev/null 2>&1 || fail "apt-get is not available"
echo "install-system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || fail "apt-get update failed"
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || fail "apt-get install failed"
missing
[ ${#need[@]} -eq 0 ] || fail "apt-get install did not provide them"
