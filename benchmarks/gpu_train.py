"""QLoRA training speed and peak GPU memory: the standard TRL recipe against loraplex's trainer settings.

Each recipe runs in its own process (`run`), so that peak memory is its own; `merge` gathers the per-recipe
files into one result. Every recipe trains the same rows (random words, 40-700 per row, as conversational
prompt-completion pairs) on the same random-weight Llama-3-8B-shaped model in 4-bit NF4, LoRA r=64 on every
linear layer, sequences up to 2048 tokens. Tokens/s counts real (non-padding) tokens, from the end of the
second optimizer step to the end of the last, as TRL reports them (`num_tokens`).

    python benchmarks/gpu_train.py data --tokenizer /tmp/site/tok --out /tmp/train.jsonl
    python benchmarks/gpu_train.py run --recipe standard --model-dir /tmp/model-8b --data /tmp/train.jsonl \\
        --out /tmp/train-standard.json
    python benchmarks/gpu_train.py merge --out benchmarks/results/gpu-train.json /tmp/train-*.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import log, result_document, write_result  # noqa: E402
from trl_baseline import train_with_trl_directly  # noqa: E402

MAX_LENGTH = 2048
# name -> (what runs it, TrainConfig fields over loraplex's defaults, optimizer steps). Packed steps hold about
# 4x the tokens, so fewer of them take about as long. Length grouping sorts mega-batches of 46 x 8 rows longest
# first, so 27 steps of a length-grouped recipe see longer rows than the random batches of "standard"; the
# tokens/s of the loraplex recipes compare among themselves on identical rows.
UNPACKED = {"packing": False, "batch_size": 4}  # the recipes measured before packing became the GPU default
RECIPES = {
    "standard": ("trl", {}, 27),
    "loraplex": ("loraplex", {"use_liger_kernel": False, **UNPACKED}, 27),
    "loraplex-liger": ("loraplex", {"use_liger_kernel": True, **UNPACKED}, 27),
    "loraplex-bs2x4": ("loraplex", {"batch_size": 2, "gradient_accumulation_steps": 4, "use_liger_kernel": False,
                                    "packing": False}, 27),
    "loraplex-packing": ("loraplex", {"packing": True, "batch_size": 4, "use_liger_kernel": False}, 10),
    # 2 packed rows of up to 2,048 tokens x 2 micro-batches: about the 8 rows' tokens of batch 4 x 2 unpacked.
    # What loraplex's GPU defaults (packing, batch_size and use_liger_kernel 'auto') resolve to.
    "loraplex-liger-packing-2x2": ("loraplex", {"packing": True, "batch_size": 2, "gradient_accumulation_steps": 2,
                                                "use_liger_kernel": True}, 27),
    "loraplex-liger-bs2x4": ("loraplex", {"batch_size": 2, "gradient_accumulation_steps": 4, "use_liger_kernel": True,
                                          "packing": False}, 27),
}
DESCRIPTIONS = {
    "standard": "TRL SFTTrainer defaults (no packing, random batches), batch 4 x grad accumulation 2",
    "loraplex": "loraplex's trainer without Liger: length-grouped batches, batch 4 x grad accumulation 2",
    "loraplex-liger": "loraplex + Liger RMSNorm/SwiGLU/RoPE kernels, batch 4 x grad accumulation 2 unpacked",
    "loraplex-bs2x4": "loraplex without Liger, batch 2 x grad accumulation 4 (same rows per step)",
    "loraplex-packing": "loraplex without Liger + TRL best-fit packing (padding-free), batch 4 x grad accumulation 2",
    "loraplex-liger-packing-2x2": "loraplex + Liger + TRL best-fit packing (padding-free, sdpa with a per-row "
                                  "block mask), 2 packed rows x grad accumulation 2 (the GPU default since)",
    "loraplex-liger-bs2x4": "loraplex + Liger, batch 2 x grad accumulation 4 (same rows per step)",
}


def make_data(tokenizer_dir: Path, out: Path, rows: int = 1500, seed: int = 0) -> Path:
    """Rows of 40-700 random vocabulary words: a short user prompt, the rest the completion."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(tokenizer_dir)).get_vocab()
    words = sorted(w for w in vocab if w.isalpha() and len(w) > 3)[:20000]
    rng = random.Random(seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for _ in range(rows):
            text = [rng.choice(words) for _ in range(rng.randint(40, 700))]
            split = rng.randint(5, 20)
            f.write(json.dumps({"prompt": " ".join(text[:split]), "completion": " ".join(text[split:])}) + "\n")
    return out


def make_clock():
    """A transformers TrainerCallback that records (time, tokens so far) at every log and the peak GPU memory
    of the training loop (defined here: transformers is imported inside functions only)."""
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, float]] = []
            self.peak_gib = self.reserved_gib = None

        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                self.marks.append((time.time(), float(logs["num_tokens"])))

        def on_train_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                self.peak_gib = torch.cuda.max_memory_allocated() / 2**30
                self.reserved_gib = torch.cuda.max_memory_reserved() / 2**30

    return Clock()


