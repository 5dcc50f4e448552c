"""The adapter manager: which adapters the server can serve right now, under which vLLM LoRA id.

Adapters come from the registry directory (found on a request for an unknown name and by a periodic scan) or
from POST /v1/adapters. Each *version* of an adapter (its directory and files as `stat` sees them) gets a new
LoRA int id: vLLM caches adapters by id, so a replaced adapter under an old id could serve stale weights. A
version is loaded into the engine (`add_lora`) before any request uses it, so a broken adapter fails alone
instead of inside a running batch (on vLLM's CPU backend a LoRA that fails to load inside `generate` kills the
engine). A replaced or unloaded version leaves the engine once its running requests finish.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.errors import LoraplexError
from loraplex.registry import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    NAME_PATTERN,
    AdapterError,
    AdapterInfo,
    escape_problem,
    read_adapter,
)
from loraplex.serve.errors import APIError, model_not_found

log = logging.getLogger("loraplex.serve")

# vLLM's allowed max_lora_rank values (vllm.config.lora.MaxLoRARanks), used when vLLM is not importable.
DEFAULT_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------- engine sizing

def supported_lora_ranks() -> tuple[int, ...]:
    try:
        from vllm.config.lora import MaxLoRARanks

        ranks = tuple(sorted(typing.get_args(MaxLoRARanks)))
        return ranks or DEFAULT_LORA_RANKS
    except ImportError:
        return DEFAULT_LORA_RANKS


def round_up_rank(rank: int, ranks: tuple[int, ...] = DEFAULT_LORA_RANKS) -> int:
    """The smallest rank vLLM accepts as max_lora_rank that is >= rank."""
    for allowed in sorted(ranks):
        if allowed >= rank:
            return allowed
    raise LoraplexError(f"LoRA rank {rank} is above {max(ranks)}, the highest rank vLLM serves",
                        hint="retrain the adapter with a lower rank")


@dataclass(frozen=True)
class LoraSizing:
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int


CPU_MOST_LORAS = 16  # the default slot count's ceiling on CPU, and its floor on a GPU
GPU_MOST_LORAS = 256  # the most slots measured on a GPU (BENCHMARKS.md, tenth and eleventh sessions)
GPU_SLOT_SHARE = 0.2  # of one GPU's memory that default slots may take (256 slots of an 8B's rank-16 adapters: 15%)


@dataclass(frozen=True)
class SlotRoom:
    """What bounds the default slot count on a GPU: its memory, and one slot's LoRA weights per unit of rank (vLLM
    gives every slot A and B matrices at max_lora_rank for every linear layer, whatever the adapters target)."""
    gpu_bytes: int
    slot_bytes_per_rank: int

    def most_loras(self, rank: int) -> int:
        fit = int(self.gpu_bytes * GPU_SLOT_SHARE) // max(self.slot_bytes_per_rank * rank, 1)
        return max(CPU_MOST_LORAS, min(GPU_MOST_LORAS, fit))


def dtype_bytes(dtype: str) -> int:
    """Bytes of one element of the model's dtype, which vLLM casts adapters to ("auto": bf16 or fp16)."""
    return 4 if dtype in ("float32", "float") else 2


def lora_linear_shapes(base_modules: dict[str, tuple[int, int] | None]) -> list[tuple[int, int]]:
    """(out, in) features of every linear layer of the base model that vLLM gives LoRA weights (embeddings and
    the LM head only when an adapter targets them, which the registry refuses)."""
    from loraplex.registry import UNSERVABLE_TARGETS

    return [shape for module, shape in base_modules.items()
            if shape is not None and module.rpartition(".")[2] not in UNSERVABLE_TARGETS]


def slot_bytes_per_rank(base_modules: dict[str, tuple[int, int] | None], element_bytes: int) -> int:
    """One LoRA slot's bytes per unit of rank: A (rank x in) and B (out x rank) for every LoRA layer."""
    return element_bytes * sum(out_features + in_features
                               for out_features, in_features in lora_linear_shapes(base_modules))


def size_loras(ranks: list[int], *, max_loras: int | None = None, max_cpu_loras: int | None = None,
               max_lora_rank: int | None = None, supported: tuple[int, ...] = DEFAULT_LORA_RANKS,
               slot_room: SlotRoom | None = None) -> LoraSizing:
    """Engine LoRA settings from the registry's adapters, unless given.

    vLLM's default of one adapter per batch makes mixed traffic run one adapter at a time; here every adapter
    in the registry gets a batch slot: at least 4, at most 16 on CPU (slot_room None), on a GPU (slot_room) at
    most 256 and what fits in a fifth of its memory, though never fewer than 16. On an H200 one slot for each of
    256 adapters ran 256-adapter traffic at 0.71-0.79 of the base model's tokens/s, against 0.26-0.48 over 16
    slots, with 32 adapters as fast as over 16 slots (BENCHMARKS.md, eleventh session). Host memory keeps every
    adapter plus room (up to 16) for hot-loaded ones and replaced versions still finishing their requests."""
    rank = round_up_rank(max_lora_rank or max([16, *ranks]), supported)
    most = slot_room.most_loras(rank) if slot_room else CPU_MOST_LORAS
    loras = max_loras or min(max(len(ranks), 4), most)
    cpu_loras = max_cpu_loras or max(len(ranks), loras) + min(loras, CPU_MOST_LORAS)
    return LoraSizing(max_loras=loras, max_cpu_loras=max(cpu_loras, loras), max_lora_rank=rank)


