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
  timed per iteration.
- ``report``: the comparison of variants (Markdown, JSON, PNG).
- ``packing``: ``pack_sequences``, examples packed into full-length rows.
- ``progress``: the stderr progress bar.
- ``files``: atomic writes and the flushed metrics stream.

What a run writes, under ``output.dir`` (or ``--out``), per variant::

    <variant>/adapters/adapters.safetensors   mlx-lm adapter format
    <variant>/adapters/adapter_config.json
    <variant>/metrics.jsonl                   one record per iteration: iteration,
                                              loss, tokens, wall_s, tokens_per_s,
                                              peak_memory_bytes, learning_rate
                                              (val_loss where validation ran)
    <variant>/summary.json                    total time, median/p95 iteration,
                                              peak memory, losses (final_train_loss:
                                              the last iteration's; train_loss_last10:
                                              the mean of the last 10), and the
                                              attention implementation that ran
    <variant>/generations.json, .md           with output.generations: the answers
                                              before and after training
    compare.md, compare.json, compare.png     with two or more variants
"""

from .config import RecipeError, load_recipe

__all__ = ["RecipeError", "load_recipe"]
