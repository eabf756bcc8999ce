"""Integrations with the servers and frameworks an app lives in (Starlette, gunicorn, Flask…)."""
