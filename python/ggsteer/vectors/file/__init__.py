"""Control-vector GGUF files: the format (format.py), the metadata schema (schema.py), writing,
reading, a bounds-checked header scan that guards gguf's reader (scan.py), and `describe`."""

from ggsteer.vectors.file.describe import describe_vector_file
from ggsteer.vectors.file.format import FORMAT_VERSION, VectorFile, VectorFileError, VectorFileWarning
from ggsteer.vectors.file.read import read_vector_file
from ggsteer.vectors.file.schema import METADATA_KEYS, PER_LAYER_KEYS, PER_LAYER_VECTOR_KEYS, MetadataSpec
from ggsteer.vectors.file.write import write_vector_file

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEYS",
    "MetadataSpec",
    "PER_LAYER_KEYS",
    "PER_LAYER_VECTOR_KEYS",
    "VectorFile",
    "VectorFileError",
    "VectorFileWarning",
    "describe_vector_file",
    "read_vector_file",
    "write_vector_file",
]
