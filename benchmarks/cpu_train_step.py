"""QLoRA training speed on CPU for the demo recipe, against the reference run.

    .venv/bin/python benchmarks/cpu_train_step.py [--steps 20] [--precision auto|bf16|fp32] [--trainer loraplex|trl]

Trains the demo config (SmolLM2-135M-Instruct, 4-bit NF4 base, r=16, batch 8 x 256 tokens) on the prepared
docstring set for a few steps and reports seconds per optimizer step, excluding the first (warm-up) step.
Batches are drawn at random as in the reference (TRL's default), not grouped by length as the demo does: grouping
puts the longest rows first, so the first steps of a grouped run are its slowest and say little about the mean.
Reference: TRL + bitsandbytes NF4 directly on the same machine kind, 7.6 s per step at the same shape.
`--trainer trl` runs the same recipe through TRL's SFTTrainer directly (benchmarks/trl_baseline.py, the GPU
benchmark's baseline too), on the same rows: the like-for-like baseline, since the reference's own script and rows
are not in this repository.
Writes benchmarks/results/cpu-train-<date>-<trainer>-<precision>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path

REFERENCE_S_PER_STEP = 7.6
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--data", default=str(ROOT / "runs" / "demo" / "prepared"))
    parser.add_argument("--trainer", default="loraplex", choices=["loraplex", "trl"])
    args = parser.parse_args()

    from transformers import TrainerCallback

    from trl_baseline import train_with_trl_directly  # this folder: the script's own directory is on sys.path

    from loraplex.models import resolve_base_model
    from loraplex.train.config import load_config
    from loraplex.train.trainer import detect_device, run_training

    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(ROOT / "train" / "configs" / "demo-docstrings.yaml", data=args.data,
                             adapters_dir=f"{tmp}/adapters", max_steps=args.steps)
        config = config.model_copy(update={"runs_dir": f"{tmp}/runs", "precision": args.precision,
                                           "eval_steps": 10**6, "save_steps": 10**6,
                                           "group_by_length": False})
        if args.trainer == "trl":
            precision = args.precision if args.precision != "auto" else ("bf16" if detect_device()[1] else "fp32")
            train_with_trl_directly(config, resolve_base_model(config.base_model), precision, [StepTimer()],
                                    Path(config.runs_dir))
        else:
            adapter = run_training(config, callbacks=[StepTimer()])
            precision = json.loads((adapter / "loraplex.json").read_text())["precision"]
    measured = step_times[1:]
    s_per_step = sum(measured) / len(measured)
    result = {
        "kind": "train", "device": f"cpu ({platform.processor() or platform.machine()})",
        "date": time.strftime("%Y-%m-%d"),
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "trl", "peft", "bitsandbytes")},
        "cases": [{"name": f"demo recipe, {args.trainer}, {precision}", "s_per_step": round(s_per_step, 2),
                   "tokens_per_s": None, "ratio_to_reference": round(REFERENCE_S_PER_STEP / s_per_step, 3),
                   "steps_timed": len(measured),
                   "s_per_step_min_max": [round(min(measured), 2), round(max(measured), 2)]}],
        "reference": {"s_per_step": REFERENCE_S_PER_STEP},
    }
    out = ROOT / "benchmarks" / "results" / f"cpu-train-{result['date']}-{args.trainer}-{precision}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
