"""``bastion bench lm``: ONNX Runtime KV-cache generation vs the same weights in torch, in one run.

Reports tokens/s (greedy, 1 thread) and time-to-first-token at several prompt lengths, and checks that both
produce the same tokens.  The torch reference is bastion's own Llama module (the export source); it needs the
``[distill]`` extra and a llama2.c checkpoint of the same weights (``--reference``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bastion.runtime.lm import Generator
from bastion.runtime.lm_timing import best_of, interleaved_tokens_per_s


ROUNDS = 3  # every contestant is timed best of the same number of runs (the machine is shared and noisy)


def _prompt_ids(generator: Generator, length: int) -> list[int]:
    base = generator.encode("Once upon a time, there was a little girl named Lily. She loved to play outside. " * 40)
    return base[:length]


def bench_lm(
    model: str,
    reference: Path | None,
    new_tokens: int,
    prompt_lengths: list[int],
    allow_unsigned: bool = False,
    transformers_dir: Path | None = None,
    against: str | None = None,
) -> dict[str, Any]:
    generator = Generator.load(model, threads=1, allow_unsigned=allow_unsigned)
    result: dict[str, Any] = {"model": generator.bundle.manifest.name, "new_tokens": new_tokens, "lengths": {}}
    rival = Generator.load(against, threads=1, allow_unsigned=allow_unsigned) if against else None
    if rival is not None:
        result["against"] = rival.bundle.manifest.name
    torch_model = None
    if reference is not None:
        import torch

        from bastion.distill.llama import greedy, load_teacher

        torch.set_num_threads(1)
        torch_model = load_teacher(reference)
    warm = _prompt_ids(generator, 8)  # every contestant runs once before it is timed
    list(generator.generate_ids(warm, 8, stop=()))
    if torch_model is not None:
        greedy(torch_model, warm, 8)
    for length in prompt_lengths:
        ids = _prompt_ids(generator, min(length, generator.context - new_tokens - 1))
        ttft, total, ours = best_of(ROUNDS, lambda: generator.generate_ids(ids, new_tokens))
        row = {
            "prompt_tokens": len(ids),
            "ttft_ms": round(ttft * 1000, 2),
            "tokens": len(ours),
            "tokens_per_s": round(len(ours) / total, 1),
        }
        if torch_model is not None:
            _, ref_total, theirs = best_of(ROUNDS, lambda: iter(greedy(torch_model, ids, new_tokens)))
            row.update(
                torch_tokens_per_s=round(len(theirs) / ref_total, 1),
                same_tokens=theirs == ours,
                speedup=round((len(ours) / total) / (len(theirs) / ref_total), 2) if theirs else None,
            )
        result["lengths"][str(length)] = row
        if rival is not None:  # the two bundles take turns, best of ROUNDS each
            speeds = interleaved_tokens_per_s({"model": generator, "against": rival}, ids, new_tokens, ROUNDS)
            row.update(
                against_tokens_per_s=speeds["against"],
                model_tokens_per_s_in_turns=speeds["model"],
                speedup_vs_against=round(speeds["model"] / speeds["against"], 2),
            )
        if transformers_dir is not None:
            from bastion.distill.hf_reference import transformers_available, transformers_greedy

            if not transformers_available():
                row["transformers"] = "not installed (pip install transformers) — comparison skipped"
            else:
                hf = transformers_greedy(transformers_dir, [ids], new_tokens, rounds=ROUNDS)[0]
                row.update(
                    transformers_tokens_per_s=hf["tokens_per_s"],
                    same_tokens_as_transformers=hf["ids"] == ours,
                    speedup_vs_transformers=round(row["tokens_per_s"] / hf["tokens_per_s"], 2),
                )
    generator.close()
    if rival is not None:
        rival.close()
    return result
