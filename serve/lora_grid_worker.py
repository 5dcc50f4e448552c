"""The compact LoRA grid (serve/lora_grid.py) in vLLM's worker process, where the LoRA kernels run, and the one-lookup
adapter check (serve/adapter_lookup_worker.py, imported below).

`loraplex serve --compact-lora-grid` names `CompactLoRAGrid` as vLLM's worker extension class
(ParallelConfig.worker_extension_cls); vLLM imports this module in each worker before it loads the model and captures
CUDA graphs, and the import installs the grid. vLLM's way to run code in its workers without a plugin entry point,
which would apply to every vLLM server on the machine.
"""

import logging

import loraplex.serve.adapter_lookup_worker  # noqa: F401  (its import installs the adapter check)


def _install() -> str:
    try:
        from loraplex.serve.lora_grid import install
    except ImportError as e:  # no Triton (some CPU installs): nothing of it would run here anyway
        return f"compact grid not importable ({e}); vLLM's grid"
    return install()


# a child of vLLM's logger: in vLLM's worker process only vLLM has configured logging
logging.getLogger("vllm.loraplex").info("LoRA kernels: %s", _install())


class CompactLoRAGrid:
    """Adds nothing to vLLM's worker; see the module docstring."""
