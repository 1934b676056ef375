"""TensorRT engines: profiles (profiles.py), the builder (builder.py), its caches (cache.py), the
machine facts (platform.py) and the manifest's `engines` section (metadata.py).

Nothing here imports TensorRT at import time; `ps3edge build` and the `tensorrt` backend do,
through `platform.import_tensorrt`, which fails with one line where TensorRT is missing.
"""
