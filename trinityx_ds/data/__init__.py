"""Data room: format adapters, chat rendering with response-only labels, task/mixture data sets."""
from trinityx_ds.data.dataset import (Batches, build_pair_datasets, build_task_datasets, collate, collate_pairs,
                                      heldout_indices, mixture, pack, prompt_key, split_tasks)
from trinityx_ds.data.formats import (REFUSAL, DataError, LoadReport, MCItem, PreferencePair, hh_rlhf_pairs,
                                      parse_hh_dialogue, read_pairs, read_source, truthfulqa_mc)
from trinityx_ds.data.render import IGNORE, render_example, render_pair, render_text, shift_labels

__all__ = ["IGNORE", "REFUSAL", "Batches", "DataError", "LoadReport", "MCItem", "PreferencePair", "build_pair_datasets",
           "build_task_datasets", "collate", "collate_pairs", "heldout_indices", "hh_rlhf_pairs", "mixture", "pack",
           "parse_hh_dialogue", "prompt_key", "read_pairs", "read_source", "render_example", "render_pair",
           "render_text", "shift_labels", "split_tasks", "truthfulqa_mc"]
