#!/usr/bin/env bash
# Renews docs/dashboard-screenshot.png: runs the dashboard's browser test (bench/tests/dashboard.rs:
# a small scenario on the embedded hub, the page in headless chromium), which saves the page as
# it shows the finished release, one device selected.
#   bash bench/dashboard-screenshot.sh [OUT.png, default docs/dashboard-screenshot.png]
# Needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=$(realpath -m "${1:-docs/dashboard-screenshot.png}")
DASHBOARD_SCREENSHOT=$out cargo test -p testbench --test dashboard -- --nocapture
echo "wrote $out"
