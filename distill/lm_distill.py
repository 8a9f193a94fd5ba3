"""``bastion distill lm``: a smaller Llama from a bigger one — drop layers, then knowledge distillation.

The whole loop fits on one screen (nanoGPT-style): batches of token windows from a corpus (or text the teacher
generates itself when there is none), loss = T²·KL(teacher/T ‖ student/T) + α·cross-entropy, AdamW, cosine
learning rate with warm-up, gradient accumulation, periodic evaluation, checkpoints and resume.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

from bastion.distill.llama import Llama, LlamaConfig, greedy
from bastion.distill.progress import TrainingProgress
from bastion.distill.spec import LMDistillSpec
from bastion.errors import ConfigError, InputNotFoundError
from bastion.models.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from bastion.runtime.lm import Generator

log = logging.getLogger(__name__)


def prune_layers(teacher: Llama, keep: list[int]) -> Llama:
    """A student with only the teacher layers in ``keep`` (weights copied), same width and vocabulary."""
    n = teacher.c.n_layers
    if not keep or sorted(set(keep)) != sorted(keep) or min(keep) < 0 or max(keep) >= n:
        raise ConfigError(f"--keep-layers must be distinct indices in 0..{n - 1}, got {keep}")
    c = LlamaConfig(**{**asdict(teacher.c), "n_layers": len(keep)})
    student = Llama(c)
    student.tok_embeddings = copy.deepcopy(teacher.tok_embeddings)
    student.norm = copy.deepcopy(teacher.norm)
    student.output = copy.deepcopy(teacher.output)
    student.layers = torch.nn.ModuleList(copy.deepcopy(teacher.layers[i]) for i in sorted(keep))
    return student


@torch.no_grad()
def layer_importance(teacher: Llama, tokens: torch.Tensor, block: int = 128, windows: int = 8) -> list[float]:
    """Block influence per layer (ShortGPT, Men et al. 2024): 1 − mean cos(hidden in, hidden out) on real text.

    A layer that barely turns its input is the cheapest to drop; ``--layer-choice importance`` keeps the
    layers with the highest influence.
    """
    teacher.eval()
    influence = torch.zeros(teacher.c.n_layers)
    count = 0
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        layer.register_forward_hook(lambda m, args, out: captured.append((args[0], out[0]))) for layer in teacher.layers
    ]
    try:
        for s in range(0, min(len(tokens) - block, windows * block), block):
            captured.clear()
            _logits(teacher, tokens[s : s + block][None])
            for i, (x_in, x_out) in enumerate(captured):
                influence[i] += (1 - F.cosine_similarity(x_in, x_out, dim=-1)).mean()
            count += 1
    finally:
        for h in hooks:
            h.remove()
    return [round(float(v) / max(count, 1), 5) for v in influence]


def most_important(influence: list[float], depth: int) -> list[int]:
    if not 1 <= depth <= len(influence):
        raise ConfigError(f"--depth must be 1..{len(influence)}")
    return sorted(sorted(range(len(influence)), key=lambda i: -influence[i])[:depth])


@torch.no_grad()
def narrow_ffn(model: Llama, ratio: float, tokens: torch.Tensor, block: int = 128, windows: int = 4) -> Llama:
    """Keep the ``ratio`` share of each layer's MLP hidden units that carry the most activation on real text.

    Importance of unit j = mean |silu(w1·h)_j · (w3·h)_j| × ‖w2[:, j]‖ — what it actually adds to the residual.
    w1/w3 rows and w2 columns of the kept units are copied; every layer keeps the same width.
    """
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"--ffn-ratio must be in (0, 1], got {ratio}")
    keep_n = max(8, int(round(model.c.hidden_dim * ratio / 8)) * 8)  # a multiple of 8: friendly to matmul kernels
    if keep_n >= model.c.hidden_dim:
        return model
    act = [torch.zeros(model.c.hidden_dim) for _ in model.layers]
    hooks = [
        layer.w2.register_forward_pre_hook(lambda m, args, i=i: act[i].add_(args[0].abs().mean((0, 1))))
        for i, layer in enumerate(model.layers)
    ]
    try:
        for s in range(0, min(len(tokens) - block, windows * block), block):
            _logits(model, tokens[s : s + block][None])
    finally:
        for h in hooks:
            h.remove()
    c = LlamaConfig(**{**asdict(model.c), "hidden_dim": keep_n})
    narrow = Llama(c)
    narrow.load_state_dict(
        {k: v for k, v in model.state_dict().items() if ".w1." not in k and ".w2." not in k and ".w3." not in k},
        strict=False,
    )
    for i, (src, dst) in enumerate(zip(model.layers, narrow.layers)):
        keep = torch.argsort(act[i] * src.w2.weight.norm(dim=0), descending=True)[:keep_n].sort().values
        dst.w1.weight.copy_(src.w1.weight[keep])
        dst.w3.weight.copy_(src.w3.weight[keep])
        dst.w2.weight.copy_(src.w2.weight[:, keep])
    return narrow.eval()


def fresh_student(teacher: Llama, config_file: Path) -> Llama:
    """A randomly initialised student from a small YAML/JSON config (dim, hidden_dim, n_layers, n_heads,
    n_kv_heads); vocabulary, context and RoPE come from the teacher so the tokenizer still fits."""
    import yaml

    try:
        raw = yaml.safe_load(Path(config_file).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--student-config {config_file}: {exc}") from None
    allowed = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads"}
    if not isinstance(raw, dict) or set(raw) - allowed or {"dim", "n_layers", "n_heads"} - set(raw):
        raise ConfigError(
            f"--student-config {config_file}: give dim, n_layers, n_heads (and optionally "
            "hidden_dim, n_kv_heads) and nothing else"
        )
    c = LlamaConfig(
        **{
            **asdict(teacher.c),
            "hidden_dim": raw.get("hidden_dim", 4 * raw["dim"]),
            "n_kv_heads": raw.get("n_kv_heads", raw["n_heads"]),
            **raw,
        }
    )
    if c.dim % c.n_heads or c.n_heads % c.n_kv_heads or c.head_dim % 2:
        raise ConfigError(
            f"--student-config {config_file}: dim must split into n_heads of even size, and n_heads "
            "into n_kv_heads groups"
        )
    torch.manual_seed(0)
    student = Llama(c)
    for prm in student.parameters():
        if prm.dim() > 1:
            torch.nn.init.normal_(prm, std=0.02)
    return student


def evenly(n_layers: int, depth: int) -> list[int]:
    """``depth`` layers spread over ``n_layers``, always keeping the first and the last."""
    if not 1 <= depth <= n_layers:
        raise ConfigError(f"--depth must be 1..{n_layers}")
    if depth == 1:
        return [0]
    return sorted({round(i * (n_layers - 1) / (depth - 1)) for i in range(depth)})


def read_corpus(path: Path) -> str:
    """Plain text (.txt) or JSON lines (.jsonl: every string value); a directory: all of them."""
    files = (
        sorted(p for p in Path(path).rglob("*") if p.suffix in (".txt", ".jsonl"))
        if Path(path).is_dir()
        else [Path(path)]
    )
    if not files or not all(f.is_file() for f in files):
        raise InputNotFoundError(f"no .txt or .jsonl corpus at {path}")
    parts = []
    for f in files:
        raw = f.read_bytes()
        if b"\x00" in raw[:4096]:
            raise ConfigError(f"{f} looks binary, not text")
        text = raw.decode("utf-8", errors="replace")
        if f.suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    parts.extend(v for v in json.loads(line).values() if isinstance(v, str))
        else:
            parts.append(text)
    corpus = "\n".join(parts).strip()
    if len(corpus) < 1000:
        raise ConfigError(f"the corpus at {path} is too small ({len(corpus)} characters)")
    return corpus


def synthetic_corpus(
    teacher: "Generator",
    n: int,
    seeds: tuple[str, ...] = ("Once upon a time", "One day", "The little", "Lily"),
    temperature: float = 1.0,
    seed: int = 0,
    tick: Callable[[], None] | None = None,
) -> list[str]:
    """Sequence-level KD: text the teacher writes itself — continuations of short seeds *sampled* from its own
    distribution (temperature 1, no top-k/top-p; each text from its own RNG seed derived from ``seed``, so a
    run is reproducible).  Greedy continuations would give only one text per seed: the corpus would repeat
    itself and its held-out tail would be training text.  ``teacher`` is the teacher's ONNX export on bastion's
    runtime, ~9× the torch module's tokens/s: 2,048 stories from stories260K take ~35 s instead of ~4 min."""
    out = []
    for i, text_seed in enumerate(np.random.SeedSequence(seed).generate_state(n)):
        ids = teacher.encode(seeds[i % len(seeds)])
        new = teacher.generate_ids(ids, 200, temperature=temperature, top_k=0, top_p=1.0, seed=int(text_seed))
        out.append(teacher.tokenizer.decode(ids + list(new)))
        if tick:
            tick()
    return out


