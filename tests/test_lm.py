"""Language models: the vendored stories260K bundle on ONNX Runtime, greedy parity with torch, ask over a socket."""

import json

import pytest

from bastion.errors import ConfigError
from bastion.runtime.lm import PREFILL_CHUNK, Generator, KVCache
from bastion.models.zoo import ZOO_DIR
from conftest import SHARED, run_cli
from lm_kit import distill_lm, stories_teacher

# What karpathy/llama2.c's run.c prints for `-t 0 -i "Zoo"` with this checkpoint (../shared SOURCE.md).
RUN_C_ZOO = "Zoo was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball."


@pytest.fixture(scope="module")
def generator():
    g = Generator.load("stories260K")
    yield g
    g.close()


def test_greedy_matches_llama2c_run_c(generator):
    text = "Zoo" + "".join(generator.generate("Zoo", 40))
    assert text.startswith(RUN_C_ZOO)


def test_streaming_pieces_join_to_the_decoded_ids(generator):
    ids = generator.encode("Once upon a time")
    new = list(generator.generate_ids(ids, 50))
    pieces = list(generator.generate("Once upon a time", 50))
    assert len(pieces) > 10
    assert "".join(pieces) == generator.tokenizer.decode(ids + new)[len(generator.tokenizer.decode(ids)) :]


def test_sampling_is_seeded_and_limits_are_enforced(generator):
    with pytest.raises(ConfigError, match="no tokens"):
        generator.generate_ids([], 5)
    a = list(generator.generate_ids(generator.encode("The cat"), 30, temperature=1.0, top_k=20, top_p=0.9, seed=3))
    b = list(generator.generate_ids(generator.encode("The cat"), 30, temperature=1.0, top_k=20, top_p=0.9, seed=3))
    assert a == b
    with pytest.raises(ConfigError, match="max_new_tokens"):
        list(generator.generate_ids([1], 0))
    with pytest.raises(ConfigError, match="context is 512"):
        list(generator.generate_ids([1] * 600, 5))


def test_a_detection_bundle_is_not_a_language_model():
    with pytest.raises(ConfigError, match="not a language-model bundle"):
        Generator.load("yolov5n")


def test_ask_cli_local():
    proc = run_cli("ask", "Zoo", "--model", "stories260K", "--max-new-tokens", "40")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(RUN_C_ZOO)
    assert run_cli("ask", "Zoo").returncode == 1


def test_ask_through_a_node_streams_and_audits(tmp_path):
    from bastion.edge.client import Client, NodeRequestError
    from test_node import running_node

    with running_node(tmp_path, lm="stories260K") as node:
        with Client(node.server.control_endpoint, timeout_s=5) as client:
            pieces = list(client.ask_stream("Zoo", 40))
            assert len(pieces) > 5 and ("Zoo" + "".join(pieces)).startswith(RUN_C_ZOO)
            with pytest.raises(NodeRequestError, match="prompt"):  # refused by the typed ask request, named
                client.ask("")
            assert client.status()["node"] == "test-node"  # still serving after the stream
        proc = run_cli("ask", "Zoo", "--node", node.server.control_endpoint, "--max-new-tokens", "20")
        assert proc.returncode == 0 and "Lily" in proc.stdout, proc.stderr
    records = [json.loads(x) for x in (tmp_path / "data" / "audit.log").read_text().splitlines()]
    asks = [r for r in records if r["kind"] == "ask"]
    assert asks and asks[0]["fields"]["tokens_out"] > 5 and "Lily" not in json.dumps(asks)  # counts, not text
    assert any(r["kind"] == "bundle_loaded" and r["fields"].get("task") == "lm" for r in records)


