"""Data-parallel LM distillation step time, 1 vs 2 gloo processes on the CPU (#20, a benchmark, not a test).

Usage: .venv/bin/python scripts/ddp_step_bench.py [--steps 30] [--rounds 2] [--configs 1x1,1x2,2x1]

Each configuration PROCESSESxTHREADS is launched by ``python -m torch.distributed.run --nproc-per-node PROCESSES``
(static rendezvous on 127.0.0.1, gloo on the loopback interface, OMP_NUM_THREADS=THREADS) and distils a 5→3-layer
student of a random dim-64 Llama (vocab 512): ``--steps`` steps of 8 windows × 128 tokens (the whole batch, split
over the processes), evaluated only after the last step. The time is taken around ``distill()`` alone, after a
barrier (the launcher's start-up and the model building are outside it). One JSON line per run, then a summary
line; the numbers go to docs/benchmarks.md ("Data-parallel LM distillation").
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, BLOCK = 8, 128


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(out: Path, steps: int, threads: int) -> None:
    """One rank: build the same teacher and student as every other rank, then time ``distill()``."""
    import torch

    from bastion.distill import ddp
    from bastion.distill.llama import Llama, LlamaConfig
    from bastion.distill.lm_distill import distill, prune_layers
    from bastion.distill.spec import LMDistillSpec

    torch.set_num_threads(threads)
    world, _ = ddp.join("cpu")
    torch.manual_seed(0)
    config = LlamaConfig(
        dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, max_seq_len=BLOCK + 1
    )
    teacher = Llama(config).eval()
    student = prune_layers(teacher, [0, 2, 4])
    tokens = torch.randint(0, config.vocab_size, (60_000,))
    spec = LMDistillSpec(steps=steps, batch=BATCH, block=BLOCK, eval_every=steps, warmup=2)
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as scratch:
        ddp.barrier()
        started = time.perf_counter()
        history = distill(teacher, student, tokens[:54_000], tokens[54_000:], spec, Path(scratch) / "ck.pt")
        seconds = time.perf_counter() - started
    if world.is_main:
        out.write_text(json.dumps({"seconds": seconds, "loss": history[-1]["loss"] if history else None}))
    ddp.leave()


def run(processes: int, threads: int, steps: int) -> dict:
    """One configuration under torchrun; its rank 0's timing."""
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as scratch:
        out = Path(scratch) / "result.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={processes}",
            "--rdzv-backend=static", "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "--max-restarts=0",
            __file__, "--worker", str(out), "--steps", str(steps), "--threads", str(threads),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo"}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        result = json.loads(out.read_text())
    return {
        "processes": processes,
        "threads": threads,
        "steps": steps,
        "seconds": round(result["seconds"], 2),
        "windows_per_s": round(steps * BATCH / result["seconds"], 1),
        "final_loss": result["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configs", default="1x1,1x2,2x1", help="PROCESSESxTHREADS, comma-separated")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.steps, args.threads)
        return
    configs = [tuple(int(n) for n in c.split("x")) for c in args.configs.split(",")]
    rows = []
    for round_ in range(1, args.rounds + 1):
        for processes, threads in configs:
            row = {"round": round_, **run(processes, threads, args.steps)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(json.dumps({"summary": rows, "cpu_count": os.cpu_count(), "load_average_1min": load}))


if __name__ == "__main__":
    main()
