"""Camera ingestor service: sources -> validation -> object storage -> ``crops`` topic."""

from .service import CropInput, Ingestor, IngestResult, make_crop_id
from .validate import CropRejected, ValidCrop, validate_crop, validate_metadata

__all__ = ["CropInput", "CropRejected", "IngestResult", "Ingestor", "ValidCrop", "make_crop_id",
           "validate_crop", "validate_metadata"]
