"""Training: the one loop (``loop.py``), its state and schedule (``state.py``), checkpoints
(``checkpoint.py``), the distillation losses (``losses.py``), data parallel and FSDP
(``parallel.py``) and the CUDA-graph step (``graphs.py``). Methods say what a step is; this
package runs it."""
