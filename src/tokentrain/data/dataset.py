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
    write: bool = True  # False (a plan): no meta, index cache or lock is written


def build_dataset(s: DataSettings) -> PackedDataset | UnpackedDataset:
    files = fmt.discover_files(s.folder, s.file_type, s.data_order_path)
    index = open_index(files, s.min_length, s.shuffle, s.seed, s.cache_dir, write=s.write)
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


# --------------------------------------------------------------------------- from a training config


def settings_for(cfg, folder: str, write: bool = True) -> DataSettings:
    """The DataSettings a training config implies for one folder (train, validation or one source)."""
    return DataSettings(
        folder=folder,
        max_length=cfg.max_length,
        pack_to_max_length=cfg.pack_to_max_length,
        shuffle=cfg.shuffle_before_pack,
        seed=cfg.seed,
        min_length=cfg.min_length,
        file_type=cfg.file_type,
        data_order_path=cfg.data_order_path,
        zero_is_target=cfg.zero_is_target,
        write=write,
    )


def build_mixture(cfg, write: bool = True):
    """The `datasets = [...]` of a config as one MixtureDataset (each source packed on its own)."""
    from tokentrain.data.mixture import MixtureDataset, parse_sources

    sources = parse_sources(cfg.datasets)
    parts = [build_dataset(settings_for(cfg, s.folder, write)) for s in sources]
    return MixtureDataset(parts, [s.name for s in sources], [s.weight for s in sources], cfg.seed)


def build_named(settings: DataSettings, key: str):
    """`build_dataset`, its errors naming the config key `key` (data.checks.naming_errors)."""
    from tokentrain.data.checks import naming_errors

    with naming_errors(settings, key):
        return build_dataset(settings)


def build_train_data(cfg, rank: int = 0, world_size: int = 1, write: bool = True):
    """(training dataset, its sampler) for a config: one `dataset_folder` (shuffled per epoch)
    or a `datasets` mixture (its own seeded order, read as a stream). `write=False` (a plan):
    nothing is written (no meta, index cache or lock)."""
    from tokentrain.data.sampler import ResumableSampler, StreamSampler

    # Ignoring a change of the data or its settings (resume_ignore) means going on with another stream.
    relaxed = bool(set(cfg.resume_ignore) - {"global_batch", "val_dataset"})
    if not getattr(cfg, "datasets", None):
        ds = build_named(settings_for(cfg, cfg.dataset_folder, write), "dataset_folder")
        return ds, ResumableSampler(len(ds), rank, world_size, seed=cfg.seed, shuffle=True, relaxed=relaxed)
    mix = build_mixture(cfg, write)
    fingerprint = mixture_fingerprint(mix)
    return mix, StreamSampler(len(mix), rank, world_size, seed=cfg.seed, fingerprint=fingerprint, relaxed=relaxed)


def mixture_fingerprint(mix) -> str:
    """What a checkpoint's position in the stream means: the sources, their sizes and shares."""
    return ", ".join(f"{n}:{w:.4f}:{s}" for n, w, s in zip(mix.names, mix.weights, mix.sizes.tolist()))


def planned_counts(mix, total_steps: int, steps_per_epoch: int, global_batch: int):
    """Samples a run of total_steps reads from each source: every mixture epoch reads its first
    steps_per_epoch * global_batch positions (the incomplete last step is skipped)."""
    epochs, rest = divmod(total_steps, steps_per_epoch)
    n, used = len(mix), steps_per_epoch * global_batch
    counts = sum((mix.counts_before(e * n + used) - mix.counts_before(e * n) for e in range(epochs)), 0)
    return counts + mix.counts_before(epochs * n + rest * global_batch) - mix.counts_before(epochs * n)


def log_mixture_plan(mix, counts) -> list[dict]:
    """One start-up line per source: its share, samples and effective epochs at the planned
    steps (``planned_counts``); a source read more than once (epochs > 1) is said to be over-sampled."""
    rows = mix.describe(counts)
    for r in rows:
        over = r["epochs"] > 1
        (log.warning if over else log.info)(
            "mixture source %s: weight %.4f, %d samples, %d planned = %.3f epochs%s",
            r["name"],
            r["weight"],
            r["samples"],
            r["planned_samples"],
            r["epochs"],
            " (over-sampled: its samples repeat)" if over else "",
        )
    return rows
