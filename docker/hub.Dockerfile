# The hub image: `iothub-emulator` FROM scratch. Build it with docker/build.sh, which stages the
# build context (target/docker/hub/rootfs): the binary, the dynamic loader and the libraries `ldd`
# lists, an /etc/nsswitch.conf, /tmp (1777) and /data. See build.sh for why the binary is dynamic.
FROM scratch
COPY rootfs/ /

# Settings go through the flags' env twins rather than ENTRYPOINT flags, so `docker run IMAGE
# --bind ...` can still override any of them (clap refuses a flag given twice) and the HEALTHCHECK
# below probes the same port the hub listens on. Change ports with these variables, not flags.
ENV PATH=/usr/local/bin \
    IOTHUB_EMULATOR_BIND=0.0.0.0 \
    IOTHUB_EMULATOR_DATA_DIR=/data \
    IOTHUB_EMULATOR_HTTP_PORT=8080 \
    IOTHUB_EMULATOR_FTP_PASSIVE_PORTS=50000-50199

# HTTPS (REST), MQTT over TLS, AMQP over TLS, plain HTTP (health, /ca.pem, REST), FTP control and
# the FTP passive data ports (200: twice the concurrent downloads a 100-device release makes).
EXPOSE 443 8883 5671 8080 2121 50000-50199

# certs/ca.pem (clients trust it) and packages/ (the FTP root) live here; share it with the fleet.
VOLUME /data
WORKDIR /data

HEALTHCHECK --interval=2s --timeout=3s --start-period=2s --retries=3 \
    CMD ["/usr/local/bin/iothub-emulator", "healthcheck"]

ENTRYPOINT ["/usr/local/bin/iothub-emulator"]
