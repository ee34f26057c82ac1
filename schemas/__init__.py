"""Contracts: every event and API payload, versioned (pydantic v2).

JSON Schema exports live in ``jsonschema/`` beside this file; ``python -m schemas``
rewrites them and ``tests/test_schemas.py`` fails when they drift from the models.
"""

from schemas.api import (
    API_MODELS,
    ErrorResponse,
    QueryFilters,
    QueryKind,
    QueryRequest,
    QueryResponse,
    ResultItem,
    Turn,
)
from schemas.console import CONSOLE_MODELS, ROLES, Role
from schemas.events import (
    EVENT_MODELS,
    BBox,
    CheckpointEvent,
    CheckpointFile,
    CropEvent,
    DeadLetterEvent,
    DeploymentEvent,
    ErasedEvent,
    EventError,
    ForcedRollout,
    IndexedEvent,
    IndexLogEvent,
    SourceOffset,
    parse_index_log,
)
from schemas.topics import ALL_TOPICS, CHECKPOINTS, CROPS, DEADLETTER, DEPLOYMENTS, INDEXED, Topic

__all__ = [
    "ALL_TOPICS",
    "API_MODELS",
    "CHECKPOINTS",
    "CONSOLE_MODELS",
    "CROPS",
    "DEADLETTER",
    "DEPLOYMENTS",
    "EVENT_MODELS",
    "INDEXED",
    "ROLES",
    "BBox",
    "CheckpointEvent",
    "CheckpointFile",
    "CropEvent",
    "DeadLetterEvent",
    "DeploymentEvent",
    "ErasedEvent",
    "ErrorResponse",
    "EventError",
    "ForcedRollout",
    "IndexLogEvent",
    "IndexedEvent",
    "QueryFilters",
    "QueryKind",
    "QueryRequest",
    "QueryResponse",
    "ResultItem",
    "Role",
    "SourceOffset",
    "Topic",
    "Turn",
    "parse_index_log",
]
