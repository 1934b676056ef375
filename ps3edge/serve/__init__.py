"""`ps3edge serve`: PS3 (and VILA-HD) on NVIDIA Triton Inference Server through PyTriton, and the
model repository of `ps3edge triton-repo` for a stock tritonserver.

settings.py: the server's options and a request's look-close parameters; ps3_model.py: the `ps3`
model (batched look-close); vila_model.py: `vila-hd` and its streaming twin; server.py: start,
warm up, serve, drain; lockdown.py: Triton's administrative endpoints locked without a
token on its command line; repo.py: the stand-alone model repository.
"""
