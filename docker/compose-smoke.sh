#!/usr/bin/env bash
# Runs docker-compose.yml (the quickstart scenario across containers: hub, two fleet shards, the
# runner) under a unique project name, prints the runner's verdict and exits with its code. Always
# tears the project down (containers, network, volume), also on failure or Ctrl-C.
#
# Usage: docker/compose-smoke.sh [--build] [--profile release|dev] [--timeout SECS]
#   --build    build the images first even if they exist (docker/build.sh --profile ...);
#              without it they are built only when missing.
#   --profile  passed to docker/build.sh (default: release).
#   --timeout  bound on the whole compose run (default: 600 s).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

build=0
profile=release
timeout_secs=600
while [[ $# -gt 0 ]]; do
    case "$1" in
        --build) build=1; shift ;;
        --profile)
            [[ $# -ge 2 ]] || { echo "docker/compose-smoke.sh: --profile needs a value: release or dev" >&2; exit 2; }
            profile="$2"
            shift 2
            ;;
        --timeout)
            [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || { echo "docker/compose-smoke.sh: --timeout needs a number of seconds" >&2; exit 2; }
            timeout_secs="$2"
            shift 2
            ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "docker/compose-smoke.sh: unknown argument '$1' (allowed: --build, --profile release|dev, --timeout SECS)" >&2; exit 2 ;;
    esac
done

tag="${IOTHUB_EMULATOR_TAG:-dev}"
if [[ $build == 1 ]] || ! docker image inspect "iothub-emulator:$tag" "iothub-emulator-fleet:$tag" >/dev/null 2>&1; then
    docker/build.sh --profile "$profile" --tag "$tag"
fi

project="iothub-smoke-$$-$RANDOM"
compose=(docker-compose --project-name "$project" --file docker-compose.yml)
teardown() {
    "${compose[@]}" down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1 || true
}
trap teardown EXIT
trap 'exit 130' INT TERM

echo "== docker-compose up (project $project, at most ${timeout_secs} s)"
started=$SECONDS
set +e
IOTHUB_EMULATOR_TAG="$tag" timeout "$timeout_secs" "${compose[@]}" up --no-color --exit-code-from runner
code=$?
set -e
elapsed=$((SECONDS - started))

echo "== runner output (verdict)"
"${compose[@]}" logs --no-color runner 2>/dev/null | grep -E "verdict|unmet|report:" || true
if [[ $code == 124 ]]; then
    echo "compose smoke: FAILED: the run did not finish within ${timeout_secs} s" >&2
elif [[ $code == 0 ]]; then
    echo "compose smoke: passed in ${elapsed} s (runner exit code 0)"
else
    echo "compose smoke: FAILED in ${elapsed} s (runner exit code $code)" >&2
fi
exit "$code"
