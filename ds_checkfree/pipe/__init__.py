"""The pipeline: DeepSpeed ``PipelineModule`` / ``PipelineEngine`` subclasses, the
(out-of-order) schedules as data with their checker, what a stage holds, where
tensors travel, and the registry of DeepSpeed's private members the subclasses rely on."""
