"""LoRA fine-tuning recipes with mlx-flash attention: ``python -m mlx_flash.finetune recipe.yaml``.

Modules, one idea each:

- ``config``: recipes (YAML with mlx-lm's LoRA keys plus ``attention`` and
  ``output``), ``--set`` overrides, validation, path resolution.
- ``builtin``: the offline built-in model (``model: builtin:tiny-llama``).
- ``gguf``: GGUF files as mlx-lm models (``model: gguf:PATH``,
  ``model: smollm2-135m``), quantized tensors kept quantized; with
  ``gguf_file`` (the file's header: tensor types) and ``gguf_tokenizer``
  (the tokenizer and chat template from the metadata).
- ``generations``: greedy answers to held-out prompts before and after
  training (``output.generations``).
- ``train``: one run with one attention variant on mlx-lm's LoRA pieces,
  timed per iteration, as named steps over one ``Run``.
- ``interleave``: the variants of a comparison trained in turns, so load on
  the machine falls on each alike.
- ``data``: the data files, read and checked line by line.
- ``batches``: mlx-lm's batching, in a seeded order a resumed run continues.
- ``checkpoint``: crash-safe checkpoints (written whole or not at all).
- ``resume``: whether a checkpoint may continue under a recipe; restoring it.
- ``interrupts``: Ctrl-C and SIGTERM, deferred to the end of an iteration.
- ``hub``: models from the Hugging Face hub, with timeouts and the cache.
- ``report``: the comparison of variants (Markdown, JSON, PNG), each ratio
  the median and range over windows.
- ``packing``: ``pack_sequences``, examples packed into full-length rows.
- ``progress``: the stderr progress bar.
- ``files``: atomic writes and the flushed metrics stream.

What a run writes, under ``output.dir`` (or ``--out``), per variant::

    <variant>/adapters/adapters.safetensors   mlx-lm adapter format (or under
                                              adapter_path, when a recipe sets it)
    <variant>/adapters/adapter_config.json
    <variant>/checkpoints/                    the latest checkpoint (checkpoint.py)
    <variant>/metrics.jsonl                   one record per iteration: iteration,
                                              loss, tokens, wall_s, tokens_per_s,
                                              peak_memory_bytes, learning_rate
                                              (val_loss where validation ran)
    <variant>/summary.json                    total time, median/p95 iteration,
                                              peak memory, losses (final_train_loss:
                                              the last iteration's; train_loss_last10:
                                              the mean of the last 10), and the
                                              attention implementation that ran,
                                              validation (or why it was skipped),
                                              whether and from where it resumed
    <variant>/generations.json, .md           with output.generations: the answers
                                              before and after training
    compare.md, compare.json, compare.png     with two or more variants
"""

from .config import RecipeError, load_recipe

__all__ = ["RecipeError", "load_recipe"]
