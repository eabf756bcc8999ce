"""Settings of the test project; REGISTRY_AGENT comes from TEST_REGISTRY_* variables."""

from __future__ import annotations

import json
import os

SECRET_KEY = "test-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "djsite.urls"
WSGI_APPLICATION = "djsite.wsgi.application"
USE_TZ = True

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "registry_agent.integrations.django",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("TEST_DJANGO_DB", ":memory:"),
    }
}

REGISTRY_AGENT = {
    # Without TEST_REGISTRY_BACKEND: none here, the environment's (REGISTRY_AGENT_BACKEND…).
    **(
        {"backend": os.environ["TEST_REGISTRY_BACKEND"]}
        if "TEST_REGISTRY_BACKEND" in os.environ
        else {}
    ),
    "service": os.environ.get("TEST_REGISTRY_SERVICE", "djsite"),
    "health_path": "/healthz",
    "ttl": 3,
    "drain_delay": 0.25,
    # Extra keys as JSON (the bad-settings test gives {"port": "eighty"}).
    **json.loads(os.environ.get("TEST_REGISTRY_EXTRA", "{}")),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"pid": {"format": "pid=%(process)d %(name)s %(levelname)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "pid"}},
    "loggers": {"registry_agent": {"handlers": ["stderr"], "level": "INFO"}},
}
