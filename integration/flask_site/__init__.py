"""A Flask app served by integration/test_flask_server.py (flask run, app.run)."""
