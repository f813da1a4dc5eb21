"""The stages' Prefect cache policy: a task run is keyed on the content of its inputs and the
source of the code it runs (the hashing is plain Python: tasks/platform/caching.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy
from prefect.context import TaskRunContext

from distill.tasks.platform.caching import Uncacheable, code_digest, content_hash


def stage_cache_key(context: TaskRunContext, inputs: dict[str, Any]) -> str | None:
    """Prefect cache key of a stage task run; None (no caching) when an input cannot be pinned."""
    task = context.task
    try:
        inputs_key = content_hash(inputs)
    except Uncacheable:
        return None
    source_key = TASK_SOURCE.compute_key(task_ctx=context, inputs=inputs, flow_parameters={})
    return content_hash(
        task.name, source_key, code_digest(task.fn), torch.__version__, np.__version__, inputs_key
    )


# One policy object: a compound `key_fn + TASK_SOURCE` would still cache on the source alone
# when the key function declines (returns None), so TASK_SOURCE is folded into the key instead.
STAGE_CACHE = CacheKeyFnPolicy(cache_key_fn=stage_cache_key)
