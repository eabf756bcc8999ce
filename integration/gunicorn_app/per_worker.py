"""The recommended pattern's app module: nothing registers at import (see conf_per_worker)."""

from __future__ import annotations

from integration.gunicorn_app._common import app

__all__ = ["app"]
