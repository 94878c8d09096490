"""Pipelines: versioned pipeline files and the decision flow they drive.

Public surface: ``PipelineRegistry`` (a folder of pipeline files, reloaded on
change, uploads validated before they replace anything), ``DecisionEngine``
(validate → features → scheduler → policy → escalation → audit) with its
``Services``, and ``PipelineError``.
"""

from .flow import DecisionEngine, Services
from .registry import PipelineRegistry
from .spec import Pipeline, PipelineError, load_pipeline, parse_pipeline

__all__ = ["DecisionEngine", "Pipeline", "PipelineError", "PipelineRegistry", "Services", "load_pipeline",
           "parse_pipeline"]
