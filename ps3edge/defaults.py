"""Every default of ps3edge in one place: opset, budgets, tolerances, file names.

Other modules import from here instead of repeating literals, so that a reader can see in one
screen what the toolchain assumes.
"""

# --- artifacts -------------------------------------------------------------------------------
MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 2      # 2: every stage has a batch axis B (geometry.max_batch)
DEFAULT_OPSET = 17
MIN_OPSET = 17
# protobuf cannot hold more than 2 GiB; above this a stage's weights go to an external data file.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
PRIOR_PROMPT_FILE = "prior_prompt.npy"

# --- PS3 geometry (the official PS3VisionModel) --------------------------------------------------
PATCH_SIZE = 14
LOWRES_SIZE = 378                 # scale 0; 27 x 27 patches
SELECTOR_CONV_INPUT_SIZE = 1512   # the ShallowConvNet always sees the image at 1512 x 1512
PREPROCESS_THREADS = 4            # threads decoding and resizing the images of a batch
DEFAULT_MAX_BATCH = 8             # images per pass an export bounds by default (export --max-batch)
MAX_TOKENS_PER_HIGHRES_CALL = 2560  # one look-close step; the highres N axis never exceeds this
SMOOTH_SELECTION_GRID = 6         # SMOOTH_SELECTION_PROB averages the map over a 6 x 6 grid

# --- look-close defaults (the five variables of the VILA-HD README) ----------------------------
DEFAULT_NUM_LOOK_CLOSE = 6
ENV_NUM_LOOK_CLOSE = "NUM_LOOK_CLOSE"
ENV_NUM_TOKEN_LOOK_CLOSE = "NUM_TOKEN_LOOK_CLOSE"
ENV_SELECT_NUM_EACH_SCALE = "SELECT_NUM_EACH_SCALE"
ENV_LOOK_CLOSE_MODE = "LOOK_CLOSE_MODE"
ENV_SMOOTH_SELECTION_PROB = "SMOOTH_SELECTION_PROB"
LOOK_CLOSE_MODES = ("after_prompt", "after_image")

# --- returned layers ------------------------------------------------------------------------
# VILA-HD feeds layer -2 to its projector; -1 is the official last_hidden_state.
DEFAULT_RETURNED_LAYERS = (-2, -1)
DEFAULT_RUN_LAYER = -2

# --- image preprocessing --------------------------------------------------------------------
# The published PS3 snapshots ship preprocessor_config.json with mean = std = 0.5; the official
# processor falls back to CLIP's statistics when a checkpoint has none.
SNAPSHOT_MEAN = (0.5, 0.5, 0.5)
SNAPSHOT_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_PIXELS = 16384 * 16384

# --- parity tolerances per precision ----------------------------------------------------------
# max |a - b| over all features, and the minimum cosine similarity of any token pair.
TOLERANCES = {
    "fp32": {"max_abs": 1e-3, "min_cosine": 0.99999},
    "fp16": {"max_abs": 5e-2, "min_cosine": 0.999},
    "bf16": {"max_abs": 2e-1, "min_cosine": 0.99},
    "int8": {"max_abs": 1.0, "min_cosine": 0.98},
}
PROB_MAX_ABS_FP32 = 1e-5
# An image of a batch against the same image run alone (fp32, any CPU backend).
BATCH_MAX_ABS_FP32 = 1e-5
# Reduced-precision stages against the FP32 stages (ps3edge calibrate / parity --precision):
# the least IoU of the selected patches, per scale and image (1.0 = identical selection).
SELECTION_MIN_IOU = {"fp16": 1.0, "bf16": 1.0, "int8": 0.9}
# ... except that for these a selection that differs only by near ties passes: every swapped patch
# had an FP32 probability closer to the cut than twice the measured probability error (a 27 x 27
# map whose 128th and 129th values differ by 3e-5 flips under any reduced precision).
SELECTION_NEAR_TIES_ACCEPTED = ("fp16", "bf16")

# --- calibration (ps3edge calibrate: calibration/) ----------------------------------------------
CALIBRATION_PRECISIONS = ("fp16", "int8")
CALIBRATION_METHODS = ("max", "entropy", "percentile")
DEFAULT_CALIBRATION_METHOD = "entropy"       # the method NVIDIA Model Optimizer defaults to, too
DEFAULT_CALIBRATION_SAMPLES = 32          # calibration images taken from --images (sorted by name)
DEFAULT_HOLDOUT_SAMPLES = 8               # held-out images the accuracy report runs on
CALIBRATION_PERCENTILE = 99.99            # of |x|, for --method percentile
CALIBRATION_HIGHRES_STEPS = 2             # look-close steps per image that calibrate highres
DEFAULT_EXCLUDE_BLOCKS = ""               # transformer blocks kept float in INT8: e.g. "first,last"
PRECISION_FILE_SUFFIX = {"fp16": ".fp16.onnx", "int8": ".int8.onnx"}
ACCURACY_REPORT = "accuracy.{precision}.json"

# --- seeded random weights ---------------------------------------------------------------------
DEFAULT_SEED = 0

# --- TensorRT-compatibility lint (exporter/lint/, ps3edge inspect --lint) ---------------------
# The TensorRT whose ONNX parser the lint checks against: 10.3 is JetPack 6.x's (Jetson Orin).
DEFAULT_LINT_TRT_VERSION = "10.3"

# --- TensorRT engines (ps3edge build, runtime/runners/tensorrt.py) --------------------------
ENGINE_PRECISIONS = ("fp32", "fp16", "int8", "best")
DEFAULT_ENGINE_PRECISION = "fp32"
ENGINE_ROUTES = ("onnx", "torch-tensorrt")          # --via: parse the ONNX, or Torch-TensorRT dynamo
DEFAULT_WORKSPACE_GB = 4.0                          # builder scratch memory limit (GiB)
DEFAULT_BUILDER_OPTIMIZATION_LEVEL = 3              # TensorRT's own default; 0..5
ENV_ENGINE_CACHE = "PS3EDGE_ENGINE_CACHE"           # where built engines are kept for reuse
DEFAULT_ENGINE_CACHE_DIR = "~/.cache/ps3edge/engines"

# --- serving (ps3edge serve, ps3edge triton-repo) ----------------------------------------------
SERVE_MAX_QUEUE_DELAY_US = 2000   # how long a request may wait for others to batch with
SERVE_MAX_QUEUE_SIZE = 64         # requests a model queues; more are rejected at once
SERVE_QUEUE_TIMEOUT_MS = 60000    # a request still queued after this is rejected
