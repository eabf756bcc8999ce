"""The test project's settings, URLs and WSGI/ASGI entry points."""
