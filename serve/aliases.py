"""A/B aliases: one public model name spread over weighted adapters.

    # aliases.yaml
    support-bot: {support-v1: 0.5, support-v2: 0.5}

A request for `support-bot` is served by one target. With a `user`, the choice is a hash of (user, alias), so
the same user always lands on the same target while the weights stay the same; without one it is random.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from loraplex.errors import LoraplexError
from loraplex.registry import NAME_PATTERN


@dataclass(frozen=True)
class Alias:
    name: str
    targets: tuple[tuple[str, float], ...]  # (model name, weight), sorted by name so the hash buckets are stable

    def pick(self, user: str | None, rng: random.Random | None = None) -> str:
        total = sum(weight for _, weight in self.targets)
        if user:
            digest = hashlib.sha256(f"{self.name}\0{user}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64 * total
        else:
            point = (rng or random).random() * total
        for name, weight in self.targets:
            if point < weight:
                return name
            point -= weight
        return self.targets[-1][0]

    def weights(self) -> dict[str, float]:
        return dict(self.targets)


def parse_aliases(data, source: str = "aliases") -> dict[str, Alias]:
    """Check an aliases mapping; raise once listing every problem."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LoraplexError(f"{source}: must be a mapping of alias -> {{model: weight}}",
                            hint="write e.g.  support-bot: {support-v1: 0.5, support-v2: 0.5}")
    problems, aliases = [], {}
    for alias, targets in data.items():
        if not isinstance(alias, str) or not NAME_PATTERN.match(alias):
            problems.append(f"alias {alias!r}: use 1-64 letters, digits, '.', '_' or '-'")
            continue
        if not isinstance(targets, dict) or not targets:
            problems.append(f"alias {alias!r}: needs a non-empty mapping of model -> weight")
            continue
        bad = [f"{t!r}: {w!r}" for t, w in targets.items()
               if not isinstance(t, str) or isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0]
        if bad:
            problems.append(f"alias {alias!r}: weights must be positive numbers ({', '.join(bad)})")
            continue
        aliases[alias] = Alias(alias, tuple(sorted((t, float(w)) for t, w in targets.items())))
    if problems:
        raise LoraplexError(f"{source}: " + "; ".join(problems))
    return aliases


def load_aliases(path: Path | None) -> dict[str, Alias]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LoraplexError(f"cannot read aliases file {path}: {e}") from None
    return parse_aliases(data, str(path))
