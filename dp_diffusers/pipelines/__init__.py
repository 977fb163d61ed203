from .pipeline_dp_ldm import DPLDMPipeline, scheduler_class

__all__ = ["DPLDMPipeline", "scheduler_class"]
