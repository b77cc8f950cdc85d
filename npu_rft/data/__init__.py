"""Training data: the row format (schema), converters (convert), templates and chat prompts."""
from npu_rft.data.schema import DataError, Example, normalize, read_examples, write_jsonl_atomic

__all__ = ["DataError", "Example", "normalize", "read_examples", "write_jsonl_atomic"]
