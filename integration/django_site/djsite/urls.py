"""/healthz, and /slow holding a request in flight (touching SLOW_MARKER once started)."""

from __future__ import annotations

import os
import pathlib
import time

from django.http import HttpRequest, HttpResponse
from django.urls import path


def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


def slow(request: HttpRequest) -> HttpResponse:
    marker = os.environ.get("SLOW_MARKER")
    if marker:
        pathlib.Path(marker).write_text("started")
    time.sleep(float(request.GET.get("s", "1")))
    return HttpResponse("slow done")


urlpatterns = [path("healthz", healthz), path("slow", slow)]
