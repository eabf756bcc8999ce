"""A WSGI app and gunicorn configs for ``integration/test_gunicorn.py``.

Everything is set through the environment the test gives gunicorn:
``GUNI_REGISTRY`` (backend URL), ``GUNI_SERVICE``, ``GUNI_PORT`` (the bound
port, registered as the instance's port), ``GUNI_EVENTS`` (a file the hooks
append JSON lines to) and ``GUNI_TTL``.
"""
