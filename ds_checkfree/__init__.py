"""ds-checkfree: DeepSpeed pipeline training that survives lost stages without checkpoints.

Importing the package is cheap; DeepSpeed is loaded only when ``initialize``, the parts or
the engine are first used. The pure planners (``config``, ``recovery.rules``,
``recovery.injection``, ``elastic.membership.roster``, ``elastic.heartbeat.liveness``) import
neither DeepSpeed nor a process group; ``pipe.schedule`` is pure too but builds on DeepSpeed's
instruction classes, so it imports DeepSpeed.

The public API: ``initialize`` (as ``deepspeed.initialize``), ``PipelineParts`` (your model:
head, blocks, tail), ``Manager`` (fault tolerance for your own loop), and the engine and module
subclasses.
"""

from ds_checkfree.pipe.ds_private import check_deepspeed_version as _check_deepspeed_version

__version__ = "0.3.3"

_check_deepspeed_version()  # warns outside the DeepSpeed versions the private members were tested on

__all__ = ["initialize", "PipelineParts", "Manager", "CheckFreePipelineEngine", "CheckFreePipelineModule",
           "__version__"]


def __getattr__(name):
    if name == "PipelineParts":
        from ds_checkfree.pipe.parts import PipelineParts
        return PipelineParts
    if name == "Manager":
        from ds_checkfree.manager import Manager
        return Manager
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
