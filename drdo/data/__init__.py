"""Preference data: read a source (:mod:`.sources`), check, render and tokenize its rows
(:mod:`.preferences`), and pad them into batches (:mod:`.collate`)."""
from drdo.data.collate import PreferenceCollator, SFTCollator, shift_labels
from drdo.data.preferences import (
    ORACLE_FIELDS,
    PAIR_FIELDS,
    REF_FIELDS,
    EmptyDatasetError,
    InvalidExampleError,
    MissingFieldError,
    PreferenceDataset,
    encode_prompt,
    load_preference_dataset,
    load_prompts,
    render_prompt,
    render_response,
)
from drdo.data.sources import DataSourceError, load_rows
from drdo.losses import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX", "PAIR_FIELDS", "ORACLE_FIELDS", "REF_FIELDS",
    "InvalidExampleError", "MissingFieldError", "EmptyDatasetError", "DataSourceError",
    "load_rows", "load_preference_dataset", "load_prompts", "PreferenceDataset",
    "encode_prompt", "render_prompt", "render_response",
    "PreferenceCollator", "SFTCollator", "shift_labels",
]
