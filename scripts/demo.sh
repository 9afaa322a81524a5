#!/usr/bin/env bash
# Sets up .venv when missing and runs the main job: finding flipped labels in
# scikit-learn's digits. Results go to runs/mislabel_digits unless --out says.
EXTRAS=examples
source "$(dirname "$0")/_venv.sh"
exec .venv/bin/python examples/mislabel_digits.py --out runs/mislabel_digits "$@"
