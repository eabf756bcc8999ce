"""ASGI entry point for uvicorn, registered through asgi_app()."""

import os

from django.core.asgi import get_asgi_application

from registry_agent.integrations.django import asgi_app

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djsite.settings")
application = asgi_app(get_asgi_application())
