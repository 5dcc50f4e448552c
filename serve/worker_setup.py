"""What loraplex changes in vLLM's worker process, where adapters are loaded and the LoRA kernels run.

The server names `WorkerSetup` as vLLM's worker extension class (ParallelConfig.worker_extension_cls); vLLM imports
this module in each worker before it loads the model and captures CUDA graphs, and the import installs what the
server asked for in $LORAPLEX_WORKER_SETUP (comma-separated; serve/engine.py sets it in the engine's environment):

    compact-grid        vLLM's LoRA kernels launched over the compact grid (serve/lora_grid.py)
    pin-in-background   adapters enter vLLM's CPU cache unpinned and are pinned afterwards (serve/pinned_memory.py)

Unset, as when the GPU benchmarks hand vLLM's own server this class, it installs the compact grid alone. A worker
extension is vLLM's way to run code in its workers without a plugin entry point, which would apply to every vLLM
server on the machine.
"""

from __future__ import annotations

import logging
import os

SETUP_VAR = "LORAPLEX_WORKER_SETUP"
WHEN_UNSET = ("compact-grid",)

# a child of vLLM's logger: in vLLM's worker process only vLLM has configured logging
log = logging.getLogger("vllm.loraplex")


def _compact_grid() -> str:
    try:
        from loraplex.serve.lora_grid import install
    except ImportError as e:  # no Triton (some CPU installs): nothing of it would run here anyway
        return f"compact grid not importable ({e}); vLLM's grid"
    return install()


def _pin_in_background() -> str:
    from loraplex.serve.pinned_memory import install_background_pinning

    return install_background_pinning()


INSTALLERS = {"compact-grid": ("LoRA kernels", _compact_grid),
              "pin-in-background": ("adapter pinning", _pin_in_background)}


def wanted(value: str | None) -> list[str]:
    """The setup parts named in $LORAPLEX_WORKER_SETUP's value (None: unset)."""
    if value is None:
        return list(WHEN_UNSET)
    return [part.strip() for part in value.split(",") if part.strip()]


def install(parts: list[str]) -> None:
    for part in parts:
        if part not in INSTALLERS:
            log.warning("%s names %r, which loraplex does not know (known: %s); ignored", SETUP_VAR, part,
                        ", ".join(INSTALLERS))
            continue
        what, installer = INSTALLERS[part]
        log.info("%s: %s", what, installer())


install(wanted(os.environ.get(SETUP_VAR)))


class WorkerSetup:
    """Adds nothing to vLLM's worker; see the module docstring."""
