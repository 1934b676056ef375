"""Reduced precision for the exported stages: the FP16 policy (precision.py), calibration data
(data.py; the stage inputs captured from the FP32 pipeline, stage_inputs.py), INT8 by explicit
Q/DQ (int8.py), the accuracy report (report.py) and `ps3edge calibrate` itself (calibrate.py),
which writes the converted stages next to the FP32 ones and registers them in the manifest's
"precisions" section. precision.py, data.py and int8.py sit below the runtime; stage_inputs.py,
report.py and calibrate.py run it.
"""