def measured(clock, skip: int = 2) -> dict:
    """Tokens/s between the end of step `skip` and the last step (the first steps pay for warm-up)."""
    if len(clock.marks) < skip + 2:
        raise RuntimeError(f"only {len(clock.marks)} steps logged; need at least {skip + 2}")
    (t0, n0), (t1, n1) = clock.marks[skip - 1], clock.marks[-1]
    out = {"tokens_per_s": round((n1 - n0) / (t1 - t0), 1), "tokens_measured": int(n1 - n0),
           "seconds_measured": round(t1 - t0, 2), "steps": len(clock.marks)}
    if clock.peak_gib is not None:
        out.update(peak_mem_gib=round(clock.peak_gib, 2), peak_reserved_gib=round(clock.reserved_gib, 2))
    return out


def loraplex_config(model_dir: Path, data: Path, workdir: Path, recipe: str, steps: int, fields: dict):
    from loraplex.train.config import load_config

    return load_config(None, name=f"bench-{recipe}", data=str(data), base_model=str(model_dir),
                       adapters_dir=str(workdir / "adapters"), runs_dir=str(workdir / "runs" / recipe),
                       max_steps=steps, max_seq_length=MAX_LENGTH, logging_steps=1, save_steps=10**6, **fields)


def run_standard(model_dir: Path, data: Path, workdir: Path, steps: int, clock) -> None:
    """TRL's SFTTrainer as its documentation sets up QLoRA, with the recipe's hyperparameters (loraplex's
    defaults) and nothing else: no length grouping, no packing."""
    config = loraplex_config(model_dir, data, workdir, "standard", steps, UNPACKED)
    train_with_trl_directly(config, model_dir, "bf16", [clock], workdir / "runs" / "standard")


def run_recipe(recipe: str, model_dir: Path, data: Path, workdir: Path, steps: int | None = None) -> dict:
    runner, fields, default_steps = RECIPES[recipe]
    steps = steps or default_steps
    clock = make_clock()
    started = time.time()
    if runner == "trl":
        run_standard(model_dir, data, workdir, steps, clock)
    else:
        from loraplex.train.trainer import run_training

        run_training(loraplex_config(model_dir, data, workdir, recipe, steps, fields), callbacks=[clock])
    case = {"name": recipe, "recipe": DESCRIPTIONS[recipe], **measured(clock),
            "process_s": round(time.time() - started, 1)}
    log(json.dumps(case))
    return case


def merge(parts: list[Path]) -> dict:
    """One train result from per-recipe files; speedups relative to the standard recipe."""
    cases, versions = [], {}
    for part in parts:
        document = json.loads(Path(part).read_text())
        versions = versions or document.get("versions", {})
        cases += document["cases"]
    standard = next((c for c in cases if c["name"] == "standard" and "tokens_per_s" in c), None)
    for case in cases:
        if standard and "tokens_per_s" in case:
            case["speedup"] = round(case["tokens_per_s"] / standard["tokens_per_s"], 3)
    document = result_document("train", cases, seq_len=MAX_LENGTH, lora_rank=64, quantization="bitsandbytes NF4")
    document["versions"] = versions or document["versions"]
    return document


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data")
    d.add_argument("--tokenizer", type=Path, required=True)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--rows", type=int, default=1500)
    r = sub.add_parser("run")
    r.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    r.add_argument("--model-dir", type=Path, required=True)
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--workdir", type=Path, default=Path("/tmp/loraplex-train-bench"))
    r.add_argument("--steps", type=int, help="Optimizer steps (default: the recipe's).")
    r.add_argument("--out", type=Path, required=True, help="This recipe's result file.")
    m = sub.add_parser("merge")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("parts", type=Path, nargs="+")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "data":
        log(f"wrote {make_data(args.tokenizer, args.out, args.rows)}")
    elif args.command == "run":
        try:
            case = run_recipe(args.recipe, args.model_dir, args.data, args.workdir, args.steps)
        except Exception as e:  # a recipe that fails is a result too; the other recipes still run
            case = {"name": args.recipe, "recipe": DESCRIPTIONS[args.recipe], "error": f"{type(e).__name__}: {e}"[:500]}
            log(json.dumps(case))
            write_result(args.out, result_document("train", [case]))
            raise
        write_result(args.out, result_document("train", [case]))
    else:
        document = merge(args.parts)
        write_result(args.out, document)
        for case in document["cases"]:
            log(f"{case['name']:18s} {case.get('tokens_per_s', '-'):>9} tokens/s  x{case.get('speedup', '-')}  "
                f"peak {case.get('peak_mem_gib', '-')} GiB  {case.get('error', '')}")


if __name__ == "__main__":
    main()
