# The fleet/runner image: `fleet` (simulated devices, releases) and `testbench` (the scenario
# runner) with the scenario files under /scenarios, FROM scratch. Build it with docker/build.sh,
# which stages the build context (target/docker/fleet/rootfs); see there for why it is dynamic.
FROM scratch
COPY rootfs/ /

# No shell in the image: compose and `docker run` name the program, found through PATH, e.g.
# `docker run iothub-emulator-fleet:dev testbench validate /scenarios/quickstart.toml`.
ENV PATH=/usr/local/bin \
    HOME=/work

# The fleet keeps per-device files under ./.fleet and the runner writes ./testbench-report.
WORKDIR /work

CMD ["testbench", "--help"]
