"""One GPT-2 training step with and without ``multixent.transformers.apply``: peak memory above the model's, and time.

The model: a transformers GPT-2 config with 2 layers, width 256, vocabulary 50257 (tied embeddings),
float32, batch 8 x 512 tokens, ``labels=input_ids``; a step is forward, backward, ``AdamW.step()``.
The logits of the step are 4096 x 50257 float32 (785 MiB).

Method: the memory of each variant in a fresh subprocess (no allocator state shared). It builds the
model and the optimizer and runs one warm-up step (so the AdamW state and the gradients exist: the
*model's* memory is parameters, gradients and optimizer state); then it resets the kernel's peak
resident set size (``/proc/self/clear_refs`` with ``5``) and reads the resident set (``VmRSS``), runs
one step, and reads the peak (``VmHWM`` in ``/proc/self/status``). "Peak above the model" is that peak
minus that resident set: the step's transient memory (activations, logits, their gradients, the loss),
as the operating system sees it. (Python's tracemalloc does not see torch's allocations.) Linux only.
The time: both variants in one more process, one step of each in turn (a warm-up round, then ``--steps``
timed rounds, so that a change in the machine's load reaches both alike); the median step of each.

Run: ``python benchmarks/lm_step.py`` (about three minutes on two cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

VOCAB, WIDTH, LAYERS, BATCH, LENGTH = 50257, 256, 2, 8, 512
VARIANTS = ("unpatched", "patched")


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _trainer(variant: str) -> Callable[[], float]:
    """A model and its optimizer, ``patched`` or ``unpatched``; returns its training step."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=WIDTH,
        n_layer=LAYERS,
        n_head=4,
        n_positions=LENGTH,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    if variant == "patched":
        import multixent.transformers

        multixent.transformers.apply(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated, as the model's memory
        return float(loss.item())

    return step


def memory(variant: str) -> dict[str, float]:
    """One variant's memory (in this process, which must be fresh)."""
    step = _trainer(variant)
    step()  # warm-up: the optimizer state and the gradients now exist
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    model_bytes = _status("VmRSS")
    loss = step()
    return {"model_bytes": model_bytes, "above_model_bytes": _status("VmHWM") - model_bytes, "loss": loss}


def timing(steps: int) -> dict[str, float]:
    """Both variants' median step time, timed in one process in alternating rounds (after a warm-up
    step each), so that a change in the machine's load reaches both alike."""
    trainers = {variant: _trainer(variant) for variant in VARIANTS}
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for round_ in range(steps + 1):
        for variant, step in trainers.items():
            start = time.perf_counter()
            step()
            if round_:
                times[variant].append(time.perf_counter() - start)
    return {variant: statistics.median(t) for variant, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median)")
    parser.add_argument("--memory", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant's memory
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(memory(args.memory)))
        return
    import torch
    import transformers

    results = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--memory", variant]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    for variant, seconds in timing(args.steps).items():
        results[variant]["seconds"] = seconds
    mib = 2**20
    print(
        f"GPT-2 {LAYERS} layers, width {WIDTH}, vocabulary {VOCAB}, batch {BATCH} x {LENGTH}, float32, "
        f"forward + backward + AdamW; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print("| variant | loss | model (RSS) | peak above the model | step time |")
    print("|---|---|---|---|---|")
    for variant, r in results.items():
        print(
            f"| {variant} | {r['loss']:.4f} | {r['model_bytes'] / mib:.0f} MiB "
            f"| {r['above_model_bytes'] / mib:.0f} MiB | {r['seconds']:.2f} s |"
        )
    u, p = results["unpatched"], results["patched"]
    print(
        f"patched / unpatched: peak above the model {p['above_model_bytes'] / u['above_model_bytes']:.3f}x, "
        f"time {p['seconds'] / u['seconds']:.3f}x"
    )


if __name__ == "__main__":
    main()
