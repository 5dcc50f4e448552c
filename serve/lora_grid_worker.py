"""The compact LoRA grid (serve/lora_grid.py) in vLLM's worker process, where the LoRA kernels run, the one-lookup
adapter check (serve/adapter_lookup_worker.py, imported below) and, where LORAPLEX_LORA_METADATA_ON_HOST=1, the
kernels' metadata built on the host (serve/lora_metadata.py).

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


def _install_metadata() -> str:
    from loraplex.serve.lora_metadata import install

    return install()


# a child of vLLM's logger: in vLLM's worker process only vLLM has configured logging
logging.getLogger("vllm.loraplex").info("LoRA kernels: %s", _install())
logging.getLogger("vllm.loraplex").info("LoRA kernel metadata: %s", _install_metadata())


class CompactLoRAGrid:
    """Adds nothing to vLLM's worker; see the module docstring."""
