"""Every default of ps3edge in one place: opset, budgets, tolerances, file names.

Other modules import from here instead of repeating literals, so that a reader can see in one
screen what the toolchain assumes.
"""

# --- artifacts -------------------------------------------------------------------------------
MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 3      # 2: every stage has a batch axis B (geometry.max_batch); 3: lowres has no highres_patches output
DEFAULT_OPSET = 17
MIN_OPSET = 17
# protobuf cannot hold more than 2 GiB; above this a stage's weights go to an external data file.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
# Weights that lowres and highres both hold (the trunk) are written once, to this file, when they
# come to at least SHARED_WEIGHTS_MIN_BYTES (exporter/share.py); smaller models stay self-contained.
SHARED_WEIGHTS_FILE = "trunk.onnx.data"
SHARED_WEIGHTS_MIN_BYTES = 16 << 20
EXTERNAL_DATA_ALIGNMENT = 4096   # offsets of external tensors: page-aligned, as onnx's own save, for mmap
# onnxruntime's CPU attention writes a call's whole scores (rows x heads x N x (729 + N) floats, 539 MB
# a row for the real models): its highres calls take no more rows than fit in this
ORT_CPU_ATTENTION_SCORES_BYTES = 1 << 30
# the staged torch path on the CPU: a highres call takes no more rows than keep each block's MLP
# activation (rows x N x mlp_dim floats; 42 MiB a row for the real models) within this
TORCH_CPU_HIGHRES_MLP_BYTES = 64 << 20
PRIOR_PROMPT_FILE = "prior_prompt.npy"

# --- PS3 geometry (the official PS3VisionModel) --------------------------------------------------
PATCH_SIZE = 14
LOWRES_SIZE = 378                 # scale 0; 27 x 27 patches
SELECTOR_CONV_INPUT_SIZE = 1512   # the ShallowConvNet always sees the image at 1512 x 1512
PREPROCESS_THREADS = 4            # threads decoding and resizing the images of a batch
DEFAULT_MAX_BATCH = 8             # images per pass an export bounds by default (export --max-batch)
MAX_TOKENS_PER_HIGHRES_CALL = 2560  # one look-close step; the highres N axis never exceeds this
PATCH_WINDOW_CHUNK = 512          # high-res patches cut from the pixels at a time (model/patches.py): 19 MiB of windows
POSITION_ROWS_CHANNELS = 192      # the torch CPU path resizes pos_embed this many channels at a time (model/ps3.py)
SMOOTH_SELECTION_GRID = 6         # SMOOTH_SELECTION_PROB averages the map over a 6 x 6 grid

# --- look-close defaults (the five variables of the VILA-HD README) ----------------------------
DEFAULT_NUM_LOOK_CLOSE = 6
ENV_NUM_LOOK_CLOSE = "NUM_LOOK_CLOSE"
ENV_NUM_TOKEN_LOOK_CLOSE = "NUM_TOKEN_LOOK_CLOSE"
ENV_SELECT_NUM_EACH_SCALE = "SELECT_NUM_EACH_SCALE"
ENV_LOOK_CLOSE_MODE = "LOOK_CLOSE_MODE"
ENV_SMOOTH_SELECTION_PROB = "SMOOTH_SELECTION_PROB"
LOOK_CLOSE_MODES = ("after_prompt", "after_image")
# How a patch count is split over the high-res scales (per-step budget, NUM_TOKEN_LOOK_CLOSE):
# upstream PS3's rule, every scale floored but the last, which takes the rest (N asked, N given).
# ps3-torch 0.1.3 floors every scale ("floor-each-scale"); parity adopts whichever is installed.
DEFAULT_BUDGET_RULE = "remainder-to-last"

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

# --- weight-only INT4 of a VILA-HD artifact's LLM (calibrate VILA_ARTIFACT --precision int4) ----
LLM_PRECISIONS = ("fp32", "int4")         # vila.json's "precisions" holds the ones beyond fp32
INT4_FILE = "llm.int4.onnx"
INT4_EMBED_FILE = "embed_tokens.int4.npz"   # the host-side token embedding, same block arithmetic
# weights per scale along K. 32 over 128: on vila-hd-tiny the least per-step logit cosine against
# FP32 is 0.965 at 32 and 0.938 at 128 (asymmetric; symmetric 0.946 / 0.943), for about 0.64
# instead of 0.54 bytes per weight on a large LLM (fp32 scales); docs/precision.md#int4-llm
INT4_BLOCK_SIZE = 32
INT4_SYMMETRIC = False                    # a zero point per block: better than symmetric at both sizes
INT4_ACCURACY_LEVEL = 0                   # MatMulNBits computes in fp32 from the dequantized weights
INT4_AWQ_METHOD = "awq_clip"              # Model Optimizer's INT4 default (the TensorRT route)
# the report's held-out prompts (chat-templated, text only) and the greedy steps taken after each
INT4_REPORT_PROMPTS = ("What is in the picture?", "Describe the colors you see.",
                       "How many people are there, and what are they doing?", "Read the sign on the left.")
