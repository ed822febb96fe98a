"""Helpers the tests import (plain functions); the fixtures are in the conftest.py files."""
