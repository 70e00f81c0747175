#!/usr/bin/env bash
# Render a report page in headless Chromium and save a screenshot.
#
#   scripts/screenshot_report.sh REPORT.html OUT.png [WIDTH HEIGHT]
#
# Needs Debian's `chromium` package (apt-get install chromium) or $CHROMIUM pointing at a
# Chromium/Chrome binary. The page is opened from disk with networking features off, so a
# page that needed the network would show broken images here.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 REPORT.html OUT.png [WIDTH HEIGHT]" >&2
  exit 2
fi
page="$(realpath "$1")"
out="$(realpath -m "$2")"
width="${3:-1400}"
height="${4:-3000}"
browser="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}"
if [ -z "$browser" ]; then
  echo "$0: no chromium found; install Debian's package (apt-get install chromium) or set CHROMIUM" >&2
  exit 2
fi
if [ ! -f "$page" ]; then
  echo "$0: $1 does not exist" >&2
  exit 2
fi
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
# --no-sandbox: Chromium refuses to run as root otherwise (containers, CI).
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --hide-scrollbars --user-data-dir="$profile" --screenshot="$out" \
  --window-size="$width,$height" "file://$page" >/dev/null 2>&1
test -s "$out"
echo "$out"