def test_export_round_trip_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    import numpy as np

    from bastion.distill.llama import greedy, load_llama2c
    from bastion.distill.lm_export import export_lm_bundle

    src = SHARED / "weights" / "stories260K"
    if not (src / "stories260K.bin").is_file():
        pytest.skip("../shared is not present")
    export_lm_bundle(
        src / "stories260K.bin", src / "hf" / "tokenizer.json", tmp_path / "b", "s", "1", "MIT", "test", []
    )
    g = Generator.load(tmp_path / "b", allow_unsigned=True)
    model = load_llama2c(src / "stories260K.bin")
    ids = g.encode("Lily and Ben")
    assert list(g.generate_ids(ids, 200)) == greedy(model, ids, 200)
    long_prompt = g.encode("Lily and Ben went to the park to play with a big red ball. " * 12)
    assert len(long_prompt) > 2 * PREFILL_CHUNK  # written in several chunks, then decoded across windows
    assert list(g.generate_ids(long_prompt, 100, stop=())) == greedy(model, long_prompt, 100, stop=())
    with torch.no_grad():  # logits with and without a cache
        full = model(torch.tensor([ids]), torch.arange(len(ids))[None], *model.empty_past())[0].numpy()
        onnx_full, past = g.forward(ids)
    np.testing.assert_allclose(onnx_full, full, atol=1e-4)
    assert [i.name for i in g.backend.inputs][:3] == ["input_ids", "attention_mask", "position_ids"]
    step, cache = g.forward([ids[-1]], past)
    with torch.no_grad():
        ref = model(torch.tensor([ids + [ids[-1]]]), torch.arange(len(ids) + 1)[None], *model.empty_past())[0]
    np.testing.assert_allclose(step[0, -1], ref[0, -1].numpy(), atol=1e-4)
    assert cache.capacity == len(ids) + 1 and cache.length == len(ids) + 1  # grown by one slot
    # attention_mask counts the filled slots: whatever the free tail holds is never read
    roomy = g.empty_cache(len(ids) + 4)
    noisy = KVCache(
        {k: np.random.default_rng(0).normal(size=v.shape).astype(np.float32) for k, v in roomy.tensors.items()}, 0
    )
    np.testing.assert_allclose(g.forward(ids, noisy)[0], onnx_full, atol=1e-5)
    # a prompt fed in two chunks attends as the whole prompt: the second chunk's first token sees the cache
    # (bottom-right causal alignment; ONNX Runtime 1.25-1.27 got this wrong)
    _, head = g.forward(ids[:2], roomy)
    tail, _ = g.forward(ids[2:], head)
    np.testing.assert_allclose(tail[0], onnx_full[0, 2:], atol=1e-4)


def test_bundle_generation_defaults_travel_with_the_model(tmp_path):
    """Sampling defaults set at export are signed into the manifest and used when a caller sets nothing; a caller's
    own values win; out-of-range defaults are refused at export."""
    pytest.importorskip("torch")
    from bastion.distill.lm_export import export_lm_bundle
    from bastion.models.manifest import read_manifest

    src = SHARED / "weights" / "stories260K"
    if not (src / "stories260K.bin").is_file():
        pytest.skip("../shared is not present")
    export_lm_bundle(
        src / "stories260K.bin",
        src / "hf" / "tokenizer.json",
        tmp_path / "b",
        "s",
        "1",
        "MIT",
        "test",
        [],
        generation={"temperature": 1.0, "top_k": 40, "max_new_tokens": 12},
    )
    assert read_manifest(tmp_path / "b" / "manifest.json").decoder.params.generation.model_dump() == {
        "max_new_tokens": 12,
        "temperature": 1.0,
        "top_k": 40,
        "top_p": 1.0,
    }
    g = Generator.load(tmp_path / "b", allow_unsigned=True)
    ids = g.encode("Once upon a time")
    greedy_ids = list(g.generate_ids(ids, 40, temperature=0.0))
    sampled = [list(g.generate_ids(ids, 40, stop=(), seed=s)) for s in range(4)]
    assert any(run != greedy_ids for run in sampled)  # the bundle's temperature 1 is in force
    assert sampled[0] == list(g.generate_ids(ids, 40, stop=(), seed=0))  # and seeded
    assert len(list(g.generate_ids(ids, stop=()))) == 12  # the bundle's answer length
    with pytest.raises(ConfigError, match="top_p must be"):
        export_lm_bundle(
            src / "stories260K.bin",
            src / "hf" / "tokenizer.json",
            tmp_path / "c",
            "s",
            "1",
            "MIT",
            "test",
            [],
            generation={"top_p": 0.0},
        )
    assert not (tmp_path / "c").exists()


