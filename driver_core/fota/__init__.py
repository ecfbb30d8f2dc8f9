"""Firmware over the air: image library, offers on POST /fota, stateless Block2 downloads, tracking.

Importing the package registers its tables on the shared metadata.
"""

from __future__ import annotations

from . import models as _models  # noqa: F401  (tables on Base.metadata)
from .service import FotaService, FotaStateEvent, start_fota, stop_fota

__all__ = ["FotaService", "FotaStateEvent", "start_fota", "stop_fota"]
