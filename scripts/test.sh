#!/usr/bin/env bash
# Sets up .venv when missing and runs the test suite; arguments go to pytest.
EXTRAS=test
source "$(dirname "$0")/_venv.sh"
exec .venv/bin/python -m pytest "$@"
