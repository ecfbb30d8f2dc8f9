"""Container health check: exit 0 when the driver answers GET /ops/health with 200.

Run by the image's HEALTHCHECK (standard library only, no curl in python:3.11-slim).
The address comes from COAP_DRIVER_HEALTH_URL, which the Dockerfile sets to the
default HTTP port; change both together if configuration.yaml moves http.port.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8080/ops/health"
TIMEOUT_S = 4.0


def main() -> int:
    url = os.environ.get("COAP_DRIVER_HEALTH_URL") or DEFAULT_URL
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            body = response.read(200).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:  # 503: the body says which part is down
        print(f"unhealthy: HTTP {exc.code} {exc.read(200).decode('utf-8', 'replace')}")
        return 1
    except (OSError, ValueError) as exc:  # refused, timed out, bad URL
        print(f"unhealthy: {url}: {exc}")
        return 1
    print(f"healthy: {body}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