def test_bench_lm_json():
    proc = run_cli(
        "bench", "lm", "--new-tokens", "16", "--prompt-lengths", "8,64", "--against", "stories260K", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = result["lengths"]
    assert rows["64"]["prompt_tokens"] == 64 and rows["8"]["tokens_per_s"] > 0 and rows["8"]["ttft_ms"] > 0
    assert result["against"] == "stories260K"  # a bundle timed against another, taking turns (no speed asserted)
    for row in rows.values():
        assert row["speedup_vs_against"] == round(row["model_tokens_per_s_in_turns"] / row["against_tokens_per_s"], 2)


def test_bench_lm_against_transformers_generate_same_tokens():
    """The reference the LM target is measured against: transformers' generate on the same weights, offline."""
    from bastion.distill.hf_reference import transformers_available

    hf = SHARED / "weights" / "stories260K" / "hf"
    if not (transformers_available() and hf.is_dir()):
        pytest.skip("needs transformers (the [distill] extra) and ../shared")
    proc = run_cli(
        "bench",
        "lm",
        "--new-tokens",
        "32",
        "--prompt-lengths",
        "16,128",
        "--reference",
        str(hf),
        "--transformers",
        str(hf),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    for row in json.loads(proc.stdout)["lengths"].values():
        assert row["same_tokens"] and row["same_tokens_as_transformers"] and row["tokens"] == 32
        assert row["transformers_tokens_per_s"] > 0 and row["speedup_vs_transformers"] > 0


def test_pruning_and_distillation_of_a_tiny_random_teacher(tmp_path):
    torch = pytest.importorskip("torch")
    from bastion.distill.llama import Llama, LlamaConfig
    from bastion.distill.lm_distill import LMDistillSpec, distill, evenly, prune_layers

    torch.manual_seed(0)
    teacher = Llama(
        LlamaConfig(dim=32, hidden_dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=64)
    ).eval()
    keep = evenly(4, 2)
    assert keep == [0, 3]
    student = prune_layers(teacher, keep)
    assert student.c.n_layers == 2
    assert torch.equal(student.layers[1].wq.weight, teacher.layers[3].wq.weight)  # copied, not re-initialised
    x = torch.randint(0, 64, (1, 10))
    logits, *present = student(x, torch.arange(10)[None], *student.empty_past())
    assert logits.shape == (1, 10, 64) and len(present) == 4 and present[0].shape == (1, 2, 10, 8)
    tokens = torch.randint(0, 64, (2000,))
    history = distill(
        teacher,
        student,
        tokens[:1800],
        tokens[1800:],
        LMDistillSpec(steps=30, batch=4, block=16, eval_every=10, lr=1e-2),
        tmp_path / "ck.pt",
    )
    assert history[-1]["top1_agreement"] > history[0]["top1_agreement"] or history[-1]["loss"] < history[0]["loss"]
    assert (tmp_path / "ck.pt").is_file()
    with pytest.raises(ConfigError, match="keep-layers"):
        prune_layers(teacher, [0, 7])


def test_distillation_resumes_where_a_killed_run_stopped(tmp_path):
    """Killed after its step-10 checkpoint, a run resumes there and ends with the very weights of a run that was
    never interrupted (optimizer state and batch order come back with the checkpoint)."""
    torch = pytest.importorskip("torch")
    from bastion.distill.llama import Llama, LlamaConfig
    from bastion.distill.lm_distill import LMDistillSpec, distill, prune_layers

    torch.manual_seed(0)
    teacher = Llama(
        LlamaConfig(dim=32, hidden_dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=64)
    ).eval()
    tokens = torch.randint(0, 64, (2000,))
    spec = LMDistillSpec(steps=20, batch=2, block=16, eval_every=10, lr=1e-2)
    whole = prune_layers(teacher, [0, 3])
    distill(teacher, whole, tokens[:1800], tokens[1800:], spec, tmp_path / "whole.pt")

    steps = []

    def killed_at_step_13() -> None:
        steps.append(1)
        if len(steps) == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(
            teacher,
            prune_layers(teacher, [0, 3]),
            tokens[:1800],
            tokens[1800:],
            spec,
            tmp_path / "ck.pt",
            killed_at_step_13,
        )
    assert torch.load(tmp_path / "ck.pt", weights_only=False)["step"] == 10
    resumed = prune_layers(teacher, [0, 3])
    ticks = []
    history = distill(teacher, resumed, tokens[:1800], tokens[1800:], spec, tmp_path / "ck.pt", lambda: ticks.append(1))
    assert [h["step"] for h in history] == [10, 20] and len(ticks) == 20  # the bar counts the steps before too
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value)
    assert not list(tmp_path.glob(".*.tmp"))  # checkpoints are renamed into place, never left half-written


def test_synthetic_corpus_samples_distinct_reproducible_texts(tmp_path):
    """Sequence-level KD text is sampled (through the teacher's ONNX export, as the pipeline does): eight texts
    from four seeds are eight different texts (greedy gave one per seed, so the held-out split repeated the
    training text), and the same RNG seed writes the same corpus."""
    torch = pytest.importorskip("torch")
    from bastion.distill.llama import Llama, LlamaConfig
    from bastion.distill.lm_distill import synthetic_corpus
    from bastion.distill.lm_export import export_lm_bundle

    torch.manual_seed(0)
    teacher = Llama(
        LlamaConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=256)
    ).eval()
    export_lm_bundle(teacher, ZOO_DIR / "stories260K" / "tokenizer.json", tmp_path / "t", "t", "1", "MIT", "test", [])
    g = Generator.load(tmp_path / "t", allow_unsigned=True)
    ticks = []
    corpus = synthetic_corpus(g, 8, tick=lambda: ticks.append(1))
    assert len(set(corpus)) == 8 and len(ticks) == 8
    assert synthetic_corpus(g, 8) == corpus
    assert synthetic_corpus(g, 8, seed=1) != corpus


