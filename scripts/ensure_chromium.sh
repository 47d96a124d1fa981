#!/usr/bin/env bash
# Make sure Debian's Chromium is installed for the browser test of the Dagster UI
# (kspill_pipeline_tests/test_ui_browser.py). Playwright drives this system browser; it never
# downloads a browser of its own. Called by `make test` (and so by .ci/run) before pytest.
#
# When /usr/bin/chromium (or $KSPILL_CHROMIUM) does not run, install it with apt as root. Whenever
# that is impossible (not root, no apt, apt fails) print why and exit 0, so the rest of the suite
# still runs: the browser test then FAILS with that reason (it is never skipped silently);
# `pytest -m "not browser"` deselects it.
set -euo pipefail

CHROMIUM="${KSPILL_CHROMIUM:-/usr/bin/chromium}"

works() { [ -x "$CHROMIUM" ] && "$CHROMIUM" --headless --no-sandbox --version >/dev/null 2>&1; }

if works; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure_chromium: $CHROMIUM not found and not root: install it with" >&2
    echo "    sudo apt-get install -y --no-install-recommends chromium" >&2
    echo "  (or set KSPILL_CHROMIUM to a Chromium binary); the browser UI test will fail until then." >&2
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: $CHROMIUM not found and apt-get is unavailable; install Chromium by hand" >&2
    echo "  (or set KSPILL_CHROMIUM); the browser UI test will fail until then." >&2
    exit 0
fi

echo "ensure_chromium: installing Debian's chromium (apt-get) for the browser UI test" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
    echo "ensure_chromium: apt-get install chromium failed; the browser UI test will fail until it is installed" >&2
    exit 0
fi
if ! works; then
    echo "ensure_chromium: chromium was installed but '$CHROMIUM --version' fails; the browser UI test will fail" >&2
    exit 0
fi
"$CHROMIUM" --version >&2
