"""`transformers` `generate` on a local Hugging Face directory: the reference `bastion bench lm` measures against.

Only for benchmarks and checks on a model team's machine: transformers is imported here, lazily, with the hub
switched off before the import (``HF_HUB_OFFLINE``, no telemetry) and ``local_files_only=True`` on every load,
so it can never reach the network. It comes with the ``[distill]`` extra; without it the comparison is reported
as unavailable.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_OFFLINE": "1",
}


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def transformers_greedy(
    model_dir: Path, runs: list[list[int]], new_tokens: int, rounds: int = 2
) -> list[dict[str, Any]]:
    """Greedy ids and tokens/s of ``generate`` (1 thread, KV cache on) for each prompt in ``runs``."""
    os.environ.update(OFFLINE_ENV)
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        warm = torch.tensor([runs[0][:4]])  # first-call set-up is not generation speed
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=False, pad_token_id=0)
        for ids in runs:
            x = torch.tensor([ids])
            best = float("inf")
            for _ in range(rounds):  # best of ``rounds``: the first timed call can carry one-off set-up
                t0 = time.perf_counter()
                y = model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    eos_token_id=[1, 2],
                    pad_token_id=0,
                )
                best = min(best, time.perf_counter() - t0)
            new = y[0, len(ids) :].tolist()
            while new and new[-1] in (1, 2):  # bastion's generator does not return the stop token
                new.pop()
            out.append({"ids": new, "tokens_per_s": round(max(len(new), 1) / best, 1)})
    return out
