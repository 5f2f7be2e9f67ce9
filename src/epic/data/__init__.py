"""Data: LLaVA-format conversations, templates, image preprocessing, and the built-in synthetic set."""

from epic.data.dataset import Example, LlavaDataset, collate, image_token_count
from epic.data.encoding import Encoded, TooLong, encode_conversation, encode_prompt
from epic.data.records import DataError, Problem, Record, load_records, read_records
from epic.data.sampler import ModalityLengthGroupedSampler
from epic.data.templates import BUILTIN_TEMPLATES, Template, Turn, get_template

__all__ = [
    "BUILTIN_TEMPLATES",
    "DataError",
    "Encoded",
    "Example",
    "LlavaDataset",
    "ModalityLengthGroupedSampler",
    "Problem",
    "Record",
    "Template",
    "TooLong",
    "Turn",
    "collate",
    "encode_conversation",
    "encode_prompt",
    "get_template",
    "image_token_count",
    "load_records",
    "read_records",
]
