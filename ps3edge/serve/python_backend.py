"""The `TritonPythonModel` of the repository `ps3edge triton-repo` writes: Triton's own Python backend
(a stock tritonserver, e.g. the NGC container with ps3edge installed) running the same `ps3` model
as `ps3edge serve`. Unlike PyTriton, the Python backend can fail one request of a batch on its own,
so a request that cannot be answered gets a real error response (its `error` output stays for the
clients of `serve`: empty on every answered request).

The model's settings come from its config.pbtxt `parameters`; the artifact lies in the version
directory beside model.py (`<model>/1/artifact`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .tensors import ERROR

ARTIFACT_DIR = "artifact"
LOOK_CLOSE_KEYS = ("num_look_close", "num_token_look_close", "select_num_each_scale", "mode", "smooth_selection_prob")


def model_parameters(model_config: dict) -> dict:
    """config.pbtxt's `parameters` as plain strings (empty ones dropped)."""
    raw = model_config.get("parameters", {})
    return {key: value["string_value"] for key, value in raw.items() if value.get("string_value", "") != ""}


class TritonPythonModel:
    """Triton calls initialize once per instance, execute per batch, finalize at unload."""

    def initialize(self, args):
        from ..exporter.ort_session import keep_cpu_arena
        from ..runtime.lookclose import Pipeline
        from ..runtime.planning import parse_bool
        from .ps3_model import Ps3Model
        from .settings import LookCloseDefaults

        config = json.loads(args["model_config"])
        params = model_parameters(config)
        artifact = Path(args["model_repository"]) / str(args["model_version"]) / ARTIFACT_DIR
        look_close = {key: params.get(key) for key in LOOK_CLOSE_KEYS}
        if look_close["smooth_selection_prob"] is not None:
            look_close["smooth_selection_prob"] = parse_bool("smooth_selection_prob", look_close["smooth_selection_prob"])
        keep_cpu_arena(False)        # as `ps3edge serve`: memory follows the batch in flight (server.load_models)
        pipeline = Pipeline(artifact, params.get("backend", "onnxruntime"), precision=params.get("precision", "fp32"))
        self.model = Ps3Model(pipeline, LookCloseDefaults(**look_close), int(params.get("layer", "-2")))
        self.names = [d.name for d in self.model.inputs()]

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        from .ps3_model import Call

        calls = []
        for request in requests:
            data = {}
            for name in self.names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    data[name] = tensor.as_numpy()
            calls.append(Call(data, json.loads(request.parameters() or "{}")))
        responses = []
        for answer in self.model(calls):
            message = answer[ERROR][0, 0].decode()
            if message:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, value) for name, value in answer.items()]))
        return responses

    def finalize(self):
        self.model.pipeline.close()
