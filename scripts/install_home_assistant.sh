#!/usr/bin/env bash
# Install Home Assistant in its own virtual environment (default .venv-ha) for the real-HA test
# and for trying the integration locally.
#
# Home Assistant pins its own aiohttp and friends, so it never shares the driver's venv.
# 2024.3.3 is the newest release that runs on Python 3.11 (2024.4 needs 3.12).
# The packages of the integrations the test loads (mqtt, the frontend and what Home Assistant
# always sets up) are installed here too, read from their manifests, so Home Assistant's
# first start does not pip-install anything.
# Idempotent: when the venv already has this version it returns at once.
#
# Usage: scripts/install_home_assistant.sh [VENV_DIR]
#   HA_VERSION  Home Assistant version (default 2024.3.3)
#   PYTHON      interpreter for the venv (default python3; must be >= 3.11)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-.venv-ha}"
HA_VERSION="${HA_VERSION:-2024.3.3}"
PYTHON="${PYTHON:-python3}"
# The integrations the test sets up, beyond those Home Assistant always sets up; mqtt sets up
# all of its platforms (camera needs stream), the frontend's analytics needs the recorder.
INTEGRATIONS="mqtt frontend api config blueprint automation recorder stream"
# acme (via hass-nabucasa) of this release breaks with josepy 2: keep the cloud importable.
FIXES=("josepy<2")
STAMP="$VENV/.coap-driver-ha-$HA_VERSION"

if [ -f "$STAMP" ] && [ -x "$VENV/bin/hass" ]; then
  echo "Home Assistant $HA_VERSION already installed in $VENV"
  exit 0
fi

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "error: Home Assistant $HA_VERSION needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
  exit 1
fi

echo "Installing Home Assistant $HA_VERSION into $VENV (a few minutes the first time) ..."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
"${pip[@]}" "homeassistant==$HA_VERSION"

# Requirements of the integrations set up at start, with their dependencies (from the manifests).
mapfile -t requirements < <("$VENV/bin/python" - $INTEGRATIONS <<'PY'
import json
import sys
from pathlib import Path

import homeassistant.bootstrap as bootstrap
import homeassistant.components as components
from homeassistant.components.mqtt.const import PLATFORMS

base = Path(components.__file__).parent
wanted = set(sys.argv[1:]) | bootstrap.DEFAULT_INTEGRATIONS | bootstrap.CORE_INTEGRATIONS
wanted |= {"logger", "system_log"} | {str(platform) for platform in PLATFORMS}
seen, requirements = set(), set()
while wanted:
    domain = wanted.pop()
    if domain in seen or not (base / domain / "manifest.json").is_file():
        continue
    seen.add(domain)
    manifest = json.loads((base / domain / "manifest.json").read_text())
    requirements.update(manifest.get("requirements", []))
    wanted.update(manifest.get("dependencies", []))
    wanted.update(manifest.get("after_dependencies", []))
print("\n".join(sorted(requirements)))
PY
)
"${pip[@]}" "${requirements[@]}" "${FIXES[@]}"
"$VENV/bin/hass" --version >/dev/null
touch "$STAMP"
echo "Home Assistant $("$VENV/bin/hass" --version) installed in $VENV"
