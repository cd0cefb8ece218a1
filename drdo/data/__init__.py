"""Preference data: read a source (:mod:`.sources`), check its rows (:mod:`.row_checks`), render and
tokenize them (:mod:`.preferences`), and pad them into batches (:mod:`.collate`)."""
from drdo.data.collate import PreferenceCollator, SFTCollator, shift_labels
from drdo.data.preferences import (
    PreferenceDataset,
    encode_prompt,
    load_preference_dataset,
    load_prompts,
    render_prompt,
    render_response,
)
from drdo.data.row_checks import (
    ORACLE_FIELDS,
    PAIR_FIELDS,
    REF_FIELDS,
    EmptyDatasetError,
    InvalidExampleError,
    MissingFieldError,
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
