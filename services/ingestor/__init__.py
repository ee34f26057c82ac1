"""Camera ingestor service: sources -> validation -> object storage -> ``crops`` topic."""

from services.ingestor.service import CropInput, Ingestor, IngestResult, make_crop_id
from services.ingestor.validate import CropRejected, ValidCrop, validate_crop, validate_metadata

__all__ = ["CropInput", "CropRejected", "IngestResult", "Ingestor", "ValidCrop", "make_crop_id",
           "validate_crop", "validate_metadata"]