# ---------------------------------------------------------------- compatibility with the base model

def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}


def base_module_shapes(model_path: Path) -> dict[str, tuple[int, int] | None]:
    """Module path -> (out_features, in_features) of each linear weight in the base checkpoint (None when the
    weight is not a plain 2-D matrix, e.g. quantised), read from safetensors headers only."""
    modules: dict[str, tuple[int, int] | None] = {}
    for file in sorted(Path(model_path).glob("*.safetensors")):
        for key, shape in safetensors_shapes(file).items():
            module, _, leaf = key.rpartition(".")
            if leaf == "weight":
                modules[module] = (shape[0], shape[1]) if len(shape) == 2 else None
            elif module not in modules:
                modules[module] = None
    return modules


def compatibility_problems(adapter_dir: Path, base_modules: dict[str, tuple[int, int] | None]) -> list[str]:
    """Why the adapter's weights do not fit the base model: target modules it lacks, or other shapes."""
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file() or not base_modules:
        return []  # .bin adapters and bases without safetensors are left to vLLM's own loading checks
    try:
        shapes = safetensors_shapes(weights)
    except Exception as e:  # safetensors raises its own error types for damaged files
        return [f"{ADAPTER_WEIGHTS} is unreadable ({e})"]
    missing, mismatched = [], []
    for key, shape in shapes.items():
        if ".lora_A" not in key and ".lora_B" not in key:
            continue
        module_path = key.removeprefix(_PEFT_PREFIX).split(".lora_")[0]
        module = _find_module(module_path, base_modules)
        if module is None:
            missing.append(module_path)
            continue
        base_shape = base_modules[module]
        if base_shape is None or len(shape) != 2:
            continue
        out_features, in_features = base_shape
        if ".lora_A" in key and shape[1] != in_features or ".lora_B" in key and shape[0] != out_features:
            mismatched.append(f"{module_path} {key.split('.lora_')[1].split('.')[0]} {shape} vs base "
                              f"{out_features}x{in_features}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} target module(s) do not exist in the base model (e.g. {missing[0]}): "
                        "trained on another base model")
    if mismatched:
        problems.append(f"{len(mismatched)} weight shape(s) do not match the base model (e.g. {mismatched[0]}): "
                        "trained on another base model")
    return problems


def _find_module(module_path: str, base_modules: dict) -> str | None:
    if module_path in base_modules:
        return module_path
    # Checkpoints of wrapped models prefix module paths differently (e.g. "language_model.").
    for module in base_modules:
        if module.endswith("." + module_path) or module_path.endswith("." + module):
            return module
    return None


# ---------------------------------------------------------------- versions

def version_key(path: Path) -> tuple:
    """What identifies one version of an adapter directory: a publish renames a new directory in (new inode),
    an in-place edit changes a file's mtime or size."""
    parts: list = []
    for p in (path, path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS, path / "adapter_model.bin"):
        try:
            st = os.stat(p)
            parts.append((st.st_ino, st.st_mtime_ns, st.st_size if p != path else 0))
        except OSError:
            parts.append(None)
    return tuple(parts)


@dataclass(eq=False)
class AdapterVersion:
    name: str
    path: Path
    key: tuple
    lora_id: int
    info: AdapterInfo
    active: int = 0  # requests running on this version
    retired: bool = False  # replaced or unloaded: leaves the engine when active reaches 0

    def lora_request(self):
        from vllm.lora.request import LoRARequest

        # The name must be unique per version too: vLLM compares LoRARequests by name.
        return LoRARequest(lora_name=f"{self.name}.v{self.lora_id}", lora_int_id=self.lora_id,
                           lora_path=str(self.path))


class EngineLoras(typing.Protocol):
    async def add_lora(self, lora_request) -> bool: ...
    async def remove_lora(self, lora_id: int) -> bool: ...


