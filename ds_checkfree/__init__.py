"""ds-checkfree: DeepSpeed pipeline training that survives lost stages without checkpoints.

Importing the package is cheap; DeepSpeed is loaded only when ``initialize`` or the engine
is first used. The pure planners (``config``, ``modes``, ``layout``, ``failures``,
``recovery``, ``heartbeat.liveness``) import neither DeepSpeed nor a process group;
``schedule`` is pure too but builds on DeepSpeed's instruction classes, so it imports
DeepSpeed.
"""

from ds_checkfree.pipe.ds_private import check_deepspeed_version as _check_deepspeed_version

__version__ = "0.1.0"

_check_deepspeed_version()  # warns outside the DeepSpeed versions the private members were tested on

__all__ = ["initialize", "CheckFreePipelineEngine", "CheckFreePipelineModule", "__version__"]


def __getattr__(name):
    if name == "initialize":
        from ds_checkfree.initialize import initialize
        return initialize
    if name == "CheckFreePipelineEngine":
        from ds_checkfree.pipe.engine import CheckFreePipelineEngine
        return CheckFreePipelineEngine
    if name == "CheckFreePipelineModule":
        from ds_checkfree.pipe.module import CheckFreePipelineModule
        return CheckFreePipelineModule
    raise AttributeError(name)
