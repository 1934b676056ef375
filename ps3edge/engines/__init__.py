"""TensorRT engines: the build plan (plan.py), its two routes (onnx_route.py through Polygraphy,
torch_route.py through Torch-TensorRT), the `build` entry point and engine loop (builder.py), its
caches (cache.py), the machine facts (platform.py) and VILA-HD's projector / LLM engines
(llm_engine.py). Profiles and the manifest's `engines` section live in ps3edge/artifact.

Nothing here imports TensorRT or Polygraphy at import time; `ps3edge build` and the `tensorrt`
backend do, through `platform.import_tensorrt` / `import_polygraphy`, which fail with one line
where they are missing.
"""
