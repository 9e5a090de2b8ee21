#!/usr/bin/env bash
# Renders a testbench report.html to a PNG with headless Chromium (Debian's `chromium`).
#   bash bench/screenshot.sh REPORT.html OUT.png [WIDTHxHEIGHT]
# The page needs no network: every plot is inline SVG. The profile directory is a fresh
# temporary one, removed afterwards.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
  echo "usage: $0 REPORT.html OUT.png [WIDTHxHEIGHT, default 1280x2400]" >&2
  exit 2
fi
html=$1
out=$2
size=${3:-1280x2400}
if [[ ! -f $html ]]; then
  echo "$0: REPORT.html: no such file: $html" >&2
  exit 2
fi
if [[ ! $size =~ ^[0-9]+x[0-9]+$ ]]; then
  echo "$0: WIDTHxHEIGHT: expected two numbers like 1280x2400, got '$size'" >&2
  exit 2
fi
browser=${CHROMIUM:-chromium}
if ! command -v "$browser" >/dev/null; then
  echo "$0: '$browser' not found: install Debian's chromium (apt-get install chromium) or set CHROMIUM" >&2
  exit 1
fi

abs_html=$(realpath "$html")
abs_out=$(realpath -m "$out")
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT

# Chromium logs D-Bus and GPU complaints on stderr in a container; keep them out of the way
# unless it fails.
if ! "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size="${size/x/,}" \
  --screenshot="$abs_out" "file://$abs_html" 2>"$profile/stderr.log"; then
  cat "$profile/stderr.log" >&2
  exit 1
fi
if [[ ! -s $abs_out ]]; then
  cat "$profile/stderr.log" >&2
  echo "$0: chromium wrote no screenshot to $abs_out" >&2
  exit 1
fi
echo "screenshot: $abs_out"
