"""`ps3edge extract`: PS3 features for whole image datasets and video logs, written as shards.

sources.py lists and decodes the inputs (image folders, path lists, video frames), shards.py
writes and reads the shards, record.py owns the run record, index and errors files, job.py
runs a job (lock, resume, the engine, the final files), local.py is the default engine
(threaded decode feeding batched `Pipeline.run_batch`), ray_engine.py the Ray Data one, and
work.py the per-chunk work both engines share.
"""