def test_layer_influence_ffn_narrowing_and_fresh_students(tmp_path):
    """Importance picks the layer that does something; narrowing keeps the MLP units that matter."""
    torch = pytest.importorskip("torch")
    from bastion.distill.llama import Llama, LlamaConfig
    from bastion.distill.lm_distill import fresh_student, layer_importance, most_important, narrow_ffn

    torch.manual_seed(0)
    c = LlamaConfig(dim=32, hidden_dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=64)
    teacher = Llama(c).eval()
    with torch.no_grad():
        for i, layer in enumerate(teacher.layers):  # layers 0 and 2 add ~nothing; layer 1 rewrites the stream
            scale = 3.0 if i == 1 else 1e-4
            layer.wo.weight.mul_(scale)
            layer.w2.weight.mul_(scale)
    tokens = torch.randint(0, 64, (600,))
    influence = layer_importance(teacher, tokens, block=32, windows=4)
    assert influence[1] > 10 * max(influence[0], influence[2])
    assert most_important(influence, 1) == [1]

    with torch.no_grad():  # a few MLP units carry (almost) everything: narrowing must keep exactly those
        for layer in teacher.layers:
            layer.w2.weight.mul_(1e-3)
            layer.w2.weight[:, :8].mul_(1e3)
    narrow = narrow_ffn(teacher, 0.25, tokens, block=32)
    assert narrow.c.hidden_dim == 16 and narrow.layers[0].w1.weight.shape == (16, 32)
    assert torch.equal(narrow.layers[0].w2.weight[:, :8], teacher.layers[0].w2.weight[:, :8])
    x, pos = tokens[:20][None], torch.arange(20)[None]
    full, cut = teacher(x, pos, *teacher.empty_past())[0], narrow(x, pos, *narrow.empty_past())[0]
    assert (full - cut).abs().max() < 0.05 * full.abs().max()  # the dropped units hardly mattered
    with pytest.raises(ConfigError, match="ffn-ratio"):
        narrow_ffn(teacher, 1.5, tokens)

    cfg = tmp_path / "student.yaml"
    cfg.write_text("dim: 16\nn_layers: 2\nn_heads: 2\n")
    fresh = fresh_student(teacher, cfg)
    assert (fresh.c.dim, fresh.c.n_layers, fresh.c.hidden_dim, fresh.c.vocab_size) == (16, 2, 64, 64)
    cfg.write_text("dim: 16\nn_layers: 2\nn_heads: 3\n")
    with pytest.raises(ConfigError, match="n_heads of even size"):
        fresh_student(teacher, cfg)
    cfg.write_text("dim: 16\nlayers: 2\n")
    with pytest.raises(ConfigError, match="give dim, n_layers, n_heads"):
        fresh_student(teacher, cfg)