def _batches(tokens: torch.Tensor, block: int, batch: int, gen: torch.Generator, rank: int = 0, world: int = 1):
    """Windows of the whole batch, drawn by every rank from the same generator; each rank keeps its own share
    (rank r: rows r·batch/world … (r+1)·batch/world), so N processes see the very batch one process would."""
    share = batch // world
    while True:
        starts = torch.randint(0, len(tokens) - block - 1, (batch,), generator=gen)[rank * share : (rank + 1) * share]
        yield (
            torch.stack([tokens[s : s + block] for s in starts]),
            torch.stack([tokens[s + 1 : s + block + 1] for s in starts]),
        )


class _BatchLogits(torch.nn.Module):
    """``_logits`` as one forward: what DistributedDataParallel wraps (one forward per backward)."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.model, x)


def _logits(model: Llama, x: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits (no cache) for a batch: the module is batch-1 for export, so loop rows."""
    pos = torch.arange(x.shape[1], device=x.device)[None]
    return torch.cat([model(x[i : i + 1], pos, *model.empty_past())[0] for i in range(x.shape[0])])


@torch.no_grad()
def evaluate(model: Llama, teacher: Llama, tokens: torch.Tensor, block: int, max_windows: int | None = None) -> dict:
    """Perplexity on ``tokens`` and next-token top-1 agreement with the teacher, over every whole ``block``
    window of ``tokens`` (or the first ``max_windows``: the training curves' quick look)."""
    model.eval()
    device = next(model.parameters()).device
    nll, agree, count = 0.0, 0, 0
    starts = range(0, len(tokens) - block, block)  # each window also needs the token after it
    for s in starts if max_windows is None else starts[:max_windows]:
        x, y = tokens[s : s + block][None].to(device), tokens[s + 1 : s + block + 1].to(device)
        logits = _logits(model, x)[0]
        nll += F.cross_entropy(logits, y, reduction="sum").item()
        agree += (logits.argmax(-1) == _logits(teacher, x)[0].argmax(-1)).sum().item()
        count += len(y)
    return {"perplexity": round(math.exp(nll / max(count, 1)), 4), "top1_agreement": round(agree / max(count, 1), 4)}


