"""The one-lookup adapter check (serve/adapter_lookup.py) in vLLM's worker process, where the engine's steps run.

`loraplex serve` names `OneAdapterLookup` as vLLM's worker extension class (ParallelConfig.worker_extension_cls)
where the compact LoRA grid is off (CPU; serve/lora_grid_worker.py installs both); vLLM imports this module in each
worker, and the import installs the check.
"""

import logging


def _install() -> str:
    from loraplex.serve.adapter_lookup import install

    return install()


# a child of vLLM's logger: in vLLM's worker process only vLLM has configured logging
logging.getLogger("vllm.loraplex").info("LoRA adapters: %s", _install())


class OneAdapterLookup:
    """Adds nothing to vLLM's worker; see the module docstring."""
