"""Integrations with the frameworks and servers an app lives in (Starlette/FastAPI, gunicorn, Flask, Django)."""