def distill(
    teacher: Llama,
    student: Llama,
    train_tokens: torch.Tensor,
    val_tokens: torch.Tensor,
    spec: LMDistillSpec,
    checkpoint: Path,
    tick: Callable[[], None] | None = None,
    progress: TrainingProgress | None = None,
) -> list[dict]:
    """Train ``student`` to match ``teacher``; resumes from ``checkpoint`` if it exists. Returns the history.
    ``tick`` is called once per step (and for the steps a resumed run had done); ``progress`` hears each step's
    loss and each evaluation (plain lines in a log).

    In a data-parallel world (``bastion.distill.ddp``) every rank draws the same whole batch of ``spec.batch``
    windows and trains on its share under DistributedDataParallel, so the step equals one process's with the
    whole batch; ``spec.accumulate`` such batches make one optimizer step whatever the world size. Rank 0 alone
    evaluates, writes the checkpoint (atomically) and reports progress; the history is rank 0's."""
    from bastion.distill.ddp import barrier, current_world, mean_across

    world = current_world()
    if spec.batch % world.size:
        raise ConfigError(
            f"--batch {spec.batch} does not split over {world.size} processes", f"give a multiple of {world.size}"
        )
    torch.manual_seed(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)  # the batch order (CPU): saved with each checkpoint
    device = torch.device(spec.device)
    teacher.to(device).eval()
    student.to(device)
    forward: torch.nn.Module = _BatchLogits(student)
    if world.size > 1:  # gradients averaged over the ranks: the step of one process with the whole batch
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = torch.optim.AdamW(student.parameters(), lr=spec.lr, weight_decay=0.0)
    start, history = 0, []
    if checkpoint.is_file():  # every rank reads it; written by rank 0 alone, any world size resumes it
        state = torch.load(checkpoint, weights_only=False, map_location=device)
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        if "batch_rng" in state:  # resumed runs draw the batches the uninterrupted run would have drawn
            gen.set_state(state["batch_rng"].cpu())
        for _ in range(start if tick else 0):  # the progress bar resumes where the run stopped
            tick()
    batches = _batches(train_tokens, spec.block, spec.batch, gen, world.rank, world.size)
    if progress is not None and world.is_main:
        progress.start(None, spec.steps, done=start, unit="step")
    for step in range(start, spec.steps):
        lr = spec.lr * min(1.0, (step + 1) / max(spec.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / spec.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        student.train()
        step_loss = 0.0
        for micro in range(spec.accumulate):
            x, y = (t.to(device) for t in next(batches))
            with torch.no_grad():
                t_logits = _logits(teacher, x)
            last = micro + 1 == spec.accumulate
            # gradients are all-reduced once per optimizer step, on its last micro-batch
            with forward.no_sync() if world.size > 1 and not last else contextlib.nullcontext():
                s_logits = forward(x)
                kl = (
                    F.kl_div(
                        F.log_softmax(s_logits / spec.temperature, -1),
                        F.log_softmax(t_logits / spec.temperature, -1),
                        log_target=True,
                        reduction="batchmean",
                    )
                    * spec.temperature**2
                    / x.shape[1]
                )
                ce = F.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]), y.reshape(-1))
                loss = ((1 - spec.alpha) * kl + spec.alpha * ce) / spec.accumulate
                loss.backward()
            step_loss += loss.item()
        step_loss = mean_across(step_loss)  # the whole batch's loss, the same number on every rank
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ((step + 1) % spec.eval_every == 0 or step + 1 == spec.steps) and world.is_main:
            history.append(
                {
                    "step": step + 1,
                    "loss": round(step_loss, 4),
                    "lr": lr,
                    **evaluate(student, teacher, val_tokens, spec.block, max_windows=4),
                }
            )
            _save_checkpoint(
                checkpoint,
                {
                    "model": student.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step + 1,
                    "history": history,
                    "batch_rng": gen.get_state(),
                },
            )
            if progress is not None:
                point = history[-1]
                progress.note(f"step {point['step']}/{spec.steps}: held-out perplexity {point['perplexity']}")
        if tick:
            tick()
        if progress is not None and world.is_main:
            progress.batch(None, step + 1, step_loss)
    barrier()  # the last checkpoint is on disk before any rank goes on
    return history


def _save_checkpoint(path: Path, state: dict) -> None:
    """Temp file, fsync, rename: a run killed while saving resumes from the previous checkpoint, not a torn one."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def tokens_per_s(model: Llama, ids: list[int], n: int = 100) -> float:
    torch.set_num_threads(1)
    t = time.perf_counter()
    out = greedy(model, ids, n, stop=())
    return round(len(out) / (time.perf_counter() - t), 1)
