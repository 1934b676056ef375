"""Reduced precision for the exported stages: the FP16 policy (precision.py), calibration data
(data.py), INT8 by explicit Q/DQ (int8.py), the accuracy report (report.py) and `ps3edge
calibrate` itself (calibrate.py), which writes the converted stages next to the FP32 ones and
registers them in the manifest's "precisions" section.
"""
