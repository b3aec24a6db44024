"""Pipelines: each one file, its denoising loop written out."""

from . import audio2video
from .hallo import HalloPipeline, HalloPipelineOutput
from .pose2video import NonFiniteError, Pose2VideoPipeline, Pose2VideoPipelineOutput

__all__ = [
    "HalloPipeline",
    "HalloPipelineOutput",
    "NonFiniteError",
    "Pose2VideoPipeline",
    "Pose2VideoPipelineOutput",
    "audio2video",
]
