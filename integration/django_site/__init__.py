"""A Django project served by integration/test_django_server.py (manage.py runserver)."""
