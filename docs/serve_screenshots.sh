#!/bin/sh
# The serve page's screenshots in docs/images/ (playing, stalled, paused, finished): the browser test's
# walk through the page's states saves the whole page at each one (headless Chromium, Page.captureScreenshot).
set -e
cd "$(dirname "$0")/.."
HELIOS_RT_SCREENSHOTS=docs/images pytest -q -p no:cacheprovider tests/test_serve_browser.py -k says