@dataclass
class AdapterManager:
    adapters_dir: Path
    engine: EngineLoras
    base_modules: dict[str, tuple[int, int] | None]
    max_lora_rank: int
    reserved_names: set[str] = field(default_factory=set)  # the base model's and the aliases' names
    allowed_roots: list[Path] = field(default_factory=list)

    def __post_init__(self):
        self.adapters_dir = Path(self.adapters_dir)
        self.current: dict[str, AdapterVersion] = {}
        self.unavailable: dict[str, tuple[tuple, str]] = {}  # name -> (version key, reason)
        self.registered: dict[str, Path] = {}  # added by POST /v1/adapters
        self.hidden: dict[str, tuple] = {}  # registry adapters unloaded by DELETE, until a new version appears
        self._ids = itertools.count(1)
        self._locks: dict[str, asyncio.Lock] = {}
        self._pending_removals: set[asyncio.Task] = set()

    # ---- lookups

    def source_path(self, name: str) -> Path | None:
        if name in self.registered:
            return self.registered[name]
        path = self.adapters_dir / name
        return path if NAME_PATTERN.match(name) and path.is_dir() else None

    async def resolve(self, name: str) -> AdapterVersion:
        """The version to serve `name` with now, loading a new or replaced one first. Raises APIError."""
        path = self.source_path(name)
        if path is None:
            if name in self.current:
                self._retire(self.current.pop(name))
            raise model_not_found(name)
        key = version_key(path)
        current = self.current.get(name)
        if current is not None and current.key == key and current.path == path:
            return current
        if name in self.hidden:
            if self.hidden[name] == key:
                raise model_not_found(name, "it was unloaded with DELETE /v1/adapters")
            del self.hidden[name]
        async with self._lock(name):
            current = self.current.get(name)
            if current is not None and current.key == key and current.path == path:
                return current
            return await self._load(name, path, key)

    async def _load(self, name: str, path: Path, key: tuple) -> AdapterVersion:
        known = self.unavailable.get(name)
        if known is not None and known[0] == key:
            raise model_not_found(name, known[1])
        try:
            info, check_ms = self._timed_check(path, name)
        except AdapterError as e:
            self._mark_unavailable(name, key, str(e))
            raise model_not_found(name, str(e)) from None
        try:
            version = await self._add_to_engine(name, path, key, info, check_ms)
        except RuntimeError as e:
            self._mark_unavailable(name, key, str(e))
            raise APIError(500, str(e), param="model", code="adapter_load_failed") from None
        self._install(version)
        return version

    def _roots(self) -> list[Path]:
        return [self.adapters_dir, *self.allowed_roots]

    def _inside_roots(self, path: Path) -> bool:
        return any(path.is_relative_to(root.resolve()) for root in self._roots())

    def check(self, path: Path, name: str) -> AdapterInfo:
        """The symlink escape check, read_adapter's checks, then the server's rank limit and the fit to the
        base model."""
        try:
            escape = escape_problem(path, self._roots()) if path.is_dir() else None  # read_adapter says what else is wrong
        except OSError as e:
            raise AdapterError(f"adapter {name!r}: cannot read {path}: {e}") from None
        if escape is not None:
            raise AdapterError(f"adapter {name!r} refused: {escape}")
        info = read_adapter(path, name)
        if info.rank > self.max_lora_rank:
            raise AdapterError(f"adapter {name!r} has rank {info.rank}, above this server's maximum LoRA rank "
                               f"{self.max_lora_rank}",
                               hint=f"restart the server with --max-lora-rank {info.rank}")
        problems = compatibility_problems(path, self.base_modules)
        if problems:
            raise AdapterError(f"adapter {name!r} does not fit the base model: " + "; ".join(problems))
        return info

    def _timed_check(self, path: Path, name: str) -> tuple[AdapterInfo, float]:
        """`check`, and how long it took in ms (the load's log line splits loraplex's part from vLLM's)."""
        started = time.perf_counter()
        info = self.check(path, name)
        return info, (time.perf_counter() - started) * 1000

    async def _add_to_engine(self, name: str, path: Path, key: tuple, info: AdapterInfo,
                             check_ms: float) -> AdapterVersion:
        version = AdapterVersion(name=name, path=path, key=key, lora_id=next(self._ids), info=info)
        started = time.perf_counter()
        try:
            await self.engine.add_lora(version.lora_request())
        except Exception as e:  # vLLM reports load failures from its workers as plain Exceptions
            from loraplex.serve.engine import is_engine_dead

            if is_engine_dead(e):
                raise
            raise RuntimeError(f"vLLM could not load adapter {name!r} from {path}: {e}") from None
        # the split says where a first request's wait goes: loraplex's checks, or vLLM's load into its CPU cache
        # and a GPU slot (reading, pinning, copying)
        engine_ms = (time.perf_counter() - started) * 1000
        log.info("adapter %s loaded from %s as LoRA id %d (rank %d) in %.0f ms (checks %.0f ms, engine %.0f ms)",
                 name, path, version.lora_id, info.rank, check_ms + engine_ms, check_ms, engine_ms)
        return version

    def _install(self, version: AdapterVersion) -> None:
        old = self.current.get(version.name)
        self.current[version.name] = version
        self.unavailable.pop(version.name, None)
        if old is not None:
            self._retire(old)

    def _mark_unavailable(self, name: str, key: tuple, reason: str) -> None:
        if self.unavailable.get(name, (None,))[0] != key:
            log.warning("adapter %s skipped: %s", name, reason)
        self.unavailable[name] = (key, reason)
        old = self.current.pop(name, None)
        if old is not None:
            self._retire(old)

    # ---- request leases

    def acquire(self, version: AdapterVersion) -> None:
        version.active += 1

    def release(self, version: AdapterVersion) -> None:
        version.active -= 1
        if version.retired and version.active == 0:
            self._schedule_removal(version)

    def _retire(self, version: AdapterVersion) -> None:
        version.retired = True
        if version.active == 0:
            self._schedule_removal(version)

    def _schedule_removal(self, version: AdapterVersion) -> None:
        task = asyncio.get_running_loop().create_task(self._remove(version))
        self._pending_removals.add(task)
        task.add_done_callback(self._pending_removals.discard)

    async def _remove(self, version: AdapterVersion) -> None:
        try:
            await self.engine.remove_lora(version.lora_id)
            log.info("adapter %s: LoRA id %d removed from the engine", version.name, version.lora_id)
        except Exception as e:
            log.warning("adapter %s: removing LoRA id %d failed: %s", version.name, version.lora_id, e)

    # ---- admin

    async def register(self, name: str, path_text: str) -> AdapterVersion:
        """POST /v1/adapters: serve the adapter at `path_text` as `name`, replacing any adapter of that name."""
        if not NAME_PATTERN.match(name) or name in (".", ".."):
            raise APIError(400, f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                                "starting with a letter or digit", param="name", code="invalid_value")
        if name in self.reserved_names:
            raise APIError(409, f"{name!r} is already the base model's or an alias's name", param="name",
                           code="name_taken")
        try:
            path = Path(path_text).expanduser().resolve()
        except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, an unknown ~user, a symlink loop
            raise APIError(400, f"path {path_text!r} is not a usable path: {e}", param="path",
                           code="invalid_value") from None
        if not self._inside_roots(path):
            raise APIError(400, f"path {path_text!r} is outside the adapter registry and the allowed roots; "
                                "start the server with --allowed-adapter-root to allow it",
                           param="path", code="path_not_allowed")
        async with self._lock(name):
            key = version_key(path)
            try:
                version = await self._add_to_engine(name, path, key, *self._timed_check(path, name))
            except (AdapterError, RuntimeError) as e:
                raise APIError(400, str(e), param="path", code="invalid_adapter") from None
            self.registered[name] = path
            self.hidden.pop(name, None)
            self._install(version)
            return version

    async def unregister(self, name: str) -> None:
        """DELETE /v1/adapters/NAME: stop serving it and free its engine slot (files are left as they are)."""
        if name not in self.current and self.source_path(name) is None:
            raise model_not_found(name)
        async with self._lock(name):
            self.registered.pop(name, None)
            registry_path = self.adapters_dir / name
            if NAME_PATTERN.match(name) and registry_path.is_dir():
                self.hidden[name] = version_key(registry_path)
            version = self.current.pop(name, None)
            self.unavailable.pop(name, None)
            if version is not None:
                self._retire(version)
            log.info("adapter %s unloaded", name)

    async def scan(self) -> None:
        """Load new and replaced adapters of the registry; drop the ones whose directory is gone."""
        names = set(self.registered)
        if self.adapters_dir.is_dir():
            names |= {e.name for e in self.adapters_dir.iterdir() if not e.name.startswith(".") and e.is_dir()}
        for name in sorted(names):
            if not NAME_PATTERN.match(name):
                self._mark_unavailable(name, (), f"invalid adapter directory name {name!r}")
                continue
            if name in self.reserved_names:
                self._mark_unavailable(name, (), f"{name!r} is the base model's or an alias's name")
                continue
            if name in self.hidden and self.hidden[name] == version_key(self.adapters_dir / name):
                continue
            try:
                await self.resolve(name)
            except APIError:
                pass  # recorded as unavailable and logged once per version
        for name in [n for n in self.current if self.source_path(n) is None]:
            self._retire(self.current.pop(name))
        for name in [n for n in self.unavailable if n not in names]:
            del self.unavailable[name]

    def describe(self) -> list[dict]:
        rows = [{"name": v.name, "status": "loaded", "path": str(v.path), "rank": v.info.rank,
                 "lora_id": v.lora_id, "source": "api" if v.name in self.registered else "registry"}
                for v in self.current.values()]
        rows += [{"name": name, "status": "unavailable", "reason": reason}
                 for name, (_, reason) in self.unavailable.items()]
        return sorted(rows, key=lambda r: r["name"])

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())
