"""Which accelerate plugin (FSDP or DeepSpeed) an ``accelerate launch`` asked for.

On GPUs accelerate builds the plugin and reports it in ``distributed_type``. On CPUs it falls back
to plain multi-CPU and ignores the ``ACCELERATE_USE_*`` variables the launcher set, so the plugin
is built here from the same variables: the CPU tests then read a config as a GPU run does.
"""

from __future__ import annotations

import os
from typing import Any

from accelerate import Accelerator, DistributedType

_KINDS = {  # kind: (distributed type, launcher variable, state attribute, plugin class)
    "fsdp": (DistributedType.FSDP, "ACCELERATE_USE_FSDP", "fsdp_plugin",
             "FullyShardedDataParallelPlugin"),
    "deepspeed": (DistributedType.DEEPSPEED, "ACCELERATE_USE_DEEPSPEED", "deepspeed_plugin",
                  "DeepSpeedPlugin"),
}


def launch_plugin(accelerator: Accelerator, kind: str) -> Any | None:
    """accelerate's plugin for ``kind`` ("fsdp" or "deepspeed") if this launch uses it, else None."""
    distributed_type, variable, attribute, plugin_class = _KINDS[kind]
    if accelerator.distributed_type == distributed_type:
        return getattr(accelerator.state, attribute)
    if os.environ.get(variable, "false").lower() != "true":
        return None
    import accelerate.utils

    return getattr(accelerate.utils, plugin_class)()  # reads the launcher's variables
