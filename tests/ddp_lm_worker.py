"""One rank of tests/test_ddp.py's data-parallel runs, started by ``python -m torch.distributed.run`` (an external
torchrun, as a cluster would start bastion): it joins the world from RANK/WORLD_SIZE/LOCAL_RANK and distils the
tiny student below (SPEC's steps). Arguments: OUT_DIR [STOP_AFTER] — STOP_AFTER: every rank stops after that
many steps, as a killed job would leave its checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SPEC = dict(steps=8, batch=4, block=16, eval_every=2, lr=1e-2, accumulate=2, warmup=2)


def tiny():
    """(teacher, student, tokens): the same on every rank and in the test's own single process."""
    import torch

    from bastion.distill.llama import Llama, LlamaConfig
    from bastion.distill.lm_distill import prune_layers

    torch.manual_seed(0)
    teacher = Llama(
        LlamaConfig(dim=32, hidden_dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=64)
    ).eval()
    tokens = torch.randint(0, 64, (2000,))
    return teacher, prune_layers(teacher, [0, 3]), tokens


class Stopped(Exception):
    pass


def main(out: Path, stop_after: int | None) -> None:
    import torch

    from bastion.distill import ddp, lm_distill
    from bastion.distill.spec import LMDistillSpec

    torch.set_num_threads(1)
    world, device = ddp.join("cpu")
    saved = lm_distill._save_checkpoint

    def counted_save(path, state):  # which ranks write checkpoints (only rank 0 may)
        with open(out / f"saves-rank{world.rank}.txt", "a") as f:
            f.write(f"{state['step']}\n")
        saved(path, state)

    lm_distill._save_checkpoint = counted_save
    steps = []

    def tick() -> None:
        steps.append(1)
        if stop_after is not None and len(steps) == stop_after:
            raise Stopped  # every rank stops after the same step, as a killed job would leave its checkpoint

    teacher, student, tokens = tiny()
    try:
        history = lm_distill.distill(
            teacher, student, tokens[:1800], tokens[1800:], LMDistillSpec(**SPEC), out / "ck.pt", tick
        )
        if world.is_main:
            (out / "history.json").write_text(json.dumps(history))
    except Stopped:
        pass
    (out / f"world-{world.rank}.json").write_text(json.dumps({"rank": world.rank, "size": world.size}))
    ddp.leave()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
