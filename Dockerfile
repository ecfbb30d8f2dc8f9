# coap-driver container image. Deployment guide: docs/deployment.md.
#
# Written and checked statically (tests/test_deployment.py) on a machine without a Docker
# engine: the image has not been built there. Build it once and run the compose stack
# before relying on it.

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    COAP_DRIVER_HEALTH_URL=http://127.0.0.1:8080/ops/health

# The driver runs as its own unprivileged user; /config (configuration, secret key,
# firmware images) belongs to it. UID 10001: give host files meant for the container to it.
RUN groupadd --system --gid 10001 coap-driver \
 && useradd --system --uid 10001 --gid coap-driver --home-dir /config --no-create-home \
        --shell /usr/sbin/nologin coap-driver \
 && install -d -o coap-driver -g coap-driver -m 0700 /config

WORKDIR /opt/coap-driver
COPY pyproject.toml README.md ./
COPY driver_core ./driver_core
COPY custom_components ./custom_components
COPY deploy/healthcheck.py ./deploy/healthcheck.py
# Installed in place (-e): the built-in components in custom_components/ are looked up next
# to driver_core/, and the wheel of this project only carries driver_core.
RUN pip install -e . \
 && python -c "import driver_core.components as c; assert (c.builtin_components_dir() / 'mqtt').is_dir()"

USER coap-driver
VOLUME ["/config"]
# CoAP for the devices (coap.port), HTTP for the web panel, REST API, /metrics (http.port).
EXPOSE 5683/udp 8080/tcp
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/coap-driver/deploy/healthcheck.py"]
# Exec form: the driver is PID 1 and gets `docker stop`'s SIGTERM itself (a shell form would
# swallow it). It then stops cleanly within shutdown.drain_seconds + a few seconds
# (docs/operations.md, "Stopping"); compose.yaml gives it 20 s before SIGKILL.
STOPSIGNAL SIGTERM
ENTRYPOINT ["coap-driver", "--config", "/config", "run"]
