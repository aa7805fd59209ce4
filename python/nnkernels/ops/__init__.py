"""The op layer: one module per op, ops/<op>.py, holding its kernel primitives (registered with
torch.library, so torch.compile traces them), its one torch.autograd.Function (the only place its
backward formula is written) and its argument rules; all built on _dispatch.py (eager calls go
straight to the extension, compiled ones through the registered ops). See CONTRIBUTING.md.
"""
