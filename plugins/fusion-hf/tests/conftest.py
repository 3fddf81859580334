"""Fixtures of the fusion-hf tests; the helpers live in hf_testkit.py (a unique module name, so test
modules can import them even when several plugins' tests run in one pytest session)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hf_testkit import _quiet_transformers, clip_assets, text_assets  # noqa: E402,F401
