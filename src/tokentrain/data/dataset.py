"""From settings to a dataset: discover files, open (or build) the document table, pack."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tokentrain.data import format as fmt
from tokentrain.data.index import open_index
from tokentrain.data.packing import PackedDataset, UnpackedDataset

log = logging.getLogger(__name__)


@dataclass
class DataSettings:
    folder: str
    max_length: int = 2048
    pack_to_max_length: bool = True
    shuffle: bool = True
    seed: int = 0
    min_length: int = 1
    file_type: str = fmt.DEFAULT_FILE_TYPE
    data_order_path: str | None = None
    drop_last_pack: bool = True
    zero_is_target: bool = False
    cache_dir: str | None = None


def build_dataset(s: DataSettings) -> PackedDataset | UnpackedDataset:
    files = fmt.discover_files(s.folder, s.file_type, s.data_order_path)
    index = open_index(files, s.min_length, s.shuffle, s.seed, s.cache_dir)
    st = index.stats
    log.info(
        "dataset %s: %d files (%d empty), %d documents kept of %d (%d empty, %d shorter than %d), %d tokens",
        s.folder,
        st.files,
        st.empty_files,
        len(index),
        st.documents,
        st.empty_documents,
        st.short_documents,
        s.min_length,
        st.tokens,
    )
    if s.pack_to_max_length:
        return PackedDataset(index, s.max_length, s.zero_is_target, s.drop_last_pack)
    return UnpackedDataset(index, s.max_length, s.zero_is_target)
