"""Pipelines: the components put together into a product (reference portrait + driving poses -> video)."""

from .pose2video import Pose2VideoPipeline, Pose2VideoPipelineOutput, save_video

__all__ = ["Pose2VideoPipeline", "Pose2VideoPipelineOutput", "save_video"]