INT4_REPORT_STEPS = 16
# Model Optimizer's AWQ calibration prompts (apart from the report's, which stay held out)
INT4_CALIBRATION_PROMPTS = ("Describe this image in detail.", "What color is the car?",
                            "Is there any text in the image?", "Where was this photo taken?")
# pass / fail of the report: the least per-step logit cosine (teacher-forced) of INT4 vs FP32.
# On vila-hd-tiny: round-to-nearest at block 32 gives 0.965 (passes), at block 128 0.938 (fails),
# and a graph whose zero points are lost 0.17: the bound tells a sound INT4 LLM from a coarse or
# broken one (a trained 8B LLM is not measured here)
INT4_MIN_LOGIT_COSINE = 0.95

# --- seeded random weights ---------------------------------------------------------------------
DEFAULT_SEED = 0
# the largest seed anything takes (weights, `chat --seed`, a request's seed): torch.Generator.manual_seed
# and numpy's generator both take a signed 64-bit int
SEED_MAX = 2 ** 63 - 1

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

# --- the OpenAI-compatible server (ps3edge serve-openai, openai_api/) ------------------------------
OPENAI_PORT = 8000
OPENAI_BATCH_DELAY_MS = 20        # how long the first request of a vision batch waits for others
OPENAI_MAX_QUEUE = 64             # requests admitted at once (waiting or being answered); more get 429
OPENAI_MAX_IMAGE_BYTES = 20 << 20  # an encoded image, decoded from its data: URL or fetched; more get 413
OPENAI_BODY_MARGIN_BYTES = 1 << 20  # a request body: the image's base64 and this much for the rest
OPENAI_EXIT_TIMEOUT_S = 30        # on SIGTERM: how long the requests in flight may take to finish
OPENAI_REMOTE_IMAGE_TIMEOUT_S = 10.0  # --allow-remote-images: the fetch of one http(s) image
OPENAI_MAX_TOKENS = 128           # a request without max_tokens: chat's --max-new-tokens
OPENAI_TEMPERATURE = 1.0          # a request without temperature: the OpenAI API's default
OPENAI_MAX_STOP_STRINGS = 4       # as the OpenAI API
ENV_OPENAI_API_KEY = "PS3EDGE_API_KEY"   # --api-key without it on the command line, where `ps` shows it

# --- live camera streams (ps3edge stream, ps3edge.stream) ---------------------------------------
STREAM_FOLDER_FPS = 10.0          # an image folder played as a camera, without --fps
STREAM_SHARD_SIZE = 64            # frames per rolling shard of --out
STREAM_OPEN_TIMEOUT_S = 5.0       # a network source that gives no stream in this long failed to open
STREAM_READ_TIMEOUT_S = 2.0       # ... and, once open, one silent this long has failed (then reconnects)
STREAM_RECONNECT_FIRST_S = 0.5    # the first wait before reopening a source that ended or failed
STREAM_RECONNECT_MAX_S = 5.0      # the waits double up to this cap
STREAM_LATENCY_WINDOW = 512       # latencies per source the p50 / p99 are taken over
STREAM_RATE_WINDOW_S = 5.0        # input and processed fps: over about the last this many seconds
STREAM_TABLE_REFRESH_S = 1.0      # the live table's refresh period
STREAM_RERUN_MAX_SIDE = 640       # --rerun: frames are logged downscaled to at most this many pixels a side
STREAM_RERUN_JPEG_QUALITY = 85    # ... and JPEG-compressed at this quality (a raw 640 x 480 frame is 900 KB)
STREAM_RERUN_CONNECT_TIMEOUT_S = 2.0   # --rerun-connect: nothing accepting a connection in this long is an error
STREAM_RERUN_CLOSE_TIMEOUT_S = 10.0    # on stop, how long the logged data may take to reach the file and viewer

# --- stream reuse and deadlines (ps3edge stream --reuse / --deadline; runtime/reuse.py, streaming/deadline.py)
STREAM_REUSE_THRESHOLD = 0.0      # levels (0-255): a frame or patch whose pixels moved no more is unchanged
STREAM_REFRESH_FRAMES = 10        # --reuse: at least one frame in this many is computed whole
STREAM_DEADLINE_FLOOR_STEPS = 1   # the fewest look-close steps under --deadline (the pipeline runs no 0-step pass)
STREAM_DEADLINE_MARGIN = 0.85     # a step's predicted time must fit in this share of its time budget
STREAM_COST_WEIGHT = 0.3          # the running cost estimates: the weight of the newest step's times

# --- VILA-HD questions on a stream (ps3edge stream --ask / --alert; streaming/ask.py) -----------
STREAM_ASK_EVERY_S = 2.0          # --every: a round of answers this often, from the first processed frame
STREAM_ASK_EVERY_MAX_S = 86400.0  # the longest --every (a day): longer waits overflow the threads' timeouts
STREAM_ASK_MAX_NEW_TOKENS = 32    # --ask answers: the most tokens generated (greedy)
STREAM_ALERT_MAX_NEW_TOKENS = 4   # --alert answers: only the first word counts (yes / no)
STREAM_ASK_STOP_WAIT_S = 30.0     # on a stop, how long to wait for the answer thread's current stage call