@pytest.mark.slow
def test_distill_lm_cli_end_to_end(tmp_path):
    src = stories_teacher()
    proc = distill_lm(
        "--synthetic",
        "12",
        "--depth",
        "3",
        "--steps",
        "20",
        "--batch",
        "2",
        "--accumulate",
        "2",
        "--block",
        "32",
        "--out",
        str(tmp_path / "run"),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["student"]["layers"] == [0, 2, 4]
    assert report["student"]["top1_agreement"] > report["pruned_only"]["top1_agreement"]  # distillation helped
    gate = report["int8_gate"]
    assert gate["reason"].startswith(("accepted", "refused")) and gate["int8"]["perplexity"] > 0
    assert (tmp_path / "run" / "bundle-int8").is_dir() == gate["accepted"]
    g = Generator.load(tmp_path / "run" / "bundle", allow_unsigned=True)
    assert g.n_layers == 3 and len(list(g.generate_ids(g.encode("Once upon a time"), 20))) > 0
    assert (
        distill_lm(
            "--out",
            str(tmp_path / "x"),
        ).returncode
        == 1
    )  # neither --corpus nor --synthetic
    import torch

    for device in ("tpu", f"cuda:{torch.cuda.device_count()}"):  # no such kind; one GPU past the last (cuda:0 here)
        bad = distill_lm(
            "--synthetic",
            "8",
            "--device",
            device,
            "--out",
            str(tmp_path / "y"),
        )
        assert bad.returncode == 1 and "--device" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "y").exists()  # refused before any work
    bad = distill_lm(
        "--synthetic", "8", "--out", str(tmp_path / "z"), tokenizer=ZOO_DIR / "stories260K" / "manifest.json"
    )
    assert bad.returncode == 1 and "is not a Hugging Face tokenizer.json" in bad.stderr, bad.stderr

    # a Hugging Face teacher directory (tokenizer found inside), layers chosen by influence, MLPs halved
    proc = run_cli(
        "distill",
        "lm",
        "--teacher",
        str(src / "hf"),
        "--synthetic",
        "8",
        "--depth",
        "3",
        "--layer-choice",
        "importance",
        "--ffn-ratio",
        "0.5",
        "--steps",
        "10",
        "--batch",
        "4",
        "--block",
        "32",
        "--weights-license",
        "MIT",
        "--out",
        str(tmp_path / "hf-run"),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    influence = report["layer_influence"]
    assert len(influence) == 5 and report["student"]["layers"] == sorted(
        sorted(range(5), key=lambda i: -influence[i])[:3]
    )
    assert report["student_shape"]["hidden_dim"] == 88 and report["curves"] == "curves.png"
    assert (tmp_path / "hf-run" / "curves.png").stat().st_size > 1000
    if report["gguf"] and "skipped" not in report["gguf"]:  # the [distill] extra brings gguf
        assert report["gguf"]["type"] == "f16" and (tmp_path / "hf-run" / "student.gguf").is_file()
    g = Generator.load(tmp_path / "hf-run" / "bundle", allow_unsigned=True)
    assert g.n_layers == 3 and len(list(g.generate_ids(g.encode("Once upon a time"), 10))) > 0


def _to_hf_layout(w, heads):
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def test_hugging_face_teacher_directory_loads_the_same_model(tmp_path):
    """A local HF directory (Llama/Qwen2 layout) gives the very logits of the same weights in llama2.c form."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from bastion.distill.llama import Llama, LlamaConfig, load_teacher
    from bastion.errors import ModelLoadError

    ids, pos = torch.tensor([[1, 403, 407, 261, 378, 285]]), torch.arange(6)[None]
    hf_dir = SHARED / "weights" / "stories260K" / "hf"
    if hf_dir.is_dir():  # the real conversion: transformers' own permutation undone
        a, b = load_teacher(SHARED / "weights" / "stories260K" / "stories260K.bin"), load_teacher(hf_dir)
        assert torch.equal(a(ids, pos, *a.empty_past())[0], b(ids, pos, *b.empty_past())[0])

    torch.manual_seed(0)  # a tiny random Qwen2-style teacher: q/k/v biases, GQA, untied head, other rope theta
    c = LlamaConfig(
        dim=32,
        hidden_dim=48,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=64,
        max_seq_len=32,
        rope_theta=1e6,
        attention_bias=True,
    )
    ours = Llama(c).eval()
    for prm in ours.parameters():
        torch.nn.init.normal_(prm, std=0.2)
    names = {
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "wq": "self_attn.q_proj",
        "wk": "self_attn.k_proj",
        "wv": "self_attn.v_proj",
        "wo": "self_attn.o_proj",
        "w1": "mlp.gate_proj",
        "w2": "mlp.down_proj",
        "w3": "mlp.up_proj",
    }
    hf = {
        "model.embed_tokens.weight": ours.tok_embeddings.weight,
        "model.norm.weight": ours.norm.weight,
        "lm_head.weight": ours.output.weight,
    }
    for key, t in ours.state_dict().items():
        if key.startswith("layers."):
            _, i, name, kind = key.split(".")
            if name in ("wq", "wk"):
                t = _to_hf_layout(t, c.n_heads if name == "wq" else c.n_kv_heads)
            hf[f"model.layers.{i}.{names[name]}.{kind}"] = t
    model_dir = tmp_path / "qwen-tiny"
    model_dir.mkdir()
    save_file({k: v.detach().contiguous() for k, v in hf.items()}, str(model_dir / "model.safetensors"))
    config = {
        "model_type": "qwen2",
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 64,
        "max_position_embeddings": 32,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    loaded = load_teacher(model_dir)
    small = torch.tensor([[1, 5, 9, 33]]), torch.arange(4)[None]
    assert torch.allclose(ours(*small, *ours.empty_past())[0], loaded(*small, *loaded.empty_past())[0], atol=1e-5)

    (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' is not a causal LM bastion can distill"):
        load_teacher(model_dir)
    (model_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match="weights do not match its config.json"):
        load_teacher(model_dir)


def test_gguf_round_trip_keeps_the_model(tmp_path):
    """What we write is what llama.cpp's Llama layout holds: read back, the same logits (F32) and greedy ids."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    from bastion.distill.gguf_export import read_gguf, write_gguf
    from bastion.distill.llama import greedy, load_teacher

    src = SHARED / "weights" / "stories260K"
    if not (src / "stories260K.bin").is_file():
        pytest.skip("../shared is not present")
    model = load_teacher(src / "stories260K.bin")
    ids, pos = torch.tensor([[1, 403, 407, 261]]), torch.arange(4)[None]
    with torch.no_grad():
        ref = model(ids, pos, *model.empty_past())[0]
        for ftype, tol in (("f32", 0.0), ("q8_0", 1.0)):
            info = write_gguf(model, src / "hf" / "tokenizer.json", tmp_path / f"m-{ftype}.gguf", "s", ftype)
            back = read_gguf(tmp_path / f"m-{ftype}.gguf")
            assert float((back(ids, pos, *back.empty_past())[0] - ref).abs().max()) <= tol
            assert greedy(back, [1, 403, 407, 261], 40) == greedy(model, [1, 403, 407, 261], 40)
    assert info["tensors"]["Q8_0"] == 32 and info["tensors"]["F16"] == 5  # w2 rows (172) are not blocks of 32
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "m-f32.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    vocab = json.loads((src / "hf" / "tokenizer.json").read_text())["model"]["vocab"]
    assert bytes(tokens.parts[tokens.data[300]]).decode() == next(k for k, v in vocab.items() if v == 300)
    assert not list(tmp_path.glob(".*.partial"))


def test_decoder_graph_matches_torch_for_a_qwen2_style_model():
    """The node-by-node ONNX decoder (opset 24 Attention over slots, fused norms) on a random model with q/k/v
    biases, grouped KV heads and another RoPE base: logits of a prompt, of a cached step and of a cached chunk
    match torch."""
    torch = pytest.importorskip("torch")
    import numpy as np
    import onnxruntime as ort

    from bastion.distill.llama import Llama, LlamaConfig
    from bastion.distill.lm_onnx import build_decoder
    from bastion.runtime.lm import filled_mask

    torch.manual_seed(1)
    c = LlamaConfig(
        dim=32,
        hidden_dim=48,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=64,
        max_seq_len=32,
        rope_theta=1e6,
        attention_bias=True,
    )
    model = Llama(c).eval()
    for prm in model.parameters():
        torch.nn.init.normal_(prm, std=0.3)
    graph = build_decoder(c, {k: v.detach().numpy() for k, v in model.state_dict().items()})
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("Attention") == c.n_layers and len(ops) <= 8 + 20 * c.n_layers  # no traced reshape soup
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = [1, 7, 33, 12, 50, 9, 21, 4]
    names = [f"past.{i}.{kv}" for i in range(c.n_layers) for kv in ("key", "value")]

    def run(tokens: list[int], start: int, cache: dict) -> tuple[np.ndarray, dict]:
        out = session.run(
            None,
            {
                "input_ids": np.asarray([tokens]),
                "attention_mask": filled_mask(len(ids), start + len(tokens)),
                "position_ids": np.arange(start, start + len(tokens))[None],
                **cache,
            },
        )
        return out[0], dict(zip(names, out[1:]))

    with torch.no_grad():
        full = model(torch.tensor([ids]), torch.arange(len(ids))[None], *model.empty_past())[0].numpy()
    empty = {n: np.zeros((1, len(ids), c.n_kv_heads * c.head_dim), np.float32) for n in names}
    prompt, cache = run(ids[:5], 0, empty)
    np.testing.assert_allclose(prompt, full[:, :5], atol=1e-4)
    step, cache_step = run(ids[5:6], 5, cache)
    np.testing.assert_allclose(step, full[:, 5:6], atol=1e-4)
    chunk, cache_all = run(ids[6:], 6, cache_step)
    np.testing.assert_allclose(chunk, full[:, 6:], atol=1e-4)
    with torch.no_grad():  # slot i of the cache holds position i's key (batch 0, kv heads side by side)
        _, *present = model(torch.tensor([ids]), torch.arange(len(ids))[None], *model.empty_past())
    ref_key = present[2][0].transpose(0, 1).reshape(len(ids), -1).numpy()  # layer 1 key [slots, n_kv·head_dim]
    np.testing.assert_allclose(cache_all["past.1.key"][0], ref_key, atol=1e-4)
    assert not cache_step["past.0.value"][0, 6:].any()  # slots after the written ones stay empty
