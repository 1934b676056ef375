"""The VILA-HD language side: tokenizer, Qwen2 decoder (transformers and our exportable one),
LLM engines with prefill / decode on `inputs_embeds`, generation, checkpoints and the pipeline.

    image --PS3 look-close--> features --projector--> image embeddings
    chat prompt with <image> --embed + splice--> inputs_embeds --LLM engine--> tokens

Everything here imports transformers lazily where it needs it (the `torch` engine, tokenizers,
checkpoint loading), so the PS3-only toolchain keeps working without it.
"""
