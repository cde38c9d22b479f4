"""For every test process: litellm stays offline (no price list or config from the internet).

Set here, before any test module is imported: some import litellm themselves, before
anything of ours.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
