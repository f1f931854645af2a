"""Root conftest: keep every test run offline and quiet about it."""

from __future__ import annotations

import os

# Tests never reach for the Hugging Face Hub or litellm's remote price list.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
