"""Data room: format adapters, chat rendering with response-only labels, task/mixture data sets."""
from trinityx_ds.data.dataset import Batches, build_task_datasets, collate, heldout_indices, mixture, pack
from trinityx_ds.data.formats import (REFUSAL, DataError, LoadReport, MCItem, PreferencePair, hh_rlhf_pairs,
                                      parse_hh_dialogue, read_source, truthfulqa_mc)
from trinityx_ds.data.render import IGNORE, render_example, render_text, shift_labels

__all__ = ["IGNORE", "REFUSAL", "Batches", "DataError", "LoadReport", "MCItem", "PreferencePair", "build_task_datasets",
           "collate", "heldout_indices", "hh_rlhf_pairs", "mixture", "pack", "parse_hh_dialogue", "read_source",
           "render_example", "render_text", "shift_labels", "truthfulqa_mc"]
